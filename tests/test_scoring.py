"""The evaluation maths of nbalign/scoring.py against hand computations: log-probabilities of answers, KL,
perplexity, accuracy with ties and a reward model's pair metrics. Fake models have fixed, known
distributions; the tiny random Llama checks the same functions on a real model (batched vs one by one)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from helpers import close

from nbalign.scoring import accuracy_with_ties, answer_kl, pair_metrics, perplexity, score_ids, sequence_logps

TEXTS = ["The river runs past the old mill.", "Bread rises in a warm kitchen.", "A cat sleeps."]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class FixedDistribution(torch.nn.Module):
    """A causal "model" whose next-token distribution is the same `probs` at every position."""

    device = torch.device("cpu")

    def __init__(self, probs: list[float]):
        super().__init__()
        self.logits = torch.tensor(probs, dtype=torch.float64).log().float()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1).clone())


class RightWithProbability(torch.nn.Module):
    """A causal "model" that puts probability p[t] on the token that really comes next at position t (p[-1]
    from there on) and spreads the rest evenly over the other tokens of a vocabulary of `vocab`."""

    device = torch.device("cpu")

    def __init__(self, vocab: int, p: list[float]):
        super().__init__()
        self.vocab, self.p = vocab, p

    def forward(self, input_ids, attention_mask=None, **kwargs):
        batch, length = input_ids.shape
        p = torch.tensor([self.p[min(t, len(self.p) - 1)] for t in range(length)], dtype=torch.float64)
        rest = ((1 - p) / (self.vocab - 1)).log().float()
        logits = rest.view(1, length, 1).expand(batch, length, self.vocab).clone()
        following = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)  # the last position predicts nothing
        logits.scatter_(2, following.unsqueeze(-1), p.log().float().view(1, length, 1).expand(batch, length, 1))
        return SimpleNamespace(logits=logits)


class ShorterIsBetter(torch.nn.Module):
    """A reward "model" whose score is minus the number of (non-pad) tokens it reads."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # score_ids finds the device from the parameters

    def forward(self, input_ids, attention_mask, **kwargs):
        return SimpleNamespace(logits=-attention_mask.sum(-1, keepdim=True).float())


# ----------------------------------------------------------------------------------------------------
# Accuracy with ties


def test_accuracy_counts_a_tie_as_half():
    assert accuracy_with_ties([1.0, -1.0, 0.0, 0.0]) == 0.5  # (1 + 0 + 0.5 + 0.5) / 4
    assert accuracy_with_ties([0.0] * 7) == 0.5  # an untrained policy: every pair a tie, chance
    assert accuracy_with_ties([1e-9]) == 0.5  # within the default eps of 1e-6: a tie
    assert accuracy_with_ties([-1e-9]) == 0.5
    assert accuracy_with_ties([2e-6, -2e-6, 3.0]) == pytest.approx(2 / 3)  # past eps: decided
    assert accuracy_with_ties([1e-9], eps=0.0) == 1.0  # exact comparison, as pair_metrics asks
    assert accuracy_with_ties([0.0, 1e-9, -1e-9], eps=0.0) == 0.5  # (0.5 + 1 + 0) / 3


# ----------------------------------------------------------------------------------------------------
# Log-probabilities of answers


def test_sequence_logps_sums_the_tail_tokens_only(tokenizer):
    # Probability 0.5 on the right token at the first two positions, 0.25 after: the tail's sum depends on
    # where the tail starts, so a head token counted by mistake changes it.
    model = RightWithProbability(len(tokenizer), [0.5, 0.5, 0.25])
    heads, tails = ["Question: what is 2 plus 2?", ""], [" Four.", "Answer: 4."]
    sums, counts = sequence_logps(model, tokenizer, heads, tails)
    for head, tail, got, n in zip(heads, tails, sums, counts):
        h, t = len(ids(tokenizer, head)), len(ids(tokenizer, tail))
        # Token i (from 0) is predicted at position i - 1; an empty head leaves the first tail token unpredicted.
        positions = [i - 1 for i in range(max(h, 1), h + t)]
        expected = sum(math.log(0.5 if pos < 2 else 0.25) for pos in positions)
        assert n == len(positions) and got == pytest.approx(expected, rel=1e-4), (head, tail)  # float32 over 49152 logits


