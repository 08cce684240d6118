"""Each reader on a small file in the benchmark's published layout, written here; files with odd
values refused with one line naming the file and the record."""

import io
import json

import pytest
from PIL import Image

from dvlm.tasks.benchmarks import BENCHMARKS, BenchmarkDataError, get_benchmark


def png(path=None, colour="red"):
    image = Image.new("RGB", (8, 8), colour)
    if path is None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def hf_image(colour="red"):
    return {"bytes": png(colour=colour), "path": None}


# -- MME -----------------------------------------------------------------------------------------
def test_mme_release_folder(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    png(root / "artwork" / "images" / "10002.jpg")  # the questions_answers_YN layout
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Titian? Please answer yes or no.\tYes\n"
        "Is this artwork created by Monet? Please answer yes or no.\tNo\n")
    png(root / "code_reasoning" / "0020.png")  # the flat layout: text beside image
    (root / "code_reasoning" / "0020.txt").write_text("Will it print 5? Please answer yes or no.\tNo\n"
                                                        "Will it print 6? Please answer yes or no.\tYes\n")
    items = get_benchmark("mme").read(root, None)
    assert [i.id for i in items] == ["artwork/10002.jpg#0", "artwork/10002.jpg#1", "code_reasoning/0020.png#0",
                                     "code_reasoning/0020.png#1"]
    assert items[0].answer == "Yes" and items[0].meta == {"category": "artwork", "image": "artwork/10002.jpg"}
    assert items[0].images == [root / "artwork" / "images" / "10002.jpg"]
    assert get_benchmark("mme").prompt(items[0]) == ("Is this artwork created by Titian?\n"
                                                     "Answer the question using a single word or phrase.")


def test_mme_refuses_a_malformed_line(tmp_path):
    png(tmp_path / "count" / "1.png")
    (tmp_path / "count" / "1.txt").write_text("How many? no tab here\n")
    with pytest.raises(BenchmarkDataError, match="question<TAB>Yes|No"):
        get_benchmark("mme").read(tmp_path, None)


def test_mme_parquet(tmp_path):
    rows = [{"question_id": "OCR/5.jpg", "question": "Is it 'STOP'? Please answer yes or no.", "answer": "Yes",
             "category": "OCR", "image": hf_image()},
            {"question_id": "OCR/5.jpg", "question": "Is it 'GO'? Please answer yes or no.", "answer": "No",
             "category": "OCR", "image": hf_image()}]
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    items = get_benchmark("mme").read(tmp_path, None)
    assert [i.id for i in items] == ["OCR/5.jpg#0", "OCR/5.jpg#1"]
    assert Image.open(io.BytesIO(items[0].images[0])).size == (8, 8)


# -- POPE ----------------------------------------------------------------------------------------
def test_pope_question_files(tmp_path):
    png(tmp_path / "val2014" / "COCO_val2014_000000310196.jpg")
    lines = [{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
              "label": "yes"},
             {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?",
              "label": "no"}]
    (tmp_path / "coco_pope_random.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (tmp_path / "coco_pope_adversarial.json").write_text(json.dumps(lines[0]) + "\n")
    items = get_benchmark("pope").read(tmp_path, tmp_path / "val2014")
    assert [(i.id, i.answer, i.meta["category"]) for i in items] == [
        ("adversarial/1", "yes", "adversarial"), ("random/1", "yes", "random"), ("random/2", "no", "random")]
    assert get_benchmark("pope").prompt(items[0]) == ("Is there a snowboard in the image?\n"
                                                      "Answer the question using a single word or phrase.")


def test_pope_missing_image_fails_at_read(tmp_path):
    (tmp_path / "coco_pope_random.json").write_text(json.dumps(
        {"question_id": 1, "image": "missing.jpg", "text": "Is there a cat?", "label": "no"}) + "\n")
    with pytest.raises(BenchmarkDataError, match="missing.jpg not found"):
        get_benchmark("pope").read(tmp_path, None)


def test_pope_parquet(tmp_path):
    write_parquet(tmp_path / "test-00000.parquet", [
        {"id": "0", "question_id": "41", "question": "Is there a car in the image?", "answer": "Yes",
         "image_source": "COCO_val2014_000000041.jpg", "image": hf_image(), "category": "popular"}])
    (item,) = get_benchmark("pope").read(tmp_path / "test-00000.parquet", None)
    assert (item.id, item.answer, item.meta) == ("41", "yes", {"category": "popular"})


# -- AI2D ----------------------------------------------------------------------------------------
def test_ai2d_parquet_and_prompt(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", [
        {"question": "Which stage comes after the egg?", "options": ["larva", "pupa", "adult", "egg"], "answer": "0",
         "image": hf_image()}])
    (item,) = get_benchmark("ai2d").read(tmp_path / "data", None)
    assert item.answer == "A"
    assert get_benchmark("ai2d").prompt(item) == (
        "Which stage comes after the egg?\nA. larva\nB. pupa\nC. adult\nD. egg\n"
        "Answer with the option's letter from the given choices directly.")
    assert get_benchmark("ai2d").judge("A", item, "lmms-eval").values == {"accuracy": 1.0}
    assert get_benchmark("ai2d").judge("(B)", item, "lmms-eval").values == {"accuracy": 0.0}


