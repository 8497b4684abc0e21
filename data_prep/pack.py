"""`solo-data pack`: raw sources → packed directory; parallel, deterministic and resumable.

Pipeline:

1. The main process reads raw records in input order and cuts them into chunks of `chunk_size`.
2. K worker processes convert and encode one chunk each (parse, read and fully decode every image,
   tokenise the chunk in one batched call, lay images out, split over-long documents) and write
   the result to `OUTPUT/.work/chunk-NNNNNNNN.{img,npz,json}` (temporary names, then atomic renames).
   No work file is a pickle: a file placed in `.work` cannot run code when a rerun reads it.
3. The main process consumes the chunks strictly in order, feeds the document pieces to the
   windowed best-fit-decreasing packer, and writes finished packs with `PackWriter`.

Resume: `.work/state.json` holds the run's fingerprint (inputs, settings, tokenizer). Run the same
command again after a crash (even `kill -9`): finished chunks are reused — each records the SHA-256 of
the raw records it was made from, and a rerun that reads other records there (an input edited,
even at the same size) is refused, never mixed — and the packing pass
continues from its last checkpoint (`.work/progress.json`, taken at a window boundary at most every
`--checkpoint-seconds`: stream position, open packs as references to their chunks' pieces,
accounting, output file sizes); output
written after that checkpoint is cut off and rewritten. The result is byte-identical to an
uninterrupted run, whatever the number of workers. `metadata.json` is written last; then `.work`
is removed. Images that stay on disk (files, members of uncompressed tars) are referenced from
`.work` with the SHA-256 of the bytes the worker decoded, and copied from the source into the
output only if they still match; inline images are kept in the chunk's blob.
The whole run, from the first look at the output folder, holds its lock (solo.outputs.output_lock):
a second run on the same folder (another --chunk-size, --overwrite) is refused before it touches it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np

from solo.hf.image_processing_solo import PATCH_DIM, image_tokens_count
from solo.hf.processing_solo import VisionTokenIds

from .encode import DocumentEncoder, EncodeOptions
from .image_index import build_image_index
from .packed_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILE,
    REPORT_FILE,
    TOKENIZER_DIR,
    PackWriter,
    tokenizer_fingerprint,
)
from solo.processes import process_gone
from solo.outputs import (
    check_outside_inputs,
    check_replaceable,
    output_lock,
    read_marker,
    write_json_atomic,
    write_marker,
)
from .packing import BestFitPacker
from .schema import RejectedInput
from .sources import FilteredOut, Record, SourceOptions, expand_inputs, iter_records, record_to_document

COMMAND = "solo-data pack"
WORK_DIR = ".work"
PROGRESS_FILE = "progress.json"
REJECTED_FILE = "rejected.jsonl"
SOLO_FP16_BYTES_PER_PATCH = PATCH_DIM * 2


@dataclass
class PackConfig:
    inputs: list[str]
    output: str
    tokenizer: str
    source: SourceOptions
    encode: EncodeOptions
    workers: int = 1
    chunk_size: int = 256
    window_items: int = 16384
    window_tokens: int | None = None
    carry_packs: int = 64
    overwrite: bool = False
    keep_work: bool = False
    progress: bool = True
    checkpoint_seconds: float = 30.0  # how often the packing pass records its position for resume
    expanded_inputs: list[str] = field(default_factory=list)


def load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--tokenizer {directory!r} is not a directory; save a SOLO tokenizer there first")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer in {directory} is not a fast tokenizer; save it with tokenizers installed")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("tokenizer pad id must exist and differ from EOS; "
                         "extend it with solo.tokenizer.extend_tokenizer")
    return tokenizer


def run_fingerprint(config: PackConfig, tokenizer) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "inputs": [{"path": os.path.abspath(path), "bytes": _input_size(path)} for path in config.expanded_inputs],
        "source": config.source.fingerprint(),
        "encode": config.encode.fingerprint(),
        "tokenizer": {"dir": os.path.abspath(config.tokenizer), "digest": tokenizer_fingerprint(tokenizer)},
        "packer": {"window_items": config.window_items, "window_tokens": config.window_tokens,
                   "carry_packs": config.carry_packs},
    }


def _input_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
    return os.path.getsize(path)


class InputChangedError(ValueError):
    """An input whose content is not what the finished work of this run was made from."""


def _feed(digest, value: Any) -> None:
    """Feed one raw record's payload (bytes, text, JSON-like values, tar member references) to a hash,
    length-prefixed and typed, so that different values never feed the same bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        digest.update(b"b%d:" % len(value) + bytes(value))
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        digest.update(b"s%d:" % len(data) + data)
    elif isinstance(value, dict):
        digest.update(b"d%d:" % len(value))
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(b"l%d:" % len(value))
        for item in value:
            _feed(digest, item)
    else:  # numbers, None, booleans, dates of parquet rows
        text = f"{type(value).__name__}:{value!r}".encode()
        digest.update(b"o%d:" % len(text) + text)


