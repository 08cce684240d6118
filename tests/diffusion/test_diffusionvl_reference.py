"""The `diffusionvl` preset's training loss == DiffusionVL's, written out here as plainly as
possible (hustvl/DiffusionVL `_apply_bd3lm_noise_embedding`, `block_diff_mask`,
`_compute_bd3lm_loss_embedding`; reference/algorithms.md §1.3-1.5), drawing the same noise from
the same generator:

* one u per (row, absolute block), stratified: u = u / N + j / N for flat block j; t = eps_min +
  (eps_max - eps_min) u; a labelled token is masked when a uniform draw falls below its block's t;
* one forward over [x_t ; x_0], 1-D positions 0..L-1 in both halves; a noisy token sees noisy
  tokens of its block and clean tokens of earlier blocks, a clean token clean tokens of its block
  and earlier ones; padding is never seen;
* no token shift; loss = (1 / rows) * sum over rows of sum_i CE_i * (1 / t_i) / (labelled tokens of the row).
"""

import pytest
import torch
import torch.nn.functional as F

import dvlm
from dvlm.data.collate import collate
from dvlm.data.processor import IGNORE_INDEX
from dvlm.diffusion.noising import build_noisy_stream
from dvlm.diffusion.objective import diffusion_objective, loss_normaliser


def _two_stream_mask(length: int, block_size: int, valid: torch.Tensor) -> torch.Tensor:
    """(B, 2L, 2L) bool, BD3-LM's three parts over absolute blocks, AND the padding."""
    index = torch.arange(2 * length)
    clean = index >= length
    block = (index % length) // block_size
    same_noisy = ~clean[:, None] & ~clean[None, :] & (block[:, None] == block[None, :])
    noisy_to_clean = ~clean[:, None] & clean[None, :] & (block[None, :] < block[:, None])
    clean_to_clean = clean[:, None] & clean[None, :] & (block[None, :] <= block[:, None])
    both = torch.cat([valid, valid], dim=1)
    return (same_noisy | noisy_to_clean | clean_to_clean)[None] & both[:, :, None] & both[:, None, :]


def reference_loss(lm, batch, block_size: int, eps_min: float, eps_max: float, generator) -> torch.Tensor:
    rows, length = batch.input_ids.shape
    n_blocks = -(-length // block_size)
    u = torch.rand((rows, n_blocks), generator=generator)
    n = u.numel()
    u = (u / n + (torch.arange(n) / n).view(u.shape)) % 1
    t = (u.repeat_interleave(block_size, dim=1)[:, :length]) * (eps_max - eps_min) + eps_min
    labelled = batch.labels != IGNORE_INDEX
    moved = (torch.rand((rows, length), generator=generator) < t) & labelled  # DiffusionVL: <=
    x0 = lm.adapter.embed(lm.model, batch.input_ids)
    mask_embed = lm.adapter.embed(lm.model, torch.tensor([[lm.mask_token_id]]))[0, 0]  # all of a row's features
    xt = torch.where(moved[..., None], mask_embed, x0)
    allowed = _two_stream_mask(length, block_size, batch.attention_mask)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    positions = torch.arange(length).repeat(2)[None, None].expand(3, rows, -1)
    hidden = lm.adapter.hidden_states(lm.model, torch.cat([xt, x0], dim=1), positions, additive)
    logits = lm.adapter.logits(lm.model, hidden[:, :length]).float()
    ce = F.cross_entropy(logits[moved], batch.labels[moved], reduction="none")
    per_row_tokens = labelled.sum(dim=1, keepdim=True).clamp(min=1).expand_as(labelled)[moved]
    return (ce * (1 / t[moved]) / per_row_tokens).sum() / rows


@pytest.fixture(scope="module")
def lm(dvlm_checkpoints):
    return dvlm.load(dvlm_checkpoints["diffusionvl"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diffusionvl_preset_loss_equals_reference(lm, seed):
    convs = [[{"role": "user", "content": "How many shapes are there?"},
              {"role": "assistant", "content": "There are 3 shapes. A red circle is in the top left."}],
             [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "red"},
              {"role": "user", "content": "And the square?"}, {"role": "assistant", "content": "blue"}]]
    batch = collate([lm.processor.encode(c) for c in convs], lm.processor.pad_token_id)
    cfg = lm.diffusion
    labelled = (batch.labels != IGNORE_INDEX).sum(dim=1)
    assert labelled[0] != labelled[1] and not batch.attention_mask.all()  # unequal rows, padding
    with torch.no_grad():
        expected = reference_loss(lm, batch, cfg.block_size, cfg.eps_min, cfg.eps_max,
                                  torch.Generator().manual_seed(seed))
        stream, clean_block = build_noisy_stream(batch.input_ids, batch.labels, batch.attention_mask,
                                                 batch.mm_token_type_ids, cfg, cfg.block_size,
                                                 torch.Generator().manual_seed(seed))
        out = diffusion_objective(lm.adapter, lm.model, batch, stream, clean_block, cfg,
                                  loss_normaliser([batch.labels], cfg))
    assert out.num_masked > 0
    assert torch.allclose(out.loss, expected, rtol=1e-5, atol=0)
