"""`solo eval` reads each benchmark from tiny generated files in its published layout."""

import base64
import csv
import json

import pytest

from solo.eval import BENCHMARKS, EvalDataError, load_samples
from solo.eval.protocols import PROTOCOLS

from helpers import hf_image, png, write_parquet


def write_tsv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_mme_release_folder_both_layouts(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    existence = root / "existence"  # images and .txt side by side
    existence.mkdir(parents=True)
    (existence / "0001.png").write_bytes(png())
    (existence / "0001.txt").write_text("Is there a cat? Please answer yes or no.\tYes\n"
                                        "Is there a dog? Please answer yes or no.\tNo\n")
    artwork = root / "artwork"  # images/ + questions_answers_YN/
    (artwork / "images").mkdir(parents=True)
    (artwork / "questions_answers_YN").mkdir()
    (artwork / "images" / "12.jpg").write_bytes(png())
    (artwork / "questions_answers_YN" / "12.txt").write_text("Is it by Monet? Please answer yes or no.\tNo\n"
                                                            "Is it by Klimt? Please answer yes or no.\tyes\n")
    (artwork / "questions_answers_YN" / "13.txt").write_text("Orphan? Please answer yes or no.\tYes\n")

    samples = load_samples("mme", root)
    assert [(s.groups["subtask"], s.answer, s.image_key) for s in samples] == [
        ("artwork", "no", "artwork/12"), ("artwork", "yes", "artwork/12"), ("artwork", "yes", "artwork/13"),
        ("existence", "yes", "existence/0001"), ("existence", "no", "existence/0001"),
    ]
    assert samples[2].error and "no image beside" in samples[2].error
    assert samples[3].image.endswith("existence/0001.png") and samples[3].error is None
    assert PROTOCOLS["mme"]["official"].prompt(samples[3]) == "Is there a cat? Please answer yes or no."


def test_mme_lmms_lab_parquet_and_vlmevalkit_tsv(tmp_path):
    image = png()
    rows = [
        {"question_id": "code_reasoning/0020.png", "question": "Is the output 3? Please answer yes or no.",
         "answer": "Yes", "category": "code_reasoning", "image": hf_image(image)},
        {"question_id": "code_reasoning/0020.png", "question": "Is the output 4? Please answer yes or no.",
         "answer": "No", "category": "code_reasoning", "image": hf_image(image)},
    ]
    write_parquet(tmp_path / "MME" / "data" / "test-00000-of-00001.parquet", rows)
    samples = load_samples("mme", tmp_path / "MME")
    assert [s.answer for s in samples] == ["yes", "no"]
    assert samples[0].image == image and samples[0].image_key == samples[1].image_key

    # VLMEvalKit stores each image once; the second row names the first row's index instead.
    tsv = write_tsv(tmp_path / "MME.tsv", [
        {"index": "0", "image": b64(image), "question": "Is it red? Please answer yes or no.", "answer": "Yes",
         "category": "color"},
        {"index": "1", "image": "0", "question": "Is it blue? Please answer yes or no.", "answer": "No",
         "category": "color"},
    ])
    samples = load_samples("mme", tsv)
    assert samples[1].image == image and samples[0].image_key == samples[1].image_key == "0"


def test_mmstar_parquet_options_come_from_the_question(tmp_path):
    question = "Which colour is the car?\nOptions: A: red, B: dark green, C: blue, D: a, b and c"
    path = write_parquet(tmp_path / "mmstar.parquet", [
        {"index": 7, "question": question, "image": hf_image(png()), "answer": "B",
         "category": "coarse perception", "l2_category": "image scene and topic", "meta_info": None},
    ])
    (sample,) = load_samples("mmstar", path)
    assert sample.options == ["red", "dark green", "blue", "a, b and c"]
    assert sample.groups == {"category": "coarse perception", "l2_category": "image scene and topic"}
    assert PROTOCOLS["mmstar"]["official"].prompt(sample) == (
        question + "\nAnswer with the option's letter from the given choices directly.")
    assert BENCHMARKS["mmstar"].cloze_prompt(sample) == "Which colour is the car?"


def test_scienceqa_original_layout_keeps_test_questions_with_images(tmp_path):
    root = tmp_path / "scienceqa"
    (root / "images" / "test" / "5").mkdir(parents=True)
    (root / "images" / "test" / "5" / "image.png").write_bytes(png())
    problems = {
        "5": {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "Look closely.",
              "image": "image.png", "subject": "natural science", "grade": "grade4", "split": "test"},
        "6": {"question": "Text only?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
              "subject": "language science", "grade": "grade8", "split": "test"},
        "7": {"question": "Train?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
              "subject": "social science", "grade": "grade8", "split": "train"},
    }
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["5", "6"], "train": ["7"]}))
    (sample,) = load_samples("scienceqa", root)
    assert (sample.id, sample.answer, sample.options, sample.error) == ("5", "B", ["frog", "whale"], None)
    assert sample.groups == {"subject": "natural science", "grade": "G1-6"}
    assert PROTOCOLS["scienceqa"]["official"].prompt(sample) == (
        "Context: Look closely.\nWhich is a mammal?\nA. frog\nB. whale\n"
        "Answer with the option's letter from the given choices directly."
    )


