"""TextVQA's answer processor and VQA accuracy, as EvalAI scores TextVQA (lmms-eval's
lmms_eval/tasks/_task_utils/vqa_eval_metric.py `EvalAIAnswerProcessor` and textvqa/utils.py;
mmf's m4c evaluator runs the same processor and accuracy).

`evalai_normalize`, step by step:
1. lowercase; delete every "," and "?"; write "'s" as " 's"; strip; newlines and tabs as spaces;
2. punctuation: each mark of `PUNCTUATION` is deleted when the text holds it beside a space
   (or holds a digit-grouping comma, which step 1 has already deleted), else replaced by a space;
   then periods not followed by a digit are removed, the first 32 of them only (the reference
   passes `re.UNICODE`, 32, where `re.sub` takes its count);
3. words: number words zero to ten as digits, articles dropped, contractions written without
   their apostrophe given it back (`CONTRACTIONS`, EvalAI's table as it is, entries that can never
   match a lowercased word included).

`vqa_accuracy`: min(1, other annotators giving the answer / 3), averaged over the 10 ways of
leaving one annotator out.
"""

from __future__ import annotations

import re
import statistics

VQA_HUMANS_FOR_FULL_CREDIT = 3
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
PERIOD_STRIP_COUNT = 32  # re.UNICODE, passed as re.sub's count in the reference
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_GROUPING_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _tokenize(text: str) -> str:
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return text.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    # Both tests look at the text as it came in, not as rewritten by earlier marks.
    grouped_number = _GROUPING_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        beside_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if beside_space or grouped_number else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, PERIOD_STRIP_COUNT)


def _words(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def evalai_normalize(answer: str) -> str:
    """An answer as EvalAI's TextVQA processor writes it (see the module doc)."""
    return _words(_punctuation(_tokenize(answer)))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(1, matches among the other annotators / 3), averaged over leaving each annotator out."""
    if not answers:
        raise ValueError("VQA accuracy needs the annotators' answers")
    predicted = evalai_normalize(prediction)
    humans = [evalai_normalize(answer) for answer in answers]
    per_left_out = [min(1, sum(h == predicted for k, h in enumerate(humans) if k != left_out)
                        / VQA_HUMANS_FOR_FULL_CREDIT) for left_out in range(len(humans))]
    return statistics.mean(per_left_out)  # the reference's mean (exact, then rounded once)
