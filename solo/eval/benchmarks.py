"""The benchmarks `solo eval` knows: how each one's published files are read (``Benchmark.layouts``
names the layouts) and how likelihood mode puts its questions. The prompts, generation lengths,
answer parsing and aggregation of each reference toolkit live in `solo.eval.protocols`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from solo.eval import mathvista, scoring
from solo.eval.samples import (
    EvalDataError,
    Sample,
    image_ref,
    is_missing,
    iter_parquet,
    letter_columns,
    multiple_choice_sample,
    parquet_files,
    parquet_split,
    read_data_file,
    read_json_rows,
    read_rows,
    read_tsv,
)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its reader, the layouts the reader knows, and its likelihood-mode questions."""

    name: str
    read: Callable[[Path], list[Sample]]
    layouts: str  # the data layouts ``read`` knows (named in errors and in docs/evaluation.md)
    yes_no: bool = False  # MME: answers are "yes"/"no", questions carry their own instruction
    likelihood: bool = True  # whether likelihood mode can rank its answers (not for free-form MathVista)

    def cloze_prompt(self, sample: Sample) -> str:
        """The question as likelihood mode asks it: no option list, the candidates are the replies."""
        if self.yes_no:
            return sample.question
        context = f"Context: {sample.hint}\n" if sample.hint else ""
        return f"{context}{question_without_options(sample.question)}"

    def candidates(self, sample: Sample) -> list[tuple[str, str]]:
        """(label, reply text) pairs that likelihood mode ranks."""
        if self.yes_no:
            return [("yes", "Yes"), ("no", "No")]
        return list(zip(scoring.LETTERS, sample.options))


def question_without_options(question: str) -> str:
    """MMStar's questions list their options ("… Options: A: x, B: y"); the question before them."""
    return re.split(r"\s*\bOptions:", question)[0]


# --- MME ---------------------------------------------------------------------------------------

_MME_ANSWERS = {"yes": "yes", "no": "no"}


def _mme_sample(row: int, sample_id: str, question, answer, subtask, image, image_key: str, base_dir: Path) -> Sample:
    sample = Sample(row=row, id=str(sample_id), image_key=image_key, groups={"subtask": str(subtask)})
    try:
        if is_missing(question):
            raise ValueError("question is missing")
        sample.question = str(question).strip()
        label = _MME_ANSWERS.get(str(answer).strip().lower().rstrip("."))
        if label is None:
            raise ValueError(f"answer {answer!r} is neither Yes nor No")
        sample.answer = label
        if is_missing(subtask):
            raise ValueError("category (the MME subtask) is missing")
        if is_missing(image):
            raise ValueError("image is missing")
        sample.image = image_ref(image, base_dir)
    except ValueError as error:
        sample.error = str(error)
    return sample


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def _read_mme_release(root: Path) -> list[Sample]:
    """MME_Benchmark_release_version: one folder per subtask; per image a .txt of "question<TAB>answer" lines."""
    samples: list[Sample] = []
    for subtask_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if (subtask_dir / "questions_answers_YN").is_dir():
            text_dir, image_dir = subtask_dir / "questions_answers_YN", subtask_dir / "images"
        else:
            text_dir = image_dir = subtask_dir
        for text_file in sorted(text_dir.glob("*.txt")):
            images = [image_dir / (text_file.stem + suffix) for suffix in _IMAGE_SUFFIXES]
            image = next((p for p in images if p.exists()), None)
            key = f"{subtask_dir.name}/{text_file.stem}"
            try:
                lines = [line for line in read_data_file(text_file).decode("utf-8").splitlines() if line.strip()]
            except (EvalDataError, UnicodeDecodeError) as error:
                lines = [f"\t__unreadable__ {error}"]
            for number, line in enumerate(lines):
                question, _, answer = line.rpartition("\t")
                sample = _mme_sample(
                    len(samples), f"{key}#{number}", question, answer, subtask_dir.name,
                    os.fspath(image) if image else None, key, root,
                )
                if image is None:
                    looked = f"{text_file.stem}{{{','.join(_IMAGE_SUFFIXES)}}}"
                    sample.error = f"no image beside {text_file} (looked for {looked})"
                samples.append(sample)
    if not samples:
        raise EvalDataError(f"{root} holds no MME subtask folders with question .txt files")
    return samples


