"""Run a SOLO checkpoint on a benchmark: batched greedy generation (or likelihood ranking of the
options), data-parallel over processes, predictions appended per batch, resumable.

Output directory (``--out``):

- ``predictions.jsonl``: one record per sample, in the data's order (``row``, ``id``, ``prediction``,
  ``parsed``, ``answer``, ``correct``, ``groups``; ``scores`` in likelihood mode; ``error`` for a bad
  sample). While a run is going, each process appends to ``predictions.rank-<R>.jsonl`` after every
  batch; they are merged into ``predictions.jsonl`` at the end (and when a run resumes).
- ``results.json``: the protocol (and the reference it reproduces), its metrics, the sample counts and the
  bad samples with their reasons (``solo.eval.score.summarize``).
- ``.solo-output.json``: the command and its settings; running the same command again resumes
  (samples already predicted are skipped), a different one needs ``--overwrite``.

Data parallel: start the same command under ``torchrun --nproc-per-node N -m solo.cli eval …`` or
``accelerate launch -m solo.cli eval …``; each process takes every N-th remaining sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from solo.eval.benchmarks import BENCHMARKS, Benchmark, load_samples
from solo.eval.protocols import Protocol, resolve_protocol
from solo.eval.samples import MAX_IMAGE_FILE_BYTES, EvalDataError, Sample, read_data_file
from solo.eval.score import PREDICTIONS, RESULTS, judge, record, summarize
from solo.outputs import (
    OutputError,
    check_output_dir,
    read_marker,
    write_json_atomic,
    write_marker,
    write_text_atomic,
)

COMMAND = "solo eval"
MODES = ("generate", "likelihood")


@dataclass(frozen=True)
class EvalSettings:
    """What decides the predictions of a run (a resumed run must have the same)."""

    model: str
    benchmark: str
    data: str
    mode: str = "generate"
    limit: int | None = None
    max_new_tokens: int = 32
    protocol: str = "official"
    extractor_url: str | None = None  # MathVista: the endpoint that extracts answers (None: rules)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --- output directory and resume -----------------------------------------------------------------

def _read_records(path: Path) -> list[dict]:
    """Complete records of a predictions file; a torn last line (a killed write) is dropped."""
    records = []
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("row"), int):
                records.append(record)
    return records


def consolidate_predictions(out: Path) -> list[dict]:
    """Merge ``predictions.jsonl`` and every per-process part into ``predictions.jsonl`` (ordered by row)."""
    parts = sorted(out.glob("predictions.rank-*.jsonl"))
    by_row: dict[int, dict] = {}
    for path in [out / PREDICTIONS, *parts]:
        for line in _read_records(path):
            by_row[line["row"]] = line
    records = [by_row[row] for row in sorted(by_row)]
    write_text_atomic(out / PREDICTIONS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    for path in parts:
        path.unlink()
    return records


def _read_image(sample: Sample) -> bytes | None:
    """The bytes of a sample's image (a path is read capped, regular files only); EvalDataError otherwise."""
    if isinstance(sample.image, str):
        return read_data_file(sample.image, MAX_IMAGE_FILE_BYTES, "image file")
    return sample.image


