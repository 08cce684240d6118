"""MMMU-Pro (standard, 10 options; vision): readers on MMMU/MMMU_Pro's parquet; lmms-eval's rules and
MMMU-Pro's own evaluate.py, checked on answers GPT-4o gave in MMMU's own release
(mmmu-pro/output/*_direct.jsonl, where evaluate.py wrote the letter it read beside each answer)."""

import io

import pytest
from PIL import Image

from dvlm.tasks.benchmarks import BenchmarkDataError, get_benchmark
from dvlm.tasks.benchmarks.items import Item
from tests.tasks.benchmarks.test_readers import hf_image, one_line, write_parquet

OPTIONS = ["The imperial interests of the United States", "The environmental conservation movement",
           "The rise of digital technology", "A stagnation in global trade", "The advancement of space exploration",
           "The burgeoning human rights movement", "The explosion in global population",
           "The decline in religious influence", "The shift towards renewable energy", "A dramatic increase in migration"]
SILK_ROAD = ["Political instability leading to population decline", "The spread of pathogens across the Silk Road",
             "Development of new trade routes", "Climate change affecting the Silk Road",
             "Migrations to areas of Central Asia for resettlement", "Technological advancements in transportation",
             "Invasions by Mongol tribes", "Large-scale famine due to crop failures",
             "Economic prosperity and population growth", "Rise of religious conflicts along the Silk Road"]
ARTISTIC = ["Artistic elements", "Artistic tools", "Artistic techniques", "Artistic styles", "Functions of illustrations",
            "Artistic principles", "Artistic materials", "Visual media", "Artistic media", "Visual elements"]
STANDARD = {"id": "test_History_134", "question": "The conflict addressed in the <image 1> is best understood in the "
            "context of which of the following?", "options": str(OPTIONS), "explanation": "?",
            "img_type": "['Sketches and Drafts']", "answer": "J", "topic_difficulty": "Medium", "subject": "History"}


def mmmu_pro_download(root):
    images = {f"image_{k}": None for k in range(1, 8)}
    write_parquet(root / "standard (10 options)" / "test-00000-of-00001.parquet", [
        {**STANDARD, **images, "image_1": hf_image("red")},
        {**STANDARD, **images, "id": "test_Art_5", "subject": "Art", "question": "Compare <image 2> with <image 1>.",
         "options": "['<image 3>', 'b']", "answer": "A", "image_1": hf_image("red"), "image_2": hf_image("blue"),
         "image_3": hf_image("green")}])
    write_parquet(root / "standard (4 options)" / "test-00000-of-00001.parquet",
                  [{**STANDARD, **images, "id": "four", "image_1": hf_image()}])
    write_parquet(root / "vision" / "test-00000-of-00001.parquet", [
        {"id": "test_History_134", "image": hf_image("white"), "options": str(OPTIONS), "answer": "J",
         "subject": "History"}])


def colours(item):
    return [Image.open(io.BytesIO(b)).getpixel((0, 0)) for b in item.images]


def test_mmmu_pro_standard_reads_ten_options_and_orders_images(tmp_path):
    mmmu_pro_download(tmp_path)
    history, art = get_benchmark("mmmu_pro_standard").read(tmp_path, None)
    assert (history.id, history.answer, len(history.meta["options"])) == ("test_History_134", "J", 10)
    assert colours(art) == [(255, 0, 0), (0, 0, 255), (0, 128, 0)]   # image 1, 2, 3 (option A names image 3)
    # mmmu_pro/utils.py construct_prompt with the default post prompt.
    assert get_benchmark("mmmu_pro_standard").prompt(art) == (
        "Compare <image 2> with <image 1>.\nA. <image 3>\nB. b\n\n"
        "Answer with the option letter from the given choices directly.")