def read_mme(path: Path) -> list[Sample]:
    if path.is_dir() and not any(path.rglob("*.parquet")):
        return _read_mme_release(path)
    rows, kind = read_rows(path)
    samples = []
    asked: dict[str, int] = {}  # lmms-lab's question_id names the image: its questions are "<id>#0", "<id>#1"
    for row, record in enumerate(rows):
        if kind == "tsv":
            image = record.get("image") if not is_missing(record.get("image")) else record.get("image_path")
            key = record.get("image_path") or record["image_key"]
            sample_id = record.get("index", row)
        else:
            image, key = record.get("image"), str(record.get("question_id", row))
            sample_id = f"{key}#{asked.get(key, 0)}"
            asked[key] = asked.get(key, 0) + 1
        samples.append(
            _mme_sample(row, sample_id, record.get("question"), record.get("answer"), record.get("category"),
                        image, str(key), path.parent if path.is_file() else path)
        )
    return samples


# --- MMStar ------------------------------------------------------------------------------------

def _mmstar_options(question: str) -> list[str]:
    """Option texts listed in an MMStar question ("… Options: A: x, B: y, C: z, D: w")."""
    parts = re.split(r"\bOptions:\s*", question, maxsplit=1)
    if len(parts) != 2:
        return []
    pieces = re.split(r"(?:^|,\s*|\n)([A-F])[:.]\s+", parts[1].strip())
    letters, texts = pieces[1::2], pieces[2::2]
    if not letters or "".join(letters) != scoring.LETTERS[: len(letters)]:
        return []
    return [text.strip() for text in texts]


def read_mmstar(path: Path) -> list[Sample]:
    rows, kind = read_rows(path)
    base = path.parent if path.is_file() else path
    samples = []
    for row, record in enumerate(rows):
        question = record.get("question")
        options = letter_columns(record) if kind == "tsv" else _mmstar_options(str(question or ""))
        groups = {"category": record.get("category"),
                  "l2_category": record.get("l2_category", record.get("l2-category"))}
        samples.append(multiple_choice_sample(
            row, record.get("index", row), question=question, options=options, answer=record.get("answer"),
            image=record.get("image"), base_dir=base, groups=groups,
        ))
    return samples


# --- ScienceQA ---------------------------------------------------------------------------------

def _grade_band(grade) -> str | None:
    """ScienceQA reports grades 1-6 and 7-12 separately ("grade3" → "G1-6")."""
    match = re.search(r"(\d+)", str(grade or ""))
    if not match:
        return None
    return "G1-6" if int(match.group(1)) <= 6 else "G7-12"


def _sqa_groups(record: dict) -> dict:
    return {"subject": record.get("subject"), "grade": _grade_band(record.get("grade")),
            "category": record.get("category") if "subject" not in record else None}


def _read_sqa_original(root: Path) -> list[Sample]:
    problems_path = root / "problems.json"
    problems = read_json_rows(problems_path)
    splits = read_json_rows(root / "pid_splits.json") if (root / "pid_splits.json").exists() else None
    if not isinstance(problems, dict):
        raise EvalDataError(f"{problems_path} should map problem ids to problems")
    test_ids = splits.get("test") if isinstance(splits, dict) else None
    if test_ids is None:
        test_ids = [pid for pid, problem in problems.items()
                    if isinstance(problem, dict) and problem.get("split") == "test"]
    samples = []
    for pid in test_ids:
        problem = problems.get(str(pid))
        if not isinstance(problem, dict) or not problem.get("image"):
            continue  # not in the image subset
        image = next(
            (os.fspath(p) for p in (root / "images" / "test" / str(pid) / problem["image"],
                                    root / "test" / str(pid) / problem["image"]) if p.exists()),
            os.fspath(root / "images" / "test" / str(pid) / problem["image"]),
        )
        samples.append(multiple_choice_sample(
            len(samples), pid, question=problem.get("question"), options=problem.get("choices"),
            answer=problem.get("answer"), image=image, base_dir=root, groups=_sqa_groups(problem),
            hint=problem.get("hint"),
        ))
    return samples