def test_sequence_logps_matches_a_manual_log_softmax_and_batching_does_not_change_it(tokenizer, tiny):
    heads = ["User: say hi.\nAssistant:", "User: name a colour.\nAssistant:", "Q: 1+1?\nA:"]
    tails = [" Hi there, friend.", " Blue.", " Two, of course; it is always two."]  # different lengths: padding
    batched, counts = sequence_logps(tiny, tokenizer, heads, tails, batch_size=8)
    single = [sequence_logps(tiny, tokenizer, [h], [t], batch_size=1)[0][0] for h, t in zip(heads, tails)]
    for head, tail, got, alone, n in zip(heads, tails, batched, single, counts):
        h, t = ids(tokenizer, head), ids(tokenizer, tail)
        with torch.no_grad():
            logp = torch.log_softmax(tiny(input_ids=torch.tensor([h + t])).logits[0, :-1].float(), dim=-1)
        manual = sum(float(logp[len(h) - 1 + i, tok]) for i, tok in enumerate(t))
        assert n == len(t)
        assert alone == close(manual)
        assert got == close(alone)  # padded in a batch of three vs alone


def test_only_the_answer_positions_reach_the_head_in_chunks_that_fit(tokenizer, tiny, monkeypatch):
    """The LM head scores the answers' positions, not the prompts' (the earliest answer in a batch sets where it
    starts), and a batch whose fp32 log-probs would pass ROW_BYTES is read a few rows at a time: the numbers are
    those of one pass over the whole batch."""
    from nbalign import scoring

    heads = ["User: say hi, please, in a friendly way.\nAssistant:", "User: name a colour.\nAssistant:"]
    tails = [" Hi there, friend.", " Blue, like the sky on a clear day."]
    whole, _ = sequence_logps(tiny, tokenizer, heads, tails)
    seen = []
    hook = tiny.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    try:
        sequence_logps(tiny, tokenizer, heads, tails)
        length = max(len(ids(tokenizer, h + t)) for h, t in zip(heads, tails))
        first_answer = min(len(ids(tokenizer, h)) for h in heads)
        assert seen == [(2, length - first_answer + 1, tiny.config.hidden_size)]  # from the position before it
        seen.clear()
        monkeypatch.setattr(scoring, "ROW_BYTES", 4 * len(tokenizer))  # one position's log-probs: a row at a time
        chunked, _ = sequence_logps(tiny, tokenizer, heads, tails)
        ppl = [perplexity(tiny, tokenizer, tails)]
    finally:
        hook.remove()
    assert [shape[0] for shape in seen] == [1, 1, 1, 1]  # two rows scored, then two texts read, one at a time
    assert chunked == [close(w) for w in whole]
    monkeypatch.undo()
    assert ppl == [close(perplexity(tiny, tokenizer, tails))]


# ----------------------------------------------------------------------------------------------------
# KL between two models along answers


def as_reference(model):
    """What answer_kl takes as the reference: a context manager that yields the model."""

    @contextmanager
    def reference():
        yield model

    return reference


def test_kl_of_a_model_to_itself_is_zero(tokenizer, tiny, tiny_model):
    from transformers import AutoModelForCausalLM

    heads, tails = ["User: hello.\nAssistant:", "User: count.\nAssistant:"], [" Hello to you.", " One two three four."]
    same_weights = AutoModelForCausalLM.from_pretrained(tiny_model).eval()  # a second copy, not the same object
    for reference in (tiny, same_weights):
        kls = answer_kl(tiny, as_reference(reference), tokenizer, heads, tails)
        assert kls == pytest.approx([0.0, 0.0], abs=1e-6)