def _samples_digest(samples: list[Sample], benchmark: Benchmark, rules: Protocol, mode: str) -> str:
    """Identity of everything a prediction depends on: each sample's question as ``mode`` puts it to the
    model (prompt and options), its answer and its image's bytes. A resumed run whose data changed under
    it (other questions, options or images at the same rows) does not reuse the earlier predictions."""
    digest = hashlib.sha256()
    for sample in samples:
        if mode == "generate":
            question: Any = rules.prompt(sample)
        else:
            question = [benchmark.cloze_prompt(sample), benchmark.candidates(sample)]
        try:
            image = _read_image(sample)
            image_id = hashlib.sha256(image).hexdigest() if image is not None else None
        except EvalDataError as error:
            image_id = str(error)  # reported when the sample is predicted
        fields = [sample.row, sample.id, sample.answer, sample.error, sample.groups, sample.image_key,
                  question, image_id]
        digest.update(json.dumps(fields, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def prepare_output_dir(out: Path, settings: EvalSettings, digest: str, overwrite: bool) -> bool:
    """Make ``out`` ready; return whether an earlier run of the same settings is being resumed.

    The same settings resume (unless ``overwrite``); other settings, or ``overwrite``, replace an
    earlier `solo eval` output only with ``overwrite`` (never a directory some other command wrote).
    """
    details = {"settings": settings.as_dict(), "samples_sha256": digest}
    marker = read_marker(out) if out.is_dir() else None
    same = marker and marker.get("command") == COMMAND and {k: marker.get(k) for k in details} == details
    if same and not overwrite:
        check_output_dir(out, command=COMMAND, inputs=[settings.model, settings.data], overwrite=True)
        return True
    check_output_dir(out, command=COMMAND, inputs=[settings.model, settings.data], overwrite=overwrite)
    if out.exists():
        shutil.rmtree(out)  # allowed above: an earlier `solo eval` output with other settings
    out.mkdir(parents=True)
    write_marker(out, COMMAND, **details)
    return False


# --- model ---------------------------------------------------------------------------------------

def load_model(model_dir: str, device: torch.device):
    """The checkpoint's model (bf16 + SDPA on GPU, fp32 on CPU) and processor."""
    import solo.hf  # noqa: F401  registers the SOLO classes with the Auto factories
    from transformers import AutoModelForCausalLM, AutoProcessor

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise OutputError(f"--model {model_dir} is not a Hugging Face model directory (no config.json)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, dtype=dtype, attn_implementation="sdpa"
    ).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model, processor


def _images(item) -> list:
    """A prompt's images: None → none, one image → [it], a list stays a list."""
    if item is None:
        return []
    return list(item) if isinstance(item, (list, tuple)) else [item]


def _chat(processor, prompt: str, image_count: int = 1) -> str:
    """The user turn: the images first, then the text, in the checkpoint's chat template."""
    content = [{"type": "image"}] * image_count + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}])


@torch.no_grad()
def generate_answers(model, processor, prompts: list[str], images: list, max_new_tokens: int) -> list[str]:
    """Greedy answers for a batch (left padding, KV cache), decoded without special tokens.

    ``images[i]`` is the image of prompt i, a list of images, or None for a text-only prompt.
    """
    groups = [_images(item) for item in images]
    texts = [_chat(processor, prompt, len(group)) for prompt, group in zip(prompts, groups)]
    inputs = processor(texts, images=groups, padding_side="left").to(model.device)
    tokenizer = processor.tokenizer
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


@torch.no_grad()
def score_replies(model, processor, prompts: list[str], images: list,
                  replies: list[str]) -> list[tuple[float, int, bool]]:
    """For each (prompt, image, reply) row: the reply's summed log-probability, its token count, and
    whether greedy decoding would produce it.

    The reply is the assistant turn " <reply>" that the chat template renders after the prompt; its
    tokens are scored given the prompt and image (a list of images, or None: text only). Rows are left-padded so every
    reply ends at the last position and only the last few positions' logits are computed.
    """
    tokenizer = processor.tokenizer
    rows = []
    for prompt, image, reply in zip(prompts, images, replies):
        group = _images(image)
        encoded = processor(_chat(processor, prompt, len(group)), images=[group])
        reply_ids = tokenizer(" " + reply.lstrip(), add_special_tokens=False)["input_ids"]
        if not reply_ids:
            raise ValueError(f"reply {reply!r} has no tokens to score")
        rows.append((encoded, reply_ids))
    length = max(enc["input_ids"].shape[1] + len(reply) for enc, reply in rows)
    keep = max(len(reply) for _, reply in rows) + 1
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    patch_index = torch.full((len(rows), length), -1, dtype=torch.long)
    patches, offset = [], 0
    for index, (enc, reply) in enumerate(rows):
        ids = torch.cat([enc["input_ids"][0], torch.tensor(reply, dtype=torch.long)])
        where = enc["vision_patch_indices"][0]
        where = torch.cat([torch.where(where >= 0, where + offset, where), torch.full((len(reply),), -1)])
        input_ids[index, length - len(ids):] = ids
        attention[index, length - len(ids):] = 1
        patch_index[index, length - len(ids):] = where
        patches.append(enc["vision_patches"])
        offset += enc["vision_patches"].shape[0]
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: count from each row's first token
    logits = model(
        input_ids=input_ids.to(model.device),
        attention_mask=attention.to(model.device),
        position_ids=positions.to(model.device),
        vision_patches=torch.cat(patches).to(model.device),
        vision_patch_indices=patch_index.to(model.device),
        logits_to_keep=keep,
    ).logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    results = []
    for index, (_, reply) in enumerate(rows):
        targets = torch.tensor(reply, device=log_probs.device)
        # The reply's tokens sit at the last len(reply) positions; each is predicted one position earlier.
        predicted_by = log_probs[index, keep - len(reply) - 1 : keep - 1]
        total = predicted_by.gather(-1, targets[:, None]).sum().item()
        greedy = bool((predicted_by.argmax(-1) == targets).all())
        results.append((total, len(reply), greedy))
    return results