def test_ai2d_release_folder_with_test_ids(tmp_path):
    for name in ("3.png", "17.png"):
        png(tmp_path / "images" / name)
        (tmp_path / "questions").mkdir(exist_ok=True)
        (tmp_path / "questions" / f"{name}.json").write_text(json.dumps({"imageName": name, "questions": {
            "What eats grass?": {"abcLabel": False, "answerTexts": ["fox", "rabbit", "hawk", "snake"],
                                 "correctAnswer": 1, "questionId": f"{name}-0"}}}))
    (tmp_path / "ai2d_test_ids.csv").write_text("17\n")
    (item,) = get_benchmark("ai2d").read(tmp_path, None)
    assert (item.id, item.answer, item.meta["options"][1]) == ("17.png-0", "B", "rabbit")


# -- ChartQA -------------------------------------------------------------------------------------
def test_chartqa_release_files(tmp_path):
    test = tmp_path / "ChartQA Dataset" / "test"
    png(test / "png" / "41699051005347.png")
    (test / "test_human.json").write_text(json.dumps([
        {"imgname": "41699051005347.png", "query": "What is the value of the red bar?", "label": "12.5"}]))
    (test / "test_augmented.json").write_text(json.dumps([
        {"imgname": "41699051005347.png", "query": "Which year is highest?", "label": "2019"}]))
    items = get_benchmark("chartqa").read(test, None)
    assert [(i.id, i.answer) for i in items] == [("human/0", "12.5"), ("augmented/0", "2019")]
    assert get_benchmark("chartqa").prompt(items[0]) == ("What is the value of the red bar?\n"
                                                         "Answer the question with a single word.")
    scores = [get_benchmark("chartqa").judge(p, i, "lmms-eval").values for p, i in zip(["12", "1900"], items)]
    result = get_benchmark("chartqa").aggregate(items, scores)
    assert result == {"relaxed_accuracy": 0.5, "augmented/relaxed_accuracy": 0.0, "human/relaxed_accuracy": 1.0}


def test_chartqa_parquet(tmp_path):
    write_parquet(tmp_path / "test-00000-of-00001.parquet", [
        {"type": "human_test", "question": "How many bars?", "answer": "4", "image": hf_image()}])
    (item,) = get_benchmark("chartqa").read(tmp_path, None)
    assert (item.answer, item.meta) == ("4", {"type": "human"})


