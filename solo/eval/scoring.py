"""Answer parsing and aggregation rules, each as the reference that defines it applies it (which
protocol uses which: `solo.eval.protocols`). Pure functions: text in, label or numbers out; a
prediction that no rule can read counts as wrong, and as ``unparsed``.

Yes/no (MME):

- ``parse_yes_no`` — MME's eval_tool (``calculation.py``): lower-case, strip, drop periods; exactly
  "yes"/"no", else "yes" within the first 4 characters, else "no" within them, else unparsed.
- ``parse_yes_no_lmms`` — lmms-eval 0.7.3 (``tasks/mme/utils.py``): the same, but a one-character
  answer is read alone: "y" → yes, "n" → no, any other → unparsed.
- ``parse_yes_no_vlmevalkit`` — VLMEvalKit's ``YOrN_Extraction``: the words of the answer
  (lower-cased, after ``process_punctuation``) hold exactly one of "yes" and "no".

Option letters:

- ``parse_letter_mmstar`` — MMStar's own scorer (``eval/vlmeval/evaluate/mmstar.py``): lower-cased,
  the answer's first character is the letter, or it starts with "(X", "option X" or "the answer is X".
- ``parse_letter_lmms_mcq`` — lmms-eval 0.7.3's ``extract_mcq_answer`` (its MMStar rule): candidate
  letters in ten formats ranked start > end > after an answer phrase > "(X)" > "X." > "X:" > "X)" >
  "X " > anywhere (the last only when nothing else matched); the best-ranked format wins, then the
  latest position.
- ``parse_letter_llava_sqa`` — LLaVA's ``eval_science_qa.py``: the whole answer is a letter, or it
  starts with "X. ", or the pattern ``The answer is ([A-Z]).`` (the "." is any character) matches
  exactly once.
- ``parse_letter_sqa_lmms`` — lmms-eval 0.7.3's ScienceQA: the answer is the letter in either case,
  or starts with an upper-case letter and ".".
- ``parse_letter_ai2d_lmms`` — lmms-eval 0.7.3's AI2D: a leading "X." gives the letter, else the whole
  answer is kept; lower-cased and without punctuation it must equal the letter.
- ``parse_letter_first_char`` — lmms-eval 0.7.3's SEED-Bench: the first character of the stripped
  answer, compared lower-cased.
- ``parse_letter_vlmevalkit`` — VLMEvalKit's ``can_infer`` (exact-matching path, no LLM judge): split
  the answer on whitespace and ``.()[],:;!*#{}``; exactly one option letter among the pieces, and among
  the last four → it; a refusal phrase or a lone "Z" → no answer; else "answer is X" (A-D); else the
  option texts: exactly one occurs in the answer (case-insensitive; not for answers longer than twice
  the options' total length) → it.

Aggregations: ``multiple_choice_scores`` (accuracy over samples, overall and per group, in percent),
``mmstar_l2_average_scores`` (lmms-eval's mean over MMStar's l2 categories) and ``mme_scores``
(per subtask accuracy, accuracy+ and their sum; perception and cognition totals, as MME defines them).
"""

from __future__ import annotations