def rank_candidates(model, processor, prompts: list[str], images: list,
                    candidates: list[list[str]]) -> list[list[float]]:
    """Mean log-probability per token of each candidate reply to each prompt (the likelihood mode's score:
    per-token, so longer options are not penalised for their length)."""
    rows = [(prompt, image, option)
            for prompt, image, options in zip(prompts, images, candidates) for option in options]
    scores = iter(score_replies(model, processor, *map(list, zip(*rows))))
    return [[total / count for total, count, _ in (next(scores) for _ in options)] for options in candidates]


# --- one run -------------------------------------------------------------------------------------

def _open_images(samples: list[Sample], image_processor) -> tuple[list[tuple[Sample, Any]], list[dict]]:
    """The samples' images, opened as the checkpoint's processor opens them (SOLO-7B's way for a
    converted SOLO-7B); bad samples and unreadable images become error records."""
    # solo's own loader: a processor loaded with trust_remote_code is a copy of the class, whose
    # ImageLoadError is another class; its settings are what counts.
    from solo.hf.image_processing_solo import ImageLoadError, load_image

    legacy = bool(getattr(image_processor, "legacy_image_opening", False))
    good, bad = [], []
    for sample in samples:
        if sample.error:
            bad.append(record(sample, error=sample.error))
            continue
        name = sample.image if isinstance(sample.image, str) else f"image of sample {sample.id}"
        try:
            good.append((sample, load_image(_read_image(sample), name=name, max_pixels=image_processor.max_pixels,
                                            legacy_solo7b=legacy)))
        except (EvalDataError, ImageLoadError) as error:
            bad.append(record(sample, error=str(error)))
    return good, bad


def predict_batch(
    benchmark: Benchmark, protocol: Protocol, samples: list[Sample], model, processor, mode: str,
    max_new_tokens: int,
) -> list[dict]:
    """Prediction records for one batch (bad samples get an ``error`` record instead)."""
    good, records = _open_images(samples, processor.image_processor)
    if not good:
        return records
    batch = [sample for sample, _ in good]
    images = [image for _, image in good]
    if mode == "generate":
        answers = generate_answers(model, processor, [protocol.prompt(s) for s in batch], images, max_new_tokens)
        records += [judge(protocol, sample, protocol.finish(text)) for sample, text in zip(batch, answers)]
    else:
        candidates = [benchmark.candidates(s) for s in batch]
        scores = rank_candidates(
            model, processor, [benchmark.cloze_prompt(s) for s in batch], images,
            [[text for _, text in pairs] for pairs in candidates],
        )
        for sample, pairs, values in zip(batch, candidates, scores):
            best = max(range(len(values)), key=lambda i: values[i])  # ties: the first option
            parsed = pairs[best][0]
            records.append(record(
                sample, prediction=pairs[best][1], parsed=parsed, correct=parsed == sample.answer,
                scores={label: round(value, 6) for (label, _), value in zip(pairs, values)},
            ))
    return sorted(records, key=lambda r: r["row"])


