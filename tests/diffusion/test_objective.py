"""Invariants 2 and 3: the two-stream training forward agrees with the AR model and with decoding."""

import pytest
import torch

import dvlm
from dvlm.config import DiffusionConfig
from dvlm.convert.verify import causal_logits
from dvlm.data.collate import collate
from dvlm.data.processor import IGNORE_INDEX
from dvlm.diffusion.noising import NoisyStream, build_noisy_stream
from dvlm.diffusion.objective import (
    diffusion_objective,
    diffusion_targets,
    loss_normaliser,
    two_stream_hidden,
    weigh_token_losses,
)
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
    # The family's own model inputs are those its HF generate takes (vision tensors, token types...).
    batch = collate([sample], lm.processor.pad_token_id)
    with torch.no_grad():
        hf = lm.model(input_ids=batch.input_ids, **lm.adapter.hf_generate_inputs(batch)).logits[0]
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
    checked = 0
    for group in stream.group[0][stream.masked[0]].unique().tolist():
        idx = (stream.group[0] == group).nonzero(as_tuple=True)[0]
        if fill:
            assert len(idx) == block_size  # every block whole, fill tokens included
        decode_logits = _decode_block_logits(lm, cfg, batch, stream, clean_block, idx)
        assert torch.allclose(decode_logits, noisy_logits[idx], atol=ATOL), f"block group {group}"
        checked += 1
    assert checked >= 3  # several blocks, across turns (and both copies for fast-dvlm)


@pytest.mark.parametrize("block_size", [4, 8])
def test_untruncated_last_block_is_a_block_forward_over_what_follows(models, image, block_size):
    """`truncate_last_block=False`: a turn's last block, taken on over the next turn's first tokens,
    is the block forward over the cache that a block laid over the conversation would get; the
    tokens it takes in are shown, never scored, and the loss counts the same masked tokens."""
    lm = models["fast-dvlm"]
    cfg = DiffusionConfig(**{**lm.diffusion.to_dict(), "truncate_last_block": False, "fill_last_block": False})
    _, batch, stream, clean_block, noisy_h, _ = _forward(lm, image, cfg, block_size)
    noisy_logits = lm.adapter.logits(lm.model, noisy_h)[0]
    spilled = stream.valid[0] & (stream.block[0] != clean_block[0, stream.source[0]])
    groups = stream.group[0][spilled].unique().tolist()
    assert len(groups) >= 2  # two turns end mid-block, in both copies
    for group in groups:
        idx = (stream.group[0] == group).nonzero(as_tuple=True)[0]
        ends_row = int(stream.index[0, idx].max()) == int(batch.attention_mask[0].sum()) - 1
        assert len(idx) == block_size or ends_row  # whole, unless the conversation ends first
        decode_logits = _decode_block_logits(lm, cfg, batch, stream, clean_block, idx)
        assert torch.allclose(decode_logits, noisy_logits[idx], atol=ATOL), f"block group {group}"
    assert not stream.masked[0][spilled].any()
    truncated = DiffusionConfig(**{**cfg.to_dict(), "truncate_last_block": True})
    with torch.no_grad():
        out = diffusion_objective(lm.adapter, lm.model, batch, stream, clean_block, cfg, normaliser=10)
        ref = diffusion_objective(lm.adapter, lm.model, batch, *_forward(lm, image, truncated, block_size)[2:4],
                                  truncated, normaliser=10)
    assert out.num_masked == ref.num_masked and torch.isfinite(out.loss)


