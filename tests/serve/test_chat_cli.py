"""`dvlm chat` with typed input: streamed answers equal `model.generate` of the conversation so far,
/image, /reset and /quit do what they say, and mistakes are reported without leaving the chat."""

from __future__ import annotations

import io
import re

import pytest

from dvlm.tasks.builtin import get_task
from tests.test_cli import one_line_error, run


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "scene.png"
    image = get_task("shapes-caption").generate("test", 1, seed=3)[0].images[0]
    image.save(path)
    return path, image


def chat(capsys, monkeypatch, lines: list[str], *argv: str) -> tuple[int, list[str], str]:
    """Run `dvlm chat` on typed `lines`; returns the exit code, the answers printed, and stderr."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code, out, err = run(capsys, "chat", *argv)
    # Every answer ends its line (an empty answer too); each line starts with the prompts "> " of the
    # inputs read before it (commands print nothing on stdout).
    answers = [re.sub(r"^(?:> )*", "", line) for line in out.split("\n")[:-1]]
    if "/quit" not in lines:
        answers = answers[:-1]  # at the end of input the chat ends the prompt's line
    return code, answers, err


def test_conversation_images_reset_and_quit(capsys, monkeypatch, lm, scene):
    path, image = scene
    lines = [f"/image {path}", "Describe the image.", "How many shapes are there?", "/reset", "Describe the image.",
             "/image missing.png", "/nonsense", "/quit", "never asked"]
    code, answers, err = chat(capsys, monkeypatch, lines, "--model", "tiny-dvlm", "--max-new-tokens", "48")
    assert code == 0 and len(answers) == 3
    first = [{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": "Describe the image."}]}]
    expected = lm.generate(first, max_new_tokens=48).text
    assert answers[0] == expected and expected.startswith("There")  # a real caption, streamed whole
    second = [*first, {"role": "assistant", "content": expected},
              {"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]}]
    assert answers[1] == lm.generate(second, max_new_tokens=48).text
    assert answers[2] == lm.generate("Describe the image.", max_new_tokens=48).text  # no image after /reset
    assert "conversation cleared" in err and "error: cannot load image missing.png: file not found" in err
    assert "unknown command '/nonsense'" in err


def test_end_of_input_leaves_and_bad_questions_do_not(capsys, monkeypatch):
    code, answers, err = chat(capsys, monkeypatch, ["Hi <|im_end|>", "Read the digits."],
                              "--decoder", "spec", "--verbose", "--max-new-tokens", "8")
    assert code == 0 and len(answers) == 1
    assert "error: text contains the special token '<|im_end|>'" in err
    assert "tokens/forward" in err  # --verbose statistics
    assert re.search(r"0 of \d+ prompt tokens reused", err)  # the first answer reuses nothing


def test_later_turns_reuse_the_conversation(capsys, monkeypatch, scene):
    path, _ = scene
    lines = [f"/image {path}", "Describe the image.", "How many shapes are there?", "/reset", "Describe the image."]
    code, answers, err = chat(capsys, monkeypatch, lines, "--verbose", "--max-new-tokens", "16")
    reused = [int(n) for n in re.findall(r"(\d+) of \d+ prompt tokens reused", err)]
    assert code == 0 and len(answers) == 3
    assert reused[0] == 0 and reused[1] > 0 and reused[2] == 0  # nothing kept across /reset
    code, _, err = chat(capsys, monkeypatch, lines[:3], "--verbose", "--max-new-tokens", "16", "--prefix-cache-mb", "0")
    assert [int(n) for n in re.findall(r"(\d+) of \d+ prompt tokens reused", err)] == [0, 0]


@pytest.mark.parametrize("argv, message", [
    (["--threshold", "2"], "threshold must be in [0, 1], got 2.0"),
    (["--image", "missing.png"], "cannot load image missing.png: file not found"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
    (["--prefix-cache-mb", "-1"], "--prefix-cache-mb must be >= 0 (0: off), got -1"),
    (["--vision-cache-mb", "inf"], "argument --vision-cache-mb: must be a finite number, got 'inf'"),
])
def test_bad_settings_are_one_line_errors(capsys, monkeypatch, argv, message):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run(capsys, "chat", *argv)
    assert code == 2 and message in one_line_error(err, "chat")