def _append(path: Path, records: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())


def distributed_state():
    """Accelerate's process state: one process, or the ranks of torchrun / accelerate launch."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.cuda.is_available():
        # Without cpu=True and gloo, Accelerate leaves a CPU launch non-distributed: barriers pass
        # at once and the main process would merge before the others finish.
        state = PartialState(cpu=True, backend="gloo")
    else:
        state = PartialState()
    if world > 1 and (state.distributed_type == DistributedType.NO or state.num_processes != world):
        raise RuntimeError(
            f"launched with WORLD_SIZE={world} but Accelerate set up {state.num_processes} process(es) "
            f"({state.distributed_type}); check the launcher's configuration"
        )
    return state


def run_eval(
    model_dir: str | os.PathLike,
    benchmark: str,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mode: str = "generate",
    batch_size: int = 8,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    protocol: str | None = None,
    extractor_url: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate ``model_dir`` on ``benchmark`` read from ``data`` under ``protocol`` (None: the
    benchmark's default); write and return ``results.json``'s content. ``max_new_tokens`` None: the
    protocol's generation length. ``extractor_url``: see `resolve_protocol`."""
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if batch_size < 1 or (limit is not None and limit < 1) or (max_new_tokens is not None and max_new_tokens < 1):
        raise ValueError("--batch-size, --limit and --max-new-tokens must be positive")
    rules = resolve_protocol(benchmark, protocol, mode, extractor_url)
    max_new_tokens = max_new_tokens or rules.max_new_tokens
    settings = EvalSettings(os.path.abspath(model_dir), benchmark, os.path.abspath(data), mode, limit,
                            max_new_tokens, rules.name, extractor_url)
    samples = load_samples(benchmark, data)[:limit]
    spec = BENCHMARKS[benchmark]
    state = distributed_state()
    out = Path(out)
    refusal = None
    if state.is_main_process:
        try:
            resumed = prepare_output_dir(out, settings, _samples_digest(samples, spec, rules, mode), overwrite)
        except OutputError as error:
            refusal = str(error)
        else:
            done = consolidate_predictions(out) if resumed else []
            if resumed:
                print(f"{COMMAND}: resuming in {out}: {len(done)} of {len(samples)} samples already predicted",
                      file=sys.stderr)
    if state.num_processes > 1:  # every rank stops with the main process's refusal instead of waiting for it
        box = [refusal]
        torch.distributed.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        raise OutputError(refusal)
    done_rows = {line["row"] for line in _read_records(out / PREDICTIONS)}
    remaining = [s for s in samples if s.row not in done_rows]
    mine = remaining[state.process_index :: state.num_processes]

    if mine:
        model, processor = load_model(os.fspath(model_dir), state.device)
        part = out / f"predictions.rank-{state.process_index}.jsonl"
        started = time.perf_counter()
        bar = tqdm(total=len(mine), desc=f"{COMMAND} {benchmark}", unit="sample",
                   disable=not (progress and state.is_main_process))
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            _append(part, predict_batch(spec, rules, batch, model, processor, mode, max_new_tokens))
            bar.update(len(batch))
        bar.close()
        elapsed = time.perf_counter() - started
        print(f"{COMMAND}: rank {state.process_index}: {len(mine)} samples in {elapsed:.1f} s "
              f"({len(mine) / elapsed:.2f} samples/s)", file=sys.stderr)
    state.wait_for_everyone()
    results: dict = {}
    if state.is_main_process:
        records = consolidate_predictions(out)
        missing = len(samples) - len(records)
        if missing:
            raise RuntimeError(f"{missing} samples have no prediction in {out}; run the same command again")
        results = summarize(rules, records, benchmark=benchmark, mode=mode, model=settings.model, data=settings.data,
                            max_new_tokens=max_new_tokens)
        write_json_atomic(out / RESULTS, results)
    state.wait_for_everyone()
    if not state.is_main_process:
        results = json.loads((out / RESULTS).read_text(encoding="utf-8"))
    return results