def _sqa_test_files(path: Path) -> list[Path]:
    """The parquet files of ScienceQA's test split under ``path``. A snapshot of lmms-lab/ScienceQA
    holds ``ScienceQA-IMG`` and ``ScienceQA-FULL`` (the same test questions twice): only IMG is read."""
    if path.is_file():
        split = parquet_split(path)
        if split not in (None, "test"):
            raise EvalDataError(f"{path} holds ScienceQA's {split} split; pass the test split (test-*.parquet)")
        return [path]
    files = parquet_files(path)
    tests = [file for file in files if parquet_split(file) == "test"]
    if not tests:
        raise EvalDataError(f"{path} holds no ScienceQA test-split parquet (test-*.parquet or test/*.parquet); "
                            f"found {', '.join(os.path.relpath(f, path) for f in files[:5])}")
    return [file for file in tests if "ScienceQA-IMG" in file.parts] or tests


def read_scienceqa(path: Path) -> list[Sample]:
    if path.is_dir() and (path / "problems.json").exists():
        return _read_sqa_original(path)
    if path.name == "problems.json":
        return _read_sqa_original(path.parent)
    if path.suffix == ".tsv":
        rows, kind = [row for row in read_tsv(path) if str(row.get("split", "test")) == "test"], "tsv"
    else:
        rows, kind = [row for file in _sqa_test_files(path) for row in iter_parquet(file)], "parquet"
    base = path.parent if path.is_file() else path
    samples = []
    for record in rows:
        if kind == "tsv":
            options, answer = letter_columns(record), record.get("answer")
        else:
            if is_missing(record.get("image")):
                continue  # ScienceQA's text-only questions are not in the image subset
            options, answer = record.get("choices"), record.get("answer")
        samples.append(multiple_choice_sample(
            len(samples), record.get("index", len(samples)), question=record.get("question"), options=options,
            answer=answer, image=record.get("image"), base_dir=base, groups=_sqa_groups(record),
            hint=record.get("hint"),
        ))
    return samples


# --- AI2D --------------------------------------------------------------------------------------

def read_ai2d(path: Path) -> list[Sample]:
    rows, kind = read_rows(path)
    base = path.parent if path.is_file() else path
    samples = []
    for row, record in enumerate(rows):
        options = letter_columns(record) if kind == "tsv" else record.get("options")
        samples.append(multiple_choice_sample(
            row, record.get("index", row), question=record.get("question"), options=options,
            answer=record.get("answer"), image=record.get("image"), base_dir=base,
            groups={"category": record.get("category")},
        ))
    return samples


# --- SEED-Bench --------------------------------------------------------------------------------

def _seed_original(path: Path) -> list[Sample]:
    spec = read_json_rows(path)
    if not isinstance(spec, dict) or not isinstance(spec.get("questions"), list):
        raise EvalDataError(f"{path} should be SEED-Bench.json with a 'questions' list")
    type_names = {str(v): k for k, v in (spec.get("question_type") or {}).items()}
    image_dir = next((d for d in (path.parent / "SEED-Bench-image", path.parent / "images", path.parent)
                      if d.is_dir()), path.parent)
    samples = []
    for question in spec["questions"]:
        if not isinstance(question, dict) or question.get("data_type", "image") != "image":
            continue
        type_id = question.get("question_type_id")
        samples.append(multiple_choice_sample(
            len(samples), question.get("question_id", len(samples)), question=question.get("question"),
            options=[question.get(f"choice_{c}") for c in "abcd"], answer=question.get("answer"),
            image=os.fspath(image_dir / str(question.get("data_id", ""))) if question.get("data_id") else None,
            base_dir=image_dir, groups={"question_type": type_names.get(str(type_id), type_id)},
        ))
    return samples