# -- DocVQA --------------------------------------------------------------------------------------
def test_docvqa_annotation_file(tmp_path):
    png(tmp_path / "val" / "documents" / "pybv0228_81.png")
    (tmp_path / "val" / "val_v1.0.json").write_text(json.dumps({
        "dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0",
        "data": [{"questionId": 49153, "question": "What is the ‘actual’ value per 1000, during the year 1975?",
                  "question_types": ["figure/diagram"], "image": "documents/pybv0228_81.png", "docId": 14465,
                  "ucsf_document_id": "pybv0228", "ucsf_document_page_no": "81", "answers": ["0.28"],
                  "data_split": "val"}]}))
    (item,) = get_benchmark("docvqa").read(tmp_path / "val" / "val_v1.0.json", None)
    assert (item.id, item.answer) == ("49153", ["0.28"])
    assert item.images == [tmp_path / "val" / "documents" / "pybv0228_81.png"]
    assert get_benchmark("docvqa").judge("0.28", item, "lmms-eval").values == {"anls": 1.0}


def test_docvqa_reads_only_docvqa_from_the_root_of_the_whole_download(tmp_path):
    # lmms-lab/DocVQA holds two configs: DocVQA/ and InfographicVQA/, each with its splits.
    write_parquet(tmp_path / "DocVQA" / "validation-00000-of-00001.parquet", [
        {"questionId": "7", "question": "What is the date?", "answers": ["May 5"], "image": hf_image()}])
    write_parquet(tmp_path / "InfographicVQA" / "validation-00000-of-00001.parquet", [
        {"questionId": "98765", "question": "How many?", "answers": ["3"], "image": hf_image()}])
    assert [i.id for i in get_benchmark("docvqa").read(tmp_path, None)] == ["7"]
    assert [i.id for i in get_benchmark("docvqa").read(tmp_path / "DocVQA", None)] == ["7"]
    with pytest.raises(BenchmarkDataError, match="InfographicVQA files, not DocVQA's"):
        get_benchmark("docvqa").read(tmp_path / "InfographicVQA", None)


def test_docvqa_parquet(tmp_path):
    write_parquet(tmp_path / "DocVQA" / "validation-00000-of-00001.parquet", [
        {"questionId": "7", "question": "What is the date?", "answers": ["May 5", "5 May"], "image": hf_image()}])
    write_parquet(tmp_path / "DocVQA" / "test-00000-of-00001.parquet", [
        {"questionId": "8", "question": "Hidden test question", "answers": [], "image": hf_image()}])
    (item,) = get_benchmark("docvqa").read(tmp_path, None)  # the validation split only, as lmms-eval
    assert (item.id, item.answer) == ("7", ["May 5", "5 May"])


# -- TextVQA -------------------------------------------------------------------------------------
def test_textvqa_annotation_file(tmp_path):
    png(tmp_path / "train_images" / "003a8ae2ef43b901.jpg")
    answers = ["nokia"] * 7 + ["nokia phone"] * 3
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({
        "dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
        "data": [{"question": "what is the brand of this camera?", "image_id": "003a8ae2ef43b901",
                  "image_classes": ["Camera"], "answers": answers, "question_id": 34602, "set_name": "val"}]}))
    (item,) = get_benchmark("textvqa").read(tmp_path / "TextVQA_0.5.1_val.json", None)
    assert (item.id, item.answer) == ("34602", answers)
    assert get_benchmark("textvqa").prompt(item) == ("What is the brand of this camera?\n"
                                                     "Answer the question using a single word or phrase.")
    assert get_benchmark("textvqa").judge("Nokia.", item, "lmms-eval").values == {"vqa_accuracy": 1.0}
    # "nokia phone": 3 annotators; leaving one of them out leaves 2 (2/3), else 3 (1): (3*2/3 + 7)/10
    score = get_benchmark("textvqa").judge("nokia phone", item, "lmms-eval")
    assert score.values == {"vqa_accuracy": pytest.approx(0.9)}


def test_textvqa_parquet(tmp_path):
    write_parquet(tmp_path / "validation-00000-of-00001.parquet", [
        {"image_id": "a", "question_id": 1, "question": "what does it say?", "answers": ["stop"] * 10,
         "image": hf_image()}])
    (item,) = get_benchmark("textvqa").read(tmp_path, None)
    assert item.answer == ["stop"] * 10


# -- MMMU ----------------------------------------------------------------------------------------
MMMU_MC = {"id": "validation_Art_Theory_3", "question": "Which painting is shown in <image 2> and <image 1>?",
           "options": "['The Scream', 'Guernica', '<image 3>']", "explanation": "", "answer": "B",
           "question_type": "multiple-choice", "topic_difficulty": "Easy", "img_type": "['Paintings']"}
