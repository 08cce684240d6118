"""The baseline: transformers' own `generate` on the same prompts (AR, KV-cached by HF)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from dvlm.config import DecodeConfig
from dvlm.data.collate import collate
from dvlm.data.processor import Encoded
from dvlm.decode.output import GenerationOutput
from dvlm.decode.rows import Rows, RowSettings
from dvlm.runtime import Timer


@torch.inference_mode()
def generate_hf(lm, prompts: list[Encoded], cfg: DecodeConfig, listener=None) -> list[GenerationOutput]:
    """HF `generate` with our prompts; `nfe` per row is its own number of generated tokens
    (HF keeps finished rows in the batch, padding them, until the longest row ends)."""
    timer = Timer(lm.device)
    batch = collate(prompts, lm.processor.pad_token_id, padding_side="left").to(lm.device)
    sampling = dict(do_sample=False)
    if cfg.temperature > 0:
        sampling = dict(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k or 0, top_p=cfg.top_p or 1.0)
    # Image inputs only when there are images: HF runs its vision encoder on any pixel_values key, None included.
    vision = {} if batch.pixel_values is None else dict(pixel_values=batch.pixel_values,
                                                        image_grid_thw=batch.image_grid_thw)
    with timer("decode"), _seeded(cfg.seed, lm.device):
        out = lm.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask.long(),
            mm_token_type_ids=batch.mm_token_type_ids,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=lm.eos_token_ids,
            pad_token_id=lm.processor.pad_token_id,
            suppress_tokens=lm.banned_token_ids or None,
            **vision,
            **sampling,
        )
    rows = Rows(lm.eos_token_ids, lm.banned_token_ids)
    ids = rows.add([RowSettings(cfg.max_new_tokens)] * len(prompts), [len(p) for p in prompts], lm.device)
    rows.enter(ids)
    committed, _ = rows.extend(out[:, batch.input_ids.shape[1]:].tolist())
    for row_id, tokens in committed if listener is not None else ():  # streams all at the end
        listener(ids.index(row_id), tokens)
    for row_id in ids:
        rows[row_id].nfe = len(rows[row_id].tokens) + (rows[row_id].finish == "stop")
    return [rows.output(row_id, lm.processor.decode, "hf", timer.as_dict()) for row_id in ids]


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's global generator (HF `generate` samples from it) without changing the caller's:
    the global RNG state is restored afterwards, as the other decoders' private generators leave it."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
