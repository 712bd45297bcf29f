"""AI labels: judges (functions, reward model runs, causal LMs asked in both orders), pre-labels written to the
store with provenance and never over a person's, agreement beside the longer/shorter rules, and the
constitutional revise step; (slow) the built-in judge on a factual principle."""

import json

import pytest
from helpers import close

import nbalign
from nbalign import NbalignError
from nbalign.labeling.agreement import LONGER, SHORTER, agreement, sign_test, wilson
from nbalign.labeling.constitution import DEFAULT_CONSTITUTION, revise
from nbalign.labeling.judge import LMJudge, Verdict, make_judge, next_token_odds, prelabel
from nbalign.labeling.store import LabelStore

QUESTIONS = ["What is 2 plus 2?", "Name a colour.", "What is the capital of Italy?", "Say hello."]


def _store(tmp_path, n: int = 4) -> LabelStore:
    """Pairs whose A is always the shorter answer."""
    store = LabelStore(tmp_path / "labels.sqlite", labeller="ann")
    store.add_items([{"kind": "pair", "prompt": q, "a": f"Short {i}.", "b": f"A much longer answer, number {i}.",
                      "source_a": {"model": "m"}, "source_b": {"model": "m"}} for i, q in enumerate(QUESTIONS[:n])])
    return store


def shorter(prompt, a, b):
    return "A" if len(a) < len(b) else "B" if len(b) < len(a) else "tie"


def length(prompt, answer):
    return len(answer)


# ----------------------------------------------------------------------------------------------------
# Function judges


def test_function_judges_pairwise_and_pointwise():
    # f(prompt, a, b): a letter (any case), a number (> 0 prefers A), or (value, reason)
    assert make_judge(shorter).compare("q", "x", "xyz") == Verdict("A", 1.0, "shorter")
    assert make_judge(lambda p, a, b: "b").compare("q", "x", "y").choice == "B"
    assert make_judge(lambda p, a, b: -0.5).compare("q", "x", "y")[:2] == ("B", -0.5)
    assert make_judge(lambda p, a, b: (0, "no idea")).compare("q", "x", "y") == Verdict("tie", 0.0, "no idea")
    # f(prompt, answer) -> a score: the higher-scored answer wins, equal scores tie
    judge = make_judge(length)
    assert judge.labeller == "judge:length"
    choice, score, reason = judge.compare("q", "longer one", "short")
    assert (choice, score) == ("A", 5.0) and "A 10, B 5" in reason
    assert judge.compare("q", "ab", "cd").choice == "tie"
    assert make_judge(length, margin=10).compare("q", "longer one", "short").choice == "tie"
    # a default argument does not make a pointwise function pairwise
    assert make_judge(lambda prompt, answer, scale=1.0: scale * len(answer)).compare("q", "x", "xy").choice == "B"


@pytest.mark.parametrize("returned, message", [(None, "returned None"), (True, "returned True"),
                                               ("maybe", "returned 'maybe'"), (float("nan"), "returned nan")])
def test_a_function_judge_that_returns_the_wrong_thing_says_so(returned, message):
    with pytest.raises(NbalignError, match=message):
        make_judge(lambda p, a, b: returned).compare("q", "x", "y")


def test_bad_judges_are_refused_with_the_fix(tmp_path):
    def crashes(prompt, a, b):
        raise KeyError("oops")

    with pytest.raises(NbalignError, match="judge function crashes failed: KeyError"):
        make_judge(crashes).compare("q", "x", "y")
    with pytest.raises(NbalignError, match="takes 1 positional arguments"):
        make_judge(lambda answer: 1.0)
    with pytest.raises(NbalignError, match="principles only steer a language-model judge"):
        make_judge(shorter, principles=["Be brief."])
    with pytest.raises(NbalignError, match="42 \\(int\\) cannot judge"):
        make_judge(42)
    with pytest.raises(NbalignError, match="does not exist"):
        make_judge(str(tmp_path / "nowhere"))
    with pytest.raises(NbalignError, match="principles are empty"):
        make_judge(None, principles=["", "  "])


# ----------------------------------------------------------------------------------------------------
# Pre-labels in the store


