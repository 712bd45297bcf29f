"""compare (answers side by side, escaped) and chat (a multi-turn chat box) on real (tiny) models."""

import pytest

import nbalign
from nbalign.errors import NbalignError
from helpers import chats

HOSTILE = "<script>alert('x')</script><img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    nbalign.lora(r=4, model=tiny_model)
    return nbalign.sft(chats(8), model=tiny_model, out=str(tmp_path_factory.mktemp("views") / "run"), epochs=1,
                       batch_size=4, learning_rate=5e-2, eval_points=1, probe=False, fewshot=0)


def test_compare_answers_each_prompt_with_each_model_as_generate_does(tiny_model, tiny_run):
    prompts = ["What is the capital of France?", {"prompt": "Name a colour."},
               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "(reference)"}]}]
    frame = nbalign.compare([tiny_model, str(tiny_run.path)], prompts, max_new_tokens=6)
    assert list(frame.columns) == ["prompt", tiny_model, str(tiny_run.path)]
    assert list(frame["prompt"]) == ["What is the capital of France?", "Name a colour.", "Hi"]
    for model in (tiny_model, str(tiny_run.path)):
        expected = nbalign.generate(model, ["What is the capital of France?", "Name a colour.",
                                            [{"role": "user", "content": "Hi"}]], max_new_tokens=6)
        assert list(frame[model]) == expected
    page = frame._repr_html_()
    assert "method: sft" in page and "words" in page
    assert frame.head(1)._repr_html_().count("<tr>") == 2  # still a DataFrame that renders side by side


def test_compare_escapes_hostile_prompts_and_answers(tiny_model):
    frame = nbalign.compare([tiny_model], [HOSTILE], max_new_tokens=4)
    frame[tiny_model] = [HOSTILE]  # what a model could answer
    page = frame._repr_html_()
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    with pytest.raises(NbalignError, match="different models"):
        nbalign.compare([tiny_model, tiny_model], ["Hi"])


def test_chat_keeps_the_conversation_across_turns(tiny_run):
    model = str(tiny_run.path)
    box = nbalign.chat(model, max_new_tokens=5, system="Be brief.")
    first = box.send("Hello there")
    second = box.send("And again?")
    assert [m["role"] for m in box.messages] == ["system", "user", "assistant", "user", "assistant"]
    history = box.messages[:4]
    assert second == nbalign.generate(model, [history], max_new_tokens=5)[0]  # the whole conversation was sent
    assert first == nbalign.generate(model, [box.messages[:2]], max_new_tokens=5)[0]
    box.send(HOSTILE)
    assert "<script>" not in box.log.value and "&lt;script&gt;" in box.log.value
    box.clear()
    assert box.messages == [{"role": "system", "content": "Be brief."}]
    assert box.text.value == ""


def test_a_chat_turn_that_fails_or_is_interrupted_leaves_no_unanswered_turn(tiny_model, monkeypatch):
    """Interrupting the kernel while the model writes (or an error in generation) must not leave the user's turn
    in the conversation: the next turn would send two user turns in a row (templates that require alternating
    roles then refuse every later turn) and show a message the log never showed before."""
    from nbalign import generation

    box = nbalign.chat(tiny_model, max_new_tokens=3)
    box.send("Hello there")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(generation, "generate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            box.text.value = "a turn that is interrupted"  # what Enter in the text box does
    assert [m["role"] for m in box.messages] == ["user", "assistant"]
    box.send("And again?")
    assert [m["role"] for m in box.messages] == ["user", "assistant", "user", "assistant"]
    assert "interrupted" not in box.log.value