import re
import string
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
    """MME's eval_tool rule: "yes", "no", or None (unparsed)."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return None


def parse_yes_no_lmms(prediction: str) -> str | None:
    """lmms-eval 0.7.3's MME rule: MME's, except that a one-character answer is read on its own
    ("y" → yes, "n" → no, any other single character → unparsed)."""
    text = prediction.lower().strip().replace(".", "")
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text)
    return parse_yes_no(prediction)


# VLMEvalKit's `process_punctuation` (vlmeval/smp/misc.py), as its yes/no extraction applies it.
_VLMEVAL_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                        ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def _vlmeval_punctuation(text: str) -> str:
    out = text
    for mark in _VLMEVAL_PUNCTUATION:
        glued = (mark + " " in text or " " + mark in text) or _DIGIT_COMMA_DIGIT.search(text) is not None
        out = out.replace(mark, "" if glued else " ")
    # The reference passes re.UNICODE (32) where `sub` takes its count: at most 32 periods go.
    return _LONE_PERIOD.sub("", out, count=32)


def parse_yes_no_vlmevalkit(prediction: str) -> str | None:
    """VLMEvalKit's `YOrN_Extraction`: the answer's words (lower-cased, punctuation processed) hold
    "yes" and not "no" → yes; "no" and not "yes" → no; else unparsed."""
    words = _vlmeval_punctuation(prediction.lower()).split()
    if ("yes" in words) != ("no" in words):
        return "yes" if "yes" in words else "no"
    return None


def parse_letter_mmstar(prediction: str, options: Sequence[str]) -> str | None:
    """MMStar's exact-match rule (see the module docstring); the letter, upper-case, or None."""
    text = prediction.lower().strip().replace("\n", " ")
    letters = {letter.lower() for letter in option_letters(len(options))}
    for prefix in ("", "(", "option ", "the answer is "):
        if text.startswith(prefix) and len(text) > len(prefix) and text[len(prefix)] in letters:
            return text[len(prefix)].upper()
    return None


# The phrases lmms-eval 0.7.3's `extract_mcq_answer` looks for a letter after (_task_utils/mcq_extract.py).
_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
# Formats by confidence: the highest-ranked format wins, and within it the last position.
_FORMAT_RANK = {"start": 10, "end": 9, "phrase": 7, "(X)": 6, "X.": 5, "X:": 4, "X)": 3, "X ": 2, "anywhere": 0}


def parse_letter_lmms_mcq(prediction: str, options: Sequence[str]) -> str | None:
    """lmms-eval 0.7.3's multiple-choice extraction (its MMStar rule; see the module docstring)."""
    letters = option_letters(len(options))
    text = prediction.strip()
    if not text:
        return None
    for mark in ",.!?;:'\"":  # one mark after the other, as the reference strips them
        text = text.strip(mark)
    text = " " + text + " "
    found: list[tuple[int, int, str]] = []  # (format rank, position, letter)
    for fmt, pattern in (("(X)", "({})"), ("X.", "{}."), ("X:", "{}:"), ("X)", "{})"), ("X ", "{} ")):
        found += [(_FORMAT_RANK[fmt], text.rfind(pattern.format(c)), c) for c in letters if pattern.format(c) in text]
    lowered = text.lower()
    for phrase in _ANSWER_PHRASES:
        at = lowered.find(phrase)
        if at != -1:  # every letter that occurs (case-sensitive, anywhere) after the phrase
            found += [(_FORMAT_RANK["phrase"], text.find(c, at + len(phrase)), c) for c in letters
                      if text.find(c, at + len(phrase)) != -1]
    core = text.strip()
    found += [(_FORMAT_RANK["start"], 0, c) for c in letters
              if core.startswith(c) and (len(core) == 1 or not core[1].isalpha())]
    found += [(_FORMAT_RANK["end"], len(text) - 1, c) for c in letters
              if core.endswith(c) and (len(core) == 1 or not core[-2].isalpha())]
    if not found:
        found = [(_FORMAT_RANK["anywhere"], text.rfind(c), c) for c in letters if c in text]
    return max(found, key=lambda item: (item[0], item[1]))[2] if found else None


_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # "." is any character, as in LLaVA's pattern


def parse_letter_llava_sqa(prediction: str, options: Sequence[str]) -> str | None:
    """LLaVA's ScienceQA rule (see the module docstring)."""
    letters = option_letters(len(options))
    text = prediction  # as given: LLaVA strips the model's output before, not the rule
    if text in letters:
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    if len(found) == 1 and found[0] in letters:
        return found[0]
    return None