def test_prelabel_writes_judge_rows_with_provenance_and_never_overrides_people(tmp_path):
    store = _store(tmp_path)
    ids = [it.id for it in store.items()]
    store.label(ids[0], "B")  # a person preferred the longer answer here; the judge will disagree
    store.label(ids[1], "tie")
    counts = prelabel(store, judge=shorter)
    assert counts == {"judged": 4, "A": 4, "B": 0, "tie": 0, "already judged (skipped)": 0}
    rows = [r for r in store.log() if r["origin"] == "judge"]
    assert [r["item"] for r in rows] == ids and {r["labeller"] for r in rows} == {"judge:shorter"}
    note = json.loads(rows[0]["note"])
    assert note == {"reason": "shorter", "score": 1.0, "judge": "function", "principles": []}
    # people's decisions stand, and win over the judge's when training on "any" labels
    assert store.decisions(origin="human") == {ids[0]: "B", ids[1]: "tie"}
    pairs = store.pairs(labels_from="any")
    assert {r["item"]: r["labelled_by"] for r in pairs} == {ids[0]: "human", ids[2]: "judge", ids[3]: "judge"}
    assert pairs[0]["chosen"].startswith("A much longer")  # the person's B, not the judge's A
    # judged items are skipped, unless asked; `items` picks some
    assert prelabel(store, judge=shorter)["already judged (skipped)"] == 4
    again = prelabel(store, judge=lambda p, a, b: "B", items=ids[2:], overwrite=True)
    assert again["judged"] == 2 and again["B"] == 2
    assert store.decisions(labeller="judge:lambda", origin="judge") == {ids[2]: "B", ids[3]: "B"}
    assert store.decisions(origin="human") == {ids[0]: "B", ids[1]: "tie"}


def test_prelabel_records_the_principles_of_a_language_model_judge(tiny_model, tmp_path):
    store = _store(tmp_path, n=2)
    counts = prelabel(store, judge=tiny_model, principles="The answer is short.\nThe answer is polite.")
    assert counts["judged"] == 2
    note = json.loads(store.log()[0]["note"])
    assert note["principles"] == ["The answer is short.", "The answer is polite."]
    assert note["judge"] == "language model" and note["reason"].startswith("P(A better) ")
    # judges that ask differently label under different names: one never replaces another's labels
    tagged = store.log()[0]["labeller"]
    assert tagged.startswith(f"judge:{tiny_model}/") and len(tagged) == len(f"judge:{tiny_model}/") + 6
    assert make_judge(tiny_model).labeller == f"judge:{tiny_model}"
    assert make_judge(tiny_model, mode="pointwise").labeller == f"judge:{tiny_model}/pointwise"
    assert prelabel(store, judge=tiny_model, name="tiny")["judged"] == 0  # already judged: skipped
    assert prelabel(store, judge=tiny_model, name="tiny", overwrite=True)["judged"] == 2
    assert len(store.decisions(labeller="judge:tiny", origin="judge")) == 2


# ----------------------------------------------------------------------------------------------------
# Agreement with people


def test_agreement_when_people_always_prefer_the_shorter_answer(tmp_path):
    store = _store(tmp_path)
    ids = [it.id for it in store.items()]
    extra = store.add_items([{"kind": "pair", "prompt": "q", "a": "same", "b": "also longer"},
                             {"kind": "pair", "prompt": "q", "a": "not judged", "b": "never judged at all"}])
    for i in ids[:3]:
        store.label(i, "A")  # the shorter, always
    store.label(ids[3], "both_bad")
    store.label(extra[0], "skip")
    store.label(extra[1], "A")
    prelabel(store, judge=shorter, items=ids + extra[:1])
    prelabel(store, judge=lambda p, a, b: "tie", items=ids, overwrite=True)
    result = agreement(store)
    rows = {(r["judge"], r["rule"]): r for r in result.rows}
    assert rows[("judge:shorter", "judge")]["rate"] == 1.0 and rows[("judge:shorter", "judge")]["n"] == 3
    assert rows[("judge:shorter", SHORTER)]["rate"] == 1.0
    assert rows[("judge:shorter", LONGER)]["rate"] == 0.0
    # a judge that always says tie scores chance: a tie counts as half
    assert rows[("judge:lambda", "judge")]["rate"] == 0.5 and rows[("judge:lambda", "judge")]["ties"] == 3
    assert result.excluded == {"human both_bad": 1, "human skip": 1, "human decisions no judge labelled": 1}
    assert list(result.table.columns) == ["judge", "rule", "n", "agree", "rate", "low", "high", "ties"]
    low, high = wilson(3, 3)
    assert rows[("judge:shorter", "judge")]["low"] == close(low) and high == 1.0
    # three pairs cannot show that the judge beats a rule that is as good
    text = repr(result)
    assert "judge:shorter agrees with people on 100% of 3 pairs" in text and "could be chance" in text
    assert "Left out: 1 human both_bad, 1 human skip" in text
    assert "<table" in result._repr_html_()


