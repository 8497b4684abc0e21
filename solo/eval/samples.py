"""One evaluation sample, and the generic readers of the file types benchmarks are distributed as
(parquet files or folders of them, VLMEvalKit TSVs with base64 images, JSON, JSONL).

Readers never stop at a bad row: a row with a missing or malformed field becomes a `Sample` whose
``error`` says what is wrong, so the run reports it and goes on.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from solo.eval.scoring import LETTERS
from solo.outputs import NotRegularFileError, TooLargeError, open_regular_file, read_capped

ImageRef = str | bytes  # a file path, or the encoded image bytes


# Whole-file reads (a JSON/JSONL question file, an MME .txt, an image): the published benchmark
# files are far below these, and a link to /dev/zero or a runaway file stops here, not at memory's end.
MAX_DATA_FILE_BYTES = 1024**3
MAX_IMAGE_FILE_BYTES = 64 * 1024**2


class EvalDataError(ValueError):
    """The benchmark data cannot be read at all (the message names the path and what to do)."""


def open_data_file(path: str | os.PathLike, what: str = "benchmark file") -> IO[bytes]:
    """``path`` opened for reading if it is a regular file (a FIFO would hang, a device never end)."""
    try:
        return open_regular_file(path, what)
    except (OSError, NotRegularFileError) as error:
        raise EvalDataError(f"cannot read file {path} ({getattr(error, 'strerror', None) or error})") from error


def read_data_file(path: str | os.PathLike, limit: int | None = None, what: str = "benchmark file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (default ``MAX_DATA_FILE_BYTES``);
    EvalDataError naming it otherwise."""
    limit = MAX_DATA_FILE_BYTES if limit is None else limit
    with open_data_file(path, what) as handle:
        try:
            return read_capped(handle, limit, f"{what} {path}")
        except TooLargeError as error:
            raise EvalDataError(f"{error}; shrink or split it") from error
        except OSError as error:
            raise EvalDataError(f"cannot read file {path} ({error.strerror or error})") from error


@dataclass
class Sample:
    """One question. ``row`` (its position in reading order) is the key predictions are stored under."""

    row: int
    id: str
    question: str = ""
    image: ImageRef | None = None
    options: list[str] = field(default_factory=list)  # empty for yes/no questions (MME)
    answer: str = ""  # the option letter, or "yes"/"no"
    groups: dict[str, str] = field(default_factory=dict)  # e.g. {"category": "math"}: scored separately
    hint: str = ""  # ScienceQA's context
    image_key: str = ""  # MME: the image the question is about (accuracy+ pairs its questions)
    error: str | None = None  # set when the sample cannot be evaluated; the run reports it
    meta: dict[str, Any] = field(default_factory=dict)  # what a rule needs besides (MathVista: answer type, precision)


def is_missing(value: Any) -> bool:
    """None, NaN (pandas' empty TSV cell) or a blank string."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def image_ref(value: Any, base_dir: Path) -> ImageRef:
    """The image of a row as a path or bytes, from the ways benchmark files store it.

    Accepts a Hugging Face ``Image`` feature struct (``{"bytes", "path"}``), raw bytes, a base64
    string (VLMEvalKit TSVs) or a file path (relative paths are taken from ``base_dir``).
    Raises ValueError saying what was found.
    """
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return image_ref(value["path"], base_dir)
        raise ValueError("image field holds neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        candidate = Path(text) if os.path.isabs(text) else base_dir / text
        try:
            if len(text) < 1024 and candidate.suffix and candidate.exists():
                return os.fspath(candidate)
        except OSError:  # e.g. a base64 text whose "path segments" are too long for the filesystem
            pass
        if len(text) > 64:  # shorter strings are file names or row references, never an image
            try:
                return base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                pass
        return os.fspath(candidate)  # a path that does not exist: reported when the image is opened
    raise ValueError(f"image field is {type(value).__name__}, not an image, a path or base64 text")


def parquet_files(path: Path) -> list[Path]:
    """``path`` itself, or every ``*.parquet`` below the folder (sorted), as Hugging Face snapshots hold them."""
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise EvalDataError(f"{path} holds no .parquet files")
    return files


SPLIT_NAMES = ("train", "validation", "val", "dev", "test", "testmini")


def parquet_split(file: Path) -> str | None:
    """The split a Hugging Face parquet file holds, from its name (``test-00000-of-00001.parquet``)
    or its folder (``test/0000.parquet``, the parquet-converter layout); None when neither says."""
    for name in (file.name.split("-")[0].split(".")[0], file.parent.name):
        if name in SPLIT_NAMES:
            return name
    return None


def iter_parquet(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of one parquet file or of all parquet files in a folder (split folders in sorted order)."""
    import pyarrow.parquet as pq

    for file in parquet_files(path):
        with open_data_file(file, "parquet file") as handle:
            try:
                parquet = pq.ParquetFile(handle)
            except Exception as error:  # pyarrow raises several types for a broken file
                raise EvalDataError(f"{file} is not a readable parquet file ({error})") from error
            for batch in parquet.iter_batches(batch_size=256):
                yield from batch.to_pylist()


