"""MMMU's answer parsing, both rules, against worked examples of each reference.

Official: MMMU's mmmu/utils/eval_utils.py (`parse_multi_choice_response`, `parse_open_response`,
`extract_numbers`, `eval_open`). lmms-eval: lmms_eval/tasks/_task_utils/mmmu_mcq_utils.py
(`parse_mmmu_multi_choice_response`) and lmms_eval/tasks/mmmu/utils.py (`mmmu_process_results`,
`evaluate_mmmu`). The crafted cases were worked out from that code and run through it; the real
ones are Qwen-VL's answers that ship with MMMU's evaluation code
(mmmu/example_outputs/qwen_vl/<subject>/output.json), with the letters the two references give.
"""

import pytest

from dvlm.tasks.benchmarks.choices import (
    extract_numbers,
    lmms_eval_open_correct,
    normalize_open,
    open_correct,
    parse_choice,
    parse_open,
)

OPTIONS = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize("response, official, lmms_eval", [
    ("B", "B", "B"), ("B.", "B", "B"), ("(C) bird", "C", "C"),
    ("The answer is (A), no wait, (B)", "B", "B"),     # bracketed letters: the last one stated wins
    ("A or B? I think B.", "B", "B"),                  # " A " at 0, " B " later
    ("(D) is right, not A", "D", "D"),                 # brackets outrank standalone letters
    ("Answer: C", "C", "C"),
    ("I believe the animal in the picture is a dog", "B", "B"),   # > 5 words, no letter: option text
    ("it is a dog right here", "B", "B"),              # 6 words: option text
    ("DNA", None, "A"),                                # lmms-eval takes "A " (no space before needed)
    ("CD", None, "D"),
    ("(B.)", None, "B"),                               # lmms-eval's third pass: "B."
    ("B,.", None, None),                               # "," is stripped before ".", so "B," stays
    ("it is a dog here", None, None),                  # exactly 5 words: no option-text matching
])
def test_parse_choice_by_rule(response, official, lmms_eval):
    for rule, expected in (("official", official), ("lmms-eval", lmms_eval)):
        letter, guessed = parse_choice(response, OPTIONS, rule, "q1")
        if expected is None:
            assert guessed and letter in "ABCD"    # the reference would draw a random option
        else:
            assert (letter, guessed) == (expected, False)


def test_a_guess_is_seeded_by_the_question_id():
    first, guessed = parse_choice("dog", OPTIONS, "official", "validation_Art_1")
    assert guessed
    assert all(parse_choice("dog", OPTIONS, "official", "validation_Art_1") == (first, True) for _ in range(5))


TEN = ["cat", "dog", "bird", "red fish", "ant", "bee", "cow", "elk", "fox", "gnu"]


# lmms_eval/tasks/_task_utils/mmmu_mcq_utils.py (`parse_mmmu_multi_choice_response`, which
# lmms-eval's mmmu_pro task also runs) with ten options, as MMMU-Pro's standard setting has.
@pytest.mark.parametrize("response, expected", [
    ("B", "B"), ("(C) bird", "C"), ("I think B", "B"),     # "I " and "B " found; " B " is the later
    ("The answer is J.", "J"),
    ("A. cat", "A"),                                  # no "X " anywhere: the "A." step
    ("Answer: H", "H"), ("Answer: (H)", "H"),
    ("I'm sorry, I can't help with that.", "I"),     # option I exists among ten: ", I can't"
    ("It is clearly the red fish in the picture", "D"),   # six words, no letter: the option's text
    ("B.'", "B"),                                     # the quote trimmed after the period's turn
    ("(B) or (E)", "E"),
    ("D.E.", "E"),                                    # ends trimmed to "D.E": "E " before the padding
])
def test_parse_choice_lmms_eval_ten_options(response, expected):
    assert parse_choice(response, TEN, "lmms-eval", "q") == (expected, False)


def test_parse_choice_lmms_eval_without_candidates_guesses_reproducibly():
    # "dog" is one word: no letter and too short for option texts, so lmms-eval draws at random.
    letter, guessed = parse_choice("dog", TEN, "lmms-eval", "test_History_1")
    assert guessed and letter in "ABCDEFGHIJ"
    assert parse_choice("dog", TEN, "lmms-eval", "test_History_1") == (letter, True)