def test_mmmu_pro_vision_reads_the_screenshot_only(tmp_path):
    mmmu_pro_download(tmp_path)
    (item,) = get_benchmark("mmmu_pro_vision").read(tmp_path, None)
    assert (item.id, item.answer, colours(item)) == ("test_History_134", "J", [(255, 255, 255)])
    assert get_benchmark("mmmu_pro_vision").prompt(item) == "Answer with the option letter from the given choices directly."
    assert len(get_benchmark("mmmu_pro_vision").read(tmp_path / "vision", None)) == 1


def test_mmmu_pro_refuses_a_root_without_the_setting(tmp_path):
    write_parquet(tmp_path / "vision" / "test-00000-of-00001.parquet",
                  [{"id": "x", "image": hf_image(), "options": "['a']", "answer": "A", "subject": "Art"}])
    with pytest.raises(BenchmarkDataError, match="standard"):
        get_benchmark("mmmu_pro_standard").read(tmp_path, None)


def standard_item(options, answer, item_id="q"):
    return Item(item_id, "?", [], answer, {"options": options, "subject": "History"})


# lmms_eval/tasks/mmmu_pro/utils.py mmmu_pro_process_results (standard): parse_mmmu_multi_choice_response.
@pytest.mark.parametrize("response, options, answer, expected", [
    ("B. The spread of pathogens across the Silk Road", SILK_ROAD, "B", 1.0),
    ("J. A dramatic increase in migration", OPTIONS, "J", 0.0),   # "A " is found before "J.": read as A
    ("I. Artistic media", ARTISTIC, "I", 1.0),
    ("I.", [f"o{k}" for k in range(10)], "I", 1.0),            # validation_Sociology_29's answer
])
def test_mmmu_pro_standard_on_released_answers(response, options, answer, expected):
    score = get_benchmark("mmmu_pro_standard").judge(response, standard_item(options, answer), "lmms-eval")
    assert score.values == {"accuracy": expected} and not score.guessed


def test_mmmu_pro_standard_records_a_guess():
    # No letter, one word: lmms-eval's parser draws an option (seeded by the id in dvlm).
    score = get_benchmark("mmmu_pro_standard").judge("migration", standard_item(OPTIONS, "J", "test_History_9"),
                                                      "lmms-eval")
    assert score.guessed and score.parsed in "ABCDEFGHIJ"
    assert score.values == {"accuracy": float(score.parsed == "J")}


# mmmu_pro_process_results (vision): no "question" in the row, so the answer is compared unparsed.
@pytest.mark.parametrize("response, expected", [
    ("Answer: H", 0.0), ("Answer: (H)", 0.0), ("H.", 0.0), ("H", 1.0), (" H\n", 1.0)])
def test_mmmu_pro_vision_compares_the_whole_answer(response, expected):
    item = Item("validation_Design_19", "", [], "H", {"options": [], "subject": "Design"})
    score = get_benchmark("mmmu_pro_vision").judge(response, item, "lmms-eval")
    assert (score.values, score.parsed, score.guessed) == ({"accuracy": expected}, response.strip(), False)


MUSIC_7 = ["IVa", "Ia", "IIb", "IIa", "Ib", "IIIb", "IIIa", "Vc", "IVb", "Vb"]
BIOLOGY_328 = ["Se, St, Ca, St.", "Ca, St, Pe, Se.", "St, St, Ca, St.", "St, Ca, St, St.", "Ca, St, Se, Se.",
               "Ca, Se, St, St.", "Ca, St, Se, Pe.", "Ca, St, St, St.", "Ca, Ca, St, St.", "Ca, St, St, Ca."]

PHYSICS_16 = ["Bulb 1 and 2 have the same brightness.", "Bulb 1 has a higher voltage drop across it than bulb 3.",
              "Bulb 2 is brighter than bulb 1 or 3.", "Bulb 3 has the same voltage drop across it than bulb 2.",
              "Bulb 3 is brighter than bulb 1 or 2.", "Bulb 3 has a lower voltage drop across it than bulb 2.",
              "Bulb 1 is brighter than bulb 2 or 3.", "Bulb 3 has the same voltage drop across it than bulb 1.",
              "Bulb 2 has the same voltage drop across it than bulb 1."]