def records_digest(records: list[Record]) -> str:
    """SHA-256 of a chunk's raw records (names, kinds and contents) as the main process read them."""
    digest = hashlib.sha256()
    for record in records:
        _feed(digest, (record.name, record.kind, record.payload))
    return digest.hexdigest()


# --------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, source: SourceOptions, encode: EncodeOptions, work_dir: str,
                 main_pid: int | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["encoder"] = DocumentEncoder(load_tokenizer(tokenizer_dir), encode)
    _WORKER["source"] = source
    _WORKER["work_dir"] = work_dir
    if main_pid is not None:
        import threading

        threading.Thread(target=_exit_with, args=(main_pid,), daemon=True, name="main-watch").start()


def _exit_with(main_pid: int, interval: float = 1.0) -> None:
    """A worker whose main process was killed (kill -9) exits too, instead of idling forever."""
    while not process_gone(main_pid):
        time.sleep(interval)
    os._exit(1)


def chunk_paths(work_dir: str, index: int) -> tuple[str, str, str]:
    """(entries JSON, image blob, token arrays) of one chunk; the JSON is written last (= complete)."""
    stem = os.path.join(work_dir, f"chunk-{index:08d}")
    return stem + ".json", stem + ".img", stem + ".npz"


def encode_records(records: list[Record]) -> tuple[list[tuple], bytes]:
    """Convert + encode records (in a worker). Returns (one entry per record, image bytes blob).

    Entries: ("doc", input index, record number, pieces, image (offset, length) in the blob, reasons of
    the images dropped as missing),
    ("rejected", record name, reason) or ("filtered", subset).
    """
    encoder: DocumentEncoder = _WORKER["encoder"]
    source: SourceOptions = _WORKER["source"]
    entries: list[tuple] = [None] * len(records)  # type: ignore[list-item]
    documents, names, slots = [], [], []
    for position, record in enumerate(records):
        try:
            documents.append(record_to_document(record, source))
            names.append(record.name)
            slots.append(position)
        except RejectedInput as error:
            entries[position] = ("rejected", record.name, error.reason)
        except FilteredOut as filtered:
            entries[position] = ("filtered", filtered.subset)
        except Exception as error:  # any other parse failure of one record must not stop the run
            entries[position] = ("rejected", record.name, f"unreadable record ({type(error).__name__}: {error})")
    try:
        results = encoder.encode(documents, names)
    except Exception:  # isolate the document that broke the batch; the others are encoded alone
        results = []
        for document, name in zip(documents, names):
            try:
                results.extend(encoder.encode([document], [name]))
            except Exception as error:
                results.append(RejectedInput(f"cannot encode ({type(error).__name__}: {error})"))
    image_blob = bytearray()
    for position, document, result in zip(slots, documents, results):
        record = records[position]
        if isinstance(result, RejectedInput):
            entries[position] = ("rejected", record.name, result.reason)
            continue
        image_refs = []
        for data in result.images:
            source = getattr(data, "source", None)
            if source is not None:  # still on disk (an image file, a member of an uncompressed tar)
                image_refs.append(("file",) + source + (hashlib.sha256(data).hexdigest(),))
            else:  # inline (base64, parquet, compressed tar): kept in the chunk's blob
                image_refs.append(("blob", len(image_blob), len(data)))
                image_blob += data
        pieces = [(piece.tokens, piece.loss_mask, piece.images) for piece in result.pieces]
        entries[position] = ("doc", record.input_index, record.number, pieces, image_refs,
                             document.dropped_images)
    return entries, bytes(image_blob)


def _write_file(path: str, write) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_chunk(work_dir: str, index: int, entries: list[tuple], image_blob: bytes, input_digest: str) -> None:
    """Write one chunk's work files atomically, in formats that cannot run code when read back
    (JSON, raw bytes, numpy arrays loaded without pickle); the JSON comes last and means complete.
    ``input_digest``: the `records_digest` of the records the chunk was made from."""
    meta_path, img_path, arrays_path = chunk_paths(work_dir, index)
    records, tokens, losses = [], [], []
    for entry in entries:
        if entry[0] == "doc":
            _, input_index, number, pieces, image_refs, dropped = entry
            records.append({"doc": [input_index, number], "images": [list(ref) for ref in image_refs],
                            "dropped": dropped,
                            "pieces": [[len(piece[0]), [list(image) for image in piece[2]]] for piece in pieces]})
            tokens.extend(piece[0] for piece in pieces)
            losses.extend(piece[1] for piece in pieces)
        elif entry[0] == "rejected":
            records.append({"rejected": entry[1], "reason": entry[2]})
        else:
            records.append({"filtered": entry[1]})
    arrays = {"tokens": np.concatenate(tokens).astype(np.int32) if tokens else np.zeros(0, np.int32),
              "loss_mask": np.concatenate(losses).astype(np.uint8) if losses else np.zeros(0, np.uint8)}
    _write_file(img_path, lambda handle: handle.write(image_blob))
    _write_file(arrays_path, lambda handle: np.savez(handle, **arrays))
    meta = {"input_digest": input_digest, "records": records}
    _write_file(meta_path, lambda handle: handle.write(json.dumps(meta).encode()))