@pytest.mark.parametrize("block_size", [4, 8])
def test_noisy_blocks_holding_image_tokens_equal_block_forward_over_cache(models, image, block_size):
    """Invariant 3 for the blocks of a noisy stream that copies image tokens (`noisy_stream="all"`,
    the DiffusionVL preset): an image token's noisy copy is that token with all the features the
    family's `embed` gives it (its vision embedding, and Qwen3-VL's DeepStack features), so the block
    sees what a block forward over the cache sees for a prompt embedded with its images."""
    lm = models["diffusionvl"]
    cfg = lm.diffusion
    assert cfg.noisy_stream == "all"
    _, batch, stream, clean_block, noisy_h, _ = _forward(lm, image, cfg, block_size)
    noisy_logits = lm.adapter.logits(lm.model, noisy_h)[0]
    copies_image = batch.mm_token_type_ids[0, stream.source[0]] != 0  # (N,)
    groups = stream.group[0][copies_image].unique().tolist()
    for group in groups:
        idx = (stream.group[0] == group).nonzero(as_tuple=True)[0]
        decode_logits = _decode_block_logits(lm, cfg, batch, stream, clean_block, idx)
        assert torch.allclose(decode_logits, noisy_logits[idx], atol=ATOL), f"block group {group}"
    assert groups  # the stream copies the image


def _decode_block_logits(lm, cfg: DiffusionConfig, batch, stream: NoisyStream, clean_block, idx):
    """Logits of noisy tokens `idx` (one block) as decoding computes them: the clean tokens before the
    block committed to a cache with the clean-stream mask, then one bidirectional pass over the block."""
    src = stream.source[0, idx]
    start = int(src.min())
    kind = "causal" if cfg.clean_attention == "causal" else "block_causal"
    ctx = KVContext(lm.adapter, lm.model, 1, torch.device("cpu"))
    with torch.no_grad():
        clean = lm.adapter.embed(lm.model, batch.input_ids, batch.vision)
        mask_embed = lm.adapter.embed(lm.model, torch.tensor([[cfg.mask_token_id]]))[0, 0]
        if start:
            ctx.commit(clean[:, :start], batch.position_ids[:, :, :start], batch.attention_mask[:, :start],
                       clean_block[:, :start], kind)
        block = torch.where(stream.masked[0, idx, None], mask_embed, clean[0, src])[None]
        positions = batch.position_ids[:, :, src] + (stream.index[0, idx] - src)
        hidden = ctx.peek(block, positions, torch.ones(1, len(idx), dtype=torch.bool),
                          torch.full((1, len(idx)), ctx.next_block_id()), "bidirectional")
        return lm.adapter.logits(lm.model, hidden)[0]


