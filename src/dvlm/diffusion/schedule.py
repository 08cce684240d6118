"""Noise schedule (masking rate t per block) and the block-size annealing curriculum."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from dvlm.config import ANTITHETIC_ORDERS


def sample_block_t(
    shape: tuple[int, int],
    eps_min: float,
    eps_max: float,
    antithetic: bool,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    order: str = "permuted",
) -> torch.Tensor:
    """Masking rates t (R, K), one per block: t = eps_min + (eps_max - eps_min) * u.

    `antithetic` stratifies u over all R*K blocks of the batch (one draw per stratum
    [j/N, (j+1)/N)), like BD3-LM/DiffusionVL, which lowers the variance of the batch loss.
    `order` says which block gets stratum j:
    * `permuted`: a random permutation (dvlm). With the strata in block order the first blocks of
      the batch would always get the lowest masking rates.
    * `sequence`: block j in row-major order over (row, block), as DiffusionVL does, so t rises
      along each sequence. u = u_j / N + j / N, wrapped into [0, 1) (DiffusionVL's arithmetic).

    Example, shape (1, 4), order `sequence`: u lies in [0, .25), [.25, .5), [.5, .75), [.75, 1).
    """
    if order not in ANTITHETIC_ORDERS:
        raise ValueError(f"order={order!r} is not one of {ANTITHETIC_ORDERS}")
    rows, blocks = shape
    n = rows * blocks
    u = torch.rand(n, generator=generator, device=device)
    if antithetic and n > 0:
        if order == "sequence":
            stratum = torch.arange(n, device=u.device) / n
            u = torch.remainder(u / n + stratum, 1.0)
        else:
            strata = torch.randperm(n, generator=generator, device=device).to(u.dtype)
            u = (strata + u) / n
    return (eps_min + (eps_max - eps_min) * u).view(rows, blocks)


MAX_STEPS = 10**6
"""Runs of up to this many steps get their stages exactly (`exact_ratio`); longer ones to within 1e-12."""


def annealed_block_size(progress: float, block_size: int, anneal_fraction: float) -> int:
    """Training block size at `progress` in [0, 1] (Fast-dVLM block-size annealing).

    The sizes 2, 4, 8, ... below `block_size`, then `block_size` itself, each get an equal share of
    the first `anneal_fraction` of training; the rest trains at `block_size`. (Fast-dVLM does not
    publish its schedule; this is dvlm's choice.) Step s of T trains at size number
    floor(s / T / anneal_fraction * sizes): 10 steps, B=16, anneal_fraction 0.4 give 2, 4, 8, 16,
    then 16 for the other six.

    >>> [annealed_block_size(p, 16, 0.5) for p in (0.0, 0.13, 0.26, 0.4, 0.6)]
    [2, 4, 8, 16, 16]
    """
    sizes = [2**k for k in range(1, max(1, math.ceil(math.log2(block_size))))]
    sizes = [s for s in sizes if s < block_size] + [block_size]
    progress, anneal_fraction = exact_ratio(progress), exact_ratio(anneal_fraction)
    if anneal_fraction <= 0 or progress >= anneal_fraction:
        return block_size
    stage = math.floor(progress / anneal_fraction * len(sizes))
    return sizes[min(stage, len(sizes) - 1)]


def exact_ratio(ratio: float) -> Fraction:
    """A ratio of step counts (step / total) or a config fraction (0.4) as the exact fraction it
    stands for: in floats, step 3 of 10 at anneal_fraction 0.4 is 0.3 / 0.4 * 4 = 2.9999999999999996
    stages in, and a stage that starts exactly at a step would start one step late."""
    return Fraction(ratio).limit_denominator(MAX_STEPS)