def test_scienceqa_parquet_image_subset(tmp_path):
    path = write_parquet(tmp_path / "test.parquet", [
        {"image": hf_image(png()), "question": "Q1", "choices": ["x", "y", "z"], "answer": 2, "hint": "",
         "subject": "social science", "grade": "grade11"},
        {"image": None, "question": "Q2", "choices": ["x", "y"], "answer": 0, "hint": "",
         "subject": "social science", "grade": "grade11"},
    ])
    (sample,) = load_samples("scienceqa", path)
    assert sample.answer == "C" and sample.groups["grade"] == "G7-12"


def test_ai2d_parquet_and_tsv(tmp_path):
    path = write_parquet(tmp_path / "ai2d.parquet", [
        {"question": "What eats grass?", "options": ["cow", "lion", "sun", "soil"], "answer": "0",
         "image": hf_image(png())},
        {"question": "Broken row", "options": ["only one"], "answer": "0", "image": hf_image(png())},
    ])
    good, bad = load_samples("ai2d", path)
    assert good.answer == "A" and good.error is None
    assert "at least 2" in bad.error
    tsv = write_tsv(tmp_path / "AI2D_TEST.tsv", [
        {"index": "3", "image": b64(png()), "question": "Which?", "A": "p", "B": "q", "C": "", "D": "",
         "answer": "B", "category": "food chains"},
    ])
    (sample,) = load_samples("ai2d", tsv)
    assert sample.options == ["p", "q"] and sample.answer == "B" and sample.groups == {"category": "food chains"}


def test_seedbench_original_json_and_parquet(tmp_path):
    (tmp_path / "SEED-Bench-image").mkdir()
    (tmp_path / "SEED-Bench-image" / "1.jpg").write_bytes(png())
    spec = {
        "question_type": {"Scene Understanding": 1, "Instance Counting": 5},
        "questions": [
            {"question_id": "101", "question": "How many?", "choice_a": "1", "choice_b": "2", "choice_c": "3",
             "choice_d": "4", "answer": "C", "data_id": "1.jpg", "data_type": "image", "question_type_id": 5},
            {"question_id": "102", "question": "Video?", "choice_a": "1", "choice_b": "2", "choice_c": "3",
             "choice_d": "4", "answer": "A", "data_id": "v.mp4", "data_type": "video", "question_type_id": 10},
        ],
    }
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(spec))
    (sample,) = load_samples("seedbench", tmp_path / "SEED-Bench.json")
    assert (sample.id, sample.answer, sample.groups) == ("101", "C", {"question_type": "Instance Counting"})
    assert sample.image.endswith("SEED-Bench-image/1.jpg")

    path = write_parquet(tmp_path / "seed.parquet", [
        {"question_id": "9", "question": "Q", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d",
         "answer": "D", "data_type": "image", "question_type_id": 2, "data_id": "x", "image": [hf_image(png())]},
    ])
    (sample,) = load_samples("seedbench", path)
    assert sample.answer == "D" and isinstance(sample.image, bytes)


def test_mc_jsonl_reports_bad_lines_and_fields(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    lines = [
        json.dumps({"image": "a.png", "question": "Q?", "options": ["x", "y"], "answer": "B", "category": "c1"}),
        "{not json",
        json.dumps({"image": "a.png", "question": "Q?", "options": ["x", "y"], "answer": "C"}),
        json.dumps({"question": "Q?", "options": ["x", "y"], "answer": "A"}),
    ]
    (tmp_path / "set.jsonl").write_text("\n".join(lines) + "\n")
    good, broken, out_of_range, no_image = load_samples("mc", tmp_path / "set.jsonl")
    assert good.error is None and good.answer == "B" and good.image == str(tmp_path / "a.png")
    assert "line 2 is not valid JSON" in broken.error
    assert "outside the 2 options" in out_of_range.error
    assert no_image.error == "image is missing"


def test_unreadable_data_is_a_clear_error(tmp_path):
    with pytest.raises(EvalDataError, match="does not exist"):
        load_samples("ai2d", tmp_path / "nope.parquet")
    with pytest.raises(EvalDataError, match="unknown benchmark"):
        load_samples("mmmu", tmp_path)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(EvalDataError, match="unknown file type"):
        load_samples("ai2d", tmp_path / "x.csv")