MMMU_OPEN = {"id": "validation_Physics_7", "question": "<image 1> What is the speed in m/s?", "options": "[]",
             "explanation": "", "answer": "['3.5', '3.50']", "question_type": "open"}


def test_mmmu_parquet_images_follow_their_numbers(tmp_path):
    mc = {**MMMU_MC, **{f"image_{k}": None for k in range(1, 8)}, "image_1": hf_image("red"),
          "image_2": hf_image("blue"), "image_3": hf_image("green")}
    op = {**MMMU_OPEN, **{f"image_{k}": None for k in range(1, 8)}, "image_1": hf_image("white")}
    write_parquet(tmp_path / "Art_Theory" / "validation-00000-of-00001.parquet", [mc, op])
    mc_item, open_item = get_benchmark("mmmu").read(tmp_path, None)
    colours = [Image.open(io.BytesIO(b)).getpixel((0, 0)) for b in mc_item.images]
    assert colours == [(255, 0, 0), (0, 0, 255), (0, 128, 0)]  # image 1, 2, 3 (option C names image 3)
    assert get_benchmark("mmmu").prompt(mc_item) == (
        "Which painting is shown in <image 2> and <image 1>?\nA. The Scream\nB. Guernica\nC. <image 3>\n\n"
        "Answer with the option's letter from the given choices directly.")
    assert open_item.answer == ["3.5", "3.50"] and open_item.meta["subject"] == "Physics"
    assert get_benchmark("mmmu").prompt(open_item) == ("<image 1> What is the speed in m/s?\n\n"
                                                       "Answer the question using a single word or phrase.")
    assert get_benchmark("mmmu").judge("B", mc_item, "lmms-eval").values == {"accuracy": 1.0}
    assert get_benchmark("mmmu").judge("The speed is 3.5", open_item, "official").values == {"accuracy": 1.0}
    assert get_benchmark("mmmu").judge("The speed is 3.5", open_item, "lmms-eval").values == {"accuracy": 0.0}
    result = get_benchmark("mmmu").aggregate([mc_item, open_item], [{"accuracy": 1.0}, {"accuracy": 0.0}])
    assert result == {"accuracy": 0.5, "multiple-choice/accuracy": 1.0, "open/accuracy": 0.0}


def test_mmmu_json_records(tmp_path):
    png(tmp_path / "img" / "p7.png")
    (tmp_path / "mmmu.jsonl").write_text(json.dumps({**MMMU_OPEN, "image_1": "p7.png"}) + "\n")
    (item,) = get_benchmark("mmmu").read(tmp_path / "mmmu.jsonl", tmp_path / "img")
    assert item.images == [tmp_path / "img" / "p7.png"]


def test_mmmu_refuses_an_unknown_question_type(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([{**MMMU_OPEN, "question_type": "essay"}]))
    with pytest.raises(BenchmarkDataError, match="essay"):
        get_benchmark("mmmu").read(tmp_path / "m.json", tmp_path)


def test_every_benchmark_heads_with_a_metric_in_0_1():
    assert set(BENCHMARKS) == {"mme", "pope", "ai2d", "chartqa", "docvqa", "textvqa", "mmmu", "gqa", "mmbench",
                               "realworldqa", "seedbench_2_plus", "mmmu_pro_standard", "mmmu_pro_vision"}
    for benchmark in BENCHMARKS.values():
        assert benchmark.headline and benchmark.max_new_tokens > 0


def test_every_benchmark_offers_lmms_evals_rule_first():
    for benchmark in BENCHMARKS.values():
        assert next(iter(benchmark.rules)) == "lmms-eval"
        assert set(benchmark.rules) <= {"lmms-eval", "official"}
    assert get_benchmark("mme").check_rule(None) == "lmms-eval"
    with pytest.raises(BenchmarkDataError, match="ai2d has no 'official' rule; its rules: lmms-eval"):
        get_benchmark("ai2d").check_rule("official")


