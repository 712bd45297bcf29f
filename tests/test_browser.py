"""The labelling widgets in a real front end: JupyterLab 4 and Notebook 7 in headless Chromium (tests/browser.py).

What a person does: run the notebook, click the buttons, press the keys with the widget focused. What must
hold: exactly those labels, in that order, are in the store (read from this process, as another program would);
model text shows literally and runs nothing; the keys never reach the notebook (in command mode 1 and 2 would
turn the cell into a heading, m into Markdown). The delay from a click to the next item on screen is printed."""

from __future__ import annotations

import json
import sqlite3
import statistics
import time
from pathlib import Path

import pytest

import browser

pytestmark = pytest.mark.browser

HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=1">'
PAIR_PROMPTS = ["<b>first</b> question", "second question", "third question", "fourth question", "fifth question"]
THUMB_PROMPTS = ["thumb one", "thumb two", "thumb three", "thumb four"]

SETUP = f"""\
from nbalign.labeling.widgets import PairLabeler, ThumbsLabeler
HOSTILE = {HOSTILE!r}
def hostile(prompt):
    return HOSTILE + " answer to " + prompt
def plain(prompt):
    return "plain answer to " + prompt"""
PAIRS = f"""\
pairs = PairLabeler({PAIR_PROMPTS!r}, model=[hostile, plain], store="labels.sqlite", labeller="tester")
pairs.wait(1)
pairs"""
THUMBS = f"""\
thumbs = ThumbsLabeler({THUMB_PROMPTS!r}, model=hostile, store="thumbs.sqlite", labeller="tester")
thumbs.wait(1)
thumbs"""

# Installed on the page: the time of the last click or key inside a labeller, and of the first change of its
# prompt after it (the next item on screen), per widget.
TIMING = """
root => {
  const prompt = root.querySelector('.nbalign-prompt');
  root.__times = [];
  let t0 = null, before = null;
  const start = () => { t0 = performance.now(); before = prompt.textContent; };
  root.addEventListener('click', e => { if (e.target.closest('button')) start(); }, true);
  root.addEventListener('keydown', start, true);
  new MutationObserver(() => {
    if (t0 !== null && prompt.textContent !== before) { root.__times.push(performance.now() - t0); t0 = null; }
  }).observe(prompt, {childList: true, characterData: true, subtree: true});
}
"""