def _chunk_done(work_dir: str, index: int, records: list[Record]) -> bool:
    """Whether chunk ``index`` was written by an earlier run from exactly ``records``; InputChangedError
    if it was written from other ones (an input changed since: reusing it would mix two versions)."""
    meta_path = chunk_paths(work_dir, index)[0]
    if not os.path.exists(meta_path):
        return False
    with open(meta_path, encoding="utf-8") as handle:
        recorded = json.load(handle).get("input_digest")
    if recorded != records_digest(records):
        first, last = records[0].name, records[-1].name
        raise InputChangedError(
            f"the inputs changed since the interrupted run: records {first} .. {last} are not the ones its finished "
            "work was made from (an input was edited, replaced or reordered). Put the original inputs back and run "
            "the same command again to keep that work, or pass --overwrite to start over from the inputs as they are")
    return True


def read_chunk(work_dir: str, index: int) -> list[tuple]:
    """The entries of a chunk written by `write_chunk` (same shape as `encode_records` returns)."""
    meta_path, _, arrays_path = chunk_paths(work_dir, index)
    with open(meta_path, encoding="utf-8") as handle:
        records = json.load(handle)["records"]
    with np.load(arrays_path, allow_pickle=False) as arrays:
        tokens, losses = arrays["tokens"], arrays["loss_mask"]
    entries: list[tuple] = []
    position = 0
    for record in records:
        if "doc" in record:
            pieces = []
            for length, layout in record["pieces"]:
                pieces.append((tokens[position:position + length], losses[position:position + length],
                               [tuple(image) for image in layout]))
                position += length
            entries.append(("doc", *record["doc"], pieces, [tuple(ref) for ref in record["images"]],
                            record["dropped"]))
        elif "rejected" in record:
            entries.append(("rejected", record["rejected"], record["reason"]))
        else:
            entries.append(("filtered", record["filtered"]))
    if position != len(tokens):
        raise RuntimeError(f"{meta_path} does not match its arrays; rerun with --overwrite")
    return entries


def encode_chunk(index: int, records: list[Record]) -> int:
    """Convert + encode one chunk and write its work files (in a worker). Returns the chunk index."""
    write_chunk(_WORKER["work_dir"], index, *encode_records(records), records_digest(records))
    return index


# --------------------------------------------------------------------------- main process


