"""Turning answers into scored records and ``results.json``: the one scoring path of `solo eval`
(answers generated here) and `solo eval score` (answers made elsewhere, or a finished run rescored
under another protocol).

`solo eval score` reads ``--predictions``, a JSONL file with ``{"id", "prediction"}`` per line (ids as
`solo eval` writes them in its ``predictions.jsonl``, which can be passed as it is), matches each
answer to its sample by id, and writes ``predictions.jsonl`` (the scored records) and ``results.json``
to ``--out``. A sample without an answer is a bad sample, with that reason; a line that is not an
answer to a sample is listed in ``unused_predictions`` with its reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from solo.eval.benchmarks import load_samples
from solo.eval.protocols import Protocol, resolve_protocol
from solo.eval.samples import EvalDataError, Sample
from solo.outputs import atomic_output_dir, read_file_capped, write_json_atomic, write_text_atomic

SCORE_COMMAND = "solo eval score"
PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
MAX_PREDICTIONS_BYTES = 1 << 30  # a predictions file beyond 1 GiB is not one


def record(sample: Sample, **fields: Any) -> dict:
    record = {"row": sample.row, "id": sample.id, "answer": sample.answer, "groups": sample.groups}
    if sample.image_key:
        record["image_key"] = sample.image_key
    record.update(fields)
    return record


def judge(protocol: Protocol, sample: Sample, text: str) -> dict:
    """The record of one answer, read and checked by ``protocol``'s rule: the one scoring path of
    `solo eval` and `solo eval score`."""
    parsed = protocol.parse(text, sample)
    return record(sample, prediction=text, parsed=parsed, correct=parsed is not None and parsed == sample.answer)


def summarize(protocol: Protocol, records: list[dict], **source: Any) -> dict:
    """``results.json``'s content, the same fields for every benchmark: where the answers came from
    (``source``: benchmark, mode, model or predictions, data, …), the protocol and the reference it
    reproduces, sample counts, the bad samples with their reasons, and the metrics over the scored ones
    (``accuracy``, ``correct``, ``n``, ``unparsed`` and the benchmark's own)."""
    scored = [r for r in records if "error" not in r]
    bad = [{"row": r["row"], "id": r["id"], "error": r["error"]} for r in records if "error" in r]
    return {
        **source,
        "protocol": protocol.name,
        "reference": protocol.reference,
        "samples": len(records),
        "scored": len(scored),
        "bad": len(bad),
        "bad_samples": bad,
        "metrics": protocol.score(scored),
    }


def read_predictions(path: Path) -> tuple[dict[str, tuple[int, str]], list[dict]]:
    """``{id: (line number, prediction)}`` from a predictions JSONL, and the lines not used, with why."""
    try:
        text = read_file_capped(path, MAX_PREDICTIONS_BYTES, "--predictions").decode("utf-8")
    except (OSError, ValueError) as error:
        raise EvalDataError(f"cannot read --predictions {path} ({error})") from error
    answers: dict[str, tuple[int, str]] = {}
    unused: list[dict] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            unused.append({"line": number, "reason": f"not valid JSON ({error.msg})"})
            continue
        if not isinstance(item, dict) or "id" not in item:
            unused.append({"line": number, "reason": 'not an object with "id"'})
        elif not isinstance(item.get("prediction"), str):
            unused.append({"line": number, "id": str(item["id"]), "reason": 'no "prediction" text'
                           + (f" (the run reported: {item['error']})" if "error" in item else "")})
        elif str(item["id"]) in answers:
            unused.append({"line": number, "id": str(item["id"]),
                           "reason": f"a second answer for this id (line {answers[str(item['id'])][0]} is used)"})
        else:
            answers[str(item["id"])] = (number, item["prediction"])
    return answers, unused


def score_predictions(
    benchmark: str,
    data: str | os.PathLike,
    predictions: str | os.PathLike,
    out: str | os.PathLike,
    *,
    protocol: str | None = None,
    extractor_url: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Score the answers in ``predictions`` to ``benchmark``'s questions in ``data`` under ``protocol``
    (None: the benchmark's default); write ``predictions.jsonl`` and ``results.json`` to ``out`` and
    return the results. ``extractor_url``: see `resolve_protocol`."""
    rules = resolve_protocol(benchmark, protocol, "generate", extractor_url)
    samples = load_samples(benchmark, data)
    path = Path(predictions)
    if not path.is_file():
        raise EvalDataError(f"--predictions {path} is not a file; pass the JSONL of {{\"id\", \"prediction\"}} lines")
    answers, unused = read_predictions(path)
    by_id: dict[str, Sample] = {}
    for sample in samples:
        if sample.id in by_id:
            raise EvalDataError(f"{data} has two samples with id {sample.id!r}: answers cannot be matched by id")
        by_id[sample.id] = sample
    unused += [{"line": line, "id": key, "reason": f"no {benchmark} sample has this id"}
               for key, (line, _) in answers.items() if key not in by_id]
    records = []
    for sample in samples:
        if sample.error:
            records.append(record(sample, error=sample.error))
        elif sample.id not in answers:
            records.append(record(sample, error=f"no answer in {path.name}"))
        else:
            records.append(judge(rules, sample, answers[sample.id][1]))
    if not any("error" not in r for r in records):
        raise EvalDataError(f"no answer in {path} matches a valid {benchmark} sample of {data} by id "
                            f"({len(answers)} answers, {len(samples)} samples); ids are the `id` of solo eval's "
                            f"predictions.jsonl")
    results = summarize(rules, records, benchmark=benchmark, mode="score", predictions=os.path.abspath(path),
                        data=os.path.abspath(data))
    results["unused_predictions"] = unused
    with atomic_output_dir(out, command=SCORE_COMMAND, inputs=[data, path], overwrite=overwrite) as staging:
        write_text_atomic(staging / PREDICTIONS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        write_json_atomic(staging / RESULTS, results)
    return results
