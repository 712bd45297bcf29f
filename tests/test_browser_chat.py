"""The chat box (`nbalign.chat`) in a real front end: JupyterLab 4 and Notebook 7 in headless Chromium
(tests/browser.py), talking to a real (tiny, random) model in the notebook's kernel.

What a person does: run the cell, type a message and press Enter, type another and click Send, type some HTML,
click New chat, type again. What must hold: the log shows each turn as "you: ..." then "model: ...", every
earlier turn stays on screen, the text box empties after each message; in the kernel, the Chat keeps
user/assistant turns in order and the model is given the whole conversation through its chat template at each
answer (what the model's forward pass receives is recorded in the kernel and compared with the template);
typed HTML shows literally and runs nothing; New chat empties the log and the next answer starts afresh."""

from __future__ import annotations

import json
import time

import pytest

import browser

pytestmark = pytest.mark.browser

HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=1">'
FIRST, SECOND, FRESH = "hello there", "and a second one", "a fresh start"

# The tiny random model is near uniform: greedy decoding gives only newlines (stripped to ""), so the chat
# samples, seeded, to show non-empty answers. Before any turn, the kernel records what the model is given at
# each answer: the prompt of generate's first forward pass (the one with more than one new token).
SETUP = """\
import json
import nbalign
from nbalign import generation
MODEL = {model!r}
chat = nbalign.chat(MODEL, max_new_tokens=8, do_sample=True, seed=0)
model, tokenizer = generation.CACHE.get(generation.cache_key(MODEL), lambda: generation.load_for_inference(MODEL))
seen = []
def record(module, args, kwargs):
    ids = kwargs.get("input_ids")
    if ids is not None and ids.shape[1] > 1:
        seen.append(tokenizer.decode(ids[0]))
model.register_forward_pre_hook(record, with_kwargs=True)
chat"""
# What the kernel holds: the Chat's messages, what the model was given, and what the chat template makes of the
# conversation up to each user turn (so `seen` can be compared with it as is).
CHECK = """\
print(json.dumps({"messages": chat.messages, "seen": seen,
                  "template": [tokenizer.apply_chat_template(chat.messages[:i + 1], tokenize=False,
                                                             add_generation_prompt=True)
                               for i, m in enumerate(chat.messages) if m["role"] == "user"]}))"""


def shown(log) -> list[str]:
    """The log's lines as the page shows them (text, not markup): "you: ...", "model: ...", or the empty note."""
    return log.locator(".widget-html-content > div").evaluate_all("ds => ds.map(d => d.textContent)")


def say(page, chat, log, text: str, how: str, turns: int, timeout: float = 60) -> None:
    """Type `text` in the chat's box and send it (Enter or a click on Send); wait until the log shows `turns`
    lines ending with the model's answer."""
    box = chat.locator(".widget-text input")
    before = log.inner_html()
    box.click()
    page.keyboard.type(text)
    if how == "enter":
        page.keyboard.press("Enter")
    else:
        chat.get_by_role("button", name="Send", exact=True).click()
    page.wait_for_function(
        """([log, before]) => { const d = [...log.querySelectorAll('.widget-html-content > div')];
                                 return log.innerHTML !== before && d.length > 0
                                        && d[d.length - 1].textContent.startsWith('model:'); }""",
        arg=[log.element_handle(), before], timeout=timeout * 1000)
    assert len(shown(log)) == turns, shown(log)
    assert box.input_value() == "", "the text box kept the message after it was sent"


def kernel_state(page, cell: int, timeout: float = 30) -> dict:
    """Run the CHECK cell (a click in it, Control+Enter) and read what it printed."""
    prompt = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").nth(cell)
    before = prompt.inner_text()
    page.locator(".jp-Notebook .jp-Cell .cm-content").nth(cell).click()
    page.keyboard.press("Control+Enter")
    page.wait_for_function("([p, before]) => /\\[\\d+\\]/.test(p.textContent) && p.textContent !== before",
                           arg=[prompt.element_handle(), before], timeout=timeout * 1000)
    output = page.locator(".jp-Notebook .jp-Cell").nth(cell).locator(".jp-OutputArea-output")
    text = output.inner_text()
    try:
        return json.loads(text)
    except ValueError:
        raise AssertionError(f"the check cell printed no JSON:\n{browser.outputs_text(page)}") from None


