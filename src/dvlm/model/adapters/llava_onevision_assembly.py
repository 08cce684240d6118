"""A LLaVA-OneVision checkpoint assembled from a Qwen2 causal LM and a SigLIP vision tower
(DiffusionVL's second route: a plain language model becomes an AR VLM, aligned, then converted).

The parts keep their weights bit for bit. What is new:

* the projector (vision hidden -> text hidden, two linear layers), with PyTorch's default Linear
  init under the seed, as LLaVA's projector starts its alignment stage, and `image_newline`
  (N(0, 1/hidden), as transformers initialises it): both untrained, which is what
  `dvlm train --trainable projector --ar` is for;
* the tokens LLaVA-OneVision's chat needs that the LM's tokenizer lacks (`<image>`, `<video>`, and
  the ChatML tokens for a tokenizer without them): special tokens whose embedding row (and untied
  lm_head row) is the mean of the existing rows, as `dvlm convert` does for [MASK];
* the adapter's ChatML chat template, and an image processor whose tile is the tower's image size,
  with the released models' grid (up to 6 x 6 tiles, features capped at 9 tiles' worth) and the
  tower's own normalisation (its preprocessor_config.json, else SigLIP's 0.5 / 0.5).

The tower's pooling head is left out: LLaVA reads the last encoder layer's patch features, so the
head would be parameters that never get a gradient.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tokenizers import AddedToken
from torch import nn
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2ForCausalLM,
    SiglipVisionModel,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector
from transformers.utils import logging as hf_logging

from dvlm.data.tokenizer import load_tokenizer
from dvlm.model.adapters.base import Adapter, AssembledModel
from dvlm.model.adapters.llava_onevision import (
    CHAT_TEMPLATE,
    IM_END,
    IM_START,
    IMAGE,
    RELEASED_ASPECT_RATIO,
    VIDEO,
)
from dvlm.model.checkpoint_files import read_config, saved_dtype
from dvlm.runtime import seed_everything

LANGUAGE_MODELS = ("Qwen2ForCausalLM",)
VISION_TOWERS = ("SiglipVisionModel",)
CHAT_TOKENS = (IM_START, IM_END, IMAGE, VIDEO)
"""What the chat format and the config's image/video token ids need, in the order they are added."""
RELEASED_GRID = 6
"""The released models tile an image into up to 6 x 6 tiles (their image_grid_pinpoints)."""
SIGLIP_NORMALISATION = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
IMAGE_PROCESSOR_KEYS = ("image_mean", "image_std", "rescale_factor", "resample")
"""What the image processor takes from the tower's preprocessor_config.json."""


class AssemblyError(ValueError):
    """The written checkpoint does not hold the parts' weights exactly; nothing was kept."""


def check_parts(language_model: Path, vision_tower: Path) -> None:
    """Refuse parts of other architectures before anything loads."""
    for path, accepted, flag in ((language_model, LANGUAGE_MODELS, "--lm"), (vision_tower, VISION_TOWERS, "--vision")):
        found = read_config(path).get("architectures") or ["no architecture"]
        if found[0] not in accepted:
            raise ValueError(f"{flag} {path} is a {found[0]} checkpoint; LLaVA-OneVision is assembled from "
                             f"{' / '.join(accepted)}")


def assemble(adapter: Adapter, language_model: Path, vision_tower: Path, seed: int, dtype: torch.dtype | None,
             log: Callable[[str], None]) -> AssembledModel:
    """The assembled model in memory (see the module docstring); dtype None: the LM's saved dtype."""
    check_parts(language_model, vision_tower)
    dtype = dtype or getattr(torch, saved_dtype(read_config(language_model)) or "float32")
    tokenizer = load_tokenizer(language_model)  # a missing tokenizer fails before the weights load
    lm = Qwen2ForCausalLM.from_pretrained(language_model, dtype=dtype, local_files_only=True, use_safetensors=True)
    with quiet_load_report():  # the head's weights are left out on purpose: no "unexpected keys" table
        tower = SiglipVisionModel.from_pretrained(vision_tower, dtype=dtype, local_files_only=True,
                                                  use_safetensors=True, vision_use_head=False)
    added = add_chat_tokens(tokenizer)
    config = assembled_config(lm, tower, tokenizer)
    model = join_parts(config, lm, tower, seed).to(dtype)
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in added]
    grow_embeddings(adapter, model, new_ids, known=len(tokenizer) - len(added))
    model.eval()
    log(f"joined {language_model.name} (text hidden {config.text_config.hidden_size}) and {vision_tower.name} "
        f"(vision hidden {config.vision_config.hidden_size}, {config.vision_config.image_size} px tiles) "
        f"with a new projector (seed {seed})")
    if added:
        log(f"added token(s) {', '.join(added)} to the tokenizer (mean-initialised rows)")
    if {IM_START, IM_END} & set(added):
        log("the language model's tokenizer had no ChatML tokens: their new rows train only when the language "
            "model does (projector-only alignment leaves them as they are)")
    image_processor = tile_image_processor(config, vision_tower)
    return AssembledModel(model, tokenizer, image_processor, written_weights_check(adapter, model), added_tokens=added,
                          new_parameters=sum(p.numel() for p in adapter.projector_parameters(model)))