def test_kl_of_two_fixed_distributions_is_the_hand_computed_one(tokenizer):
    # Over three tokens, P = (1/2, 1/4, 1/4) and Q uniform at every step:
    # KL(P || Q) = 1/2 ln(1/2 / 1/3) + 2 * 1/4 ln(1/4 / 1/3) = 1/2 ln 1.5 + 1/2 ln 0.75 = 0.0588915 per token.
    per_token = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    p, q = FixedDistribution([0.5, 0.25, 0.25]), FixedDistribution([1 / 3] * 3)
    heads, tails = ["Question:", "Q: and this?"], [" an answer of a few tokens.", " Yes."]
    kls = answer_kl(p, as_reference(q), tokenizer, heads, tails)
    tokens = [len(ids(tokenizer, t)) for t in tails]  # summed over each answer's tokens
    assert tokens == [7, 2] and kls == pytest.approx([n * per_token for n in tokens], rel=1e-5)
    # KL is not symmetric: KL(Q || P) = ln(1/3) - 1/3 (ln 1/2 + 2 ln 1/4) = 0.0647, per token.
    reverse = answer_kl(q, as_reference(p), tokenizer, heads, tails)
    per_token_reverse = math.log(1 / 3) - (math.log(0.5) + 2 * math.log(0.25)) / 3
    assert reverse == pytest.approx([n * per_token_reverse for n in tokens], rel=1e-5)


def test_kl_between_different_weights_is_positive_and_batching_does_not_change_it(tokenizer, tiny, tiny_model):
    from transformers import AutoModelForCausalLM

    moved = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        for name, weight in moved.named_parameters():
            if "self_attn.o_proj" in name:
                weight.mul_(3.0)
    heads, tails = ["User: hi.\nAssistant:", "User: colours?\nAssistant:"], [" Hi.", " Red, green and blue."]
    batched = answer_kl(moved, as_reference(tiny), tokenizer, heads, tails, batch_size=8)
    single = [answer_kl(moved, as_reference(tiny), tokenizer, [h], [t], batch_size=1)[0] for h, t in zip(heads, tails)]
    assert all(k > 1e-4 for k in batched), batched
    # KL is a difference of two log-probabilities, so padding's float noise (~1e-6 absolute, seen between CPUs
    # and thread counts) is a larger share of a small KL than of either term: compare absolutely.
    assert batched == pytest.approx(single, abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# Perplexity


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tokenizer):
    vocab = len(tokenizer)  # 49152
    assert perplexity(FixedDistribution([1 / vocab] * vocab), tokenizer, TEXTS) == pytest.approx(vocab, rel=1e-4)


@pytest.mark.parametrize("p", [0.5, 0.1, 0.9])
def test_perplexity_of_a_model_right_with_probability_p_is_one_over_p(tokenizer, p):
    model = RightWithProbability(len(tokenizer), [p])
    # The log-softmax sums 49,151 equal fp32 terms; how many lanes accumulate them is the CPU's choice: on an
    # AVX2-only AMD EPYC the perplexity read 2.00026 for 2 (2.6e-4), within 1e-4 on an AVX512 CPU.
    assert perplexity(model, tokenizer, TEXTS, batch_size=2) == pytest.approx(1 / p, rel=1e-3)


def test_perplexity_reads_every_text_token_after_the_bos(tokenizer):
    # Probability 1/2 on the first text token (read after BOS), 1/4 on the ones after it: the mean
    # negative log-likelihood weighs one token at ln 2 and the others at ln 4.
    model = RightWithProbability(len(tokenizer), [0.5, 0.25])
    n = [len(ids(tokenizer, t)) for t in TEXTS]
    nll = sum(math.log(2) + (k - 1) * math.log(4) for k in n) / sum(n)
    assert perplexity(model, tokenizer, TEXTS) == pytest.approx(math.exp(nll), rel=1e-4)