def lines(messages: list[dict]) -> list[str]:
    return [f"{'you' if m['role'] == 'user' else 'model'}: {m['content']}" for m in messages]


@pytest.mark.parametrize("app", ["lab", "notebook"])
def test_chatting_in_the_browser_keeps_the_conversation_and_shows_text_literally(app, tmp_path, tiny_model):
    root, home = browser.workspace(app, tmp_path)
    cells = [SETUP.format(model=tiny_model), CHECK]
    browser.write_notebook(root / "chat.ipynb", cells)
    started, times = time.perf_counter(), {}
    with browser.jupyter_server(app, root, home) as server, browser.chromium_page(home / "profile") as page:
        browser.open_notebook(page, server, "chat.ipynb")
        loaded = len(page.messages)  # (Notebook 7.6 itself throws "reading 'schema'" while it loads a notebook)
        browser.run_all(page, 1, timeout=120)  # the kernel imports torch and loads the model
        times["ready"] = time.perf_counter() - started
        chat = page.locator(".jp-OutputArea-output .widget-vbox").filter(has_text="chat with")
        chat.wait_for(timeout=30000)
        log = chat.locator(".widget-html").nth(1)
        assert shown(log) == ["No messages yet."]

        # 1. Enter sends the first message, a click on Send the second; both turns stay on screen.
        say(page, chat, log, FIRST, "enter", 2)
        assert shown(log)[0] == f"you: {FIRST}" and shown(log)[1].startswith("model: ")
        say(page, chat, log, SECOND, "click", 4)
        screen = shown(log)
        assert screen[:1] == [f"you: {FIRST}"] and screen[2] == f"you: {SECOND}", screen

        # 2. In the kernel: user/assistant/user/assistant, exactly what is on screen, and the model was given
        # the whole conversation at each answer (the second answer's prompt holds the first turn and its answer).
        state = kernel_state(page, 1)
        messages = state["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"], messages
        assert [messages[0]["content"], messages[2]["content"]] == [FIRST, SECOND]
        assert all(m["content"].strip() for m in messages), messages  # the model did answer
        assert lines(messages) == screen
        assert state["seen"] == state["template"], state
        assert messages[1]["content"] in state["seen"][1] and FIRST in state["seen"][1]

        # 3. Typed HTML is shown as text and runs nothing.
        say(page, chat, log, HOSTILE, "enter", 6)
        time.sleep(0.3)  # time for an injected onerror to have fired
        assert shown(log)[4] == f"you: {HOSTILE}", shown(log)
        assert log.locator("img, script").count() == 0
        assert page.evaluate("typeof window.__pwned") == "undefined"

        # 4. New chat empties the log, and the next answer is to the new conversation alone.
        chat.get_by_role("button", name="New chat", exact=True).click()
        page.wait_for_function("log => log.textContent.includes('No messages yet.')", arg=log.element_handle(),
                               timeout=15000)
        assert shown(log) == ["No messages yet."]
        say(page, chat, log, FRESH, "enter", 2)
        state = kernel_state(page, 1)
        assert [m["role"] for m in state["messages"]] == ["user", "assistant"], state["messages"]
        assert state["messages"][0]["content"] == FRESH
        assert lines(state["messages"]) == shown(log)
        assert len(state["seen"]) == 4 and state["seen"][-1] == state["template"][0], state["seen"]

        # The keys typed in the chat box did nothing to the notebook (no cell added, none turned to Markdown).
        assert page.locator(".jp-Notebook .jp-Cell").count() == len(cells)
        assert page.locator(".jp-Notebook .jp-MarkdownCell").count() == 0
        errors = [m for m in page.messages[loaded:] if "pageerror" in m or "nbalign" in m.lower()]
        assert not errors, errors
        page.screenshot(path=str(tmp_path / f"chat-{app}.png"))
        times["chatted"] = time.perf_counter() - started
    assert server.proc.poll() is not None and not server.leftover  # no server or kernel left behind
    print(f"\n{app}: model loaded in the kernel {times['ready']:.1f} s, four turns, two checks and a new chat "
          f"done {times['chatted']:.1f} s")