@contextmanager
def quiet_load_report() -> Iterator[None]:
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def add_chat_tokens(tokenizer: Any) -> list[str]:
    """Add the chat tokens the tokenizer lacks, as special tokens; set the chat template."""
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.get_vocab()]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return missing


def assembled_config(lm: nn.Module, tower: nn.Module, tokenizer: Any) -> LlavaOnevisionConfig:
    """The parts' own configs, the chat tokens' ids and the released models' tiling."""
    tile = tower.config.image_size
    ids = tokenizer.get_vocab()
    text, vision = part_config(lm), part_config(tower)
    return LlavaOnevisionConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=lm.config.tie_word_embeddings,
        image_token_index=ids[IMAGE], video_token_index=ids[VIDEO], vision_feature_select_strategy="full",
        vision_feature_layer=-1, vision_aspect_ratio=RELEASED_ASPECT_RATIO,
        image_grid_pinpoints=[[rows * tile, cols * tile] for rows in range(1, RELEASED_GRID + 1)
                              for cols in range(1, RELEASED_GRID + 1)],
    )


def part_config(part: nn.Module) -> dict[str, Any]:
    """A part's config as a sub-config: without the part's own class name and source path."""
    return {k: v for k, v in part.config.to_dict().items() if k not in ("architectures", "_name_or_path")}


def join_parts(config: LlavaOnevisionConfig, lm: nn.Module, tower: nn.Module, seed: int) -> nn.Module:
    """The LLaVA-OneVision network holding the parts' modules and a fresh projector.

    The frame is built on the meta device (no memory, no init of weights about to be replaced),
    then each of its modules is set: the parts themselves, and the new ones, initialised on CPU."""
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    seed_everything(seed)
    model.model.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
    hidden = config.text_config.hidden_size
    model.model.image_newline = nn.Parameter(torch.randn(hidden) / hidden ** 0.5)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"assembly left parameters without weights: {left[:5]}")
    return model


def grow_embeddings(adapter: Adapter, model: nn.Module, new_ids: list[int], known: int) -> None:
    """Rows for the added tokens (the table grows if they do not fit): the mean of the `known` rows."""
    if not new_ids:
        return
    if max(new_ids) >= adapter.embedding_tables(model)[0].shape[0]:
        adapter.resize_vocabulary(model, max(new_ids) + 1)
    with torch.no_grad():
        for table in adapter.embedding_tables(model):  # a tied lm_head shares the input table's rows
            table[new_ids] = table[:known].mean(dim=0)
    model.config.get_text_config().vocab_size = adapter.embedding_tables(model)[0].shape[0]


def tile_image_processor(config: LlavaOnevisionConfig, vision_tower: Path) -> Any:
    """Tiles of the tower's image size on the config's pinpoints, normalised as the tower expects."""
    tile = config.vision_config.image_size
    file = vision_tower / "preprocessor_config.json"
    tower_settings = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    normalisation = SIGLIP_NORMALISATION | {k: tower_settings[k] for k in IMAGE_PROCESSOR_KEYS if k in tower_settings}
    return LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile},
                                           image_grid_pinpoints=config.image_grid_pinpoints, **normalisation)


# -- checking what was written ----------------------------------------------------------------------


def written_weights_check(adapter: Adapter, model: nn.Module) -> Callable[[Path], None]:
    """A check of a written checkpoint: loaded back, it holds every tensor of `model` bit for bit.

    `model` holds the parts as their own classes loaded them, so this proves the copy exact
    whatever names transformers gives the weights on disk; a weight the load would miss (and
    transformers would initialise at random) fails it. Peak memory: two copies of the model."""

    def check(out: Path) -> None:
        expected = model.state_dict()
        dtype = next(iter(expected.values())).dtype
        loaded = adapter.load_model(out, dtype, torch.device("cpu")).state_dict()
        if set(loaded) != set(expected):
            odd = sorted(set(loaded) ^ set(expected))
            raise AssemblyError(f"the written checkpoint loads with other weights: {odd[:5]}")
        differ = [name for name, tensor in expected.items() if not torch.equal(tensor, loaded[name])]
        if differ:
            raise AssemblyError(f"the written checkpoint loads with other values for {differ[:5]}")

    return check