# MMMU's mmmu-pro/evaluate.py: GPT-4o's answers in mmmu-pro/output/gpt-4o_vision_direct.jsonl (id,
# response, options, answer) and the letter the script wrote beside each (`pred_indexs`).
@pytest.mark.parametrize("item_id, response, options, answer, letter", [
    ("test_History_1", "Answer: A", SILK_ROAD, "B", "A"),
    ("validation_Music_7", "Answer: (B)Ia", MUSIC_7, "H", "B"),       # "B" and "I" after it: the "(B)" step
    ("test_Biology_328", "Answer: \\( \\text{C} \\)", BIOLOGY_328, "H", "C"),   # only "C" is a capital option letter
    ("test_Physics_16", "(E) Bulb 3 is brighter than bulb 1 or 2.\n\n(I) Bulb 2 has the same voltage drop across it "
                        "than bulb 1.\n\nAnswer: EI", PHYSICS_16, "E", "I"),   # two after it: the latest "(I)"
])
def test_mmmu_pro_official_rule_on_released_answers(item_id, response, options, answer, letter):
    for name in ("mmmu_pro_vision", "mmmu_pro_standard"):   # evaluate.py parses both settings alike
        item = Item(item_id, "", [], answer, {"options": options, "subject": "x"})
        score = get_benchmark(name).judge(response, item, "official")
        assert (score.parsed, score.guessed, score.values) == (letter, False, {"accuracy": float(letter == answer)})


def test_mmmu_pro_rules_differ_on_an_answer_line():
    # test_Biology_328: evaluate.py reads C after "Answer:"; lmms-eval's parser finds no letter
    # (so draws one) on the standard setting and compares the whole text on the vision one.
    item = Item("test_Biology_328", "", [], "C", {"options": BIOLOGY_328, "subject": "Biology"})
    response = "Answer: \\( \\text{C} \\)"
    assert get_benchmark("mmmu_pro_vision").judge(response, item, "official").values == {"accuracy": 1.0}
    assert get_benchmark("mmmu_pro_vision").judge(response, item, "lmms-eval").values == {"accuracy": 0.0}
    assert get_benchmark("mmmu_pro_standard").judge(response, item, "lmms-eval").guessed


def test_mmmu_pro_accuracy_per_subject():
    items = [standard_item([], "A"), standard_item([], "A"), Item("x", "?", [], "A", {"options": [], "subject": "Art"})]
    result = get_benchmark("mmmu_pro_standard").aggregate(items, [{"accuracy": 1.0}, {"accuracy": 0.0},
                                                                  {"accuracy": 1.0}])
    assert result == pytest.approx({"accuracy": 2 / 3, "Art/accuracy": 1.0, "History/accuracy": 0.5})


def test_mmmu_pro_odd_rows_are_one_line_errors(tmp_path):
    images = {f"image_{k}": None for k in range(1, 8)}
    file = write_parquet(tmp_path / "standard (10 options)" / "test-00000-of-00001.parquet",
                         [{**STANDARD, **images, "image_1": hf_image()}, {**STANDARD, **images, "answer": None}])
    with pytest.raises(BenchmarkDataError) as err:
        get_benchmark("mmmu_pro_standard").read(tmp_path, None)
    assert one_line(err) == f"{file}, row 1, image_1: the image cell holds no encoded image"
    write_parquet(file, [{**STANDARD, **images, "image_1": hf_image(), "options": "not a list"}])
    with pytest.raises(BenchmarkDataError) as err:
        get_benchmark("mmmu_pro_standard").read(tmp_path, None)
    assert one_line(err) == f"{file}, row 0: options 'not a list' are not a list"
    write_parquet(file, [{**STANDARD, **images, "image_1": hf_image(), "answer": None}])
    with pytest.raises(BenchmarkDataError) as err:
        get_benchmark("mmmu_pro_standard").read(tmp_path, None)
    assert one_line(err) == f"{file}, row 0: answer must be text, got null"
