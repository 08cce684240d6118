"""MMMU's answer parsing against worked examples of its rule."""

import pytest

from dvlm.tasks.benchmarks.choices import normalize_open, open_correct, parse_choice, parse_open

OPTIONS = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize("response, expected", [
    ("B", "B"), ("B.", "B"), ("(C) bird", "C"),
    ("The answer is (A), no wait, (B)", "B"),        # bracketed letters: the last one stated wins
    ("A or B? I think B.", "B"),                     # standalone letters: " A " at 0, " B " later
    ("(D) is right, not A", "D"),                    # brackets outrank standalone letters
    ("I believe the animal in the picture is a dog", "B"),   # > 5 words, no letter: option text
    ("Answer: C", "C"),
])
def test_parse_choice(response, expected):
    assert parse_choice(response, OPTIONS, "q1") == expected


def test_parse_choice_without_candidates_draws_a_seeded_option():
    # "dog" alone is one word: not long enough for the option-text rule, so MMMU guesses.
    first = parse_choice("dog", OPTIONS, "validation_Art_1")
    assert first in "ABCD"
    assert all(parse_choice("dog", OPTIONS, "validation_Art_1") == first for _ in range(5))


def test_normalize_open():
    assert normalize_open(" 1,234.567 ") == [1234.57]
    assert normalize_open("Paris") == ["paris"]
    assert normalize_open("b") == [" b", "b "]


def test_parse_open_keeps_the_shortest_tail_after_an_indicator():
    assert parse_open("The answer is 42.") == [42.0]   # the tail "42" and the number in it, once
    # "=" counts on the last line only; "is " leaves "fast", shorter than "so "'s tail.
    assert parse_open("x = 3.5\nso the speed is fast") == ["fast"]


@pytest.mark.parametrize("response, references, expected", [
    ("The answer is 42.", ["42"], True),
    ("The answer is 42.", ["42.001"], True),         # numbers compared at 2 decimals
    ("The answer is 42.", ["43"], False),
    ("x = 3.5\nso the speed is fast", ["3.5"], False),
    ("x = 3.5\nso the speed is fast", ["fast"], True),
    ("It is Paris, France", ["Paris"], True),        # a reference inside the candidate text
    ("b", ["b"], True), ("abc", ["b"], False),       # one character must stand alone
    ("24", ["12", "24"], True),                      # any accepted value
])
def test_open_correct(response, references, expected):
    assert open_correct(response, references) is expected