def read_seedbench(path: Path) -> list[Sample]:
    if path.suffix == ".json":
        return _seed_original(path)
    rows, kind = read_rows(path)
    base = path.parent if path.is_file() else path
    samples = []
    for record in rows:
        if kind == "tsv":
            options, group, image = letter_columns(record), record.get("category"), record.get("image")
        else:
            if record.get("data_type", "image") != "image":
                continue
            options = [record.get(f"choice_{c}") for c in "abcd"]
            group = record.get("question_type_id")
            image = record.get("image")
            if isinstance(image, list):  # lmms-lab stores a list: one image, or a video's frames
                image = image[0] if len(image) == 1 else None
        samples.append(multiple_choice_sample(
            len(samples), record.get("question_id", record.get("index", len(samples))),
            question=record.get("question"), options=options, answer=record.get("answer"),
            image=image, base_dir=base, groups={"question_type": group},
        ))
    return samples


# --- generic multiple choice -------------------------------------------------------------------

def read_mc(path: Path) -> list[Sample]:
    if path.suffix != ".jsonl":
        raise EvalDataError(f"--benchmark mc reads a .jsonl file (one question per line), got {path}")
    samples = []
    for row, record in enumerate(read_json_rows(path)):
        if not isinstance(record, dict):
            samples.append(Sample(row=row, id=str(row), error=f"line {row + 1} is not a JSON object"))
            continue
        if "__error__" in record:
            samples.append(Sample(row=row, id=str(row), error=record["__error__"]))
            continue
        samples.append(multiple_choice_sample(
            row, record.get("id", row), question=record.get("question"), options=record.get("options"),
            answer=record.get("answer"), image=record.get("image"), base_dir=path.parent,
            groups={"category": record.get("category")},
        ))
    return samples


BENCHMARKS: dict[str, Benchmark] = {
    "mme": Benchmark("mme", read_mme, (
        "the MME_Benchmark_release_version folder (per subtask images/ + questions_answers_YN/, or images and "
        ".txt side by side); lmms-lab/MME parquet; VLMEvalKit MME.tsv"), yes_no=True),
    "mmstar": Benchmark("mmstar", read_mmstar, "Lin-Chen/MMStar mmstar.parquet; VLMEvalKit MMStar.tsv"),
    "scienceqa": Benchmark("scienceqa", read_scienceqa, (
        "ScienceQA's problems.json + pid_splits.json + images/test/<pid>/; lmms-lab/ScienceQA (ScienceQA-IMG) or "
        "derek-thomas/ScienceQA parquet, test split; VLMEvalKit ScienceQA_TEST.tsv")),
    "ai2d": Benchmark("ai2d", read_ai2d, "lmms-lab/ai2d parquet; VLMEvalKit AI2D_TEST.tsv"),
    "seedbench": Benchmark("seedbench", read_seedbench, (
        "SEED-Bench.json + SEED-Bench-image/; lmms-lab/SEED-Bench parquet; VLMEvalKit SEEDBench_IMG.tsv")),
    "mathvista": Benchmark("mathvista", mathvista.read_mathvista, mathvista.LAYOUTS, likelihood=False),
    "mc": Benchmark("mc", read_mc, (
        "a JSONL file, one object per line: image (path relative to the file), question, options (list), "
        "answer (letter); optional id, category")),
}


def load_samples(benchmark: str, data: str | os.PathLike) -> list[Sample]:
    """Read a benchmark's samples from ``data`` (see the module table for the layouts)."""
    if benchmark not in BENCHMARKS:
        raise EvalDataError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    path = Path(data)
    if not path.exists():
        raise EvalDataError(f"--data {path} does not exist; pass the benchmark's local file or folder")
    spec = BENCHMARKS[benchmark]
    samples = spec.read(path)
    if not any(sample.error is None for sample in samples):
        reasons = sorted({sample.error for sample in samples})[:3]
        raise EvalDataError(
            f"{path} holds no valid {benchmark} sample ({len(samples)} read"
            + (f"; e.g. {'; '.join(reasons)}" if reasons else "")
            + f"). --benchmark {benchmark} reads: {spec.layouts}. Is it the right --benchmark for this file?"
        )
    return samples
