"""Building the noisy stream x_t from a clean batch x_0: blocks, masking rates, masks, copies."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvlm.config import DiffusionConfig
from dvlm.diffusion.schedule import sample_block_t
from dvlm.model.masks import absolute_block_ids, block_starts, response_block_ids

IGNORE_INDEX = -100


@dataclass
class NoisyStream:
    """The noisy stream of a batch: copies of some clean positions, some replaced by [MASK].

    All tensors are (B, N); N is the longest row's stream (copies concatenated), padded.
    """

    xt: torch.Tensor  # token ids, mask_token_id where masked
    source: torch.Tensor  # index of the clean position each noisy token copies
    block: torch.Tensor  # block id of the source position (for N2C)
    group: torch.Tensor  # N2N group: block id made distinct per complementary copy
    valid: torch.Tensor  # False on padding
    masked: torch.Tensor  # True where xt is [MASK]
    t: torch.Tensor  # masking rate of the token's block

    @property
    def num_masked(self) -> int:
        return int(self.masked.sum())


def clean_block_ids(labels: torch.Tensor, attention_mask: torch.Tensor, cfg: DiffusionConfig, block_size: int):
    """(B, L) block ids of the clean sequence for the configured layout."""
    if cfg.block_layout == "absolute":
        return absolute_block_ids(labels.shape[1], block_size, labels.device).expand_as(labels).clone()
    return response_block_ids((labels != IGNORE_INDEX) & attention_mask, block_size)


def maskable_positions(labels: torch.Tensor, attention_mask: torch.Tensor, block: torch.Tensor, token_shift: bool):
    """(B, L) bool: response tokens that may be masked.

    With token shift, the first token of each block is predicted from the previous block's
    clean context (an AR step, covered by the AR loss) and is known at decode time, so it is never
    masked.
    """
    maskable = (labels != IGNORE_INDEX) & attention_mask
    if token_shift:
        maskable &= ~block_starts(block)
    return maskable


def stream_positions(labels, attention_mask, mm_token_type_ids, cfg: DiffusionConfig) -> torch.Tensor:
    """(B, L) bool: which clean positions the noisy stream copies (`noisy_stream`)."""
    if cfg.noisy_stream == "response":
        return (labels != IGNORE_INDEX) & attention_mask
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
) -> tuple[NoisyStream, torch.Tensor]:
    """Sample x_t for a batch (DESIGN.md §1, "Training").

    Args:
        input_ids, labels, mm_token_type_ids: (B, L) clean batch (labels -100 off responses).
        attention_mask: (B, L) bool.
        block_size: the (possibly annealed) block size B.
    Returns:
        (noisy stream, clean block ids (B, L)).
    """
    block = clean_block_ids(labels, attention_mask, cfg, block_size)  # (B, L)
    maskable = maskable_positions(labels, attention_mask, block, cfg.token_shift)
    num_blocks = int(block.max()) + 1 if block.numel() else 0
    t_block = sample_block_t(
        (input_ids.shape[0], num_blocks), cfg.eps_min, cfg.eps_max,
        cfg.t_sampling == "antithetic", generator, input_ids.device,
    )  # (B, K)
    t = t_block.gather(1, block)  # (B, L)
    draw = torch.rand(t.shape, generator=generator, device=t.device)
    masked = maskable & (draw < t)
    copies = [masked, maskable & ~masked] if cfg.complementary_mask else [masked]
    selected = stream_positions(labels, attention_mask, mm_token_type_ids, cfg)
    parts = [
        _gather_stream(input_ids, selected, block, m, t, cfg.mask_token_id, group_offset=i * num_blocks)
        for i, m in enumerate(copies)
    ]
    return _concat_streams(parts), block


def _gather_stream(input_ids, selected, block, masked, t, mask_token_id: int, group_offset: int) -> NoisyStream:
    """Pack the selected positions of each row to the front (keeping order) and pad."""
    count = selected.sum(dim=1)  # (B,)
    width = int(count.max()) if count.numel() else 0
    # A stable sort on "not selected" moves selected positions first, in their original order.
    source = torch.sort((~selected).int(), dim=1, stable=True).indices[:, :width]  # (B, N)
    valid = torch.arange(width, device=input_ids.device)[None, :] < count[:, None]
    is_masked = masked.gather(1, source) & valid
    xt = torch.where(is_masked, torch.full_like(source, mask_token_id), input_ids.gather(1, source))
    src_block = block.gather(1, source)
    return NoisyStream(
        xt=xt, source=source, block=src_block, group=torch.where(valid, src_block + group_offset, -1),
        valid=valid, masked=is_masked, t=t.gather(1, source),
    )


def _concat_streams(parts: list[NoisyStream]) -> NoisyStream:
    if len(parts) == 1:
        return parts[0]
    fields = NoisyStream.__dataclass_fields__
    return NoisyStream(**{name: torch.cat([getattr(p, name) for p in parts], dim=1) for name in fields})
