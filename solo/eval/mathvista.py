"""MathVista testmini: the released files, the reference query, answer extraction and scoring as
MathVista's ``evaluation/`` (lupantech/MathVista 53d52587) does it.

Layouts (``--data``): the Hugging Face AI4Math/MathVista snapshot folder (``data/testmini-*.parquet``;
``test`` files, whose answers are not released, are skipped) or one of its parquet files; the
original ``testmini.json`` (a mapping pid → problem, ``image`` relative to its folder). Columns:
``pid, question, image, decoded_image, choices, unit, precision, answer, question_type, answer_type,
metadata, query``.

The model is asked the released ``query`` (MathVista's zero-shot query: hint, question, choices).
Its answer is then read in MathVista's order (``extract_answer.py``): empty → empty; a multiple-choice
answer equal to a choice → it; an integer / float answer that parses as one → it; ``The answer is
"…".`` → the quoted text. Where the reference then asks GPT-4, this module applies rules instead
(the documented difference): multiple choice → VLMEvalKit's letter / option-text rule, and else the
answer as it is (normalisation then takes the most similar choice, as it does with GPT-4's text);
integer / float → the last number in the answer; list → the last ``[…]`` in it. With an extractor
(``--extractor-url``, an OpenAI-compatible chat endpoint), that model is asked instead, with a
few-shot prompt written for this project in the reference's form (not MathVista's own examples).

Normalisation and the check are the reference's (``calculate_score.py``): multiple choice → "(X)" or
a lone letter names a choice, else the choice nearest in edit distance; integer → ``str(int(float(x)))``;
float → ``str(round(float(x), precision))``; list → ``str(x)``; correct when equal to the released
answer. Accuracy overall, per ``task`` and per ``skill`` (a problem counts for each of its skills),
and per the other metadata fields the reference reports.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from solo.eval import scoring
from solo.eval.samples import (
    EvalDataError,
    Sample,
    image_ref,
    is_missing,
    iter_parquet,
    parquet_files,
    parquet_split,
    read_json_rows,
)

LAYOUTS = ("the AI4Math/MathVista snapshot folder (data/testmini-*.parquet) or one of its parquet files; "
           "the original testmini.json with its images/")
QUESTION_TYPES = ("multi_choice", "free_form")
ANSWER_TYPES = ("text", "integer", "float", "list")
METADATA_GROUPS = ("task", "skills", "category", "context", "grade", "source", "language")
MAX_NEW_TOKENS = 512  # evaluation/generate_response.py's --max_new_tokens


# --- reading -------------------------------------------------------------------------------------

def _rows(path: Path) -> tuple[list[dict], Path]:
    if path.suffix == ".json" or (path.is_dir() and (path / "testmini.json").is_file()):
        file = path if path.suffix == ".json" else path / "testmini.json"
        problems = read_json_rows(file)
        if not isinstance(problems, dict):
            raise EvalDataError(f"{file} should map problem ids to problems, as MathVista's testmini.json does")
        return [{"pid": pid, **problem} if isinstance(problem, dict) else {"pid": pid} for pid, problem in
                problems.items()], file.parent
    if path.is_dir():
        files = [file for file in parquet_files(path) if parquet_split(file) == "testmini"]
        if not files:
            raise EvalDataError(f"{path} holds no testmini parquet (testmini-*.parquet); MathVista reads: {LAYOUTS}")
        return [row for file in files for row in iter_parquet(file)], path
    return list(iter_parquet(path)), path.parent


def read_mathvista(path: Path) -> list[Sample]:
    rows, base = _rows(path)
    samples = []
    for row, record in enumerate(rows):
        metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
        sample = Sample(row=row, id=str(record.get("pid", row)))
        sample.groups = {name: metadata[name] for name in METADATA_GROUPS if not is_missing(metadata.get(name))}
        for name in ("question_type", "answer_type"):
            if not is_missing(record.get(name)):
                sample.groups[name] = str(record[name])
        try:
            sample.question = _required(record, "query", "MathVista's released files have it")
            question_type = _required(record, "question_type")
            answer_type = _required(record, "answer_type")
            if question_type not in QUESTION_TYPES or answer_type not in ANSWER_TYPES:
                raise ValueError(f"question_type {question_type!r} / answer_type {answer_type!r} are not MathVista's")
            sample.answer = _required(record, "answer", "the test split's answers are not released: use testmini")
            choices = record.get("choices")
            if question_type == "multi_choice":
                if not isinstance(choices, (list, tuple)) or len(choices) < 2:
                    raise ValueError(f"a multi_choice problem needs its choices, got {choices!r}")
                sample.options = [str(choice) for choice in choices]
            precision = record.get("precision")
            if answer_type == "float" and is_missing(precision):
                raise ValueError("a float answer needs its precision")
            sample.meta = {"question_type": question_type, "answer_type": answer_type,
                           "precision": None if is_missing(precision) else int(float(precision))}
            image = record.get("decoded_image")
            if image is None or is_missing(image) or (isinstance(image, dict) and not any(image.values())):
                image = record.get("image")
            if image is None or is_missing(image):
                raise ValueError("image is missing")
            sample.image = image_ref(image, base)
        except ValueError as error:
            sample.error = str(error)
        samples.append(sample)
    return samples


def _required(record: dict, name: str, hint: str = "") -> str:
    value = record.get(name)
    if value is None or is_missing(value):
        raise ValueError(f"{name} is missing" + (f" ({hint})" if hint else ""))
    return str(value).strip() if name != "query" else str(value)


# --- extraction ----------------------------------------------------------------------------------

_QUOTED_ANSWER = re.compile(r'The answer is "(.*)"\.')
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LIST = re.compile(r"\[[^\[\]]*\]")


def _as_number(text: str, answer_type: str) -> str | None:
    """MathVista's direct reads: the whole answer is an integer / a float."""
    try:
        return str(int(text)) if answer_type == "integer" else str(float(text)) if answer_type == "float" else None
    except ValueError:
        return None