@pytest.mark.parametrize("response, options, official, lmms_eval", [
    # validation_Biology_26 (right: E): the text of E; lmms-eval reads "A " in "DNA ".
    ("If you cut the above plasmid with restriction enzyme called HindIII, the form of DNA will be changed from "
     "supercoiled to linear.",
     ["Linear to supercoiled", "Nicked to linear", "Nicked to supercoiled", "Supercoiled to nicked",
      "Supercoiled to linear"], "E", "A"),
    # validation_Pharmacy_29 (right: C): the text of A; lmms-eval reads "C " in "IUPAC ".
    ("The IUPAC name for the compound in the image is cyclopentane.",
     ["cyclopentane", "2-methylpropan-2-ol", "3-pentanone"], "A", "C"),
    # validation_Pharmacy_18 (right: A): the text of A; lmms-eval reads "C " in "(AUC ".
    ("The relevant optical representation for transdermal absorption by active transport is Graph 1 (AUC vs Dose).",
     ["Graph 1", "Graph 2", "Graph 3"], "A", "C"),
])
def test_parse_choice_on_real_answers(response, options, official, lmms_eval):
    assert parse_choice(response, options, "official") == (official, False)
    assert parse_choice(response, options, "lmms-eval") == (lmms_eval, False)


def test_normalize_open():
    assert normalize_open(" 1,234.567 ") == [1234.57]
    assert normalize_open("Paris") == ["paris"]
    assert normalize_open("b") == [" b", "b "]


def test_extract_numbers_runs_the_three_patterns_in_turn():
    assert extract_numbers("1,234") == ["1,234", "234"]        # grouped, then "234" again as a simple number
    assert extract_numbers("1.5e-3") == ["1.5e-3", "1", "-3"]  # scientific, then the simple pattern's pieces
    assert extract_numbers("3.5 and 7") == ["3.5", "7"]


def test_parse_open_keeps_the_shortest_tail_after_an_indicator():
    assert parse_open("The answer is 42.") == [42.0]   # the tail "42" and the number in it, once
    # "=" counts on the last line only; "is " leaves "fast", shorter than "so "'s tail.
    assert parse_open("x = 3.5\nso the speed is fast") == ["fast"]
    # An empty tail ("so " ends the line) is replaced by the next indicator's tail, as the
    # reference's loop does: "is " leaves "so".
    assert parse_open("the value is so \nthus 5") == ["so", 5.0]
    assert parse_open("The total is 1,234") == [1234.0, 234.0]
    assert parse_open("x is 1.5e-3") == [0.0, 1.0, -3.0]


def test_parse_open_on_a_real_multiline_answer():
    # validation_Electronics_21 (Qwen-VL; right: 0.9965): the tails of "... is:" lines and
    # "the answer is 1" (the official rule scores it right: 1.0 == round(0.9965, 2)).
    response = ("The waveform in the image is a triangle wave with a period of 4. The Fourier series of this "
                "waveform is:\n\n  1. A constant term of 1/2\n  2. A sine term of -4/2=-2\n  3. A cosine term of "
                "3/2\n  4. A sine term of 1/2\n  5. A cosine term of -1/2\n\nThe sum of the first four terms of this "
                "series at t=2 is:\n\n  1. 1/2 + (-2) + (3/2) + (1/2) = 1\n\nTherefore, the answer is 1.")
    candidates = parse_open(response)
    assert sorted(candidates, key=str) == [1.0, 2.0, "series at t=2 is:", "waveform is:"]
    assert open_correct(candidates, ["0.9965"])


@pytest.mark.parametrize("response, references, expected", [
    ("The answer is 42.", ["42"], True),
    ("The answer is 42.", ["42.001"], True),         # numbers compared at 2 decimals
    ("The answer is 42.", ["43"], False),
    ("x = 3.5\nso the speed is fast", ["3.5"], False),
    ("x = 3.5\nso the speed is fast", ["fast"], True),
    ("It is Paris, France", ["Paris"], True),        # a reference inside the candidate text
    ("b", ["b"], True), ("abc", ["b"], False),       # one character must stand alone
    ("24", ["12", "24"], True),                      # any accepted value
    ("The total is 1,234", ["234"], True),           # "234" is one of the numbers found
])
def test_open_correct_official(response, references, expected):
    assert open_correct(parse_open(response), references) is expected


@pytest.mark.parametrize("response, answer", [
    ("The speed is 3.5", "3.5"), ("3.5", "3.5"), ("Paris", "Paris"), ("b", "b"),
    ("The answer is 24", "['24', '24.0']"),
])
def test_lmms_eval_open_rule_checks_characters(response, answer):
    # lmms-eval hands eval_open the text of one candidate where the list of candidates is
    # expected: each character is checked against the normalised answer, which never fits in one.
    assert not lmms_eval_open_correct(parse_open(response), answer)
    assert lmms_eval_open_correct(parse_open("anything"), "")   # only an empty answer fits in a character
