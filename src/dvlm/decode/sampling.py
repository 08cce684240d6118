"""Token selection and the unmasking policy: pure functions on logits and confidences, and the
per-row sampler of a batch (each row its own temperature and random stream)."""

from __future__ import annotations

import torch

from dvlm.config import Sampling


def greedy_tokens(logits: torch.Tensor, banned: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely token per position and its probability.

    Args:
        logits: (..., V).
        banned: ids never produced (the mask token).
    Returns:
        tokens (...) long and confidences (...) float32.
    """
    logits = logits.float()  # softmax and confidences in fp32
    if banned:
        logits = logits.clone()
        logits[..., banned] = float("-inf")
    conf, tokens = torch.softmax(logits, dim=-1).max(dim=-1)
    return tokens, conf


def sampling_distribution(logits: torch.Tensor, samplings: list[Sampling], banned: list[int] | None = None
                          ) -> torch.Tensor:
    """(R, ..., V) fp32 probabilities that sampling draws from, row r by samplings[r] (its
    temperature, top-k and top-p; a greedy row at temperature 1)."""
    logits = logits.float()
    if banned:
        logits = logits.clone()
        logits[..., banned] = float("-inf")
    per_row = (-1, *[1] * (logits.dim() - 1))  # broadcasts one value per row against (R, ..., V)
    temps = torch.tensor([s.temperature if s.temperature > 0 else 1.0 for s in samplings], device=logits.device)
    logits = _filter_top_k(logits / temps.view(per_row), [s.top_k for s in samplings], per_row)
    return torch.softmax(_filter_top_p(logits, [s.top_p for s in samplings], per_row), dim=-1)


def sample_from(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: (..., V) probabilities and (...) uniforms in [0, 1) -> (...) tokens.

    Token i is drawn when cdf[i-1] <= u * total < cdf[i], so a token with probability 0 is never
    drawn and every token's chance is its probability. Example: probs [0.5, 0, 0.5], u = 0.6 -> 2.
    """
    cdf = probs.cumsum(dim=-1)
    target = (uniform * cdf[..., -1])[..., None]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # Rounding can put u * total at the very top of the CDF: take the last token that has probability.
    index = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, index, -1).max(dim=-1).values
    return torch.minimum(tokens, last)


class RowSampler:
    """Token selection for the R rows of a batch: each row has its own `Sampling` (temperature,
    0: greedy; top-k; top-p) and its own random stream (its generator; None: torch's global one).
    A row's stream advances only in the draws it takes part in, by a count that depends on the
    row alone, so a seeded row samples the same tokens whatever batch it runs in.
    """

    def __init__(self, samplings: list[Sampling], generators: list[torch.Generator | None],
                 banned: list[int]) -> None:
        self.samplings = samplings
        self.generators = generators
        self.banned = banned

    @property
    def greedy(self) -> bool:
        return all(s.greedy for s in self.samplings)

    def sampling_rows(self, drawing: list[bool] | None = None) -> list[bool]:
        """Per row: does it sample (temperature > 0) in a draw where only the rows `drawing` take part."""
        return [not s.greedy and (drawing is None or drawing[r]) for r, s in enumerate(self.samplings)]

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """(R, ..., V) fp32 sampling probabilities, each row by its own sampling (greedy rows at temperature 1)."""
        return sampling_distribution(logits, self.samplings, self.banned)

    def uniforms(self, rows: list[bool], count: int, device: torch.device) -> torch.Tensor:
        """(R, count) uniforms in [0, 1): `count` from each row's own stream where `rows`, zeros elsewhere."""
        out = torch.zeros(len(rows), count, device=device)
        unseeded = [r for r, take in enumerate(rows) if take and self.generators[r] is None]
        if unseeded:
            out[unseeded] = torch.rand(len(unseeded), count, device=device)
        for r, take in enumerate(rows):
            if take and self.generators[r] is not None:
                out[r] = torch.rand(count, generator=self.generators[r], device=device)
        return out

    def select(self, logits: torch.Tensor, drawing: list[bool] | None = None,
               draws_per_row: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A token per position and its confidence, like `greedy_tokens`, sampled in sampling rows.

        Args:
            logits: (R, ..., V).
            drawing: (R,) the rows whose result is used (None: all); the others draw nothing.
            draws_per_row: uniforms each sampling row draws (at least the positions per row; the
                first ones are used), so that its stream advances by a count fixed by the caller
                (e.g. the block size), not by the batch's widest canvas.
        Returns:
            tokens (R, ...) and confidences (R, ...) float32: the probability of the chosen token
            under the distribution it was drawn from.
        """
        tokens, conf = greedy_tokens(logits, self.banned)
        rows = self.sampling_rows(drawing)
        if not any(rows):
            return tokens, conf
        shape = logits.shape[1:-1]
        positions = shape.numel()
        u = self.uniforms(rows, draws_per_row or positions, logits.device)[:, :positions].reshape(-1, *shape)
        probs = self.distribution(logits)
        sampled = sample_from(probs, u)
        sampled_conf = probs.gather(-1, sampled[..., None]).squeeze(-1)
        pick = torch.tensor(rows, device=logits.device).view(-1, *[1] * len(shape))
        return torch.where(pick, sampled, tokens), torch.where(pick, sampled_conf, conf)


def _filter_top_k(logits: torch.Tensor, top_k: list[int | None], per_row: tuple[int, ...]) -> torch.Tensor:
    """Keep each row's top_k[r] most likely tokens (None, or k >= V: all)."""
    vocab = logits.shape[-1]
    ks = [vocab if k is None else min(k, vocab) for k in top_k]
    if min(ks) >= vocab:
        return logits
    top = torch.topk(logits, max(k for k in ks if k < vocab), dim=-1).values  # (R, ..., k_max)
    index = torch.tensor([k - 1 if k < vocab else 0 for k in ks], device=logits.device).view(per_row)
    kth = top.gather(-1, index.expand(*top.shape[:-1], 1))
    filtered = torch.tensor([k < vocab for k in ks], device=logits.device).view(per_row)
    return logits.masked_fill(filtered & (logits < kth), float("-inf"))


def _filter_top_p(logits: torch.Tensor, top_p: list[float | None], per_row: tuple[int, ...]) -> torch.Tensor:
    """Keep each row's nucleus of probability top_p[r] (None, or p >= 1: all)."""
    filtered = [p is not None and p < 1.0 for p in top_p]
    if not any(filtered):
        return logits
    p = torch.tensor([p if f else 1.0 for p, f in zip(top_p, filtered)], device=logits.device).view(per_row)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already reach top_p (the top token always stays).
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p
    drop_sorted &= torch.tensor(filtered, device=logits.device).view(per_row)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def unmask_by_threshold(confidence: torch.Tensor, masked: torch.Tensor,
                        threshold: float | torch.Tensor) -> torch.Tensor:
    """Positions to unmask: every masked one with confidence >= threshold, and at least the most
    confident masked position of each row that still has masks (so every pass makes progress).

    Args:
        confidence: (R, Q) float; masked: (R, Q) bool; threshold: a float, or (R, 1) per row in
            the confidences' dtype.
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
