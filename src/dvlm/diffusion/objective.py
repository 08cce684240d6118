"""The two-stream training forward and the joint diffusion + AR objective.

One forward over `[x_t ; x_0]`: the noisy stream holds copies of some clean positions (with
[MASK] at masked ones) at the same position ids (`dvlm.data.positions.copy_positions`); the clean
stream is the whole sample with vision features. Because clean tokens never attend to noisy ones and the clean mask is the AR
model's own, the clean-stream outputs are exactly the AR model's (invariant 2).

Loss (Fast-dVLM, reference/algorithms.md §5.5):
    loss = alpha * S_diff / N + beta * S_ar / N
with S_diff the (optionally 1/t-weighted) CE summed over masked noisy positions, S_ar the
next-token CE summed over response tokens of the clean stream, N the number of response tokens
of the optimizer step (`loss_normalisation='tokens'`). With `loss_normalisation='rows'` (LLaDA-V,
DiffusionVL, reference/algorithms.md §1.5) each token's term is first divided by its row's count
of labelled tokens N_b, and N is the number of rows:
    loss = (1 / R) * sum_b (alpha * S_diff_b + beta * S_ar_b) / N_b
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dvlm.config import DiffusionConfig
from dvlm.data.collate import Batch
from dvlm.data.positions import copy_positions
from dvlm.data.processor import response_mask
from dvlm.diffusion.noising import NoisyStream
from dvlm.model.adapters.base import Adapter
from dvlm.model.masks import to_additive, two_stream_mask


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, already divided by the normaliser
    diffusion_sum: torch.Tensor  # S_diff (detached)
    ar_sum: torch.Tensor  # S_ar (detached)
    num_masked: int
    num_response: int


def two_stream_hidden(
    adapter: Adapter, model: nn.Module, batch: Batch, stream: NoisyStream, cfg: DiffusionConfig,
    clean_block: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of the noisy (R, N, D) and clean (R, L, D) streams from one forward."""
    clean = adapter.embed(model, batch.input_ids, batch.vision)  # (R, L, F)
    # Noisy tokens copy the clean embedding (vision features included when copied) unless masked.
    noisy = clean.gather(1, stream.source[..., None].expand(-1, -1, clean.shape[-1]))  # (R, N, F)
    # Through the embedding module, not its weight: ZeRO-3 gathers a layer's weights only in its forward.
    mask_ids = torch.full_like(stream.xt[:1, :1], cfg.mask_token_id)
    mask_embed = adapter.embed(model, mask_ids)[0, 0].to(noisy.dtype)  # (F,)
    noisy = torch.where(stream.masked[..., None], mask_embed, noisy)
    positions = batch.position_ids  # (A, R, L)
    # Fill tokens (index > source) continue the text positions past the response's last token.
    noisy_pos = copy_positions(positions, stream.source, stream.index - stream.source)
    mask = two_stream_mask(
        stream.block, stream.group, stream.valid, clean_block, batch.attention_mask,
        "causal" if cfg.clean_attention == "causal" else "block_causal",
    )
    hidden = adapter.hidden_states(
        model,
        torch.cat([noisy, clean], dim=1),
        torch.cat([noisy_pos, positions], dim=2),
        to_additive(mask, noisy.dtype),
    )
    n_noisy = stream.xt.shape[1]
    return hidden[:, :n_noisy], hidden[:, n_noisy:]


def diffusion_targets(stream: NoisyStream, input_ids: torch.Tensor, token_shift: bool):
    """Which noisy outputs are scored, and against what.

    Returns (rows, cols, targets, t): noisy-stream output (rows, cols) predicts token `targets`
    of a masked position whose block had masking rate t. With token shift, output j predicts
    the next token of the same block (position j + 1); otherwise output j predicts itself.
    """
    if not token_shift:
        rows, cols = stream.masked.nonzero(as_tuple=True)
        return rows, cols, input_ids[rows, stream.source[rows, cols]], stream.t[rows, cols]
    nxt_masked = stream.masked[:, 1:]
    same_block = stream.group[:, 1:] == stream.group[:, :-1]
    adjacent = stream.index[:, 1:] == stream.index[:, :-1] + 1
    rows, cols = (nxt_masked & same_block & adjacent).nonzero(as_tuple=True)
    targets = input_ids[rows, stream.source[rows, cols + 1]]
    return rows, cols, targets, stream.t[rows, cols + 1]


def row_label_counts(labels: torch.Tensor) -> torch.Tensor:
    """(R,) long: labelled tokens per row, at least 1 (a row without labels then adds 0, not NaN)."""
    return response_mask(labels).sum(dim=1).clamp(min=1)