def quick_extract(response: str, sample: Sample) -> str | None:
    """The reference's steps before GPT-4 (see the module docstring); None when they find nothing."""
    if response == "":
        return ""
    if sample.meta["question_type"] == "multi_choice" and response in sample.options:
        return response
    number = _as_number(response, sample.meta["answer_type"])
    if number is not None:
        return number
    quoted = _QUOTED_ANSWER.search(response)
    return quoted.group(1) if quoted else None


def rule_extract(response: str, sample: Sample) -> str:
    """The rules this project uses where the reference asks GPT-4 (see the module docstring)."""
    if sample.meta["question_type"] == "multi_choice":
        return scoring.parse_letter_vlmevalkit(response, sample.options) or response
    if sample.meta["answer_type"] in ("integer", "float"):
        numbers = _NUMBER.findall(response.replace(",", ""))
        return numbers[-1] if numbers else ""
    if sample.meta["answer_type"] == "list":
        lists = _LIST.findall(response)
        return lists[-1] if lists else response.strip()
    return response.strip()


_EXTRACTOR_PROMPT = """Read the question and a model's response to it, then write only the final answer the response gives, in the form the hint asks for (an option letter, an integer, a number with the stated decimals, or a Python list). Write nothing else.

Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.
Question: How many red blocks are on the shelf?

Model response: I can count three red blocks next to a blue one.

Extracted answer: 3

{query}

Model response: {response}

Extracted answer: """  # noqa: E501 (the prompt's lines are its text)


class Extractor:
    """An OpenAI-compatible chat completions endpoint that extracts answers (``POST {url}/chat/completions``)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model or os.environ.get("SOLO_EXTRACTOR_MODEL", "gpt-4-0613")
        self.api_key = api_key if api_key is not None else os.environ.get("SOLO_EXTRACTOR_API_KEY", "")
        self.timeout = timeout

    def __call__(self, query: str, response: str) -> str:
        body = {"model": self.model, "temperature": 0, "max_tokens": 64,
                "messages": [{"role": "user", "content": _EXTRACTOR_PROMPT.format(query=query, response=response)}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                answer = json.loads(reply.read(1 << 20))
            return str(answer["choices"][0]["message"]["content"]).strip()
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as error:
            raise EvalDataError(f"--extractor-url {self.url} gave no answer ({error}); check the server, or "
                                "leave --extractor-url out to extract by rules") from error


def extract_answer(response: str, sample: Sample, extractor: Extractor | None = None) -> str:
    quick = quick_extract(response, sample)
    if quick is not None:
        return quick
    return extractor(sample.question, response) if extractor else rule_extract(response, sample)


# --- normalisation -------------------------------------------------------------------------------

def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


_PARENTHESISED_LETTER = re.compile(r"\(([a-zA-Z])\)")


def normalize(extraction: str, sample: Sample) -> str | None:
    """The reference's ``normalize_extracted_answer`` (see the module docstring); None: not a number."""
    answer_type, choices = sample.meta["answer_type"], sample.options
    if sample.meta["question_type"] == "multi_choice":
        text = str(extraction).strip()
        letters = _PARENTHESISED_LETTER.findall(text)
        if letters:
            text = letters[0].upper()
        if text in scoring.LETTERS[: len(choices)] and len(text) == 1:
            return choices[scoring.LETTERS.index(text)]
        distances = [edit_distance(text, choice) for choice in choices]
        return choices[distances.index(min(distances))]  # ties: the first choice
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), sample.meta["precision"]))
    except (TypeError, ValueError, OverflowError):
        return None
    return str(extraction)


def parse_rule(extractor: Extractor | None = None) -> Callable[[str, Sample], str | None]:
    """Model text → the normalised answer compared with the released one."""
    return lambda text, sample: normalize(extract_answer(text, sample, extractor), sample)

