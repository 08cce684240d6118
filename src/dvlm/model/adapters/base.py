"""The adapter interface: everything that differs between families of HF vision-language models.

Shared code (data, diffusion, convert, decode, train) calls these methods and nothing
family-specific, so masks, positions and caches cross into a family's HF implementation through
documented seams (input embeddings, 4-D masks, explicit position ids, Cache objects). A family is
one module: an `Adapter` subclass decorated with `@register` (`dvlm.model.adapters.registry`).

The interface, by concern:

* loading: `load_model`, `load_image_processor` (never torchvision), `chat_format` (special
  tokens, image tokens, image tensors, position ids; the layout is the checkpoint's chat template,
  else the family's `fallback_template`), `load_processor` (provided), `check_config` (a config
  the family's network cannot run, refused in one line before any weight loads);
* forward seams: `image_features` (the vision tower and projector), `embed_with_features` (input
  features, given image features in place), `split_images` (a batch's images one by one, as the
  tower takes each alone), `hidden_states` (the masked forward, optionally over a KV cache),
  `logits`, `new_cache`; provided on top of them: `embed` (input features, images in place),
  `causal_hidden_states` (the AR model's forward), `hf_generate_inputs`, `max_positions`;
* conversion: `embedding_tables`, `resize_vocabulary` (provided through the HF API; override when
  a family's embeddings live elsewhere);
* training: `vision_parameters`, `projector_parameters` (provided: what is neither vision tower
  nor language model);
* assembling a checkpoint of the family from a causal LM and a vision tower: `assemble` (optional;
  DiffusionVL's LM -> dVLM route);
* a small random model of the family, for tests and the built-in models: `tokenizer_spec`,
  `random_model`, `tiny_image_processor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from dvlm.data.chat import ChatFormat
from dvlm.data.collate import Batch
from dvlm.data.processor import ChatProcessor
from dvlm.data.template import ChatTemplate, find_chat_template, tokenizer_template
from dvlm.data.tokenizer import load_tokenizer
from dvlm.data.vision import VisionInputs
from dvlm.model.checkpoint_files import check_processor_files, read_config
from dvlm.model.masks import context_mask, to_additive


@dataclass
class TinyShape:
    """Sizes of a small model of any family (tests, the built-in models)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden_size: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    """Std of the random init; tests use a larger one so random models give varied outputs."""


@dataclass(frozen=True)
class TokenizerSpec:
    """What a tokenizer built from scratch for a family needs (the built-in models' word-level one)."""

    special_tokens: tuple[str, ...]
    """The family's special tokens, in the order that gives them their ids."""
    pad_token: str
    eos_token: str
    chat_template: str
    """A Jinja chat template rendering the family's layout, without a default system prompt."""


@dataclass(frozen=True)
class ImageInputs:
    """One image as the family's vision tower takes it alone (`Adapter.split_images`)."""

    vision: VisionInputs
    """Its tensors: `Adapter.image_features(model, vision)` gives its features."""
    tokens: int
    """The image tokens those features fill in the text (the rows of its features)."""


@dataclass
class AssembledModel:
    """A model of the family made of a language model, a vision tower and a new projector
    (`Adapter.assemble`), in memory, with what its written copy must hold."""

    model: nn.Module
    tokenizer: Any
    image_processor: Any
    check_written: Callable[[Path], None]
    """Raises ValueError unless a checkpoint directory written from `model` holds every weight of
    the parts bit for bit (so a renamed or re-initialised weight never passes unnoticed)."""
    added_tokens: list[str]
    """Tokens the chat needs that the language model's tokenizer lacked."""
    new_parameters: int
    """Parameters that are new (the projector's): what alignment trains."""


