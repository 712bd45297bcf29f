"""How long `%load_ext nbalign` takes in a fresh IPython, and that it imports no heavy library.

    python bench/bench_import.py            # 5 fresh processes; min / median / max seconds

A benchmark, not a test: it reports and asserts nothing about time (tests/test_magics.py checks that no
heavy library is imported).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

CODE = (
    "import sys, time, json\n"
    "from IPython.core.interactiveshell import InteractiveShell\n"
    "ip = InteractiveShell.instance()\n"
    "t = time.perf_counter()\n"
    "ip.run_line_magic('load_ext', 'nbalign')\n"
    "dt = time.perf_counter() - t\n"
    "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]\n"
    "print(json.dumps({'seconds': dt, 'heavy': heavy}))\n"
)


def main(repeats: int = 5) -> None:
    rows = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    seconds = [r["seconds"] for r in rows]
    print(f"%load_ext nbalign: min {min(seconds):.3f} s, median {statistics.median(seconds):.3f} s, "
          f"max {max(seconds):.3f} s over {repeats} fresh processes; heavy libraries imported: "
          f"{sorted({m for r in rows for m in r['heavy']}) or 'none'}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
