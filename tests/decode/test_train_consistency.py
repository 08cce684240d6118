"""Invariant 3 through the real decoder: every denoising pass the block decoder runs sees exactly
what the training forward shows the model for that block.

The decoder runs as it always does (prefill, passes, commits: its own masks, positions and cache);
a recording context keeps each pass's inputs and outputs. The finished answer then becomes a
training sample, and one two-stream training forward holds every recorded pass as its own noisy
copy of its block (the same tokens masked). Pass by pass, the logits must agree: a commit written
with another mask than the training clean stream, a shifted position or a wrong prefill shows up.
"""

import pytest
import torch

from dvlm.config import DecodeConfig
from dvlm.convert.verify import probe_image
from dvlm.data.collate import collate
from dvlm.data.processor import IGNORE_INDEX, Encoded
from dvlm.decode.block import generate_block
from dvlm.diffusion.noising import NoisyStream, clean_block_ids
from dvlm.diffusion.objective import two_stream_hidden
from dvlm.model.cache import KVContext

ATOL = 2e-4


def recording_context(passes: list):
    """A KVContext class that appends (embeds (1, Q, F), positions (3, 1, Q), hidden (1, Q, D)) of
    every denoising pass (`peek`) to `passes`."""

    class Recording(KVContext):
        def peek(self, embeds, position_ids, query_valid, query_block, kind):
            hidden = super().peek(embeds, position_ids, query_valid, query_block, kind)
            passes.append((embeds, position_ids, hidden))
            return hidden

    return Recording


def _as_training_sample(lm, prompt: Encoded, answer: list[int]) -> Encoded:
    """The prompt followed by the decoded answer (labelled), positions continuing the prompt's (as
    text, on every axis of the family's positions)."""
    n = len(answer)
    start = prompt.next_position
    answer_positions = lm.positions.along_axes(start + torch.arange(n))
    return Encoded(
        input_ids=torch.cat([prompt.input_ids, torch.tensor(answer)]),
        labels=torch.cat([torch.full((len(prompt),), IGNORE_INDEX), torch.tensor(answer)]),
        mm_token_type_ids=torch.cat([prompt.mm_token_type_ids, torch.zeros(n, dtype=torch.long)]),
        position_ids=torch.cat([prompt.position_ids, answer_positions], dim=1),
        next_position=start + n, vision=prompt.vision,
    )


def _passes_as_noisy_stream(lm, passes, batch, clean_block, rope_delta: int) -> NoisyStream:
    """One noisy copy per recorded pass: its block's clean positions, masked where the pass was."""
    mask_embed = lm.adapter.embed(lm.model, torch.tensor([[lm.mask_token_id]]))[0, 0]  # all of a row's features
    sources, masked, groups = [], [], []
    for i, (embeds, positions, _) in enumerate(passes):
        width = embeds.shape[1]
        start = int(positions[0, 0, -1]) - rope_delta - (width - 1)  # the last canvas position is generated
        sources.append(torch.arange(start, start + width))
        masked.append((embeds[0] == mask_embed).all(dim=-1))
        groups.append(torch.full((width,), i))
    source, is_masked = torch.cat(sources)[None], torch.cat(masked)[None]
    xt = torch.where(is_masked, lm.mask_token_id, batch.input_ids[0, source[0]][None])
    return NoisyStream(xt=xt, source=source, block=clean_block.gather(1, source),
                       group=torch.cat(groups)[None], valid=torch.ones_like(is_masked), masked=is_masked,
                       t=torch.ones(is_masked.shape), index=source)


@torch.inference_mode()
def _check_decoder_against_training(lm, prompt: Encoded, cfg: DecodeConfig):
    passes = []
    out = generate_block(lm, [prompt], cfg, context_cls=recording_context(passes))[0]
    assert len(out.tokens) == cfg.max_new_tokens  # a whole answer: every decoded block is complete
    batch = collate([_as_training_sample(lm, prompt, out.tokens)], lm.processor.pad_token_id)
    clean_block = clean_block_ids(batch.labels, batch.attention_mask, lm.diffusion, cfg.block_size)
    stream = _passes_as_noisy_stream(lm, passes, batch, clean_block, prompt.next_position - len(prompt))
    clean = lm.adapter.embed(lm.model, batch.input_ids, batch.vision)
    noisy_h, _ = two_stream_hidden(lm.adapter, lm.model, batch, stream, lm.diffusion, clean_block)
    offset = 0
    for i, (embeds, _, hidden) in enumerate(passes):
        width = embeds.shape[1]
        src = stream.source[0, offset:offset + width]
        shown = ~stream.masked[0, offset:offset + width]
        # The pass saw the answer's own tokens wherever it had no mask (a prompt tail included).
        assert torch.allclose(embeds[0, shown], clean[0, src[shown]]), f"pass {i}"
        decode_logits = lm.adapter.logits(lm.model, hidden[0])
        train_logits = lm.adapter.logits(lm.model, noisy_h[0, offset:offset + width])
        assert torch.allclose(decode_logits, train_logits, atol=ATOL), f"pass {i} of {len(passes)}"
        offset += width
    return out, passes


@pytest.mark.parametrize("settings", [dict(threshold=0.9), dict(steps=3)])
def test_fast_dvlm_decoder_passes_equal_training_blocks(confident_models, monkeypatch, settings):
    lm = confident_models["fast-dvlm"]
    monkeypatch.setattr(lm.diffusion, "eos_token_ids", [])  # whole blocks, no early stop
    prompt = lm.encode("Read the digits.", [probe_image(84)])
    cfg = DecodeConfig(decoder="block", block_size=4, max_new_tokens=12, fuse_commit=False, **settings)
    out, passes = _check_decoder_against_training(lm, prompt, cfg)
    assert len(passes) > 3  # several blocks: the later ones read committed blocks from the cache


@pytest.mark.parametrize("prompt_text,steps", [("Hi", 8), ("How many shapes are there?", 4)])
def test_diffusionvl_decoder_passes_equal_training_blocks(confident_models, monkeypatch, prompt_text, steps):
    lm = confident_models["diffusionvl"]
    monkeypatch.setattr(lm.diffusion, "eos_token_ids", [])
    prompt = lm.encode(prompt_text)
    block_size = lm.diffusion.block_size
    tail = len(prompt) % block_size
    cfg = DecodeConfig(decoder="block", block_size=block_size, steps=steps, max_new_tokens=2 * block_size - tail)
    out, passes = _check_decoder_against_training(lm, prompt, cfg)
    assert tail and len(passes) > 2  # the first block holds the prompt's tail
