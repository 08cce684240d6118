"""Tiny random parts for `dvlm assemble`, built on the spot: a Qwen2 causal LM with a word-level
tokenizer that has ChatML tokens but no `<image>`, and a SigLIP vision tower (with its pooling head,
which assembly leaves out)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from dvlm.zoo.tokenizer import UNK_TOKEN, pre_tokenizer, vocabulary

LM_SPECIALS = (UNK_TOKEN, "<|endoftext|>", "<|im_start|>", "<|im_end|>")
TILE = 28


def lm_tokenizer() -> PreTrainedTokenizerFast:
    """A base LM's tokenizer: ChatML specials, eos <|endoftext|>, no image token, no chat template."""
    vocab = {token: i for i, token in enumerate(vocabulary(LM_SPECIALS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LM_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK_TOKEN, pad_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", extra_special_tokens=list(LM_SPECIALS[2:]),
                                   clean_up_tokenization_spaces=False)


def build_language_model(out: Path, seed: int = 0, tied: bool = True, hidden_size: int = 64) -> Path:
    torch.manual_seed(seed)
    tokenizer = lm_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=tied, initializer_range=0.1,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_vision_tower(out: Path, seed: int = 1, hidden_size: int = 32) -> Path:
    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                                num_attention_heads=2, image_size=TILE, patch_size=14, vision_use_head=True)
    SiglipVisionModel(config).save_pretrained(out, safe_serialization=True)
    return out
