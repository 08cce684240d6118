"""The baseline: transformers' own `generate` on the same prompts (AR, KV-cached by HF), with
exactly the settings dvlm's decoders run with.

transformers fills every setting a `generate` call leaves unset from the model's
`generation_config`, which it reads from the checkpoint's generation_config.json: a published
one may ask for sampling with `repetition_penalty` 1.05, which turns a greedy call into a
penalised one that parts from greedy decoding. The baseline runs with a blank generation config instead, so
greedy means greedy (no penalty, no sampling, no other logits processor) and sampling uses only the
temperature, top-k and top-p that `out.settings` records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import GenerationConfig

from dvlm.config import DecodeConfig
from dvlm.data.collate import collate
from dvlm.data.processor import Encoded
from dvlm.decode.output import GenerationOutput
from dvlm.decode.rows import Rows
from dvlm.decode.settings import resolve, split
from dvlm.model.loaded import LoadedModel
from dvlm.runtime import Timer, seeded_global_rng


@torch.inference_mode()
def generate_hf(lm: LoadedModel, prompts: list[Encoded], cfg: DecodeConfig, listener=None) -> list[GenerationOutput]:
    """HF `generate` with our prompts; `nfe` per row is its own number of generated tokens
    (HF keeps finished rows in the batch, padding them, until the longest row ends)."""
    timer = Timer(lm.device)
    group, row = split(resolve(dataclasses.replace(cfg, decoder="hf"), lm.diffusion, lm.path))
    batch = collate(prompts, lm.processor.pad_token_id, padding_side="left").to(lm.device)
    sampling = dict(do_sample=False)
    if not row.sampling.greedy:
        s = row.sampling
        sampling = dict(do_sample=True, temperature=s.temperature, top_k=s.top_k or 0, top_p=s.top_p or 1.0)
    # HF samples from torch's global stream, seeded for the call
    with timer("decode"), seeded_global_rng(row.sampling.seed, lm.device), blank_generation_config(lm.model):
        out = lm.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask.long(),
            max_new_tokens=row.max_new_tokens,
            eos_token_id=lm.eos_token_ids,
            pad_token_id=lm.processor.pad_token_id,
            suppress_tokens=lm.banned_token_ids or None,
            **lm.adapter.hf_generate_inputs(batch),
            **sampling,
        )
    rows = Rows(lm.eos_token_ids, lm.banned_token_ids)
    ids = rows.add([row] * len(prompts), [len(p) for p in prompts], lm.device)
    rows.enter(ids)
    committed, _ = rows.extend(out[:, batch.input_ids.shape[1]:].tolist())
    for row_id, tokens in committed if listener is not None else ():  # streams all at the end
        listener(ids.index(row_id), tokens)
    for row_id in ids:
        rows[row_id].nfe = len(rows[row_id].tokens) + (rows[row_id].finish == "stop")
    return [rows.output(row_id, lm.processor.decode, "hf", timer.as_dict(), group) for row_id in ids]


@contextmanager
def blank_generation_config(model: nn.Module) -> Iterator[None]:
    """`model.generate` with transformers' defaults only, not the checkpoint's generation_config.json
    (restored afterwards: saving the model writes the checkpoint's own)."""
    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own
