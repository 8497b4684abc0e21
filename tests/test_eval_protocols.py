"""Each protocol's numbers on a crafted set of raw outputs, through `solo eval score` on files in the
benchmarks' published layouts. Every expectation is worked out by hand in the comments from the
reference's own rule (lmms-eval 0.7.3's task folders, VLMEvalKit e8e78f05's exact-matching path, MME's
eval_tool, MMStar's scorer, LLaVA's eval_science_qa.py), never from this project's code."""

import json

import pytest
from helpers import hf_image, png, write_parquet

from solo.cli import main as solo_main

IMAGE = hf_image(png())


def score(tmp_path, benchmark, data, answers, protocol, name=None):
    """Run `solo eval score` on {id: prediction} answers; return results.json."""
    predictions = tmp_path / f"{name or benchmark}-answers.jsonl"
    predictions.write_text("".join(json.dumps({"id": key, "prediction": text}) + "\n" for key, text in answers.items()))
    out = tmp_path / f"{name or benchmark}-{protocol}"
    code = solo_main(["eval", "score", "--benchmark", benchmark, "--data", str(data), "--predictions",
                      str(predictions), "--protocol", protocol, "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == protocol and results["benchmark"] == benchmark
    return results


def credited(tmp_path, results):
    return {record["id"]: record["correct"] for record in results_records(tmp_path, results)}


def results_records(tmp_path, results):
    out = tmp_path / f"{results['benchmark']}-{results['protocol']}"
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


# --- MMStar --------------------------------------------------------------------------------------

MMSTAR_ANSWERS = {  # id: (answer, prediction, l2 category)
    "1": ("B", "B", "x"),
    "2": ("B", "b", "x"),
    "3": ("C", "The answer is (C) blue", "y"),
    "4": ("D", "I think A is wrong, so D", "y"),
    "6": ("B", "A cat. The answer is B", "y"),
}
# official (MMStar's scorer: lower-cased; first char, "(x", "option x", "the answer is x"):
#   1 b ✓; 2 b ✓; 3 "the answer is (" → char 14 is "(" ✗; 4 "i" ✗; 6 "a" ✗  → 2/5 = 40%
# lmms-eval (extract_mcq_answer, A-D upper-case only; start > end > phrase > (X) > …):
#   1 start B ✓; 2 no upper-case letter anywhere ✗; 3 phrase "the answer is" → C ✓;
#   4 ends with a standalone "D" (end beats the "A " space match) ✓; 6 starts with "A " → start A ✗
#   → 3/5 samples; aggregation = mean over l2 categories: x 1/2 = 50, y 2/3 = 66.6667 → 58.3333
# vlmevalkit (can_infer): 1 ✓; 2 no letter, "answer is" absent, no option text ✗;
#   3 pieces [The answer is C blue]: one letter, 4th of 5 ✓; 4 letters A and D: two → "answer is" no →
#   option texts no ✗; 6 A and B → "answer is B" ✓  → 3/5 = 60%
MMSTAR_EXPECTED = {
    "official": ({"1": True, "2": True, "3": False, "4": False, "6": False}, 40.0),
    "lmms-eval": ({"1": True, "2": False, "3": True, "4": True, "6": False}, 58.3333),
    "vlmevalkit": ({"1": True, "2": False, "3": True, "4": False, "6": True}, 60.0),
}


@pytest.fixture(scope="module")
def mmstar(tmp_path_factory):
    question = "What colour is it?\nOptions: A: red, B: green, C: blue, D: yellow"
    category = {"x": "coarse perception", "y": "math"}
    rows = [{"index": int(key), "question": question, "image": IMAGE, "answer": answer,
             "category": category[l2], "l2_category": l2} for key, (answer, _, l2) in MMSTAR_ANSWERS.items()]
    return write_parquet(tmp_path_factory.mktemp("mmstar") / "mmstar.parquet", rows)


@pytest.mark.parametrize("protocol", sorted(MMSTAR_EXPECTED))
def test_mmstar_protocols(tmp_path, mmstar, protocol):
    results = score(tmp_path, "mmstar", mmstar, {k: v[1] for k, v in MMSTAR_ANSWERS.items()}, protocol)
    flags, accuracy = MMSTAR_EXPECTED[protocol]
    assert credited(tmp_path, results) == flags
    assert results["metrics"]["accuracy"] == accuracy
    if protocol == "lmms-eval":
        assert results["metrics"]["sample_accuracy"] == 60.0
        assert results["metrics"]["by_category"]["math"]["accuracy"] == 66.6667


# --- MME -----------------------------------------------------------------------------------------

MME_ANSWERS = {  # id ("<image>#<n>", as solo eval names lmms-lab/MME's questions): (answer, prediction)
    "e1#0": ("Yes", "y"), "e1#1": ("No", "No, there is none"),
    "e2#0": ("Yes", "Yes"), "e2#1": ("No", "I see no dog"),
    "e3#0": ("Yes", "yes"), "e3#1": ("No", "n"),
}
# official (calculation.py: exact yes/no, else yes/no within the first 4 characters):
#   y ✗, "no, " ✓ | Yes ✓, "i se" ✗ | yes ✓, n ✗ → acc 3/6 = 50, acc+ 0/3 → 50
# lmms-eval (+ lone y/n): y ✓ ✓ | ✓ ✗ | ✓ n ✓ → acc 5/6 = 83.3333, acc+ 2/3 = 66.6667 → 150
#   (its per-image mean: (200 + 50 + 200) / 3 = 150, the same with pairs)
# vlmevalkit (YOrN_Extraction: the words hold yes xor no): "y" ✗, "no there is none" ✓ | ✓, "no" ✓ |
#   ✓, "n" ✗ → acc 4/6 = 66.6667, acc+ 1/3 = 33.3333 → 100
MME_EXPECTED = {"official": (50.0, 50.0), "lmms-eval": (150.0, 83.3333), "vlmevalkit": (100.0, 66.6667)}


@pytest.fixture(scope="module")
def mme(tmp_path_factory):
    rows = [{"question_id": key.split("#")[0], "question": f"Is it {key}? Please answer yes or no.", "answer": answer,
             "category": "existence", "image": IMAGE} for key, (answer, _) in MME_ANSWERS.items()]
    return write_parquet(tmp_path_factory.mktemp("mme") / "MME" / "data" / "test-00000-of-00001.parquet", rows)


@pytest.mark.parametrize("protocol", sorted(MME_EXPECTED))
def test_mme_protocols(tmp_path, mme, protocol):
    results = score(tmp_path, "mme", mme, {key: prediction for key, (_, prediction) in MME_ANSWERS.items()}, protocol)
    perception, accuracy = MME_EXPECTED[protocol]
    assert results["metrics"]["perception"] == perception and results["metrics"]["cognition"] == 0.0
    assert results["metrics"]["accuracy"] == accuracy and results["metrics"]["n"] == 6


def test_mme_lmms_averages_per_image_where_images_are_unpaired():
    from solo.eval import scoring

    def record(image, correct):
        return {"subtask": "count", "image_key": image, "correct": correct, "parsed": "yes"}

    records = [record("a", True), record("a", True), record("b", True)]  # b has one question only
    # official: acc 3/3 = 100 + acc+ 2/2 = 100 → 200
    assert scoring.mme_scores(records)["subtasks"]["count"]["score"] == 200.0
    # lmms-eval: per image (acc + 100 when exactly two are right): a 200, b 100 + 0 → mean 150
    assert scoring.mme_scores(records, per_image_average=True)["subtasks"]["count"]["score"] == 150.0


# --- ScienceQA -----------------------------------------------------------------------------------

SQA_ANSWERS = {  # row: (answer index, prediction)
    0: (1, "The answer is B, dog"),
    1: (1, "b"),
    2: (2, "The answer is C"),
    3: (2, "C."),
    4: (0, "A. cat"),
}
# official (LLaVA: a letter; "X. "; exactly one match of "The answer is ([A-Z])." — any character after):
#   0 ✓ ("," is the any character); 1 ✗; 2 ✗ (nothing after C); 3 ✗ ("C." is no letter, too short); 4 ✓ → 40%
# lmms-eval (answer.lower() == letter; or upper-case letter + "."): 0 ✗; 1 ✓; 2 ✗; 3 ✓; 4 ✓ → 60%
# vlmevalkit (can_infer): 0 B 4th of 6 pieces ✓; 1 ✗ ("b" is no letter, no option text); 2 ✓; 3 ✓; 4 ✓ → 80%
SQA_EXPECTED = {
    "official": ([True, False, False, False, True], 40.0),
    "lmms-eval": ([False, True, False, True, True], 60.0),
    "vlmevalkit": ([True, False, True, True, True], 80.0),
}


def _sqa_rows(count, offset=0):
    return [{"image": IMAGE, "question": f"Q{offset + row}", "choices": ["cat", "dog", "bird"],
             "answer": SQA_ANSWERS[row][0] if row in SQA_ANSWERS else 0, "hint": "", "subject": "natural science",
             "grade": "grade2"} for row in range(count)]


@pytest.fixture(scope="module")
def scienceqa(tmp_path_factory):
    """An lmms-lab/ScienceQA snapshot: ScienceQA-IMG and ScienceQA-FULL, each with three splits."""
    root = tmp_path_factory.mktemp("sqa") / "ScienceQA"
    for subset in ("ScienceQA-IMG", "ScienceQA-FULL"):
        write_parquet(root / subset / "test-00000-of-00001.parquet", _sqa_rows(5))
        for split in ("train", "validation"):
            write_parquet(root / subset / f"{split}-00000-of-00001.parquet", _sqa_rows(2, offset=100))
    return root


@pytest.mark.parametrize("protocol", sorted(SQA_EXPECTED))
def test_scienceqa_protocols(tmp_path, scienceqa, protocol):
    answers = {str(row): prediction for row, (_, prediction) in SQA_ANSWERS.items()}
    results = score(tmp_path, "scienceqa", scienceqa, answers, protocol)
    flags, accuracy = SQA_EXPECTED[protocol]
    assert [r["correct"] for r in results_records(tmp_path, results)] == flags
    assert results["metrics"]["accuracy"] == accuracy and results["samples"] == 5  # test split, IMG only


# --- AI2D and SEED-Bench -------------------------------------------------------------------------

AI2D_ANSWERS = {"0": "(B)", "1": "Between A and B: the lion", "2": "B. lion", "3": "the answer is b"}  # all B
# lmms-eval (leading "X." → X, else the answer; lower-cased, punctuation removed, == letter):
#   "(b)" → "b" ✓; ✗; "B." → B ✓; "the answer is b" ✗ → 50%
# vlmevalkit: ✓; letters A and B → option text "lion" alone ✓; ✓; "answer is b" (case-insensitive) ✓ → 100%
AI2D_EXPECTED = {"lmms-eval": ([True, False, True, False], 50.0), "vlmevalkit": ([True, True, True, True], 100.0)}


@pytest.mark.parametrize("protocol", sorted(AI2D_EXPECTED))
def test_ai2d_protocols(tmp_path, protocol):
    rows = [{"question": "Who eats meat?", "options": ["cow", "lion", "sun", "soil"], "answer": "1", "image": IMAGE}
            for _ in AI2D_ANSWERS]
    data = write_parquet(tmp_path / "ai2d" / "test-00000-of-00001.parquet", rows)
    results = score(tmp_path, "ai2d", data, AI2D_ANSWERS, protocol)
    flags, accuracy = AI2D_EXPECTED[protocol]
    assert [r["correct"] for r in results_records(tmp_path, results)] == flags
    assert results["metrics"]["accuracy"] == accuracy


SEED_ANSWERS = {"q1": ("B", "b"), "q2": ("C", "C) three"), "q3": ("D", "The answer is D")}
# lmms-eval (first character, compared lower-cased): b ✓; C ✓; T ✗ → 66.6667
# vlmevalkit: "b" ✗; C ✓; "answer is D" → D, one letter, 4th of 4 ✓ → 66.6667
SEED_EXPECTED = {"lmms-eval": [True, True, False], "vlmevalkit": [False, True, True]}


@pytest.mark.parametrize("protocol", sorted(SEED_EXPECTED))
def test_seedbench_protocols(tmp_path, protocol):
    rows = [{"question_id": key, "question": "How many?", "choice_a": "one", "choice_b": "two", "choice_c": "three",
             "choice_d": "four", "answer": answer, "data_type": "image", "question_type_id": 5, "image": [IMAGE]}
            for key, (answer, _) in SEED_ANSWERS.items()]
    data = write_parquet(tmp_path / "seed.parquet", rows)
    results = score(tmp_path, "seedbench", data, {k: v[1] for k, v in SEED_ANSWERS.items()}, protocol)
    assert [r["correct"] for r in results_records(tmp_path, results)] == SEED_EXPECTED[protocol]
    assert results["metrics"]["accuracy"] == 66.6667


# --- refusals and reporting ----------------------------------------------------------------------

def test_a_protocol_without_a_reference_is_refused_by_name(tmp_path, mmstar, capsys):
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"id": "1", "prediction": "B"}) + "\n")
    common = ["--predictions", str(answers), "--out", str(tmp_path / "o")]
    assert solo_main(["eval", "score", "--benchmark", "ai2d", "--data", str(mmstar), "--protocol", "official",
                      *common]) == 2
    assert "AI2D's authors publish no scorer" in capsys.readouterr().err
    assert solo_main(["eval", "score", "--benchmark", "seedbench", "--data", str(mmstar), "--protocol", "official",
                      *common]) == 2
    assert "--mode likelihood" in capsys.readouterr().err