def read_tsv(path: Path) -> list[dict[str, Any]]:
    """Rows of a VLMEvalKit TSV, with rows that reference another row's image resolved.

    VLMEvalKit stores an image once: a row whose ``image`` cell is short (≤ 64 characters) holds
    the ``index`` of the row with the base64 image.
    """
    csv.field_size_limit(sys.maxsize)  # base64 images are far larger than csv's 128 KiB default
    try:
        with open_data_file(path, "TSV file") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise EvalDataError(f"cannot read the TSV {path} ({error})") from error
    if rows and "question" not in rows[0]:
        raise EvalDataError(f"{path} has no 'question' column (columns: {sorted(rows[0])}); is it a VLMEvalKit TSV?")
    images = {row.get("index"): row.get("image") for row in rows}
    for row in rows:
        value = row.get("image")
        if isinstance(value, str) and 0 < len(value.strip()) <= 64 and value.strip() in images:
            row["image"] = images[value.strip()]
            row["image_key"] = value.strip()
        else:
            row["image_key"] = row.get("index", "")
    return rows


def read_json_rows(path: Path) -> list[Any]:
    """A JSON file's top-level value, or a JSONL file's objects (a broken line becomes an error row)."""
    try:
        text = read_data_file(path).decode("utf-8")
    except UnicodeDecodeError as error:
        raise EvalDataError(f"cannot read {path} ({error})") from error
    if path.suffix == ".jsonl":
        rows: list[Any] = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                rows.append({"__error__": f"{path.name} line {number} is not valid JSON ({error.msg})"})
        return rows
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise EvalDataError(f"{path} is not valid JSON ({error})") from error


def read_rows(path: Path) -> tuple[list[dict[str, Any]], str]:
    """Rows of a table file by its type, and the type: "parquet", "tsv" or "jsonl"."""
    if path.is_dir() or path.suffix == ".parquet":
        return list(iter_parquet(path)), "parquet"
    if path.suffix == ".tsv":
        return read_tsv(path), "tsv"
    if path.suffix == ".jsonl":
        return read_json_rows(path), "jsonl"
    raise EvalDataError(f"{path}: unknown file type {path.suffix!r}; expected .parquet, .tsv or .jsonl")


def letter_columns(row: dict[str, Any]) -> list[str]:
    """The option texts of a VLMEvalKit row (columns A, B, C, … up to the first empty one)."""
    options = []
    for letter in LETTERS:
        value = row.get(letter)
        if is_missing(value):
            break
        options.append(str(value).strip())
    return options


def answer_letter(answer: Any, count: int) -> str:
    """An answer given as a letter or a 0-based index → its letter; ValueError when out of range."""
    if isinstance(answer, bool) or is_missing(answer):
        raise ValueError("answer is missing")
    text = str(answer).strip()
    if text.isdigit():
        index = int(text)
    elif len(text) == 1 and text.upper() in LETTERS:
        index = ord(text.upper()) - ord("A")
    else:
        raise ValueError(f"answer {text!r} is neither an option letter nor an option index")
    if not 0 <= index < count:
        raise ValueError(f"answer {text!r} is outside the {count} options")
    return chr(ord("A") + index)


def multiple_choice_sample(
    row: int,
    sample_id: Any,
    *,
    question: Any,
    options: Any,
    answer: Any,
    image: Any,
    base_dir: Path,
    groups: dict[str, Any] | None = None,
    hint: Any = "",
) -> Sample:
    """A validated multiple-choice sample; a missing or malformed field gives a sample with ``error``."""
    sample = Sample(row=row, id=str(sample_id if not is_missing(sample_id) else row))
    sample.groups = {name: str(value) for name, value in (groups or {}).items() if not is_missing(value)}
    sample.hint = "" if is_missing(hint) else str(hint).strip()
    try:
        if is_missing(question):
            raise ValueError("question is missing")
        sample.question = str(question).strip()
        if not isinstance(options, (list, tuple)) or len(options) < 2 or any(is_missing(o) for o in options):
            raise ValueError(f"options must be a list of at least 2 non-empty texts, got {options!r}")
        if len(options) > len(LETTERS):
            raise ValueError(f"{len(options)} options, but only {len(LETTERS)} can be labelled A-Z")
        sample.options = [str(option).strip() for option in options]
        sample.answer = answer_letter(answer, len(sample.options))
        if image is None or is_missing(image):
            raise ValueError("image is missing")
        sample.image = image_ref(image, base_dir)
    except ValueError as error:
        sample.error = str(error)
    return sample
