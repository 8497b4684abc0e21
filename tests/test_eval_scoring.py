"""`solo eval` answer parsing and scoring rules against hand-computed expectations."""

import pytest

from solo.eval import scoring

OPTIONS = ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"), ("no.", "no"), (" YES", "yes"), ("Yes, there is a dog.", "yes"),
        ("No, it is not.", "no"), ("nope", "no"),  # "no" within the first 4 characters, as MME's tool reads it
        ("The answer is yes", None),  # MME only looks at the first 4 characters
        ("", None), ("maybe", None),
    ],
)
def test_mme_yes_no_rule(text, expected):
    assert scoring.parse_yes_no(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"), ("b", "B"), ("(C) blue", "C"), ("Option D", "D"), ("The answer is A.", "A"),
        ("B. green", "B"), ("E", None),  # not one of the 4 options
        ("I think it is B", None),  # MMStar only reads the start
        ("", None),
    ],
)
def test_mmstar_exact_match_rule(text, expected):
    assert scoring.parse_letter_mmstar(text, OPTIONS) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A", "A"), ("C. blue", "C"), ("The answer is D.", "D"),
        ("The answer is B. The answer is C.", None),  # two answers: LLaVA's rule fails
        ("(B)", None), ("b", None), ("B.", None),  # LLaVA wants "X. …" with the space
    ],
)
def test_llava_scienceqa_rule(text, expected):
    assert scoring.parse_letter_llava_sqa(text, OPTIONS) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"), ("(C)", "C"), ("Answer: D.", "D"), ("**A**", "A"),
        ("It is green", "B"),  # no letter: exactly one option's text occurs
        ("A or B", None),  # two letters: ambiguous
        ("blue or yellow", None),  # two option texts
        ("green", "B"), ("", None), ("Bees", None),  # a letter inside a word is not a letter
    ],
)
def test_vlmevalkit_rule(text, expected):
    assert scoring.parse_letter_vlmevalkit(text, OPTIONS) == expected


def test_first_character_rule():
    assert scoring.parse_letter_first_char(" C) blue", OPTIONS) == "C"
    assert scoring.parse_letter_first_char("The answer", OPTIONS) is None
    assert scoring.parse_letter_first_char("b", OPTIONS) == "B"  # lmms-eval compares lower-cased
    assert scoring.parse_letter_first_char("", OPTIONS) is None


def test_multiple_choice_accuracy_overall_and_per_group():
    records = [
        {"correct": True, "parsed": "A", "groups": {"category": "math", "l2": "x"}},
        {"correct": False, "parsed": "B", "groups": {"category": "math", "l2": "y"}},
        {"correct": False, "parsed": None, "groups": {"category": "math", "l2": "y"}},
        {"correct": True, "parsed": "C", "groups": {"category": "ocr", "l2": "y"}},
    ]
    scores = scoring.multiple_choice_scores(records)
    assert scores["accuracy"] == 50.0 and scores["n"] == 4 and scores["correct"] == 2 and scores["unparsed"] == 1
    assert scores["by_category"] == {"math": {"accuracy": 33.3333, "correct": 1, "n": 3},
                                     "ocr": {"accuracy": 100.0, "correct": 1, "n": 1}}
    assert scores["by_l2"] == {"x": {"accuracy": 100.0, "correct": 1, "n": 1},
                               "y": {"accuracy": 33.3333, "correct": 1, "n": 3}}


def test_mme_accuracy_plus_pairs_the_two_questions_of_each_image():
    def record(subtask, image, correct):
        return {"subtask": subtask, "image_key": image, "correct": correct, "parsed": "yes"}

    records = [
        record("existence", "e1", True), record("existence", "e1", True),  # both right: counts for acc+
        record("existence", "e2", True), record("existence", "e2", False),  # one right
        record("existence", "e3", False), record("existence", "e3", False),
        record("code_reasoning", "c1", True), record("code_reasoning", "c1", True),
    ]
    scores = scoring.mme_scores(records)
    existence = scores["subtasks"]["existence"]
    assert existence["accuracy"] == 50.0  # 3 of 6 questions
    assert existence["accuracy_plus"] == 33.3333  # 1 of 3 images
    assert existence["score"] == 83.3333 and existence["images"] == 3 and existence["unpaired_images"] == 0
    assert scores["subtasks"]["code_reasoning"]["score"] == 200.0
    assert scores["perception"] == 83.3333 and scores["cognition"] == 200.0
    assert "count" in scores["missing_subtasks"] and "existence" not in scores["missing_subtasks"]