def parse_letter_sqa_lmms(prediction: str, options: Sequence[str]) -> str | None:
    """lmms-eval 0.7.3's ScienceQA rule: the whole answer is the letter in either case, or it starts
    with an upper-case letter and a period."""
    letters = option_letters(len(options))
    text = prediction.strip()
    if text.upper() in letters and len(text) == 1:
        return text.upper()
    if len(text) >= 2 and text[0].isupper() and text[1] == "." and text[0] in letters:
        return text[0]
    return None


_LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def parse_letter_ai2d_lmms(prediction: str, options: Sequence[str]) -> str | None:
    """lmms-eval 0.7.3's AI2D rule: "X." at the start gives the letter, else the whole answer is kept;
    then lower-cased and without punctuation it must equal the letter."""
    match = _LEADING_LETTER.match(prediction)
    kept = (match.group(1) if match else prediction).lower().translate(_PUNCTUATION)
    named = [letter for letter in option_letters(len(options)) if kept == letter.lower()]
    return named[0] if named else None


def parse_letter_first_char(prediction: str, options: Sequence[str]) -> str | None:
    """lmms-eval 0.7.3's SEED-Bench rule: the first character of the stripped answer, compared
    case-insensitively with the letter."""
    text = prediction.strip()
    letter = text[:1].upper()
    return letter if letter and letter in option_letters(len(options)) else None


_VLMEVAL_SEPARATORS = ".()[],:;!*#{}"
_VLMEVAL_REFUSALS = (
    "Sorry, I can't help with images of people yet.", "I can't process this file.",
    "I'm sorry, but without the image provided", "Cannot determine the answer",
)
_VLMEVAL_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def _vlmeval_option(prediction: str, letters: list[str]) -> str | None:
    """VLMEvalKit's `can_infer_option`: a letter, "Z" (no answer: a refusal, or a lone "Z"), or None."""
    if "Failed to obtain answer via API" in prediction:
        return None
    if any(refusal in prediction for refusal in _VLMEVAL_REFUSALS):
        return "Z"
    pieces = prediction.translate(str.maketrans(_VLMEVAL_SEPARATORS, " " * len(_VLMEVAL_SEPARATORS))).split()
    named = [letter for letter in letters if letter in pieces]
    if len(named) == 1 and pieces.index(named[0]) > len(pieces) - 5:  # the letter must be among the last words
        return named[0]
    if not named and "Z" in pieces:
        return "Z"
    match = _VLMEVAL_ANSWER_IS.search(prediction)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    return None


def parse_letter_vlmevalkit(prediction: str, options: Sequence[str]) -> str | None:
    """VLMEvalKit's exact-matching rule (`can_infer`; see the module docstring)."""
    letters = option_letters(len(options))
    letter = _vlmeval_option(prediction, letters)
    if letter:
        return None if letter == "Z" else letter
    text = prediction.lower()
    if len(text) > 2 * sum(len(str(option)) for option in options):
        return None
    matching = [letter for letter, option in zip(letters, options) if str(option).lower() in text]
    return matching[0] if len(matching) == 1 else None


def _percent(correct: float, total: int) -> float:
    return round(100.0 * correct / total, 4) if total else 0.0


def _group_values(value) -> list[str]:
    """A record's value for one group: a list (MathVista's skills) counts towards each of its items."""
    return [str(item) for item in value] if isinstance(value, (list, tuple)) else [str(value)]


def multiple_choice_scores(records: Iterable[Mapping]) -> dict:
    """Accuracy overall and per group from prediction records (every sample weighs the same).

    Each record has ``correct`` (bool), ``parsed`` (the answer read, or None) and ``groups`` (a
    mapping of group name → value, or → a list of values, e.g. {"category": "math"}). Returns
    percentages, counts, the number of unparsed answers, and ``by_<group>`` tables
    ``{value: {"accuracy", "correct", "n"}}`` in sorted order.
    """
    records = list(records)
    total = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    grouped: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for name, value in (record.get("groups") or {}).items():
            for item in _group_values(value):
                grouped[name][item].append(bool(record["correct"]))
    result: dict = {
        "accuracy": _percent(correct, total),
        "correct": correct,
        "n": total,
        "unparsed": sum(r.get("parsed") is None for r in records),
    }
    for name in sorted(grouped):
        result[f"by_{name}"] = {
            value: {"accuracy": _percent(sum(flags), len(flags)), "correct": sum(flags), "n": len(flags)}
            for value, flags in sorted(grouped[name].items())
        }
    return result


def mmstar_l2_average_scores(records: Iterable[Mapping]) -> dict:
    """lmms-eval 0.7.3's MMStar aggregation: ``accuracy`` is the mean of the ``l2_category``
    accuracies (each of the 18 weighs the same, whatever its size); each core ``category``'s
    accuracy is the mean of its l2 categories'. The per-sample accuracy stays as ``sample_accuracy``."""
    result = multiple_choice_scores(records)
    records = list(records)
    l2_of: dict[str, set[str]] = defaultdict(set)
    for record in records:
        groups = record.get("groups") or {}
        if "l2_category" not in groups:
            raise ValueError(f"sample {record.get('id')} has no l2_category: lmms-eval averages over l2 categories")
        l2_of[str(groups.get("category"))].add(str(groups["l2_category"]))
    by_l2 = result.get("by_l2_category", {})

    def mean_of(l2s) -> float:  # of the unrounded l2 accuracies
        return round(100.0 * sum(by_l2[l2]["correct"] / by_l2[l2]["n"] for l2 in l2s) / len(l2s), 4) if l2s else 0.0

    result["sample_accuracy"] = result["accuracy"]
    result["accuracy"] = mean_of(list(by_l2))
    result["by_category"] = {
        category: {"accuracy": mean_of(sorted(l2s)),
                   "correct": sum(by_l2[l2]["correct"] for l2 in l2s), "n": sum(by_l2[l2]["n"] for l2 in l2s)}
        for category, l2s in sorted(l2_of.items())
    }
    return result


def mme_scores(records: Iterable[Mapping], per_image_average: bool = False) -> dict:
    """MME's scores from prediction records with ``correct``, ``parsed``, ``subtask`` and ``image_key``.

    Per subtask: accuracy = correct questions / questions; accuracy+ = images whose questions
    (two per image in MME: one "yes", one "no") are all correct / images; score = accuracy +
    accuracy+ (both in percent, so at most 200). Perception = sum of the 10 perception subtasks'
    scores (max 2000), cognition = sum of the 4 cognition subtasks' (max 800); subtasks absent from
    the data (e.g. under --limit) are listed in ``missing_subtasks`` and add nothing.

    ``per_image_average`` (lmms-eval 0.7.3): a subtask's score is instead the mean over its images
    of (that image's accuracy + 100 if exactly two of its answers are right); the same number when
    every image has its two questions, not otherwise.
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
        if per_image_average:
            score = sum(100.0 * sum(f) / len(f) + 100.0 * (sum(f) == 2) for f in images.values()) / len(images)
        else:
            score = accuracy + accuracy_plus
        subtasks[name] = {
            "accuracy": accuracy,
            "accuracy_plus": accuracy_plus,
            "score": round(score, 4),
            "questions": len(answers),
            "images": len(images),
            "unpaired_images": sum(len(flags) != 2 for flags in images.values()),
        }
    known = set(MME_PERCEPTION) | set(MME_COGNITION)
    correct = sum(bool(r["correct"]) for r in records)
    return {
        "perception": round(sum(subtasks[n]["score"] for n in MME_PERCEPTION if n in subtasks), 4),
        "cognition": round(sum(subtasks[n]["score"] for n in MME_COGNITION if n in subtasks), 4),
        "accuracy": _percent(correct, len(records)),
        "correct": correct,
        "n": len(records),
        "unparsed": sum(r.get("parsed") is None for r in records),
        "subtasks": subtasks,
        "missing_subtasks": [n for n in MME_PERCEPTION + MME_COGNITION if n not in subtasks],
        "unknown_subtasks": sorted(set(subtasks) - known),
    }
