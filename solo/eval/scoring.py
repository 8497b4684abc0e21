"""Answer parsing and scoring rules, each as its benchmark's authors (or the toolkit that reports
the benchmark) apply it. Pure functions: text in, label or numbers out.

Parsing rules (a prediction that no rule can read counts as wrong, and is counted as `unparsed`):

- ``parse_yes_no`` — MME's eval_tool (``calculation.py``; the rule lmms-eval reuses): lower-case,
  strip, drop periods; exactly "yes"/"no", else "yes" within the first 4 characters, else "no"
  within them, else unparsed.
- ``parse_letter_mmstar`` — MMStar's exact match (as shipped in its evaluation code and lmms-eval):
  the answer's first character is the letter, or it starts with "(X", "option X" or
  "the answer is X" (case-insensitive).
- ``parse_letter_llava_sqa`` — LLaVA's ScienceQA evaluation: the whole answer is a letter, or it
  starts with "X. ", or it contains exactly one "The answer is X.".
- ``parse_letter_first_char`` — lmms-eval's SEED-Bench rule: the first character of the stripped answer.
- ``parse_letter_generic`` — VLMEvalKit's exact-matching stage (used when no LLM judge is set; used
  here for AI2D and `mc`): split the answer on whitespace and ``.()[],:;!*#{}``; if exactly one
  piece is an option letter, that letter; else if exactly one option's text occurs in the answer
  (case-insensitive), that option; else unparsed.

Scores: ``multiple_choice_scores`` (accuracy overall and per group, in percent) and ``mme_scores``
(per subtask accuracy, accuracy+ and their sum; perception and cognition totals, as MME defines them).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# MME's fourteen subtasks (names as in the release folders and the lmms-lab parquet `category`).
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def option_letters(count: int) -> list[str]:
    """The first ``count`` option letters: A, B, C, …"""
    if not 0 < count <= len(LETTERS):
        raise ValueError(f"a question needs 1 to {len(LETTERS)} options, got {count}")
    return list(LETTERS[:count])


def parse_yes_no(prediction: str) -> str | None:
    """MME's rule: "yes", "no", or None (unparsed)."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return None


def parse_letter_mmstar(prediction: str, options: Sequence[str]) -> str | None:
    """MMStar's exact-match rule (see the module docstring); the letter, upper-case, or None."""
    text = prediction.lower().strip().replace("\n", " ")
    letters = {letter.lower() for letter in option_letters(len(options))}
    for prefix in ("", "(", "option ", "the answer is "):
        if text.startswith(prefix) and len(text) > len(prefix) and text[len(prefix)] in letters:
            return text[len(prefix)].upper()
    return None


_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z])\.")


def parse_letter_llava_sqa(prediction: str, options: Sequence[str]) -> str | None:
    """LLaVA's ScienceQA rule (see the module docstring)."""
    letters = option_letters(len(options))
    text = prediction.strip()
    if text in letters:
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    if len(found) == 1 and found[0] in letters:
        return found[0]
    return None


def parse_letter_first_char(prediction: str, options: Sequence[str]) -> str | None:
    """lmms-eval's SEED-Bench rule: the first character of the stripped answer, if it is an option letter."""
    text = prediction.strip()
    return text[0] if text and text[0] in option_letters(len(options)) else None


_SPLIT_CHARS = re.compile(r"[.()\[\],:;!*#{}\s]+")


def parse_letter_generic(prediction: str, options: Sequence[str]) -> str | None:
    """VLMEvalKit's exact-matching rule (see the module docstring)."""
    letters = option_letters(len(options))
    pieces = set(_SPLIT_CHARS.split(prediction))
    named = [letter for letter in letters if letter in pieces]
    if len(named) == 1:
        return named[0]
    if named:
        return None  # several letters named: ambiguous, and the option texts cannot settle it either
    lowered = prediction.lower()
    matching = [letter for letter, text in zip(letters, options) if str(text).lower() in lowered]
    return matching[0] if len(matching) == 1 else None


def _percent(correct: float, total: int) -> float:
    return round(100.0 * correct / total, 4) if total else 0.0


def multiple_choice_scores(records: Iterable[Mapping]) -> dict:
    """Accuracy overall and per group from prediction records.

    Each record has ``correct`` (bool), ``parsed`` (the letter or None) and ``groups`` (a mapping of
    group name → value, e.g. {"category": "math"}). Returns percentages, counts, the number of
    unparsed answers, and ``by_<group>`` tables ``{value: {"accuracy", "n"}}`` in sorted order.
    """
    records = list(records)
    total = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    grouped: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for name, value in (record.get("groups") or {}).items():
            grouped[name][str(value)].append(bool(record["correct"]))
    result: dict = {
        "accuracy": _percent(correct, total),
        "n": total,
        "correct": correct,
        "unparsed": sum(r.get("parsed") is None for r in records),
    }
    for name in sorted(grouped):
        result[f"by_{name}"] = {
            value: {"accuracy": _percent(sum(flags), len(flags)), "n": len(flags)}
            for value, flags in sorted(grouped[name].items())
        }
    return result


def mme_scores(records: Iterable[Mapping]) -> dict:
    """MME's scores from prediction records with ``correct``, ``parsed``, ``subtask`` and ``image_key``.

    Per subtask: accuracy = correct questions / questions; accuracy+ = images whose questions
    (two per image in MME: one "yes", one "no") are all correct / images; score = accuracy +
    accuracy+ (both in percent, so at most 200). Perception = sum of the 10 perception subtasks'
    scores (max 2000), cognition = sum of the 4 cognition subtasks' (max 800); subtasks absent from
    the data (e.g. under --limit) are listed in ``missing_subtasks`` and add nothing.
    """
    by_subtask: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    records = list(records)
    for record in records:
        by_subtask[record["subtask"]][record["image_key"]].append(bool(record["correct"]))
    subtasks = {}
    for name, images in sorted(by_subtask.items()):
        answers = [flag for flags in images.values() for flag in flags]
        accuracy = _percent(sum(answers), len(answers))
        accuracy_plus = _percent(sum(all(flags) for flags in images.values()), len(images))
        subtasks[name] = {
            "accuracy": accuracy,
            "accuracy_plus": accuracy_plus,
            "score": round(accuracy + accuracy_plus, 4),
            "questions": len(answers),
            "images": len(images),
            "unpaired_images": sum(len(flags) != 2 for flags in images.values()),
        }
    known = set(MME_PERCEPTION) | set(MME_COGNITION)
    return {
        "perception": round(sum(subtasks[n]["score"] for n in MME_PERCEPTION if n in subtasks), 4),
        "cognition": round(sum(subtasks[n]["score"] for n in MME_COGNITION if n in subtasks), 4),
        "subtasks": subtasks,
        "missing_subtasks": [n for n in MME_PERCEPTION + MME_COGNITION if n not in subtasks],
        "unknown_subtasks": sorted(set(subtasks) - known),
        "n": len(records),
        "unparsed": sum(r.get("parsed") is None for r in records),
    }