class Adapter:
    """Bridges dvlm's diffusion logic and one model family's HF implementation (module docstring)."""

    architectures: ClassVar[tuple[str, ...]] = ()
    """The `architectures` names in config.json this adapter serves."""
    family: ClassVar[str] = ""
    """The family's name for people (model cards, messages)."""
    model_class: ClassVar[type[nn.Module] | None] = None
    """The transformers class `load_model` loads (its `from_pretrained`)."""
    fallback_template: ClassVar[str] = ""
    """The family's chat layout (a Jinja template) for a checkpoint that carries no chat template."""
    fallback_system_prompt: ClassVar[str | None] = None
    """The system turn added, with `fallback_template`, to a chat that has none."""

    # -- loading -----------------------------------------------------------------------------
    def check_config(self, config: dict[str, Any], source: str) -> None:
        """Raise a one-line ValueError naming `source` (config.json) and the field when the family's
        network cannot run this config (checked before any weight loads). Nothing to check by default."""

    def load_model(self, path: str | Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
        """The network from a local safetensors checkpoint, in eval mode, with SDPA attention:
        `model_class.from_pretrained` offline (a family sets `model_class`, or overrides this)."""
        if self.model_class is None:
            raise NotImplementedError
        self.check_config(read_config(path), str(Path(path) / "config.json"))
        model = self.model_class.from_pretrained(
            path, dtype=dtype, local_files_only=True, use_safetensors=True, attn_implementation="sdpa"
        )
        return model.to(device).eval()

    def load_image_processor(self, path: str | Path) -> Any:
        """The checkpoint's image processor (a PIL one: dvlm never needs torchvision)."""
        raise NotImplementedError

    def chat_format(self, tokenizer: Any, image_processor: Any, template: ChatTemplate | None = None) -> ChatFormat:
        """The family's special tokens, images and position ids (`dvlm.data.chat`); the layout is
        `template` (a checkpoint's, `dvlm.data.template.find_chat_template`), else the tokenizer's, else
        the family's fallback (`chat_layout`)."""
        raise NotImplementedError

    def chat_layout(self, tokenizer: Any, template: ChatTemplate | None) -> tuple[ChatTemplate, str | None]:
        """The template a chat format follows and the system prompt it adds to chats without one:
        `template`, else the tokenizer's (both with no added system turn: a template adds its own
        default), else the family's fallback with its default system prompt."""
        template = template or tokenizer_template(tokenizer)
        if template is not None:
            return template, None
        return (ChatTemplate(self.fallback_template, f"{self.family}'s default layout (no chat template found)",
                             fallback=True), self.fallback_system_prompt)

    def load_processor(self, path: str | Path, **options: Any) -> ChatProcessor:
        """The chat processor of a local checkpoint directory (never a hub), laid out by the chat template
        the directory carries (`dvlm.data.template`); `options` go to ChatProcessor."""
        tokenizer, image_processor = self.load_processor_parts(path)
        template = find_chat_template(path, tokenizer)
        return ChatProcessor(self.chat_format(tokenizer, image_processor, template), **options)

    def load_processor_parts(self, path: str | Path) -> tuple[Any, Any]:
        """The checkpoint's tokenizer and image processor, after checking their files are there (one
        line naming the missing file, never transformers' hub error)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a local directory; dvlm loads processors "
                                    "from local directories only")
        check_processor_files(path)
        return load_tokenizer(path), self.load_image_processor(path)

    # -- forward seams -----------------------------------------------------------------------
    def embed(self, model: nn.Module, input_ids: torch.Tensor, vision: Any = None) -> torch.Tensor:
        """(R, L) ids (+ the rows' VisionInputs) -> (R, L, F) input features, vision features in place.

        F is the language model's hidden size for most families. A family that feeds the vision
        tower into later layers too (Qwen3-VL's DeepStack) may carry those features in the same
        tensor (F > hidden size): shared code only gathers, concatenates, selects and pads it along
        the first two dimensions (noisy-stream copies, canvases, caches) and hands it back to
        `hidden_states`, so copies of image tokens keep all their features.

        Every image of `vision` goes through the tower in one call (training, conversion); decoding
        runs the tower per image (`split_images`), so that a cached image's features are exactly
        the ones its own call computes."""
        features = None if vision is None else self.image_features(model, vision)
        return self.embed_with_features(model, input_ids, features)

    def image_features(self, model: nn.Module, vision: VisionInputs) -> torch.Tensor:
        """(N, F) features of the images of `vision` at their N image tokens, in order: what `embed`
        puts at those tokens (F as in `embed`)."""
        raise NotImplementedError

    def embed_with_features(self, model: nn.Module, input_ids: torch.Tensor,
                            features: torch.Tensor | None) -> torch.Tensor:
        """(..., L) ids -> (..., L, F) input features: the tokens' embeddings, with `features` (N, F)
        (from `image_features`, in order) at the N image tokens; None: no image."""
        raise NotImplementedError

    def split_images(self, model: nn.Module, vision: VisionInputs) -> list[ImageInputs]:
        """The images of `vision` one by one, in order, each as the vision tower takes it alone: the
        tower never mixes images (its attention is per image), so the features of each, concatenated,
        are those of all of them in one call, up to float rounding."""
        raise NotImplementedError

    def hidden_states(self, model: nn.Module, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                      attention_mask: torch.Tensor, cache: Any | None = None) -> torch.Tensor:
        """Run the language model on input features (R, Q, F).

        position_ids: (A, R, Q), the family's axes (`dvlm.data.positions`); attention_mask:
        (R, 1, Q, K) additive float, K = cached entries + Q. Returns (R, Q, D). With a cache,
        the forward appends this call's keys/values to it."""
        raise NotImplementedError

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states -> (..., V) logits."""
        raise NotImplementedError

    def new_cache(self, model: nn.Module) -> Any:
        """An empty KV cache the forward of `hidden_states` appends to (transformers' DynamicCache
        or one with the same layer interface)."""
        raise NotImplementedError

    def causal_hidden_states(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(R, L, D) hidden states of the AR model's own forward over a right-padded batch: the
        token-causal mask, the batch's positions. (Conversion verifies through it; AR training
        trains through it.)"""
        embeds = self.embed(model, batch.input_ids, batch.vision)
        blocks = torch.zeros_like(batch.input_ids)
        mask = to_additive(context_mask(blocks, blocks, batch.attention_mask, "causal"), embeds.dtype)
        return self.hidden_states(model, embeds, batch.position_ids, mask)

    def hf_generate_inputs(self, batch: Batch) -> dict[str, Any]:
        """What transformers' `generate` needs besides ids and mask (the `hf` baseline decoder):
        the vision tensors, only when there are images (HF runs its vision tower on any key, None included)."""
        return {} if batch.vision is None else dict(batch.vision.tensors)

    def model_dtype(self, model: nn.Module) -> torch.dtype:
        return next(model.parameters()).dtype

    def max_positions(self, model: nn.Module) -> int | None:
        """The largest position id the language model was built for (None: no stated limit)."""
        return getattr(model.config.get_text_config(), "max_position_embeddings", None)

    # -- conversion ----------------------------------------------------------------------------
    def embedding_tables(self, model: nn.Module) -> list[torch.Tensor]:
        """The token embedding table, then the output (lm_head) table unless it is tied to it."""
        tables = [model.get_input_embeddings().weight]
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != tables[0].data_ptr():
            tables.append(out.weight)
        return tables

    def resize_vocabulary(self, model: nn.Module, rows: int) -> None:
        """Grow the embedding (and untied output) table to `rows` rows; new rows are overwritten by the caller."""
        model.resize_token_embeddings(rows, mean_resizing=False)

    # -- training ------------------------------------------------------------------------------
    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters of the vision encoder, without the projector (for their own learning rate)."""
        raise NotImplementedError

    def projector_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters of the projector between the vision encoder and the language model: every
        parameter neither in the vision encoder nor in the language model (its decoder, its output
        embedding). What `TrainConfig.trainable = "projector"` trains (LLaVA's alignment stage)."""
        elsewhere = {id(p) for p in self.vision_parameters(model)}
        elsewhere |= {id(p) for p in model.get_decoder().parameters()}
        output = model.get_output_embeddings()
        elsewhere |= {id(p) for p in (output.parameters() if output is not None else ())}
        return [p for p in model.parameters() if id(p) not in elsewhere]

    # -- assembling from parts ---------------------------------------------------------------
    def assemble(self, language_model: Path, vision_tower: Path, seed: int, dtype: torch.dtype | None,
                 log: Callable[[str], None]) -> AssembledModel:
        """A model of this family made of a local causal LM checkpoint and a local vision tower
        checkpoint (their weights copied exactly) joined by a freshly initialised projector (`seed`),
        with the tokenizer and image processor the family's chat needs. dtype None: the LM's.
        Optional: families that cannot be assembled from parts do not override this (ValueError,
        not NotImplementedError: it is not part of the interface every family must write)."""
        raise ValueError(f"{self.family} checkpoints cannot be assembled from parts")

    # -- a small random model of the family ------------------------------------------------------
    def tokenizer_spec(self) -> TokenizerSpec:
        raise NotImplementedError

    def random_model(self, tokenizer: Any, shape: TinyShape) -> nn.Module:
        """A randomly initialised model of `shape` (seed torch first) whose special-token ids are
        the tokenizer's."""
        raise NotImplementedError

    def tiny_image_processor(self, min_pixels: int, max_pixels: int) -> Any:
        """An image processor for small images (a few image tokens each)."""
        raise NotImplementedError


# -- helpers the families' seams share ---------------------------------------------------------------


def place_image_features(embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                         features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put the (N, D) image features at the N image-token positions of (R, L, D) `embeds`, in order.

    Returns (the new embeddings, the (R, L) bool positions). A count mismatch is an error: the
    processor and the model disagree about the images."""
    slots = input_ids == image_token_id
    if int(slots.sum()) != features.shape[0]:
        raise ValueError(f"{int(slots.sum())} image tokens in the text but {features.shape[0]} image features")
    embeds = embeds.clone()
    embeds[slots] = features.to(embeds.dtype)
    return embeds, slots


def language_model_hidden_states(language_model: nn.Module, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                                 attention_mask: torch.Tensor, cache: Any | None, **extra: Any) -> torch.Tensor:
    """A transformers decoder stack's last hidden states over input embeddings (`Adapter.hidden_states`
    in the families' position layout), appending to `cache` when one is given."""
    out = language_model(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
                         cache=cache, use_cache=cache is not None, **extra)
    return out.last_hidden_state
