"""Word-level tokenizer of the built-in models, built offline from the tasks' vocabulary constants.

Pre-tokenization (``SPLIT_PATTERN``) cuts text into words, single digits, single punctuation
marks and single whitespace characters; a word, digit or mark keeps the one space before it.
Pieces then go through the byte-level map (as in GPT-2 style tokenizers: a space shows as "Ġ",
"\\n" as "Ċ"), so "top left." becomes ``["top", "Ġleft", "."]`` and "\\n" is a token of its own.
The byte-level decoder maps pieces back and concatenates them, so decoding reproduces any text
made of known pieces exactly, including no space before "." or "?".

Vocabulary: ``<unk>``, the built-in family's special tokens in its own order and the ``<image>``
placeholder first, at fixed ids (``SPECIAL_TOKENS``), then every piece of
``dvlm.tasks.builtin.vocabulary_texts()`` and the chat role names, each both bare and
space-prefixed (so a word is known wherever it lands in a sentence), plus lone "Ġ" and "Ċ" for
stray whitespace, sorted. ``<image>`` (the LLaVA placeholder in the task conversations) is a
special token too, so it is never split into unknown pieces; the data pipeline replaces it with
image tokens.

The family (the reference adapter's `tokenizer_spec`) gives the special tokens, pad and eos, and
the chat template: its own layout without a default system prompt (the tiny models are trained
without one), assistant turns marked so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` works.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dvlm.data.chat import IMAGE_PLACEHOLDER, ROLES
from dvlm.model.adapters.base import Adapter, TokenizerSpec
from dvlm.model.adapters.registry import reference_adapter
from dvlm.tasks.builtin import vocabulary_texts

UNK_TOKEN = "<unk>"


def special_tokens(family: TokenizerSpec) -> tuple[str, ...]:
    """The special tokens in id order. Order fixes the ids (0, 1, ...): the shipped weights depend
    on it, so a family only ever appends to its own list."""
    return (UNK_TOKEN, *family.special_tokens, IMAGE_PLACEHOLDER)


SPECIAL_TOKENS = special_tokens(reference_adapter().tokenizer_spec())
"""The built-in models' (the reference family's) special tokens, in id order."""

SPLIT_PATTERN = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\s"
SPACE_MARK = "Ġ"  # how the byte-level map shows " "
NEWLINE_MARK = "Ċ"  # how the byte-level map shows "\n"


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Split into words / digits / marks (each with its leading space), then byte-level map."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def vocabulary(specials: tuple[str, ...] = SPECIAL_TOKENS) -> list[str]:
    """All tokens in id order: the special tokens, then the sorted task pieces."""
    splitter = pre_tokenizer()
    texts = [*vocabulary_texts(), *ROLES]
    pieces = {SPACE_MARK, NEWLINE_MARK}
    for text in texts:
        for special in specials:  # specials are matched before pre-tokenization
            text = text.replace(special, " ")
        for piece, _ in splitter.pre_tokenize_str(text):
            word = piece.removeprefix(SPACE_MARK)
            if word and word != NEWLINE_MARK:
                pieces.update((word, SPACE_MARK + word))
    return [*specials, *sorted(pieces - set(specials))]


def build_tokenizer(out_dir: str | Path | None = None, adapter: Adapter | None = None) -> PreTrainedTokenizerFast:
    """Build the tokenizer (and ``save_pretrained`` it to ``out_dir`` when given) with the special
    tokens and chat template of `adapter`'s family (default: the reference family, the built-in models')."""
    family = (adapter or reference_adapter()).tokenizer_spec()
    specials = special_tokens(family)
    vocab = {token: i for i, token in enumerate(vocabulary(specials))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    # Specials already have ids in the vocab; registering them keeps them whole in any text.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in specials])
    named = {UNK_TOKEN, family.pad_token, family.eos_token}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        pad_token=family.pad_token,
        eos_token=family.eos_token,
        extra_special_tokens=[t for t in specials if t not in named],
        chat_template=family.chat_template,
        # The decoder already reproduces spacing exactly; the cleanup would only corrupt it.
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer
