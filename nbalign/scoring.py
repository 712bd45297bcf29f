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


def forward_logprobs(model, ids, attention):
    """Log-softmax of the next-token logits at every position but the last, in fp32."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device)).logits
    # Prompt tuning puts its virtual tokens' positions first: the text's positions are the last ones.
    return torch.log_softmax(logits[:, -ids.shape[1]:-1].float(), dim=-1)


def sequence_logps(model, tokenizer, heads: list[str], tails: list[str], batch_size: int = 8):
    """Summed log-probability of each tail given its head, and the tail's token count."""
    import torch

    sums, counts = [], []
    for idx in batches(list(range(len(heads))), batch_size):
        ids, attention, target = encode_tails(tokenizer, [heads[i] for i in idx], [tails[i] for i in idx])
        logp = forward_logprobs(model, ids, attention)
        labels = ids[:, 1:].to(logp.device)
        mask = target[:, 1:].to(logp.device).float()
        picked = torch.gather(logp, 2, labels.unsqueeze(-1)).squeeze(-1)
        sums.extend((picked * mask).sum(-1).tolist())
        counts.extend(mask.sum(-1).tolist())
    return sums, counts


def answer_kl(policy, reference, tokenizer, heads: list[str], tails: list[str], batch_size: int = 8) -> list[float]:
    """KL(policy || reference) summed over each answer's tokens, exact over the vocabulary at each step.
    `reference` is a context manager yielding the reference model."""
    kls = []
    for idx in batches(list(range(len(heads))), batch_size):
        ids, attention, target = encode_tails(tokenizer, [heads[i] for i in idx], [tails[i] for i in idx])
        p = forward_logprobs(policy, ids, attention)
        with reference() as ref:
            q = forward_logprobs(ref, ids, attention)
        per_token = (p.exp() * (p - q)).sum(-1)
        mask = target[:, 1:].to(per_token.device).float()
        kls.extend((per_token * mask).sum(-1).clamp_min(0).tolist())
    return kls


def perplexity(model, tokenizer, texts: list[str], batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood per token) of `texts`, each read from its first token (after BOS)."""
    import torch

    total, count = 0.0, 0
    bos = tokenizer.bos_token or ""
    for chunk in batches(texts, batch_size):
        ids, attention, target = encode_tails(tokenizer, [bos] * len(chunk), chunk)
        logp = forward_logprobs(model, ids, attention)
        labels = ids[:, 1:].to(logp.device)
        # Without a BOS the first text token has no context; the shift by one already leaves it out.
        mask = target[:, 1:].to(logp.device).float()
        picked = torch.gather(logp, 2, labels.unsqueeze(-1)).squeeze(-1)
        total -= float((picked * mask).sum())
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

