"""Building the noisy stream x_t from a clean batch x_0: blocks, masking rates, masks, copies."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvlm.config import DiffusionConfig
from dvlm.data.processor import response_mask
from dvlm.diffusion.schedule import sample_block_t
from dvlm.model.masks import absolute_block_ids, block_starts, response_block_ids


@dataclass
class NoisyStream:
    """The noisy stream of a batch: copies of some clean positions, some replaced by [MASK].

    All tensors are (R, N); N is the longest row's stream (copies concatenated), padded.
    """

    xt: torch.Tensor  # token ids, mask_token_id where masked
    source: torch.Tensor  # index of the clean position each noisy token copies
    block: torch.Tensor  # block id of the source position (for N2C)
    group: torch.Tensor  # N2N group: block id made distinct per complementary copy
    valid: torch.Tensor  # False on padding
    masked: torch.Tensor  # True where xt is [MASK]
    t: torch.Tensor  # masking rate of the token's block
    index: torch.Tensor  # sequence index the token stands at: `source`, except for fill tokens
    # (`fill_last_block`), which copy their response's final token and continue past it

    @property
    def num_masked(self) -> int:
        return int(self.masked.sum())


@dataclass(frozen=True)
class NoiseWindow:
    """Where a micro-batch's rows sit in the batch whose noise one generator draws.

    A data-parallel step splits each global micro-batch across processes. Every process draws the
    noise of the whole global micro-batch (`rows` rows, padded to `length` columns, `blocks` blocks
    per row) and keeps its own rows [offset, offset + B) and columns, so a row's noise is the one it
    gets in a single process holding the whole batch, however the batch is split.
    """

    offset: int
    rows: int
    length: int
    blocks: int


def noise_extent(labels: torch.Tensor, attention_mask: torch.Tensor, cfg: DiffusionConfig, block_size: int):
    """(rows, length, blocks) of a batch: the shape its noise is drawn in (`NoiseWindow`)."""
    return labels.shape[0], labels.shape[1], _count_blocks(clean_block_ids(labels, attention_mask, cfg, block_size))


def _count_blocks(block: torch.Tensor) -> int:
    return int(block.max()) + 1 if block.numel() else 0


def clean_block_ids(labels: torch.Tensor, attention_mask: torch.Tensor, cfg: DiffusionConfig, block_size: int):
    """(R, L) block ids of the clean sequence for the configured layout."""
    if cfg.block_layout == "absolute":
        return absolute_block_ids(labels.shape[1], block_size, labels.device).expand_as(labels).clone()
    return response_block_ids(response_mask(labels, attention_mask), block_size)


def maskable_positions(labels: torch.Tensor, attention_mask: torch.Tensor, block: torch.Tensor, token_shift: bool):
    """(R, L) bool: response tokens that may be masked.

    With token shift, the first token of each block is predicted from the previous block's
    clean context (an AR step, covered by the AR loss) and is known at decode time, so it is never
    masked.
    """
    maskable = response_mask(labels, attention_mask)
    if token_shift:
        maskable &= ~block_starts(block)
    return maskable


def stream_positions(labels, attention_mask, mm_token_type_ids, cfg: DiffusionConfig) -> torch.Tensor:
    """(R, L) bool: which clean positions the noisy stream copies (`noisy_stream`)."""
    if cfg.noisy_stream == "response":
        return response_mask(labels, attention_mask)
    if cfg.noisy_stream == "text":
        return attention_mask & (mm_token_type_ids == 0)
    return attention_mask.clone()


def build_noisy_stream(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    cfg: DiffusionConfig,
    block_size: int,
    generator: torch.Generator | None = None,
    window: NoiseWindow | None = None,
) -> tuple[NoisyStream, torch.Tensor]:
    """Sample x_t for a batch (DESIGN.md §1, "Training").

    Args:
        input_ids, labels, mm_token_type_ids: (R, L) clean batch (labels -100 off responses).
        attention_mask: (R, L) bool.
        block_size: the (possibly annealed) block size B.
        window: where these rows sit in the batch the noise is drawn for (default: this batch).
    Returns:
        (noisy stream, clean block ids (R, L)).
    """
    block = clean_block_ids(labels, attention_mask, cfg, block_size)  # (R, L)
    maskable = maskable_positions(labels, attention_mask, block, cfg.token_shift)
    (rows, length), num_blocks = labels.shape, _count_blocks(block)
    window = window or NoiseWindow(0, rows, length, num_blocks)
    if window.offset + rows > window.rows or length > window.length or num_blocks > window.blocks:
        raise ValueError(f"a ({rows}, {length}) batch of {num_blocks} blocks does not fit in {window}")
    mine = slice(window.offset, window.offset + rows)
    t_block = sample_block_t(
        (window.rows, window.blocks), cfg.eps_min, cfg.eps_max,
        cfg.t_sampling == "antithetic", generator, input_ids.device, cfg.antithetic_order,
    )[mine, :num_blocks]  # (R, K)
    t = t_block.gather(1, block)  # (R, L)
    draw = torch.rand((window.rows, window.length), generator=generator, device=t.device)[mine, :length]
    masked = maskable & (draw < t)
    copies = [masked, maskable & ~masked] if cfg.complementary_mask else [masked]
    fills: list = [None] * len(copies)
    slot = torch.arange(1, block_size, device=t.device)
    if cfg.fill_last_block:
        wanted = slot <= fill_counts(labels, attention_mask, block, block_size)[..., None]  # (R, L, B-1)
        fill_draw = torch.rand((window.rows, window.length, block_size - 1), generator=generator, device=t.device)
        fill_masked = wanted & (fill_draw[mine, :length] < t[..., None])
        fills = [(wanted, fill_masked, False), (wanted, wanted & ~fill_masked, False)][:len(copies)]
    elif not cfg.truncate_last_block:
        wanted = slot <= spill_counts(labels, attention_mask, block, block_size)[..., None]  # (R, L, B-1)
        fills = [(wanted, torch.zeros_like(wanted), True)] * len(copies)
    selected = stream_positions(labels, attention_mask, mm_token_type_ids, cfg)
    parts = [
        _gather_stream(input_ids, selected, block, m, t, cfg.mask_token_id, i * num_blocks, fill)
        for i, (m, fill) in enumerate(zip(copies, fills))
    ]
    return _concat_streams(parts), block


def fill_counts(labels: torch.Tensor, attention_mask: torch.Tensor, block: torch.Tensor, block_size: int):
    """(R, L) long: at each response's last token, how many positions its last block lacks to be
    `block_size` long; 0 elsewhere.

    Example, B=4, response = [0 1 1 1 1 1 0]: blocks [1 1 1 1] and [1]; counts = [0 0 0 0 0 3 0].
    """
    response = response_mask(labels, attention_mask)
    is_end = response.clone()
    is_end[:, :-1] &= ~response[:, 1:]
    sizes = torch.zeros(block.shape[0], int(block.max()) + 1 if block.numel() else 0,
                        dtype=torch.long, device=block.device)
    sizes.scatter_add_(1, block, torch.ones_like(block))
    return torch.where(is_end, block_size - sizes.gather(1, block), 0)


def spill_counts(labels: torch.Tensor, attention_mask: torch.Tensor, block: torch.Tensor, block_size: int):
    """(R, L) long: at each response's last token, how many of the following tokens its last block
    takes in when it is not truncated (`truncate_last_block=False`): what it lacks to be
    `block_size` long, at most the row's tokens left; 0 elsewhere.

    Example, B=4, response = [0 1 1 1 1 1 0], 7 tokens: counts = [0 0 0 0 0 1 0] (one token follows).
    """
    tokens_after = attention_mask.long().flip(1).cumsum(1).flip(1) - attention_mask.long()  # (R, L)
    return torch.minimum(fill_counts(labels, attention_mask, block, block_size), tokens_after)


def _gather_stream(input_ids, selected, block, masked, t, mask_token_id: int, group_offset: int,
                   fill: tuple[torch.Tensor, torch.Tensor, bool] | None = None) -> NoisyStream:
    """Pack the selected positions of each row to the front, in sequence order, and pad.

    fill = (wanted (R, L, F), masked (R, L, F), spill): F slots after each position; slot token k
    after position e stands at index e + k, is ordered between e and e + 1 and belongs to e's
    block. It copies e (a fill token) or, with `spill`, the token at e + k (the sequence's own).
    """
    rows, length = input_ids.shape
    index = torch.arange(length, device=input_ids.device).expand(rows, -1)
    slots = 1 if fill is None else fill[0].shape[2] + 1
    key, src, owner, idx, sel, msk = index * slots, index, index, index, selected, masked
    if fill is not None:
        wanted, fill_masked, spill = fill
        k = torch.arange(1, slots, device=index.device)
        e = index[..., None].expand(-1, -1, slots - 1)
        key = torch.cat([key, (e * slots + k).flatten(1)], dim=1)
        src = torch.cat([src, ((e + k).clamp(max=length - 1) if spill else e).flatten(1)], dim=1)
        owner = torch.cat([owner, e.flatten(1)], dim=1)
        idx = torch.cat([idx, (e + k).flatten(1)], dim=1)
        sel = torch.cat([sel, wanted.flatten(1)], dim=1)
        msk = torch.cat([msk, fill_masked.flatten(1)], dim=1)
    count = sel.sum(dim=1)  # (R,)
    width = int(count.max()) if count.numel() else 0
    order = torch.sort(torch.where(sel, key, key.max() + 1 if key.numel() else 0), dim=1, stable=True).indices
    order = order[:, :width]  # (R, N)
    valid = torch.arange(width, device=input_ids.device)[None, :] < count[:, None]
    source, owner = src.gather(1, order), owner.gather(1, order)
    is_masked = msk.gather(1, order) & valid
    xt = torch.where(is_masked, torch.full_like(source, mask_token_id), input_ids.gather(1, source))
    own_block = block.gather(1, owner)
    return NoisyStream(
        xt=xt, source=source, block=own_block, group=torch.where(valid, own_block + group_offset, -1),
        valid=valid, masked=is_masked, t=t.gather(1, owner), index=idx.gather(1, order),
    )


def _concat_streams(parts: list[NoisyStream]) -> NoisyStream:
    if len(parts) == 1:
        return parts[0]
    fields = NoisyStream.__dataclass_fields__
    return NoisyStream(**{name: torch.cat([getattr(p, name) for p in parts], dim=1) for name in fields})
