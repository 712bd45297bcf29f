"""What the benchmarks share: the clock, memory and CPU readers, the machine description, the
subprocess-per-side runner, medians and ratios, and the Markdown table.

Import it first in a benchmark script (`from harness import ...`, bench/ is on sys.path when the script
runs): the process's clock, `T0`, starts when this module is imported, before torch & co. are. Standard
library only at import; torch and peft are imported inside the two functions that need them.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # a process's clock: the worker starts timing before its heavy imports

import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

# The adapter both benchmarks train, on every side.
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "nbalign")


# ------------------------------------------------------------------------------------------------
# readings inside a process
# ------------------------------------------------------------------------------------------------
def now() -> float:
    """Seconds since this process's clock started (the import of this module)."""
    return time.perf_counter() - T0


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def cpu_seconds() -> float:
    """CPU seconds this process has used so far, all threads, user + system. Less sensitive than wall time to
    other work on the machine (though not immune: spinning OpenMP threads burn CPU while they wait)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cuda_peak_mib() -> float | None:
    """`torch.cuda.max_memory_allocated()` in MiB; None without CUDA."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def preload(*modules: str) -> None:
    """Import `modules` now, so that their import time falls outside the spans timed after."""
    for name in modules:
        importlib.import_module(name)


class Span:
    """Wall and CPU seconds over a stretch of code: started when made, frozen by `stop()`."""

    def __init__(self) -> None:
        self.start = now()
        self._cpu0 = cpu_seconds()
        self.end: float | None = None  # on the process clock (`now()`), once stopped
        self.wall: float | None = None
        self.cpu: float | None = None

    def elapsed(self) -> float:
        """Wall seconds since the start, the span still running."""
        return now() - self.start

    def stop(self) -> Span:
        self.end, cpu = now(), cpu_seconds()
        self.wall, self.cpu = self.end - self.start, cpu - self._cpu0
        return self


def peft_lora_config():
    """`LORA` as the plain-TRL sides give it: a peft LoraConfig for a causal LM."""
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")


# ------------------------------------------------------------------------------------------------
# the machine
# ------------------------------------------------------------------------------------------------
def loadavg(ndigits: int | None = 2) -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (rounded to `ndigits`, unless None); None where unknown."""
    try:
        load = os.getloadavg()
    except OSError:
        return None
    return [x if ndigits is None else round(x, ndigits) for x in load]


def machine(packages=PACKAGES) -> dict:
    """Python, platform, processor, CPU count and the installed versions of `packages`."""
    import importlib.metadata as md

    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }


# ------------------------------------------------------------------------------------------------
# one side, one subprocess
# ------------------------------------------------------------------------------------------------
@dataclass
class WorkerRun:
    result: dict  # what the worker passed to write_result
    wall_s: float  # the subprocess, start to exit, timed from the driver
    loadavg_before: list[float] | None
    loadavg_after: list[float] | None


class WorkerFailed(RuntimeError):
    def __init__(self, returncode: int, log: Path):
        self.returncode, self.log = returncode, log
        super().__init__(f"worker exited {returncode} without a result; see {log}")

    def tail(self, lines: int = 30) -> str:
        return "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def run_worker(script, args: list[str], *, result: Path, log: Path, env: dict | None = None,
               cwd=None) -> WorkerRun:
    """Run `python SCRIPT *ARGS --result RESULT` in a process of its own and wait for it (one side at a time:
    never in parallel, so that the peak RSS is the side's own and the sides do not compete for the CPU).
    Its stdout and stderr go to LOG; `env` entries are defaults over this process's environment. Returns the
    dict the worker wrote with `write_result`, with the wall time and the 1-minute load average around it;
    raises WorkerFailed when the worker fails or writes no result."""
    environ = dict(os.environ)
    for key, value in (env or {}).items():
        environ.setdefault(key, value)
    result = Path(result)
    before = loadavg()
    start = time.perf_counter()
    with Path(log).open("w") as fh:
        proc = subprocess.run([sys.executable, str(Path(script).resolve()), *args, "--result", str(result)],
                              stdout=fh, stderr=subprocess.STDOUT, env=environ, cwd=cwd)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result.is_file():
        raise WorkerFailed(proc.returncode, Path(log))
    return WorkerRun(json.loads(result.read_text()), wall, before, loadavg())


def add_worker_options(parser) -> None:
    """The hidden options a script's worker side is started with: `--worker SIDE --cfg FILE`, and the
    `--result FILE` run_worker adds."""
    import argparse

    for option in ("--worker", "--cfg", "--result"):
        parser.add_argument(option, help=argparse.SUPPRESS)


def write_result(path, result: dict) -> None:
    """The worker's side of run_worker: hand `result` back to the driver."""
    Path(path).write_text(json.dumps(result, indent=2, default=str))


# ------------------------------------------------------------------------------------------------
# numbers and tables
# ------------------------------------------------------------------------------------------------
def aggregate(runs: list[dict], keys) -> dict:
    """The first run, with the number of runs as `repeats` and each of `keys` replaced by its median over the
    runs that have it."""
    out = dict(runs[0])
    out["repeats"] = len(runs)
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    return out


def ratio(a, b) -> float | None:
    """a / b; None when either is missing or b is zero."""
    if a is None or b is None or not b:
        return None
    return a / b


def ratios(a: dict, b: dict, keys, ndigits: int = 3) -> dict:
    """{key: a[key] / b[key], rounded} for each of `keys` (None where there is no ratio)."""
    return {k: (round(q, ndigits) if (q := ratio(a.get(k), b.get(k))) is not None else None) for k in keys}


def fmt_ratio(q, missing: str = "-") -> str:
    return missing if q is None else f"{q:.2f}x"


def fmt(v, digits: int = 1) -> str:
    """A table cell: '-' for None, yes/no, thousands separators, `digits` decimals for floats."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; an empty cell is written `| |`."""

    def line(cells) -> str:
        return "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"

    return "\n".join([line(header), "|---" * len(header) + "|", *(line(r) for r in rows)])