class _WorkerPool:
    """K worker processes encoding chunks; survives workers that die (decoder crash, OOM kill).

    When a worker dies the pool is rebuilt and the unfinished chunks are submitted again. A chunk
    that was in flight at two deaths is then encoded one record at a time in a single-worker pool,
    and a record whose worker dies is rejected ("crashed its worker"), so one poisonous file never
    stops the run — nor a rerun of it.
    """

    def __init__(self, workers: int, init_args: tuple, work_dir: str):
        from .workers import worker_context

        self.context = worker_context()
        self.workers, self.init_args, self.work_dir = workers, init_args, work_dir
        self.deaths: dict[int, int] = {}
        self.pool = self._new_pool(workers)

    def _new_pool(self, workers: int):
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(workers, mp_context=self.context, initializer=_init_worker,
                                   initargs=self.init_args + (os.getpid(),))

    def submit(self, index: int, chunk: list[Record]):
        return self.pool.submit(encode_chunk, index, chunk)

    def wait(self, pending: deque) -> int:
        """Wait until the oldest pending chunk is written; pop it and return its index."""
        from concurrent.futures.process import BrokenProcessPool

        while True:
            index, chunk, future = pending[0]
            if future is None:
                break
            try:
                future.result()
                break
            except BrokenProcessPool:
                self._recover(pending)
        pending.popleft()
        return index

    def _recover(self, pending: deque) -> None:
        print("solo-data pack: a worker process died; restarting the workers", file=sys.stderr)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = self._new_pool(self.workers)
        for item in pending:
            index, chunk, future = item
            if future is None or (future.done() and not future.cancelled() and future.exception() is None):
                continue  # already written
            if not future.cancelled():  # it was running when the pool broke: a suspect
                self.deaths[index] = self.deaths.get(index, 0) + 1
            if self.deaths.get(index, 0) >= 2:
                self._encode_isolated(index, chunk)
                item[2] = None
            else:
                item[2] = self.submit(index, chunk)

    def _encode_isolated(self, index: int, chunk: list[Record]) -> None:
        from concurrent.futures.process import BrokenProcessPool

        print(f"solo-data pack: chunk {index} was in flight at two worker deaths; encoding it one record "
              "at a time", file=sys.stderr)
        entries: list[tuple] = []
        blob = bytearray()
        single = self._new_pool(1)
        try:
            for record in chunk:
                try:
                    (entry,), data = single.submit(encode_records, [record]).result()
                except BrokenProcessPool:
                    single.shutdown(wait=True, cancel_futures=True)
                    single = self._new_pool(1)
                    entry, data = ("rejected", record.name, "crashed its worker process (decoder crash or "
                                   "out of memory)"), b""
                if entry[0] == "doc":
                    entry = entry[:4] + ([("blob", ref[1] + len(blob), ref[2]) if ref[0] == "blob" else ref
                                          for ref in entry[4]],) + entry[5:]
                entries.append(entry)
                blob += data
        finally:
            single.shutdown(wait=True)
        write_chunk(self.work_dir, index, entries, bytes(blob), records_digest(chunk))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _chunks(records: Iterator[Record], size: int) -> Iterator[tuple[int, list[Record]]]:
    chunk: list[Record] = []
    index = 0
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield index, chunk
            index, chunk = index + 1, []
    if chunk:
        yield index, chunk


class _ImageSource:
    """Reads verified image bytes back: from a chunk's blob, or from the source file region the
    worker read them from (its SHA-256 checked). A few handles stay open, least recently used closed."""

    def __init__(self, work_dir: str, max_open: int = 64):
        self.work_dir, self.max_open = work_dir, max_open
        self.handles: OrderedDict[Any, Any] = OrderedDict()

    def _handle(self, key, path: str):
        handle = self.handles.pop(key, None)
        if handle is None:
            handle = open(path, "rb")
            if len(self.handles) >= self.max_open:
                self.handles.popitem(last=False)[1].close()
        self.handles[key] = handle
        return handle

    def read(self, chunk: int, ref: tuple) -> bytes:
        if ref[0] == "blob":
            _, offset, length = ref
            data = os.pread(self._handle(chunk, chunk_paths(self.work_dir, chunk)[1]).fileno(), length, offset)
            if len(data) != length:
                raise RuntimeError(f"short read of an image ({len(data)} of {length} bytes at {ref}); "
                                   "rerun with --overwrite")
            return data
        _, path, offset, length, *_, sha256 = ref
        try:
            data = os.pread(self._handle(path, path).fileno(), length, offset)
        except OSError:  # gone, or no longer readable
            data = b""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise InputChangedError(
                f"{path} changed after this pack run read it (the {length} bytes at offset {offset} are not the "
                "image it encoded). Put the original file back and run the same command again: the finished work "
                "is kept. To pack the file as it is now, start over with --overwrite")
        return data

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


def reason_kind(reason: str) -> str:
    """A rejection reason without its specifics (names, numbers, details), for counting by kind."""
    if reason.startswith("image ") and ": " in reason:
        reason = reason.split(": ", 1)[1]  # "image NAME: not a readable image (...)"
    reason = re.sub(r"\([^)]*\)|'[^']*'|\"[^\"]*\"|(?<![\w-])\d+(?!\w)", "", reason.split(";")[0])
    return " ".join(reason.split()) or "other"


class NothingPackedError(ValueError):
    """A pack run that produced no pack at all (every record rejected, or no record found)."""


# A run whose most frequent rejection reason covers more than this share of its records is most
# likely reading its inputs with the wrong --format: say so loudly.
MOSTLY_REJECTED = 0.5


def rejection_warning(report: dict[str, Any], source_format: str) -> str | None:
    """The warning for a run where most records were rejected for one reason, else None."""
    if not report["rejected_by_kind"] or not report["documents_in"]:
        return None
    kind, count = max(report["rejected_by_kind"].items(), key=lambda item: item[1])
    if count <= MOSTLY_REJECTED * report["documents_in"]:
        return None
    example = next(item for item in report["rejected"] if reason_kind(item["reason"]) == kind)
    return (f"{count} of {report['documents_in']} records were rejected for one reason, e.g. "
            f"{example['input']}: {example['reason']}. Is --format {source_format} the format of these inputs?")