def labels_in(path: Path) -> list[tuple[str, str]]:
    """(choice, prompt) of every row of the store's log, oldest first (undos included)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT l.choice, i.prompt FROM labels l JOIN items i ON i.id = l.item ORDER BY l.id")
        return [(choice, json.loads(prompt)) for choice, prompt in rows]


def shown(widget) -> str:
    return widget.locator(".nbalign-prompt").inner_text()


def act(page, widget, do, expect_prompt: str, timeout: float = 10) -> None:
    """Do a click or a key press, then wait until the widget shows `expect_prompt` and its buttons are live."""
    do()
    page.wait_for_function(
        "([root, text]) => root.querySelector('.nbalign-prompt').textContent === text"
        " && !root.querySelector('button.nbalign-btn[data-action=\"undo\"]').disabled",
        arg=[widget.element_handle(), expect_prompt], timeout=timeout * 1000)


def check_no_notebook_command(page, sources_before: list[str], cells: int) -> None:
    """The keys pressed in the widgets changed nothing in the notebook: same cells, all code, same text."""
    assert page.locator(".jp-Notebook .jp-Cell").count() == cells
    assert page.locator(".jp-Notebook .jp-MarkdownCell").count() == 0, "a key press turned a cell into Markdown"
    assert page.locator(".jp-Notebook .jp-Cell .cm-content").all_inner_texts() == sources_before


def check_hostile_text(page, widget, sides: list[str]) -> None:
    texts = [widget.locator(s).inner_text() for s in sides]
    assert any(HOSTILE in t for t in texts), texts  # shown literally, as data
    assert widget.locator("img, script").count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"


def shift_enter_runs_the_cell(page, widget, cell: int) -> None:
    """With the widget focused, Shift+Enter still runs its cell (the keys that run cells pass its key guard)."""
    widget.locator(".nbalign-prompt").click()
    assert widget.evaluate("root => root.contains(document.activeElement)")
    prompt = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").nth(cell)
    before = prompt.inner_text()
    page.keyboard.press("Shift+Enter")
    page.wait_for_function("([p, before]) => /\\[\\d+\\]/.test(p.textContent) && p.textContent !== before",
                           arg=[prompt.element_handle(), before], timeout=15000)


def label_in_browser(app: str, tmp_path: Path, thumbs: bool = True) -> dict:
    root, home = browser.workspace(app, tmp_path)
    cells = [SETUP, PAIRS] + ([THUMBS] if thumbs else [])
    browser.write_notebook(root / "labels.ipynb", cells)
    started, times = time.perf_counter(), {}
    with browser.jupyter_server(app, root, home) as server, browser.chromium_page(home / "profile") as page:
        times["server"] = time.perf_counter() - started
        browser.open_notebook(page, server, "labels.ipynb")
        times["page"] = time.perf_counter() - started
        loaded = len(page.messages)  # (Notebook 7.6 itself throws "reading 'schema'" while it loads a notebook)
        browser.run_all(page, len(cells))
        labelers = page.locator(".nbalign-labeler")
        labelers.nth(len(cells) - 2).wait_for(timeout=15000)
        times["ran"] = time.perf_counter() - started
        sources = page.locator(".jp-Notebook .jp-Cell .cm-content").all_inner_texts()

        pair = labelers.nth(0)
        pair.locator(".nbalign-prompt").get_by_text(PAIR_PROMPTS[0]).wait_for(timeout=15000)
        pair.evaluate(TIMING)
        check_hostile_text(page, pair, [".nbalign-answer-a", ".nbalign-answer-b"])
        button = pair.get_by_role("button", name="A", exact=True)
        act(page, pair, button.click, PAIR_PROMPTS[1])
        act(page, pair, pair.get_by_role("button", name="B", exact=True).click, PAIR_PROMPTS[2])
        act(page, pair, pair.get_by_role("button", name="tie", exact=True).click, PAIR_PROMPTS[3])
        pair.locator(".nbalign-prompt").click()  # focus the widget as a person does: click on it
        assert page.evaluate("document.activeElement.classList.contains('nbalign-labeler')")
        act(page, pair, lambda: page.keyboard.press("2"), PAIR_PROMPTS[4])
        act(page, pair, lambda: page.keyboard.press("u"), PAIR_PROMPTS[3])  # the undone item is shown again
        page.keyboard.press("m")  # not a widget key: the notebook must not get it either while the widget has focus
        pair_times = pair.evaluate("root => root.__times")

        thumb_times = []
        if thumbs:
            thumb = labelers.nth(1)
            thumb.locator(".nbalign-prompt").get_by_text(THUMB_PROMPTS[0]).wait_for(timeout=15000)
            thumb.evaluate(TIMING)
            check_hostile_text(page, thumb, [".nbalign-answer"])
            act(page, thumb, thumb.get_by_role("button", name="up").click, THUMB_PROMPTS[1])
            act(page, thumb, thumb.get_by_role("button", name="down").click, THUMB_PROMPTS[2])
            thumb.locator(".nbalign-prompt").click()
            act(page, thumb, lambda: page.keyboard.press("1"), THUMB_PROMPTS[3])
            act(page, thumb, lambda: page.keyboard.press("u"), THUMB_PROMPTS[2])
            thumb_times = thumb.evaluate("root => root.__times")

        time.sleep(0.3)  # time for a stray command to have done its harm
        check_no_notebook_command(page, sources, len(cells))
        check_hostile_text(page, pair, [".nbalign-answer-a", ".nbalign-answer-b"])
        page.screenshot(path=str(tmp_path / f"{app}.png"))
        errors = [m for m in page.messages[loaded:] if "pageerror" in m or "nbalign" in m.lower()]
        assert not errors, errors
        times["labelled"] = time.perf_counter() - started
        shift_enter_runs_the_cell(page, pair, 1)

    assert labels_in(root / "labels.sqlite") == [
        ("A", PAIR_PROMPTS[0]), ("B", PAIR_PROMPTS[1]), ("tie", PAIR_PROMPTS[2]), ("B", PAIR_PROMPTS[3]),
        ("undo", PAIR_PROMPTS[3])]
    if thumbs:
        assert labels_in(root / "thumbs.sqlite") == [
            ("up", THUMB_PROMPTS[0]), ("down", THUMB_PROMPTS[1]), ("up", THUMB_PROMPTS[2]), ("undo", THUMB_PROMPTS[2])]
    assert server.proc.poll() is not None and not server.leftover  # no server or kernel left behind
    delays = pair_times + thumb_times
    assert len(delays) == (5 + 4 * thumbs), delays
    print(f"\n{app}: server up {times['server']:.1f} s, notebook open {times['page']:.1f} s, cells ran "
          f"{times['ran']:.1f} s, labelled {times['labelled']:.1f} s; click/key to next item on screen: "
          f"median {statistics.median(delays):.0f} ms, max {max(delays):.0f} ms "
          f"({', '.join(f'{d:.0f}' for d in delays)})")
    return {"delays": delays, "times": times}


def test_labelling_in_jupyterlab(tmp_path):
    label_in_browser("lab", tmp_path)


def test_labelling_in_notebook7(tmp_path):
    label_in_browser("notebook", tmp_path, thumbs=False)


def test_typing_in_another_cell_while_a_labeller_appears_labels_nothing(tmp_path):
    """A person runs the labeller's cell and goes on typing in the next one while the widget appears (a real
    model takes seconds to write the first candidates): their keys stay in their cell. A widget that took the
    focus when it rendered would turn the x, s, 1, 2, 0, u they type into labels."""
    reason = browser.missing("lab")
    if reason:
        pytest.skip(reason)
    root, home = tmp_path / "work", tmp_path / "home"
    root.mkdir()
    home.mkdir()
    slow = PAIRS.replace("pairs.wait(1)", "import time\ntime.sleep(1.5)  # a model writing\npairs.wait(1)")
    cells = [SETUP, slow, ""]
    browser.write_notebook(root / "labels.ipynb", cells)
    typed = "x = 10  # 1 or 2 sets; u"
    with browser.jupyter_server("lab", root, home) as server, browser.chromium_page(home / "profile") as page:
        browser.open_notebook(page, server, "labels.ipynb")
        browser.run_all(page, 1)
        editors = page.locator(".jp-Notebook .jp-Cell .cm-content")
        editors.nth(1).click()
        page.keyboard.press("Control+Enter")  # run the labeller's cell ...
        editors.nth(2).click()  # ... and go on to write the next one meanwhile
        for key in typed:
            page.keyboard.type(key, delay=0)
            time.sleep(0.12)
        page.locator(".nbalign-labeler").wait_for(timeout=15000)
        time.sleep(0.3)
        written = editors.nth(2).inner_text()
        focus = page.evaluate("document.activeElement.className")
        page.screenshot(path=str(tmp_path / "typing.png"))

        # A click on the widget gives it the keys, and the outline and the hint say so; Shift+Enter, pressed
        # there, still runs the cell (the widget's key guard lets the keys that run cells through).
        widget = page.locator(".nbalign-labeler")
        hint_before = widget.locator(".nbalign-hint").inner_text()
        widget.locator(".nbalign-prompt").click()
        hint_after = widget.locator(".nbalign-hint").inner_text()
        outline = widget.evaluate("root => root.classList.contains('nbalign-keys-on') && getComputedStyle(root).outlineStyle")
        page.screenshot(path=str(tmp_path / "focused.png"))
        shift_enter_runs_the_cell(page, widget, 1)
        page.locator(".nbalign-labeler .nbalign-prompt").get_by_text(PAIR_PROMPTS[0]).wait_for(timeout=15000)
        cells = page.locator(".jp-Notebook .jp-Cell").count()
    assert not labels_in(root / "labels.sqlite"), "keys typed in another cell were stored as labels"
    assert written == typed, f"the cell got {written!r} of {typed!r}; focus went to {focus!r}"
    assert hint_before == "click here, then keys 1 / 2 / 0 / x / s / u", hint_before
    assert hint_after.startswith("keys on: 1 A · 2 B · 0 tie") and outline == "solid", (hint_after, outline)
    assert cells == 3  # Shift+Enter ran the cell and moved on; it added no cell
    assert not server.leftover