def test_wrong_benchmark_for_the_file_exits_2_naming_the_layouts(tmp_path, mmstar, capsys):
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"id": "1", "prediction": "yes"}) + "\n")
    code = solo_main(["eval", "score", "--benchmark", "mme", "--data", str(mmstar), "--predictions", str(answers),
                      "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err
    assert code == 2 and "holds no valid mme sample" in error and "MME_Benchmark_release_version" in error
    assert not (tmp_path / "o").exists()


def test_unmatched_and_missing_answers_are_reported(tmp_path, mmstar):
    lines = [json.dumps({"id": "1", "prediction": "B"}), "{broken", json.dumps({"id": 1, "prediction": "C"}),
             json.dumps({"id": "99", "prediction": "A"}), json.dumps({"id": "2", "error": "image unreadable"})]
    predictions = tmp_path / "p.jsonl"
    predictions.write_text("\n".join(lines) + "\n")
    code = solo_main(["eval", "score", "--benchmark", "mmstar", "--data", str(mmstar), "--predictions",
                      str(predictions), "--out", str(tmp_path / "o")])
    assert code == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["protocol"] == "official" and results["scored"] == 1 and results["metrics"]["accuracy"] == 100.0
    assert {b["id"]: b["error"] for b in results["bad_samples"]}["2"] == "no answer in p.jsonl"
    reasons = {u["line"]: u["reason"] for u in results["unused_predictions"]}
    assert "not valid JSON" in reasons[2] and "second answer" in reasons[3]
    assert "no mmstar sample" in reasons[4] and "image unreadable" in reasons[5]


def test_prompts_lengths_and_stops_follow_each_reference():
    from solo.eval.protocols import PROTOCOLS
    from solo.eval.samples import Sample

    mme = Sample(row=0, id="0", question="Is there a dog? Please answer yes or no.")
    assert PROTOCOLS["mme"]["official"].prompt(mme) == mme.question
    assert PROTOCOLS["mme"]["lmms-eval"].prompt(mme) == (  # post_prompt replaces MME's instruction
        "Is there a dog?\nAnswer the question using a single word or phrase.")
    lmms = PROTOCOLS["mme"]["lmms-eval"]
    assert lmms.max_new_tokens == 16 and lmms.finish("Yes\n\nThe dog is there.") == "Yes"  # until: "\n\n"

    sqa = Sample(row=0, id="0", question="Which is a mammal?", options=["frog", "whale"], hint="Look.")
    assert PROTOCOLS["scienceqa"]["vlmevalkit"].prompt(sqa) == (
        "Hint: Look.\nQuestion: Which is a mammal?\nOptions:\nA. frog\nB. whale\n"
        "Please select the correct answer from the options above. \n")
    assert PROTOCOLS["scienceqa"]["official"].max_new_tokens == 1024  # LLaVA's model_vqa_science
    star = Sample(row=0, id="0", question="Which colour?\nOptions: A: red, B: green", options=["red", "green"])
    assert PROTOCOLS["mmstar"]["lmms-eval"].prompt(star) == star.question + (
        "\nAnswer with the option's letter from the given choices directly")  # no final period in 0.7.3
    assert PROTOCOLS["mmstar"]["vlmevalkit"].prompt(star).startswith("Question: Which colour?\nOptions:\nA. red\n")
    seed = PROTOCOLS["seedbench"]["lmms-eval"]
    assert seed.finish("B ASSISTANT: C") == "B " and seed.stop == ("ASSISTANT:",)