def test_agreement_says_when_the_judge_beats_the_length_rules(tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    rows = []
    for i in range(24):  # the right answer is the longer one half of the time; people always pick it
        right, wrong = f"Right answer {i}", f"Wrong {i}" if i % 2 else f"Wrong, and at some length, {i}"
        rows.append({"kind": "pair", "prompt": f"q{i}", "a": right if i % 3 else wrong, "b": wrong if i % 3 else right})
    ids = store.add_items(rows)
    for i, row in zip(ids, rows):
        store.label(i, "A" if row["a"].startswith("Right") else "B")
    prelabel(store, judge=lambda p, a, b: "A" if a.startswith("Right") else "B")
    result = agreement(store)
    assert result.table.set_index("rule")["rate"]["judge"] == 1.0
    assert result.verdicts[0].endswith("The judge does better than that rule (sign test p = 0.000).")
    empty = agreement(LabelStore(tmp_path / "empty.sqlite"))
    assert empty.rows == [] and "no pair has both" in repr(empty)


def test_agreement_escapes_what_it_shows(tmp_path):
    store = _store(tmp_path, n=1)
    item = store.items()[0].id
    store.label(item, "A")
    store.label(item, "A", labeller="judge:<script>x</script>", origin="judge")
    page = agreement(store)._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_interval_and_sign_test_numbers():
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0


# ----------------------------------------------------------------------------------------------------
# A reward model run as the judge


def test_a_reward_model_run_judges_by_its_scores(tiny_model, in_tmp):
    from nbalign.examples import style_pairs

    rm = nbalign.reward_model(style_pairs()[:4], model=tiny_model, out="runs/rm", batch_size=4, max_steps=1)
    judge = make_judge("runs/rm")
    triples = [(r["prompt"], r["chosen"], r["rejected"]) for r in style_pairs("heldout")[:4]]
    verdicts = judge.compare_many(triples)
    for (prompt, a, b), v in zip(triples, verdicts):
        diff = rm.score(prompt, a) - rm.score(prompt, b)
        assert v.score == close(diff) and v.choice == ("A" if diff > 1e-3 else "B" if diff < -1e-3 else "tie")
    assert make_judge(rm).compare(*triples[0]).score == close(verdicts[0].score)
    assert judge.labeller == "judge:runs/rm" and make_judge(rm, margin=1e9).compare(*triples[0]).choice == "tie"
    with pytest.raises(NbalignError, match="principles only steer a language-model judge"):
        make_judge("runs/rm", principles=["Be brief."])


# ----------------------------------------------------------------------------------------------------
# A causal LM as the judge (the tiny random model: its verdicts mean nothing, their symmetry does)


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_a_language_model_judge_mirrors_when_the_answers_swap(tiny_model, mode):
    judge = make_judge(tiny_model, principles=["The answer is correct."], mode=mode)
    assert isinstance(judge, LMJudge) and judge.mode == mode
    triples = [("What is 2 plus 2?", "4", "It is five, I think."), ("Name a colour.", "Blue is a colour.", "Dog")]
    forward = judge.compare_many(triples)
    backward = judge.compare_many([(p, b, a) for p, a, b in triples])
    mirror = {"A": "B", "B": "A", "tie": "tie"}
    for f, b in zip(forward, backward):
        assert f.score == close(-b.score, rel=1e-3, abs=1e-5) and b.choice == mirror[f.choice]
    # one at a time gives what the batch gave: padding changes nothing
    assert judge.compare(*triples[1]).score == close(forward[1].score, rel=1e-3, abs=1e-5)


def test_the_pairwise_judge_averages_out_position_bias(tiny_model):
    """The random model's P("A") barely depends on the answers, so each order alone prefers whatever it
    shows first (or second); averaged over both orders that bias cancels to a score near zero."""
    from nbalign.generation import load_for_inference

    model, tokenizer = load_for_inference(tiny_model)
    judge = LMJudge((model, tokenizer), ["The answer is correct."], mode="pairwise")
    prompt, a, b = "What is 2 plus 2?", "4", "It is five, I think."
    first_ab, first_ba = next_token_odds(model, tokenizer, [judge.pair_message(prompt, a, b),
                                                            judge.pair_message(prompt, b, a)], "A", "B")
    verdict = judge.compare(prompt, a, b)
    assert verdict.score == close((first_ab + 1 - first_ba) - 1, rel=1e-3, abs=1e-5)
    assert (first_ab - 0.5) * (first_ba - 0.5) > 0  # each order alone favours the same position (measured 0.492)
    assert abs(verdict.score) < abs(2 * first_ab - 1) / 10  # ... which the average cancels (4e-5 against 0.016)
    assert f"{first_ab:.3f} with A shown first" in verdict.reason
    # the odds read from a padded batch equal one unpadded forward pass
    import torch

    from nbalign.text import prompt_text

    ids = tokenizer(prompt_text(tokenizer, judge.pair_message(prompt, a, b)), return_tensors="pt",
                    add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(**ids).logits[0, -1].float(), -1)
    yes = torch.logsumexp(logp[[tokenizer.encode(t, add_special_tokens=False)[0] for t in ("A", " A")]], 0)
    no = torch.logsumexp(logp[[tokenizer.encode(t, add_special_tokens=False)[0] for t in ("B", " B")]], 0)
    assert first_ab == close(float(torch.sigmoid(yes - no)), rel=1e-3, abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# Constitutional revisions


def test_revise_stores_original_and_revision_as_a_pair_preferring_the_revision(tiny_model, tmp_path):
    import torch

    store = LabelStore(tmp_path / "labels.sqlite")
    torch.manual_seed(0)  # sampled: greedy, the random model repeats a newline, and an empty revision is dropped
    rows = revise(QUESTIONS, model=tiny_model, store=store, max_new_tokens=6, do_sample=True)
    assert len(rows) + sum(rows.dropped.values()) == len(QUESTIONS) and rows
    items = {it.id: it for it in store.items()}
    assert set(items) == {r["item"] for r in rows}
    for r in rows:
        item = items[r["item"]]
        assert r["principle"] in DEFAULT_CONSTITUTION and r["revision"] != r["original"]
        revised_side = "A" if item.swapped else "B"
        assert (item.a if item.swapped else item.b) == r["revision"]
        source = item.source_a if item.swapped else item.source_b
        assert source["method"] == "constitutional revision" and source["role"] == "revision"
        assert source["model"] == tiny_model and source["principle"] == r["principle"] and source["do_sample"]
        assert store.decisions(labeller="constitution", origin="judge")[item.id] == revised_side
    assert [r["chosen"] for r in store.pairs(labels_from="any")] == [r["revision"] for r in rows]
    assert store.pairs(labels_from="human") == []  # nothing counts as a person's label until one confirms it
    assert "<table>" in rows._repr_html_()


def test_revise_keeps_only_new_answers_and_escapes_text(tiny_model, tmp_path, monkeypatch):
    import nbalign.generation as generation

    rewrites = {"same": "Revised answer: <b>bold</b>   answer", "critique": "It is too long!",
                "principle": "The answer is brief.", "empty": "  ", "new": "<i>x</i>"}

    def scripted(model, tokenizer, conversations, **kwargs):  # the model's critique, then its rewrite
        return ["It is too long." if len(c) == 3 else rewrites[c[0]["content"]] for c in conversations]

    monkeypatch.setattr(generation, "generate_with", scripted)
    store = LabelStore(tmp_path / "labels.sqlite")
    rows = revise(list(rewrites), model=tiny_model, store=store, answers=["<b>bold</b> answer"] * 5,
                  principles=["The answer is brief."])
    assert rows.dropped == {"identical to the original": 1, "repeats the critique": 1, "repeats the principle": 1,
                            "empty": 1}
    assert [(r["prompt"], r["revision"]) for r in rows] == [("new", "<i>x</i>")] and len(store.items()) == 1
    item = store.items()[0]
    assert (item.source_b if item.swapped else item.source_a)["answered_by"] == "given"
    page = rows._repr_html_()
    assert "<i>" not in page and "&lt;i&gt;x&lt;/i&gt;" in page and "&lt;b&gt;" in page
    with pytest.raises(NbalignError, match="2 prompts and 1 answers"):
        revise(["q1", "q2"], model=tiny_model, answers=["a"])


# ----------------------------------------------------------------------------------------------------
# The built-in judge on a factual principle (real model)


@pytest.mark.slow
def test_the_built_in_judge_prefers_the_concise_answer():
    """The default judge (the built-in model, pairwise in both orders, the default constitution) on held-out
    terse-vs-rambling pairs. Measured: 16 of 16 held-out and 16 of 16 training pairs, deterministic in fp32;
    the smallest margin (0.0014) is far above float noise. On a wrong fact against the right one it is at
    chance (11 of 22), which agreement() would show."""
    from nbalign.examples import style_pairs

    judge = make_judge()
    assert judge.labeller == "judge:smollm2-135m" and judge.principles == DEFAULT_CONSTITUTION
    rows = style_pairs("heldout")[:12]
    triples = [(r["prompt"], r["chosen"], r["rejected"]) if i % 2 else (r["prompt"], r["rejected"], r["chosen"])
               for i, r in enumerate(rows)]
    verdicts = judge.compare_many(triples)
    terse = sum(v.choice == ("A" if i % 2 else "B") for i, v in enumerate(verdicts))
    assert terse >= 10, [v.reason for v in verdicts]
