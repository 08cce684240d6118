"""Invariants 2 and 3: the two-stream training forward agrees with the AR model and with decoding."""

import pytest
import torch

import dvlm
from dvlm.config import DiffusionConfig
from dvlm.convert.verify import causal_logits
from dvlm.data.collate import collate
from dvlm.diffusion.noising import build_noisy_stream
from dvlm.diffusion.objective import diffusion_objective, two_stream_hidden
from dvlm.model.cache import KVContext

ATOL = 2e-4


def _conversation(image):
    return [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": "There are 3 shapes. A red circle is in the top left. A blue square is in the center."},
        {"role": "user", "content": "How many shapes are there?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "What colour is the circle?"},
        {"role": "assistant", "content": "red"},
    ]


@pytest.fixture(scope="module")
def models(dvlm_checkpoints):
    return {preset: dvlm.load(path) for preset, path in dvlm_checkpoints.items()}


def _forward(lm, image, cfg: DiffusionConfig, block_size: int, seed: int = 0):
    sample = lm.processor.encode(_conversation(image))
    batch = collate([sample], lm.processor.pad_token_id)
    stream, clean_block = build_noisy_stream(
        batch.input_ids, batch.labels, batch.attention_mask, batch.mm_token_type_ids, cfg, block_size,
        torch.Generator().manual_seed(seed),
    )
    with torch.no_grad():
        noisy_h, clean_h = two_stream_hidden(lm.adapter, lm.model, batch, stream, cfg, clean_block)
    return sample, batch, stream, clean_block, noisy_h, clean_h


@pytest.mark.parametrize("noisy_stream", ["response", "text", "all"])
def test_clean_stream_is_the_ar_model(models, image, noisy_stream):
    """Invariant 2: clean-stream logits == a plain causal forward of the AR model."""
    lm = models["fast-dvlm"]
    cfg = DiffusionConfig(**{**lm.diffusion.to_dict(), "noisy_stream": noisy_stream})
    sample, _, _, _, _, clean_h = _forward(lm, image, cfg, block_size=4)
    clean_logits = lm.adapter.logits(lm.model, clean_h)[0]
    reference = causal_logits(lm.adapter, lm.model, sample, lm.processor.pad_token_id)
    assert torch.allclose(clean_logits, reference, atol=ATOL)
    # And against HF's own forward (its own mask and rope index), independently of our seams.
    with torch.no_grad():
        hf = lm.model(input_ids=sample.input_ids[None], pixel_values=sample.pixel_values,
                      image_grid_thw=sample.image_grid_thw, mm_token_type_ids=sample.mm_token_type_ids[None]).logits[0]
    assert torch.allclose(clean_logits, hf, atol=ATOL)


@pytest.mark.parametrize("preset,block_size,fill", [("fast-dvlm", 4, False), ("fast-dvlm", 8, False),
                                                    ("fast-dvlm", 8, True), ("fast-dvlm", 16, True),
                                                    ("diffusionvl", 8, False), ("diffusionvl", 4, False)])
def test_training_block_equals_decode_block_over_cache(models, image, preset, block_size, fill):
    """Invariant 3: noisy-stream logits of each block == the decode-time block forward over the KV
    cache of everything before the block (the cache written with the clean-stream mask). With
    fill_last_block, a truncated last block is whole again, as decoding sees it."""
    lm = models[preset]
    cfg = DiffusionConfig(**{**lm.diffusion.to_dict(), "fill_last_block": fill})
    _, batch, stream, clean_block, noisy_h, _ = _forward(lm, image, cfg, block_size)
    noisy_logits = lm.adapter.logits(lm.model, noisy_h)[0]
    with torch.no_grad():
        clean = lm.adapter.embed(lm.model, batch.input_ids, batch.pixel_values, batch.image_grid_thw)
    mask_embed = lm.model.get_input_embeddings().weight[cfg.mask_token_id]
    kind = "causal" if cfg.clean_attention == "causal" else "block_causal"
    checked = 0
    for group in stream.group[0][stream.masked[0]].unique().tolist():
        idx = (stream.group[0] == group).nonzero(as_tuple=True)[0]
        src = stream.source[0, idx]
        start = int(src.min())
        ctx = KVContext(lm.adapter, lm.model, 1, torch.device("cpu"))
        with torch.no_grad():
            if start:
                ctx.commit(clean[:, :start], batch.position_ids[:, :, :start], batch.attention_mask[:, :start],
                           clean_block[:, :start], kind)
            block = torch.where(stream.masked[0, idx, None], mask_embed, clean[0, src])[None]
            positions = batch.position_ids[:, :, src] + (stream.index[0, idx] - src)
            if fill:
                assert len(idx) == block_size  # every block whole, fill tokens included
            hidden = ctx.peek(block, positions, torch.ones(1, len(idx), dtype=torch.bool),
                              torch.full((1, len(idx)), ctx.next_block_id()), "bidirectional")
            decode_logits = lm.adapter.logits(lm.model, hidden)[0]
        assert torch.allclose(decode_logits, noisy_logits[idx], atol=ATOL), f"block group {group}"
        checked += 1
    assert checked >= 3  # several blocks, across turns (and both copies for fast-dvlm)


def test_objective_normalisation_and_weights(models, image):
    lm = models["fast-dvlm"]
    cfg = lm.diffusion
    _, batch, stream, clean_block, _, _ = _forward(lm, image, cfg, block_size=4)
    with torch.no_grad():
        out = diffusion_objective(lm.adapter, lm.model, batch, stream, clean_block, cfg, normaliser=10)
    expected = (cfg.diffusion_loss_weight * out.diffusion_sum + cfg.ar_loss_weight * out.ar_sum) / 10
    assert torch.allclose(out.loss, expected)
    # With complementary masks and token shift, every response token except block starts is scored once.
    from dvlm.model.masks import block_starts

    response = batch.labels != -100
    starts = block_starts(clean_block) & response
    assert out.num_masked == int(response.sum() - starts.sum())
    assert out.num_response == int(response.sum())


def test_objective_inverse_t_weighting(models, image):
    lm = models["diffusionvl"]
    cfg = lm.diffusion
    _, batch, stream, clean_block, _, _ = _forward(lm, image, cfg, block_size=8)
    plain = DiffusionConfig(**{**cfg.to_dict(), "loss_weighting": "none"})
    with torch.no_grad():
        weighted = diffusion_objective(lm.adapter, lm.model, batch, stream, clean_block, cfg, normaliser=1)
        unweighted = diffusion_objective(lm.adapter, lm.model, batch, stream, clean_block, plain, normaliser=1)
    assert weighted.num_masked > 0
    assert weighted.diffusion_sum > unweighted.diffusion_sum  # 1/t >= 1
    assert weighted.ar_sum == 0
