"""MMMU-Pro (standard, 10 options; vision): readers on MMMU/MMMU_Pro's parquet; lmms-eval's rules,
checked on answers GPT-4o gave in MMMU's own release (mmmu-pro/output/*_direct.jsonl)."""

import io

import pytest
from PIL import Image

from dvlm.tasks.benchmarks import BenchmarkDataError, get_benchmark
from dvlm.tasks.benchmarks.items import Item
from tests.tasks.benchmarks.test_readers import hf_image, write_parquet

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
    assert get_benchmark("mmmu_pro_standard").score(response, standard_item(options, answer)) == {"accuracy": expected}


# mmmu_pro_process_results (vision): no "question" in the row, so the answer is compared unparsed.
@pytest.mark.parametrize("response, expected", [
    ("Answer: H", 0.0), ("Answer: (H)", 0.0), ("H.", 0.0), ("H", 1.0), (" H\n", 1.0)])
def test_mmmu_pro_vision_compares_the_whole_answer(response, expected):
    item = Item("validation_Design_19", "", [], "H", {"options": [], "subject": "Design"})
    assert get_benchmark("mmmu_pro_vision").score(response, item) == {"accuracy": expected}


def test_mmmu_pro_accuracy_per_subject():
    items = [standard_item([], "A"), standard_item([], "A"), Item("x", "?", [], "A", {"options": [], "subject": "Art"})]
    result = get_benchmark("mmmu_pro_standard").aggregate(items, [{"accuracy": 1.0}, {"accuracy": 0.0},
                                                                  {"accuracy": 1.0}])
    assert result == pytest.approx({"accuracy": 2 / 3, "Art/accuracy": 1.0, "History/accuracy": 0.5})
