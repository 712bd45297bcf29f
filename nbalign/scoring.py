"""The maths shared by evaluation, reward models and RL: log-probabilities of answers, KL between two
models along answers, perplexity, accuracy with ties, and the scores of a reward model's head.

Everything here works on models already in memory and never trains or saves anything.
"""

from __future__ import annotations

import math

from .text import has_template, joined, pad_id, pad_right, prompt_text


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def encode_tails(tokenizer, heads: list[str], tails: list[str]):
    """Right-padded ids of head + tail, the attention mask, and a mask over the tail tokens only."""
    seqs, masks = [], []
    for head, tail in zip(heads, tails):
        h = tokenizer(head, add_special_tokens=False)["input_ids"]
        t = tokenizer(tail, add_special_tokens=False)["input_ids"]
        seqs.append(h + t)
        masks.append([0] * len(h) + [1] * len(t))
    return pad_right(seqs, pad_id(tokenizer), masks)


# fp32 log-probabilities held at once, per tensor: 128 MiB (about 680 positions of a 49,152-token vocabulary). The
# scoring below holds a few such tensors at a time (memory.py prices five), whatever the batch and answer lengths.
ROW_BYTES = 1 << 27


def forward_logprobs(model, ids, attention, start: int = 0):
    """Log-softmax, in fp32, of the next-token logits at positions start .. L-2 (the distributions of tokens
    start+1 .. L-1). Only those positions go through the LM head (`logits_to_keep`), so a prompt's positions cost
    no head and no `[positions, vocab]` tensor."""
    import torch

    keep = ids.shape[1] - start
    with torch.no_grad():
        inputs = {"input_ids": ids.to(model.device), "attention_mask": attention.to(model.device)}
        if _keeps_logits(model):
            inputs["logits_to_keep"] = keep
        logits = model(**inputs).logits  # otherwise every position, sliced below
        # Prompt tuning puts its virtual tokens' positions first: the text's positions are the last ones.
        logits = logits[:, -keep:-1]
        return torch.log_softmax(logits.float(), dim=-1)


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs; behind a peft wrapper, the
    wrapped model's forward, which gets the wrapper's keyword arguments)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def scored_chunks(model, tokenizer, heads: list[str], tails: list[str], batch_size: int = 8):
    """(ids, attention, start, labels, tail mask) for the rows of head + tail, in order, in batches of at most
    `batch_size` rows whose log-probs over the tail positions fit in ROW_BYTES. `start`: the first position whose
    distribution is read (the earliest tail in the batch, less one); labels and mask are from there on."""
    vocab = _vocab(model)
    for idx in batches(list(range(len(heads))), batch_size):
        ids, attention, target = encode_tails(tokenizer, [heads[i] for i in idx], [tails[i] for i in idx])
        start = max(0, int(target.float().argmax(1).min()) - 1) if target.any() else 0
        rows = max(1, ROW_BYTES // (4 * vocab * max(1, ids.shape[1] - start - 1))) if vocab else len(idx)
        for r in range(0, len(idx), rows):
            part = slice(r, r + rows)
            yield ids[part], attention[part], start, ids[part, start + 1:], target[part, start + 1:]


def _vocab(model) -> int | None:
    """The size of the model's vocabulary (its output embeddings' rows), None when it does not say."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def picked_logps(model, ids, attention, start: int, labels, target):
    """(each tail token's log-probability, zero elsewhere; the tail mask) of one chunk from scored_chunks."""
    import torch

    logp = forward_logprobs(model, ids, attention, start)
    mask = target.to(logp.device).float()
    picked = torch.gather(logp, 2, labels.to(logp.device).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def sequence_logps(model, tokenizer, heads: list[str], tails: list[str], batch_size: int = 8):
    """Summed log-probability of each tail given its head, and the tail's token count."""
    sums, counts = [], []
    for chunk in scored_chunks(model, tokenizer, heads, tails, batch_size):
        picked, mask = picked_logps(model, *chunk)
        sums.extend(picked.sum(-1).tolist())
        counts.extend(mask.sum(-1).tolist())
    return sums, counts


def answer_kl(policy, reference, tokenizer, heads: list[str], tails: list[str], batch_size: int = 8) -> list[float]:
    """KL(policy || reference) summed over each answer's tokens, exact over the vocabulary at each step.
    `reference` is a context manager yielding the reference model."""
    kls = []
    for ids, attention, start, _, target in scored_chunks(policy, tokenizer, heads, tails, batch_size):
        p = forward_logprobs(policy, ids, attention, start)
        with reference() as ref:
            q = forward_logprobs(ref, ids, attention, start)
        # sum_v p_v (log p_v - log q_v), in place: two [rows, positions, vocab] tensors at most.
        q.sub_(p)  # log q - log p
        per_token = p.exp_().mul_(q).sum(-1).neg_()
        del p, q
        mask = target.to(per_token.device).float()
        kls.extend((per_token * mask).sum(-1).clamp_min(0).tolist())
    return kls


def perplexity(model, tokenizer, texts: list[str], batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood per token) of `texts`, each read from its first token (after BOS)."""
    total, count = 0.0, 0
    bos = tokenizer.bos_token or ""
    # Without a BOS the first text token has no context; the shift by one already leaves it out.
    for chunk in scored_chunks(model, tokenizer, [bos] * len(texts), texts, batch_size):
        picked, mask = picked_logps(model, *chunk)
        total -= float(picked.sum())
        count += int(mask.sum())
    return math.exp(total / max(count, 1))


def accuracy_with_ties(diffs: list[float], eps: float = 1e-6) -> float:
    """Share of positive differences, a tie (|d| <= eps) counting as half: an untrained policy, whose
    implicit rewards are all zero, scores chance (0.5), not 0."""
    return sum(1.0 if d > eps else 0.5 if abs(d) <= eps else 0.0 for d in diffs) / max(len(diffs), 1)


# ----------------------------------------------------------------------------------------------------
# Reward model scores. The text is exactly what TRL's RewardTrainer trained on: for conversational pairs the
# chat template over prompt + answer, no generation prompt; the score head reads the last non-pad token.
# GRPO and RLOO render a reward model's input the same way.


def reward_input_ids(tokenizer, prompt: list[dict], answer: list[dict]) -> list[int]:
    """Token ids of one (prompt, answer) as TRL's RewardTrainer tokenizes a conversational pair. Without a
    chat template nbalign passes TRL plain text instead (prompt text, the answer and EOS), tokenized with
    the tokenizer's special tokens, as TRL does."""
    if has_template(tokenizer):
        return list(tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"])
    text = prompt_text(tokenizer, prompt) + joined(answer)
    if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return list(tokenizer(text=text)["input_ids"])


def score_ids(model, tokenizer, sequences: list[list[int]], batch_size: int = 8) -> list[float]:
    """The score head's output for each token sequence, batched and right-padded like TRL's collator."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        for chunk in batches(sequences, batch_size):
            ids, mask = pad_right(chunk, pad_id(tokenizer))
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            scores.extend(float(v) for v in logits[:, 0].float().cpu())
    finally:
        model.train(was_training)
    return scores


def pair_metrics(model, tokenizer, pairs: list[dict], batch_size: int = 8) -> dict:
    """Pairwise accuracy of a reward model (share of pairs where chosen scores above rejected; a tie counts
    as half, as in the preference evaluation) and the mean margin."""
    chosen = score_ids(model, tokenizer, [reward_input_ids(tokenizer, p["prompt"], p["chosen"]) for p in pairs],
                       batch_size)
    rejected = score_ids(model, tokenizer, [reward_input_ids(tokenizer, p["prompt"], p["rejected"]) for p in pairs],
                         batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    n = len(pairs)
    return {
        "pairs": n,
        "accuracy": accuracy_with_ties(margins, eps=0.0),
        "margin": sum(margins) / n,
        "mean_chosen": sum(chosen) / n,
        "mean_rejected": sum(rejected) / n,
    }

