"""Token selection and the unmasking policy: pure functions on logits and confidences."""

from __future__ import annotations

import torch


def select_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    banned: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick a token per position and its confidence.

    Args:
        logits: (..., V).
        banned: ids never produced (the mask token).
    Returns:
        tokens (...) long and confidences (...) float32: the probability of the chosen token under
        the distribution it was drawn from (argmax probability when greedy).
    """
    if temperature == 0.0:
        logits = logits.float()  # softmax and confidences in fp32
        if banned:
            logits = logits.clone()
            logits[..., banned] = float("-inf")
        conf, tokens = torch.softmax(logits, dim=-1).max(dim=-1)
        return tokens, conf
    probs = sampling_distribution(logits, temperature, top_k, top_p, banned)
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def sampling_distribution(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
    banned: list[int] | None = None,
) -> torch.Tensor:
    """(..., V) fp32 probabilities that `select_tokens` samples from at this temperature."""
    logits = logits.float()
    if banned:
        logits = logits.clone()
        logits[..., banned] = float("-inf")
    return torch.softmax(_filter_top_p(_filter_top_k(logits / temperature, top_k), top_p), dim=-1)


def _filter_top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: torch.Tensor, top_p: float | None) -> torch.Tensor:
    if top_p is None or top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already reach top_p (the top token always stays).
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def unmask_by_threshold(confidence: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """Positions to unmask: every masked one with confidence >= threshold, and at least the most
    confident masked position of each row that still has masks (so every pass makes progress).

    Args:
        confidence: (R, Q) float; masked: (R, Q) bool.
    Returns:
        (R, Q) bool.
    """
    conf = confidence.masked_fill(~masked, float("-inf"))
    chosen = masked & (conf >= threshold)
    best = torch.zeros_like(masked).scatter(1, conf.argmax(dim=1, keepdim=True), True)
    return chosen | (best & masked.any(dim=1, keepdim=True))


def unmask_by_count(confidence: torch.Tensor, masked: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Positions to unmask: the `count[r]` most confident masked positions of each row r; of equally
    confident ones the lowest index first."""
    conf = confidence.masked_fill(~masked, float("-inf"))
    rank = conf.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = most confident
    return masked & (rank < count[:, None])


def unmask_by_topk(confidence: torch.Tensor, masked: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Like `unmask_by_count`, but equally confident positions are taken in `torch.topk`'s order
    (DiffusionVL): each row's k = min(count, masks) positions come from `torch.topk(conf, k)` over
    the whole row, non-masked positions at -inf. topk's order among ties depends on k, so rows
    are grouped by k rather than taking one topk of the largest k.

    Example: 8 equal confidences, k = 2 -> positions 5 and 6 (CPU, torch 2.13), not 0 and 1.
    """
    conf = confidence.masked_fill(~masked, float("-inf"))
    k = torch.minimum(count, masked.sum(dim=1))  # (R,)
    chosen = torch.zeros_like(masked)
    for value in k.unique().tolist():
        if value == 0:
            continue
        rows = (k == value).nonzero(as_tuple=True)[0]
        picked = torch.topk(conf[rows], value, dim=1).indices  # (rows, k)
        chosen[rows[:, None], picked] = True
    return chosen


def steps_schedule_count(masked: torch.Tensor, steps_left: int) -> torch.Tensor:
    """(R,) tokens to unmask this step so the rest finish in `steps_left` passes: ceil(n / steps).

    The first n mod s steps take one more token than the others; for a full block (n = B) these
    are DiffusionVL's counts (`block_schedule_count`)."""
    remaining = masked.sum(dim=1)
    return (remaining + steps_left - 1) // max(steps_left, 1)


def block_schedule_count(block_size: int, steps: int, step: int) -> int:
    """Tokens pass `step` unmasks in DiffusionVL's static schedule, from the block size alone:
    B // steps, plus one in the first B % steps passes. The counts of a full block are used
    whatever the block holds, so a block with fewer masks finishes early (3 masks, B=8, 4 steps:
    2, then 1). Passes after the last step (only sub-blocks need them) take B // steps, at least 1.

    >>> [block_schedule_count(8, 3, s) for s in range(3)]
    [3, 3, 2]
    """
    base, extra = divmod(block_size, steps)
    if step >= steps:
        return max(base, 1)
    return base + (1 if step < extra else 0)
