"""The click-to-effect delay in a real JupyterLab while a --live round trains in the kernel's background.

A notebook makes a pair labeller (answers written by two functions, so only training loads the CPU) and starts
`nbalign.dpo(pairs, live=True, live_every=2)` on the built-in model. Headless chromium clicks A twice to start
a round, waits until the round is training, then clicks A every 0.3 s and records, in the page, the time from
each click to the next item's prompt on screen (the whole round trip: browser -> kernel -> store commit ->
widget state -> browser). The same clicks are made idle first.

    python bench/bench_browser_live.py      # about 2 minutes; results in bench/results/browser_live.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import browser  # noqa: E402
from test_browser import TIMING  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
N = 60
CELLS = [
    f"""\
import contextlib, io, logging
with contextlib.redirect_stderr(io.StringIO()):  # bitsandbytes' note about its CPU kernels, on import
    logging.disable(logging.WARNING)
    import bitsandbytes, trl, peft
    logging.disable(logging.NOTSET)
import nbalign
from nbalign.labeling.widgets import PairLabeler
def short(p): return "Answer: " + p
def long(p): return "Let me tell you at length about " + p
pairs = PairLabeler([f"question {{i}}" for i in range({N})], model=[short, long], store="labels.sqlite", ahead={N})
pairs.wait({N})
pairs""",
]
LIVE = ("live = nbalign.dpo(pairs, out='runs/live', live=True, live_every=22, watch=False, max_steps=10, "
        "batch_size=4)\nlive")


def clicks(page, widget, k: int, pause: float) -> list[float]:
    widget.evaluate("root => { root.__times = []; }")
    for _ in range(k):
        before = widget.locator(".nbalign-prompt").inner_text()
        widget.get_by_role("button", name="A", exact=True).click()
        page.wait_for_function("([w, b]) => w.querySelector('.nbalign-prompt').textContent !== b",
                               arg=[widget.element_handle(), before], timeout=30000)
        time.sleep(pause)
    return widget.evaluate("root => root.__times")


def summary(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 1),
            "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1), "max_ms": round(ms[-1], 1)}


def main() -> None:
    reason = browser.missing("lab")
    if reason:
        sys.exit(f"cannot run: {reason}")
    tmp = Path(tempfile.mkdtemp(prefix="nbalign-browser-live-"))
    root, home = tmp / "work", tmp / "home"
    root.mkdir()
    home.mkdir()
    browser.write_notebook(root / "live.ipynb", CELLS + [LIVE])
    with browser.jupyter_server("lab", root, home) as server, browser.chromium_page(home / "profile") as page:
        browser.open_notebook(page, server, "live.ipynb")
        browser.run_all(page, 2)
        widget = page.locator(".nbalign-labeler").first
        widget.get_by_text("question 0").first.wait_for(timeout=60000)
        widget.evaluate(TIMING)
        idle = clicks(page, widget, 20, 0.3)  # 20 labels: the round starts at 22
        clicks(page, widget, 2, 0.3)
        page.get_by_text("round 1: step").first.wait_for(timeout=180000)
        during = clicks(page, widget, 20, 0.3)
        state = page.locator(".nbalign-live").first.inner_text()
        page.screenshot(path=str(tmp / "live.png"))
    result = {"idle": summary(idle), "while_training": summary(during), "live_state_after": state,
              "screenshot": str(tmp / "live.png")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "browser_live.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