# -- files with odd values: one line naming the file and the record -------------------------------
def one_line(err):
    message = str(err.value)
    assert "\n" not in message
    return message


def test_docvqa_answers_stored_as_an_integer(tmp_path):
    png(tmp_path / "documents" / "a.png")
    (tmp_path / "val_v1.0.json").write_text(json.dumps({"data": [
        {"questionId": 1, "question": "What?", "image": "documents/a.png", "answers": ["x"]},
        {"questionId": 2, "question": "Which?", "image": "documents/a.png", "answers": 5}]}))
    with pytest.raises(BenchmarkDataError) as err:
        get_benchmark("docvqa").read(tmp_path / "val_v1.0.json", None)
    assert one_line(err) == (f"{tmp_path / 'val_v1.0.json'}, record 1: answers must be a non-empty list of strings, "
                             "got an int (5)")


def test_docvqa_parquet_answers_of_the_wrong_type(tmp_path):
    file = write_parquet(tmp_path / "validation-00000-of-00001.parquet", [
        {"questionId": "7", "question": "What?", "answers": "May 5", "image": hf_image()}])
    with pytest.raises(BenchmarkDataError, match=f"{file}, row 0: answers must be a non-empty list of strings, got "
                                                 "a str"):
        get_benchmark("docvqa").read(tmp_path, None)


def test_mmmu_record_with_a_null_question(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([MMMU_OPEN, {**MMMU_OPEN, "id": "validation_Physics_8",
                                                             "question": None}]))
    png(tmp_path / "p7.png")
    records = json.loads((tmp_path / "m.json").read_text())
    for record in records:
        record["image_1"] = "p7.png"
    (tmp_path / "m.json").write_text(json.dumps(records))
    with pytest.raises(BenchmarkDataError) as err:
        get_benchmark("mmmu").read(tmp_path / "m.json", tmp_path)
    assert one_line(err) == f"{tmp_path / 'm.json'}, record 1: question must be text, got null"


@pytest.mark.parametrize("name, record, message", [
    ("pope", '"Is there a cat?"', "record 1: expected an object with question_id, image, text, label, got a str "
                                  "('Is there a cat?')"),
    ("pope", '{"question_id": 1, "image": "x.jpg", "text": "Is it?", "label": "maybe"}',
     "record 1: label 'maybe' is neither yes nor no"),
    ("pope", '{"question_id": 1, "image": null, "text": "Is it?", "label": "yes"}',
     "record 1: image must be text, got null"),
])
def test_pope_records_with_odd_values(tmp_path, name, record, message):
    png(tmp_path / "x.jpg")
    (tmp_path / "coco_pope_random.json").write_text(record + "\n")
    with pytest.raises(BenchmarkDataError) as err:
        get_benchmark(name).read(tmp_path, None)
    assert one_line(err) == f"{tmp_path / 'coco_pope_random.json'}, {message}"


def test_chartqa_label_as_a_number_is_read_as_text_and_a_null_query_refused(tmp_path):
    png(tmp_path / "png" / "a.png")
    (tmp_path / "test_human.json").write_text(json.dumps([{"imgname": "a.png", "query": "Which year?", "label": 2019}]))
    (item,) = get_benchmark("chartqa").read(tmp_path, None)
    assert item.answer == "2019"
    (tmp_path / "test_human.json").write_text(json.dumps([{"imgname": "a.png", "query": None, "label": "1"}]))
    with pytest.raises(BenchmarkDataError, match="record 0: query must be text, got null"):
        get_benchmark("chartqa").read(tmp_path, None)


def test_textvqa_empty_answers_refused(tmp_path):
    png(tmp_path / "train_images" / "a.jpg")
    (tmp_path / "val.json").write_text(json.dumps({"data": [
        {"question": "what?", "image_id": "a", "answers": [], "question_id": 3}]}))
    with pytest.raises(BenchmarkDataError, match="record 0: answers must be a non-empty list of strings, got a list"):
        get_benchmark("textvqa").read(tmp_path / "val.json", None)