def test_objective_normalisation_and_weights(models, image):
    lm = models["fast-dvlm"]
    cfg = lm.diffusion
    _, batch, stream, clean_block, _, _ = _forward(lm, image, cfg, block_size=4)
    with torch.no_grad():
        out = diffusion_objective(lm.adapter, lm.model, batch, stream, clean_block, cfg, normaliser=10)
    expected = (cfg.diffusion_loss_weight * out.diffusion_sum + cfg.ar_loss_weight * out.ar_sum) / 10
    assert torch.allclose(out.loss, expected)
    # The AR sum by hand: clean output i scored against the response token at i + 1.
    with torch.no_grad():
        _, clean_h = two_stream_hidden(lm.adapter, lm.model, batch, stream, cfg, clean_block)
        logits = lm.adapter.logits(lm.model, clean_h[0, :-1]).float()
    ar = torch.nn.functional.cross_entropy(logits, batch.labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
    assert torch.allclose(out.ar_sum, ar, rtol=1e-5)
    # With complementary masks and token shift, every response token except block starts is scored once.
    from dvlm.model.masks import block_starts

    response = batch.labels != -100
    starts = block_starts(clean_block) & response
    assert out.num_masked == int(response.sum() - starts.sum())
    assert out.num_response == int(response.sum())


def _literal_stream() -> NoisyStream:
    """One row: clean positions 6..11 copied as two blocks (groups 1 and 2), masks at 7..10."""
    source = torch.tensor([[6, 7, 8, 9, 10, 11]])
    masked = torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    group = torch.tensor([[1, 1, 1, 2, 2, 2]])
    return NoisyStream(xt=torch.where(masked, 99, source * 10), source=source, block=group, group=group,
                       valid=torch.ones_like(masked), masked=masked,
                       t=torch.tensor([[0.2, 0.2, 0.2, 0.7, 0.7, 0.7]]), index=source)


def test_diffusion_targets_literal():
    """Token shift: output j learns the masked token j + 1 of its own block (never its own
    position, never the next block's first token). Without: each masked output learns itself."""
    input_ids = torch.arange(20)[None] * 10  # token at position p is 10 p
    rows, cols, targets, t = diffusion_targets(_literal_stream(), input_ids, token_shift=True)
    assert cols.tolist() == [0, 1, 3] and rows.tolist() == [0, 0, 0]
    assert targets.tolist() == [70, 80, 100]
    assert t.tolist() == pytest.approx([0.2, 0.2, 0.7])
    rows, cols, targets, t = diffusion_targets(_literal_stream(), input_ids, token_shift=False)
    assert cols.tolist() == [1, 2, 3, 4]
    assert targets.tolist() == [70, 80, 90, 100]
    assert t.tolist() == pytest.approx([0.2, 0.2, 0.7, 0.7])


def _cfg(preset: str, **overrides) -> DiffusionConfig:
    return DiffusionConfig.from_preset(preset, **overrides)


def test_token_weights_literal():
    ce, t = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 0.25])
    row_tokens = torch.tensor([4, 2])
    assert weigh_token_losses(ce, t, row_tokens, _cfg("fast-dvlm")).tolist() == [2.0, 3.0]
    assert weigh_token_losses(ce, t, row_tokens, _cfg("fast-dvlm", loss_weighting="inverse_t")).tolist() == [4.0, 12.0]
    assert weigh_token_losses(ce, t, row_tokens, _cfg("diffusionvl")).tolist() == [1.0, 6.0]
    assert weigh_token_losses(ce, t, row_tokens, _cfg("diffusionvl", loss_weighting="none")).tolist() == [0.5, 1.5]


def _labels(counts: list[int], width: int = 30) -> torch.Tensor:
    labels = torch.full((len(counts), width), IGNORE_INDEX)
    for row, n in enumerate(counts):
        labels[row, width - n:] = 1
    return labels


def test_loss_normalisation_literal():
    """Two rows with 23 and 17 labelled tokens; row 0 scores CE 1 and 2 at t = 0.5, row 1 CE 3 at
    t = 0.25 (1/t-weighted: 2 + 4 = 6 and 12). DiffusionVL: the mean over rows of each row's
    weighted sum over its labelled tokens; dvlm's `tokens`: the total over all labelled tokens."""
    labels = _labels([23, 17])
    ce, t, rows = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.5, 0.25]), torch.tensor([0, 0, 1])
    row_tokens = torch.tensor([23, 17])[rows]
    for preset, normaliser, expected in [("diffusionvl", 2, (6 / 23 + 12 / 17) / 2),
                                         ("fast-dvlm", 40, (6 + 12) / 40)]:
        cfg = _cfg(preset, loss_weighting="inverse_t")
        assert loss_normaliser([labels], cfg) == normaliser
        loss = weigh_token_losses(ce, t, row_tokens, cfg).sum() / normaliser
        assert loss.item() == pytest.approx(expected, rel=1e-6)
    # An accumulation window of two micro-batches: rows (3) or labelled tokens (23 + 17 + 5).
    window = [labels, _labels([5])]
    assert loss_normaliser(window, _cfg("diffusionvl")) == 3
    assert loss_normaliser(window, _cfg("fast-dvlm")) == 45
    assert loss_normaliser(window, None) == 45  # plain AR training counts tokens