class _Accounting:
    def __init__(self, seq_length: int):
        self.seq_length = seq_length
        self.documents_in = 0
        self.documents_packed = 0
        self.rejected: list[dict[str, str]] = []
        self.filtered: dict[str, int] = {}
        self.documents_split = 0
        self.pieces = 0
        self.pieces_without_loss = 0
        self.packs = 0
        self.tokens = 0
        self.loss_tokens = 0
        self.vision_tokens = 0
        self.images = 0
        self.image_bytes = 0
        self.patches = 0
        self.patches_before_max_patches = 0
        self.images_scaled_down = 0
        self.max_pack_length = 0
        self.images_dropped: dict[str, int] = {}  # interleaved images left out as missing, by reason

    def report(self) -> dict[str, Any]:
        slots = self.packs * self.seq_length
        return {
            "documents_in": self.documents_in,
            "documents_packed": self.documents_packed,
            "documents_rejected": len(self.rejected),
            "rejected": self.rejected,
            "rejected_by_kind": dict(sorted(Counter(reason_kind(item["reason"]) for item in self.rejected).items())),
            "documents_filtered": sum(self.filtered.values()),
            "filtered_by_subset": dict(sorted(self.filtered.items())),
            "documents_split": self.documents_split,
            "pieces": self.pieces,
            "pieces_without_loss": self.pieces_without_loss,
            "packs": self.packs,
            "seq_length": self.seq_length,
            "tokens": self.tokens,
            "max_pack_length": self.max_pack_length,
            "fill": round(self.tokens / slots, 6) if slots else 0.0,
            "loss_tokens": self.loss_tokens,
            "vision_tokens": self.vision_tokens,
            "text_tokens": self.tokens - self.vision_tokens,
            "images": self.images,
            "patches": self.patches,
            "patches_before_max_patches": self.patches_before_max_patches,
            "images_scaled_down": self.images_scaled_down,
            "image_bytes": self.image_bytes,
            "images_dropped": sum(self.images_dropped.values()),
            "images_dropped_by_reason": dict(sorted(self.images_dropped.items())),
            "bytes_per_image": round(self.image_bytes / self.images, 1) if self.images else 0.0,
            "solo_fp16_patch_bytes": self.patches * SOLO_FP16_BYTES_PER_PATCH,
            "bytes_vs_solo_fp16": round(self.image_bytes / (self.patches * SOLO_FP16_BYTES_PER_PATCH), 5)
            if self.patches else 0.0,
        }


def _work_state(config: PackConfig, fingerprint: dict[str, Any]) -> dict[str, Any]:
    # The chunk size shapes the work files but not the output, so it is not in the output fingerprint.
    # work_format 2: chunks record their input digest (work files of an older run are redone).
    return {"fingerprint": fingerprint, "chunk_size": config.chunk_size, "work_format": 2}