def weigh_token_losses(ce: torch.Tensor, t: torch.Tensor, row_tokens: torch.Tensor, cfg: DiffusionConfig):
    """The terms the diffusion loss sums, one per scored token (M,).

    Args:
        ce: (M,) cross-entropies; t: (M,) the masking rate of each token's block;
        row_tokens: (M,) labelled tokens of each token's row (`row_label_counts`).
    `inverse_t` multiplies by 1/t (BD3-LM's ELBO weight |-1/t|); `rows` then divides by the row's
    labelled tokens. Example: ce [2, 3], t [.5, .25], row_tokens [4, 2], both on -> [1, 6].
    """
    if cfg.loss_weighting == "inverse_t":
        ce = ce * (1 / t)
    if cfg.loss_normalisation == "rows":
        ce = ce / row_tokens
    return ce


def loss_normaliser(labels: list[torch.Tensor], cfg: DiffusionConfig | None) -> int:
    """N, the denominator of one optimizer step's loss, from the labels (R, L) of its micro-batches.

    `tokens` (and plain AR training, cfg None): the labelled tokens of the whole accumulation
    window, so the accumulated gradient is that of one big batch. `rows`: the window's rows, so
    every row's normalised loss counts once. DiffusionVL (HF Trainer) averages rows within a
    micro-batch and then micro-batches (and devices); that is the same mean whenever the window's
    micro-batches hold equally many rows, and weighs every row alike when a last one is smaller.
    """
    if cfg is not None and cfg.loss_normalisation == "rows":
        return sum(int(y.shape[0]) for y in labels)
    return sum(int(response_mask(y).sum()) for y in labels)


def diffusion_objective(
    adapter: Adapter, model: nn.Module, batch: Batch, stream: NoisyStream, clean_block: torch.Tensor,
    cfg: DiffusionConfig, normaliser: int,
) -> LossOutput:
    """alpha * S_diff / N + beta * S_ar / N for one micro-batch, N = `normaliser`: the whole
    accumulation window's `loss_normaliser`, so accumulated gradients are exact."""
    noisy_h, clean_h = two_stream_hidden(adapter, model, batch, stream, cfg, clean_block)
    rows, cols, targets, t = diffusion_targets(stream, batch.input_ids, cfg.token_shift)
    # Logits only where scored: the full (R, N + L, V) tensor is large for real vocabularies.
    logits = adapter.logits(model, noisy_h[rows, cols]).float()  # CE in fp32
    ce = F.cross_entropy(logits, targets, reduction="none")
    row_tokens = row_label_counts(batch.labels)  # (R,)
    diffusion_sum = weigh_token_losses(ce, t, row_tokens[rows], cfg).sum()
    ar_sum = torch.zeros((), device=diffusion_sum.device)
    if cfg.ar_loss_weight > 0:
        per_row = row_tokens if cfg.loss_normalisation == "rows" else None
        ar_sum = ar_loss_sum(adapter, model, clean_h, batch.labels, per_row)
    loss = (cfg.diffusion_loss_weight * diffusion_sum + cfg.ar_loss_weight * ar_sum) / max(normaliser, 1)
    num_response = int(response_mask(batch.labels).sum())
    return LossOutput(loss, diffusion_sum.detach(), ar_sum.detach(), int(rows.numel()), num_response)


def ar_loss_sum(adapter: Adapter, model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                row_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token CE: output i scored against labels[i + 1] where labelled.

    With `row_tokens` (R,), each token's CE is first divided by its row's count (`rows`)."""
    rows, cols = response_mask(labels[:, 1:]).nonzero(as_tuple=True)
    logits = adapter.logits(model, hidden[rows, cols]).float()
    targets = labels[rows, cols + 1]
    if row_tokens is None:
        return F.cross_entropy(logits, targets, reduction="sum")
    return (F.cross_entropy(logits, targets, reduction="none") / row_tokens[rows]).sum()


def ar_objective(adapter: Adapter, model: nn.Module, batch: Batch, normaliser: int) -> LossOutput:
    """Plain autoregressive training (how the built-in AR model is made): the AR model's own forward."""
    hidden = adapter.causal_hidden_states(model, batch)
    ar_sum = ar_loss_sum(adapter, model, hidden, batch.labels)
    zero = torch.zeros((), device=ar_sum.device)
    num_response = int(response_mask(batch.labels).sum())
    return LossOutput(ar_sum / max(normaliser, 1), zero, ar_sum.detach(), 0, num_response)