def _two_rows(lm, cfg: DiffusionConfig, seed: int = 0):
    """Two text conversations with different numbers of labelled tokens, noised by `cfg`."""
    convs = [[{"role": "user", "content": "How many shapes are there?"},
              {"role": "assistant", "content": "There are 3 shapes. A red circle is in the top left."}],
             [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "red"}]]
    batch = collate([lm.processor.encode(c) for c in convs], lm.processor.pad_token_id)
    stream, clean_block = build_noisy_stream(batch.input_ids, batch.labels, batch.attention_mask,
                                             batch.mm_token_type_ids, cfg, cfg.block_size,
                                             torch.Generator().manual_seed(seed))
    return batch, stream, clean_block


def _per_token_ce(lm, batch, stream, clean_block, cfg):
    """Every scored noisy token's CE, its t and its row, from the full noisy logits."""
    noisy_h, clean_h = two_stream_hidden(lm.adapter, lm.model, batch, stream, cfg, clean_block)
    rows, cols, targets, t = diffusion_targets(stream, batch.input_ids, cfg.token_shift)
    logits = lm.adapter.logits(lm.model, noisy_h).float()
    ce = torch.nn.functional.cross_entropy(logits[rows, cols], targets, reduction="none")
    return ce, t, rows, clean_h


@pytest.mark.parametrize("normalisation", ["rows", "tokens"])
def test_diffusionvl_loss_by_hand(models, normalisation):
    """The preset's loss from the per-token CEs: exact 1/t weights, each row over its own
    labelled tokens (`rows`, DiffusionVL) or all over the total (`tokens`)."""
    lm = models["diffusionvl"]
    cfg = DiffusionConfig(**{**lm.diffusion.to_dict(), "loss_normalisation": normalisation, "block_size": 4})
    batch, stream, clean_block = _two_rows(lm, cfg)
    counts = (batch.labels != IGNORE_INDEX).sum(dim=1)
    assert counts[0] != counts[1]
    with torch.no_grad():
        ce, t, rows, _ = _per_token_ce(lm, batch, stream, clean_block, cfg)
        out = diffusion_objective(lm.adapter, lm.model, batch, stream, clean_block, cfg,
                                  loss_normaliser([batch.labels], cfg))
    weighted = ce / t
    if normalisation == "rows":
        per_row = [weighted[rows == r].sum() / counts[r] for r in range(2)]
        expected = (per_row[0] + per_row[1]) / 2
    else:
        expected = weighted.sum() / counts.sum()
    assert out.num_masked == len(ce) > 0 and (t < 0.9).any()  # 1/t is not ~1 everywhere
    assert torch.allclose(out.loss, expected, rtol=1e-5)


def test_rows_normalisation_of_the_ar_loss(models):
    """With an AR loss, `rows` divides each row's AR CE by its labelled tokens too."""
    lm = models["fast-dvlm"]
    cfg = DiffusionConfig(**{**lm.diffusion.to_dict(), "loss_normalisation": "rows", "block_size": 4})
    batch, stream, clean_block = _two_rows(lm, cfg)
    counts = (batch.labels != IGNORE_INDEX).sum(dim=1)
    with torch.no_grad():
        ce, _, rows, clean_h = _per_token_ce(lm, batch, stream, clean_block, cfg)
        out = diffusion_objective(lm.adapter, lm.model, batch, stream, clean_block, cfg, normaliser=2)
        ar_logits = lm.adapter.logits(lm.model, clean_h[:, :-1]).float()
    ar_ce = torch.nn.functional.cross_entropy(ar_logits.transpose(1, 2), batch.labels[:, 1:],
                                              ignore_index=IGNORE_INDEX, reduction="none")  # (B, L-1)
    ar_sum = (ar_ce.sum(dim=1) / counts).sum()
    diff_sum = sum(ce[rows == r].sum() / counts[r] for r in range(2))
    assert torch.allclose(out.ar_sum, ar_sum, rtol=1e-5)
    assert torch.allclose(out.loss, (0.5 * diff_sum + 0.5 * ar_sum) / 2, rtol=1e-5)
