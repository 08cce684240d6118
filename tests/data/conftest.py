"""Fixtures for the data layer: a tiny Qwen-style tokenizer + image processor built offline.

``build_tiny_processor_dir`` is a plain function so other test folders can build the same
directory: a word-level tokenizer (one token per word or punctuation mark, ``"\\n"`` kept as
its own token) with the Qwen special tokens, and a ``Qwen2VLImageProcessorPil`` limited to
56·56 .. 112·112 pixels (4 .. 16 image tokens per image with merge 2).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from dvlm.data.processor import ChatProcessor
from dvlm.model.adapters.qwen2_5_vl import Qwen25VLAdapter

ADAPTER = Qwen25VLAdapter()

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
UNK_TOKEN = "[UNK]"
TINY_WORDS = [
    "\n", ".", ",", "?", "!", ":", "system", "user", "assistant", "You", "are", "a", "helpful",
    "What", "is", "this", "it", "in", "the", "image", "picture", "A", "cat", "dog", "red",
    "blue", "square", "Describe", "Be", "brief", "Yes", "No", "and", "two", "images", "Compare",
    "first", "second", "Thanks", "welcome",
]


def build_tiny_tokenizer(*, words: list[str] = TINY_WORDS, eos_token: str = "<|im_end|>",
                         pad_token: str | None = "<|endoftext|>",
                         special_tokens: list[str] = QWEN_SPECIAL_TOKENS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: spaces separate words, "\\n" and punctuation are tokens."""
    vocab = {token: i for i, token in enumerate([UNK_TOKEN, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in special_tokens])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=UNK_TOKEN,
                                   eos_token=eos_token, pad_token=pad_token)


def build_tiny_image_processor(min_pixels: int = 56 * 56,
                               max_pixels: int = 112 * 112) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def build_tiny_processor_dir(path: str | Path, **tokenizer_kwargs) -> Path:
    """Save the tiny tokenizer and image processor into ``path``; return it."""
    path = Path(path)
    build_tiny_tokenizer(**tokenizer_kwargs).save_pretrained(path)
    build_tiny_image_processor().save_pretrained(path)
    return path


def qwen_processor(tokenizer, image_processor, **options) -> ChatProcessor:
    """A ChatProcessor laying chats out in the Qwen format; `options` go to ChatProcessor."""
    return ChatProcessor(ADAPTER.chat_format(tokenizer, image_processor), **options)


def load_processor(path, **options) -> ChatProcessor:
    """The Qwen adapter's processor of a local directory; `options` go to ChatProcessor."""
    return ADAPTER.load_processor(path, **options)


def build_tiny_vlm(processor: ChatProcessor, vocab_size: int = 128):
    """A random tiny Qwen2_5_VLForConditionalGeneration whose token ids match ``processor``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = processor.format.token_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                         bos_token_id=None, eos_token_id=processor.eos_token_ids[0],
                         pad_token_id=processor.pad_token_id,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                           patch_size=14, spatial_merge_size=2, out_hidden_size=128,
                           fullatt_block_indexes=[1]),
        image_token_id=ids.image_pad, vision_start_token_id=ids.vision_start,
        vision_end_token_id=ids.vision_end,
        video_token_id=processor.tokenizer.get_vocab()["<|video_pad|>"],
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def png_bytes(size: tuple[int, int] = (56, 56), color=(255, 0, 0), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_processor_dir(tmp_path_factory) -> Path:
    return build_tiny_processor_dir(tmp_path_factory.mktemp("tiny_processor"))


@pytest.fixture
def processor(tiny_processor_dir) -> ChatProcessor:
    return load_processor(tiny_processor_dir)


@pytest.fixture
def build_processor(tmp_path):
    """``build_processor(**tokenizer_kwargs, **processor_kwargs)``: a ChatProcessor from a fresh
    tiny directory; tokenizer kwargs as in :func:`build_tiny_tokenizer`."""
    def build(*, eos_token="<|im_end|>", pad_token="<|endoftext|>",
              special_tokens=QWEN_SPECIAL_TOKENS, **processor_kwargs) -> ChatProcessor:
        path = build_tiny_processor_dir(tmp_path / "built", eos_token=eos_token,
                                        pad_token=pad_token, special_tokens=special_tokens)
        return load_processor(path, **processor_kwargs)
    return build


@pytest.fixture(scope="session")
def tiny_vlm(tiny_processor_dir):
    return build_tiny_vlm(load_processor(tiny_processor_dir))


@pytest.fixture
def as_tokens(processor):
    """``as_tokens(ids)``: token strings of a tensor or list of ids, for literal comparisons."""
    def convert(ids) -> list[str]:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return processor.tokenizer.convert_ids_to_tokens(ids)
    return convert


@pytest.fixture
def make_png():
    """``make_png(size, color, mode)``: PNG bytes of a plain image."""
    return png_bytes