def test_perplexity_without_a_bos_reads_every_token_but_the_first(tokenizer):
    import copy

    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    # Position 0 predicts the second text token with probability 1/2; later positions the rest with 1/4.
    # The first token has no context and is not counted; every other one is.
    model = RightWithProbability(len(tokenizer), [0.5, 0.25])
    n = [len(ids(tokenizer, t)) for t in TEXTS]
    nll = sum(math.log(2) + (k - 2) * math.log(4) for k in n) / sum(k - 1 for k in n)
    assert perplexity(model, no_bos, TEXTS) == pytest.approx(math.exp(nll), rel=1e-4)


def test_perplexity_of_the_tiny_model_does_not_depend_on_the_batch(tokenizer, tiny):
    texts = TEXTS + ["A much longer sentence about rivers, mills, bread and cats, to force some padding here."]
    batched = perplexity(tiny, tokenizer, texts, batch_size=8)
    # One text at a time gives per-text sums; weighing them by their token counts gives the same mean.
    per_text = [(perplexity(tiny, tokenizer, [t], batch_size=1), len(ids(tokenizer, t))) for t in texts]
    pooled = math.exp(sum(math.log(ppl) * n for ppl, n in per_text) / sum(n for _, n in per_text))
    assert batched == pytest.approx(pooled, rel=1e-4)
    assert batched > 1000  # a random model over 49152 tokens is nowhere near certain of anything


# ----------------------------------------------------------------------------------------------------
# A reward model's pair metrics


def test_pair_metrics_of_a_known_scorer(tokenizer):
    from nbalign.scoring import reward_input_ids

    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    pairs = [
        {"prompt": user("Capital of France?"), "chosen": assistant("Paris."),
         "rejected": assistant("It is Paris, a city on the Seine, as everyone knows.")},
        {"prompt": user("2 plus 2?"), "chosen": assistant("Four, I would say after some thought."),
         "rejected": assistant("4.")},
        {"prompt": user("Opposite of hot?"), "chosen": assistant("Cold."), "rejected": assistant("Cool.")},
    ]
    model = ShorterIsBetter().train()
    length = {k: [len(reward_input_ids(tokenizer, p["prompt"], p[k])) for p in pairs] for k in ("chosen", "rejected")}
    assert length["chosen"][2] == length["rejected"][2]  # "Cold." and "Cool.": a tie, which counts half
    margins = [r - c for c, r in zip(length["chosen"], length["rejected"])]  # score = -tokens
    assert margins[0] > 0 > margins[1]

    metrics = pair_metrics(model, tokenizer, pairs, batch_size=2)
    assert metrics == {
        "pairs": 3,
        "accuracy": 0.5,  # (1 + 0 + 0.5) / 3
        "margin": pytest.approx(sum(margins) / 3),
        "mean_chosen": pytest.approx(-sum(length["chosen"]) / 3),
        "mean_rejected": pytest.approx(-sum(length["rejected"]) / 3),
    }
    assert model.training  # scoring switched to eval mode and back


def test_reward_scores_do_not_depend_on_the_batch(tokenizer, tiny_model):
    from transformers import AutoModelForSequenceClassification

    from nbalign.scoring import reward_input_ids

    torch.manual_seed(0)
    head = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    prompt = [{"role": "user", "content": "What is 2 plus 2?"}]
    sequences = [reward_input_ids(tokenizer, prompt, [{"role": "assistant", "content": a}])
                 for a in ("Answer: 4.", "Four, I think, though I would check it twice.", "4")]
    batched = score_ids(head, tokenizer, sequences, batch_size=8)
    single = [score_ids(head, tokenizer, [s], batch_size=1)[0] for s in sequences]
    assert batched == close(single)
    assert len(set(single)) == 3  # the head reads the answer: three answers, three scores