def _read_json_or_none(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _prepare_output(config: PackConfig, fingerprint: dict[str, Any]) -> str | None:
    """Check the output folder (under the run's lock); returns 'complete' if this exact run already
    finished there. --overwrite replaces only an earlier `solo-data pack` output (its marker), see
    solo.outputs.
    """
    output, work_dir = config.output, os.path.join(config.output, WORK_DIR)
    state_path = os.path.join(work_dir, "state.json")
    state = _work_state(config, fingerprint)
    exists = os.path.isdir(output) and bool(os.listdir(output))
    if exists and config.overwrite:
        check_replaceable(output, COMMAND)
        shutil.rmtree(output)
        exists = False
    if exists:
        metadata = _read_json_or_none(os.path.join(output, METADATA_FILE))
        if metadata is not None:
            if isinstance(metadata, dict) and metadata.get("fingerprint") == fingerprint:
                shutil.rmtree(work_dir, ignore_errors=True)
                return "complete"
            raise FileExistsError(f"{output} holds packed data of different inputs or settings; "
                                  "choose another --output or pass --overwrite")
        if not os.path.exists(state_path) or read_marker(output) is None:
            raise FileExistsError(f"{output} is not empty and is not a solo-data pack output; "
                                  "choose an empty folder")
        previous = _read_json_or_none(state_path)
        if not isinstance(previous, dict) or previous.get("fingerprint") != fingerprint:
            raise FileExistsError(f"{output} holds an unfinished run with different inputs or settings; "
                                  "rerun that command, or pass --overwrite to start over")
        if previous != state:  # another --chunk-size: the finished chunks do not line up; redo them
            for name in os.listdir(work_dir):
                if name.startswith("chunk-") or name in (PROGRESS_FILE, REJECTED_FILE):
                    os.remove(os.path.join(work_dir, name))
            write_json_atomic(state_path, state)
        return None  # resume
    os.makedirs(work_dir, exist_ok=True)
    write_marker(output, COMMAND)  # first: from here on, --overwrite may replace this folder
    write_json_atomic(state_path, state)
    return None


def _input_paths(config: PackConfig) -> list[str]:
    """Everything the run reads that must not be inside (or contain) the output folder."""
    paths = list(config.inputs) + [config.tokenizer]
    if config.source.image_root:
        paths.append(config.source.image_root)
    if config.source.image_index:
        paths.append(config.source.image_index)
    return paths


def run_pack(config: PackConfig) -> dict[str, Any]:
    """Run (or resume) one pack job and return its report."""
    if config.workers < 1:
        raise ValueError("--workers must be at least 1")
    config.expanded_inputs = expand_inputs(config.inputs, config.source.format)
    tokenizer = load_tokenizer(config.tokenizer)
    DocumentEncoder(tokenizer, config.encode)  # validates vision tokens and options up front
    fingerprint = run_fingerprint(config, tokenizer)
    check_outside_inputs(config.output, _input_paths(config))
    with output_lock(config.output, COMMAND):  # before the folder is looked at, let alone changed
        if _prepare_output(config, fingerprint) == "complete":
            with open(os.path.join(config.output, REPORT_FILE), encoding="utf-8") as handle:
                report = json.load(handle)
            print(f"{config.output} is already complete ({report['packs']} packs); nothing to do", file=sys.stderr)
            return report
        work_dir = os.path.join(config.output, WORK_DIR)
        if config.source.image_index:  # the URL → image index, built once for all workers
            config.source = replace(config.source,
                                    image_index_db=build_image_index(config.source.image_index, work_dir))
        return _PackRun(config, tokenizer, fingerprint, work_dir).run()


class _PackRun:
    """One locked pack run, phase by phase: resume (or start) the packing pass's state; encode the
    inputs chunk by chunk (in workers) and pack each chunk in order as it is ready, checkpointing at
    window boundaries; then seal the output (report, tokenizer copy, metadata.json written last)."""

    def __init__(self, config: PackConfig, tokenizer, fingerprint: dict[str, Any], work_dir: str):
        self.config, self.tokenizer, self.fingerprint, self.work_dir = config, tokenizer, fingerprint, work_dir
        self.seq_length = config.encode.seq_length
        self.progress_path = os.path.join(work_dir, PROGRESS_FILE)
        self.rejected_path = os.path.join(work_dir, REJECTED_FILE)  # the rejections so far, one JSON line each
        self.packer = BestFitPacker(self.seq_length, config.window_items, config.window_tokens, config.carry_packs)
        self.accounting = _Accounting(self.seq_length)
        self.loaded_chunks: dict[int, list[tuple]] = {}  # chunks the open packs of a resumed run point into
        self.last_checkpoint = time.monotonic()

    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        for name in os.listdir(self.work_dir):  # pieces of writes a crash interrupted
            if ".tmp" in name:
                os.remove(os.path.join(self.work_dir, name))
        resume = self._restore()
        self.writer = PackWriter(self.config.output, len(self.tokenizer), self.work_dir,
                                 resume=resume["writer"] if resume else None)
        self.images = _ImageSource(self.work_dir)
        self.progress = tqdm(desc="pack", unit="doc", disable=not self.config.progress, file=sys.stderr,
                             smoothing=0.1)
        self.last_checkpoint = time.monotonic()
        started = time.time()
        try:
            self._encode_and_pack()
            self._write_packs(self.packer.flush())
        finally:
            self.progress.close()
            self.images.close()
            self.rejected_log.close()
        self.writer.finalize()
        report = self._seal()
        elapsed = time.time() - started
        print(f"packed {report['documents_packed']}/{report['documents_in']} documents "
              f"({report['documents_rejected']} rejected) into {report['packs']} packs, fill {report['fill']:.4f}, "
              f"{report['images']} images, in {elapsed:.1f}s", file=sys.stderr)
        return report

    def _piece_payload(self, chunk: int, entry_index: int, piece_number: int) -> tuple:
        """What the packer carries for one piece (kept small: the image bytes are read when written)."""
        if chunk not in self.loaded_chunks:
            self.loaded_chunks[chunk] = read_chunk(self.work_dir, chunk)
        _, input_index, number, pieces, image_refs, _ = self.loaded_chunks[chunk][entry_index]
        return (pieces[piece_number], chunk, image_refs, (input_index, number, piece_number), entry_index)

    def _restore(self) -> dict | None:
        """Where the packing pass of an earlier run got to (None: from the start); opens the rejection log."""
        if not os.path.exists(self.progress_path):
            self.resume_at = (0, 0, 0)
            self.rejected_log = open(self.rejected_path, "wb")
            return None
        with open(self.progress_path, encoding="utf-8") as handle:
            resume = json.load(handle)
        self.packer.restore(resume["packer"], lambda ref: self._piece_payload(*ref))
        self.loaded_chunks.clear()
        for name, value in resume["accounting"].items():
            setattr(self.accounting, name, value)
        self.resume_at = tuple(resume["position"])  # (chunk, entry, next piece): everything before it is written
        self.rejected_log = open(self.rejected_path, "r+b")
        self.rejected_log.truncate(resume["rejected_bytes"])
        self.rejected_log.seek(0)
        self.accounting.rejected = [json.loads(line) for line in self.rejected_log.read().splitlines()]
        self.rejected_log.seek(resume["rejected_bytes"])
        return resume

    def _checkpoint(self, position: tuple[int, int, int]) -> None:
        """Record where the packing pass stands; only at window boundaries (nothing half-packed)."""
        accounting = self.accounting
        self.rejected_log.flush()
        rejected, accounting.rejected = accounting.rejected, []  # kept in the log, not in every checkpoint
        try:
            # Open packs are stored as (chunk, entry, piece) references: the chunks stay in .work.
            packer_state = self.packer.state(lambda payload: [payload[1], payload[4], payload[3][2]])
            write_json_atomic(self.progress_path, {
                "position": list(position), "writer": self.writer.checkpoint(), "packer": packer_state,
                "accounting": vars(accounting), "rejected_bytes": self.rejected_log.tell()})
        finally:
            accounting.rejected = rejected
        self.last_checkpoint = time.monotonic()

    def _write_packs(self, packs) -> None:
        accounting = self.accounting
        for pack in packs:
            tokens, loss, cu, layout, origin, pack_images = [], [], [0], [], [], []
            for _, length, (piece, chunk, image_refs, piece_origin, _) in pack.items:
                piece_tokens, piece_loss, piece_layout = piece
                for offset, rows, cols, image_index, *full in piece_layout:
                    full_patches = full[0] if full else rows * cols  # work files of an earlier version: no budget
                    layout.append((cu[-1] + offset, rows, cols))
                    pack_images.append(self.images.read(chunk, image_refs[image_index]))
                    accounting.patches += rows * cols
                    accounting.patches_before_max_patches += full_patches
                    accounting.images_scaled_down += full_patches > rows * cols
                tokens.append(piece_tokens)
                loss.append(piece_loss)
                cu.append(cu[-1] + length)
                origin.append(piece_origin)
            all_tokens = np.concatenate(tokens)
            all_loss = np.concatenate(loss)
            self.writer.add_pack(all_tokens, all_loss, np.asarray(cu, np.int32),
                                 np.asarray(layout, np.int32).reshape(-1, 3), np.asarray(origin, np.int64),
                                 pack_images)
            accounting.packs += 1
            accounting.tokens += len(all_tokens)
            accounting.max_pack_length = max(accounting.max_pack_length, len(all_tokens))
            accounting.loss_tokens += int(all_loss.sum())
            accounting.images += len(pack_images)
            accounting.image_bytes += sum(len(data) for data in pack_images)
            accounting.vision_tokens += sum(image_tokens_count(rows, cols) for _, rows, cols in layout)
        if packs:
            self.progress.set_postfix(packs=accounting.packs,
                                      fill=f"{accounting.tokens / (accounting.packs * self.seq_length):.4f}")

    def _consume(self, index: int) -> None:
        """Pack the encoded chunk `index` (the part of it after where a resumed run stopped)."""
        accounting, resume_at = self.accounting, self.resume_at
        if index < resume_at[0]:
            self.progress.update(self.config.chunk_size)
            return  # packed before the restart
        entries = read_chunk(self.work_dir, index)
        skip_entries, first_piece = resume_at[1:] if index == resume_at[0] else (0, 0)
        for entry_index in range(skip_entries, len(entries)):
            entry = entries[entry_index]
            resumed = entry_index == skip_entries and first_piece > 0  # its document was counted already
            if entry[0] == "filtered":
                accounting.filtered[entry[1]] = accounting.filtered.get(entry[1], 0) + 1
                continue
            if not resumed:
                accounting.documents_in += 1
            if entry[0] == "rejected":
                rejection = {"input": entry[1], "reason": entry[2]}
                accounting.rejected.append(rejection)
                self.rejected_log.write(json.dumps(rejection, sort_keys=True).encode() + b"\n")
                continue
            _, input_index, number, pieces, image_refs, dropped = entry
            if not resumed:
                accounting.documents_packed += 1
                for reason in dropped:
                    kind = reason_kind(reason)
                    accounting.images_dropped[kind] = accounting.images_dropped.get(kind, 0) + 1
                accounting.documents_split += len(pieces) > 1
            for piece_number in range(first_piece if resumed else 0, len(pieces)):
                piece = pieces[piece_number]
                accounting.pieces += 1
                accounting.pieces_without_loss += not piece[1].any()
                payload = (piece, index, image_refs, (input_index, number, piece_number), entry_index)
                self._write_packs(self.packer.add(len(piece[0]), payload))
                if (self.packer.window_empty
                        and time.monotonic() - self.last_checkpoint >= self.config.checkpoint_seconds):
                    self._checkpoint((index, entry_index, piece_number + 1))
        self.progress.update(len(entries) - skip_entries)

    def _encode_and_pack(self) -> None:
        """Encode the chunks not already in the work folder (in this process or in workers) and pack
        every chunk in input order as soon as it is ready."""
        config, work_dir = self.config, self.work_dir
        init_args = (config.tokenizer, config.source, config.encode, work_dir)
        records = iter_records(config.expanded_inputs, config.source)
        if config.workers == 1:
            _init_worker(*init_args)
            for index, chunk in _chunks(records, config.chunk_size):
                if not _chunk_done(work_dir, index, chunk):
                    encode_chunk(index, chunk)
                self._consume(index)
            return
        pending: deque[list] = deque()  # [chunk index, records, future or None if written]
        workers = _WorkerPool(config.workers, init_args, work_dir)
        try:
            for index, chunk in _chunks(records, config.chunk_size):
                done = _chunk_done(work_dir, index, chunk)
                pending.append([index, None, None] if done else [index, chunk, workers.submit(index, chunk)])
                while len(pending) > 2 * config.workers or (pending and pending[0][2] is None):
                    self._consume(workers.wait(pending))
            while pending:
                self._consume(workers.wait(pending))
        finally:
            workers.shutdown()

    def _seal(self) -> dict[str, Any]:
        """Check the accounting, write the report, the tokenizer copy and metadata.json (last); return the report."""
        config, tokenizer, fingerprint = self.config, self.tokenizer, self.fingerprint
        report = self.accounting.report()
        if report["documents_in"] != report["documents_packed"] + report["documents_rejected"]:
            raise RuntimeError("accounting bug: documents_in != documents_packed + documents_rejected")
        write_json_atomic(os.path.join(config.output, REPORT_FILE), report)
        warning = rejection_warning(report, config.source.format)
        if report["packs"] == 0:
            # No metadata.json: training must not accept an empty directory as data. The work folder
            # stays, so the same command fails the same way and another --format says --overwrite.
            found = (f"all {report['documents_in']} records were rejected" if report["documents_in"]
                     else "the inputs hold no records"
                     + (" that pass --exclude-subset" if report["documents_filtered"] else ""))
            raise NothingPackedError(
                f"nothing was packed into {config.output}: {found}. "
                + (f"{warning} " if warning else "")
                + f"Every rejection is listed in {os.path.join(config.output, REPORT_FILE)}; fix the inputs or "
                "options and rerun with --overwrite."
            )
        if warning:
            print(f"solo-data pack: WARNING: {warning} (all rejections: {os.path.join(config.output, REPORT_FILE)})",
                  file=sys.stderr)
        vision = VisionTokenIds.from_tokenizer(tokenizer)
        # A copy of the tokenizer travels with the packs (training and preview load it from there), so
        # the directory can be moved or mounted elsewhere; metadata.json, written last, seals it.
        tokenizer.save_pretrained(os.path.join(config.output, TOKENIZER_DIR))
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "seq_length": self.seq_length,
            "packs": report["packs"],
            "tokenizer": {
                "dir": TOKENIZER_DIR,
                "source_dir": os.path.abspath(config.tokenizer),
                "digest": fingerprint["tokenizer"]["digest"],  # blended sources must share one tokenizer
                "vocab_size": len(tokenizer),
                "bos_id": tokenizer.bos_token_id,
                "eos_id": tokenizer.eos_token_id,
                "pad_id": tokenizer.pad_token_id,
                "vision_start_id": vision.start,
                "vision_patch_id": vision.patch,
                "vision_row_sep_id": vision.row_sep,
                "vision_end_id": vision.end,
            },
            "resize_mode": config.encode.resize_mode,
            "max_pixels": config.encode.max_pixels,
            "max_patches": config.encode.max_patches,
            "template": config.encode.template,
            "loss_on_user": config.encode.loss_on_user,
            "source_format": config.source.format,
            "inputs": [os.path.abspath(path) for path in config.expanded_inputs],
            "fingerprint": fingerprint,
        }
        write_json_atomic(os.path.join(config.output, METADATA_FILE), metadata)
        if not config.keep_work:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        return report
