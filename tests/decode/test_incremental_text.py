"""IncrementalText: text pieces of a growing token list add up to decoding it all."""

from dvlm.decode.stream import IncrementalText


def byte_decode(tokens):
    """A byte-level tokenizer: token = one byte; a split character shows as U+FFFD."""
    return bytes(tokens).decode("utf-8", errors="replace")


def test_a_character_split_over_tokens_waits_for_its_last_byte():
    text = IncrementalText(byte_decode)
    snowman = list("☃".encode())  # 3 bytes
    assert text.push(list(b"ab")) == "ab"
    assert text.push(snowman[:1]) == ""
    assert text.push(snowman[1:2]) == ""
    assert text.push(snowman[2:] + list(b"c")) == "☃c"
    assert text.text == "ab☃c" and text.rest() == ""


def test_an_unfinished_character_at_the_end_comes_out_in_rest():
    text = IncrementalText(byte_decode)
    text.push(list(b"x") + list("é".encode())[:1])
    assert text.text == "" and text.rest() == byte_decode(list(b"x") + list("é".encode())[:1])


def test_a_tokenizer_that_drops_the_leading_space_of_its_first_token():
    """SentencePiece-style: "▁word" decodes to " word" except at the start of a decode call."""
    vocab = {0: "▁the", 1: "▁cat", 2: "s", 3: "▁sat"}

    def decode(tokens):
        return "".join(vocab[t] for t in tokens).replace("▁", " ").removeprefix(" ")

    text = IncrementalText(decode)
    pieces = [text.push(chunk) for chunk in ([0], [1, 2], [3])]
    assert pieces == ["the", " cats", " sat"]
    assert "".join(pieces) == decode([0, 1, 2, 3])
