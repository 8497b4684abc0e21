"""Source converters: raw datasets of the SOLO stages and SFT → `Document`s (one sample schema).

Reading is split in two so that packing can run in parallel and resume:

* `iter_records(paths, options)` runs in the main process and reads as little as it can: JSONL
  lines (plain, .gz, .zst, .lz4), entries of a JSON list, parquet rows, webdataset tar samples
  (members grouped by key; for uncompressed tars only the headers — the members travel as
  (offset, size) references), or the paths of class-folder images. Each record has a stable name
  (`file:line`, `file:key`, ...) used in report.json.
* `record_to_document(record, options)` runs in the workers: it parses, resolves and reads the
  image files, and returns a `Document`, or raises `RejectedInput` (bad JSON, non-UTF-8 text,
  unknown role, missing image file, empty document, ...) or `FilteredOut` (an excluded subset).

Formats (`--format`):

=============  ===========================================================================
imagenet       class folders (`ROOT/<synset>/*.JPEG`) or tar shards whose keys start with the
               synset (`n01440764_10026.JPEG`) or carry a `.cls` index; `--class-map` maps
               synsets to names. Document: one assistant message [image, class name].
caption        image–caption pairs: webdataset tars (`KEY.jpg` + `KEY.txt`/`KEY.json`), or
               JSONL/parquet rows with an image path (or bytes) and a caption.
interleaved    MMC4 (`text_list` + `image_info[matched_text_index]`) or OBELICS (`texts` and
               `images` aligned lists) JSONL/parquet; images are inserted before their sentence.
text           text-only JSONL/parquet (`text` field), with subset filtering
               (`--exclude-subset RedPajamaCommonCrawl` reads SlimPajama's
               `meta.redpajama_set_name`).
llava          LLaVA instruction JSON/JSONL (`image`, `conversations` of human/gpt turns with
               `<image>` placeholders).
sharegpt       ShareGPT JSON/JSONL (`conversations` of `from`/`value` turns; `from` is
               human/user, gpt/chatgpt/bing/bard/assistant or system; an optional `image` as LLaVA).
chat           OpenAI-chat JSONL (SOLO's interchange format): a list of messages,
               `{"messages"|"conversations": [...]}` or one message; content a string or items
               `text` / `image_url` (base64 data URL or a local path) / `image` (a local path).
=============  ===========================================================================
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

from solo.hf.processing_solo import IMAGE_PLACEHOLDER
from solo.outputs import NotRegularFileError, TooLargeError, open_regular_file, read_capped

from .schema import FORMATS, Document, RejectedInput, check_role

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# ShareGPT dumps name the assistant after the service the conversation came from.
SHAREGPT_ROLES = {**LLAVA_ROLES, "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
SYNSET_PATTERN = re.compile(r"n\d{8}")


class FilteredOut(Exception):
    """A record deliberately left out by a filter option (counted per subset, not as rejected)."""

    def __init__(self, subset: str):
        self.subset = subset
        super().__init__(subset)


@dataclass(frozen=True)
class SourceOptions:
    """How to read one source. Everything here is part of the pack run's fingerprint."""

    format: str
    image_root: str | None = None  # relative image paths resolve here (default: the input file's folder)
    class_map: dict[str, str] = field(default_factory=dict)  # imagenet: synset (or class index) → name
    exclude_subsets: tuple[str, ...] = ()
    max_image_bytes: int = 32 * 1024 * 1024  # also the cap of every other tar member (caption, json, cls)
    max_record_bytes: int = 256 * 1024 * 1024  # one JSONL line, or one entry of a .json list

    def fingerprint(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "image_root": os.path.abspath(self.image_root) if self.image_root else None,
            "class_map_entries": len(self.class_map),
            "class_map_digest": _digest(json.dumps(sorted(self.class_map.items())).encode()),
            "exclude_subsets": list(self.exclude_subsets),
            "max_image_bytes": self.max_image_bytes,
            "max_record_bytes": self.max_record_bytes,
        }


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]


class Record(NamedTuple):
    """One raw input record, as read by the main process (picklable)."""

    input_index: int
    number: int  # position in its input (0-based)
    name: str  # e.g. "data/part-0.jsonl:17"
    kind: str  # "line", "object", "tar", "file", "error" (an unreadable input; payload: the reason)
    payload: Any
    base_dir: str


# --------------------------------------------------------------------------- reading (main process)


def load_class_map(path: str) -> dict[str, str]:
    """Read a class map: JSON {synset: name} / list of names, or text lines `SYNSET name words`.

    Class indices (for `.cls` members) are the line/list order, stored as keys "0", "1", ...
    """
    with open(path, "rb") as handle:
        raw = handle.read().decode("utf-8")
    mapping: dict[str, str] = {}
    stripped = raw.lstrip()
    if stripped.startswith("{") or stripped.startswith("["):
        data = json.loads(raw)
        if isinstance(data, dict):
            for index, (key, value) in enumerate(data.items()):
                mapping[str(key)] = str(value)
                mapping.setdefault(str(index), str(value))
        else:
            for index, value in enumerate(data):
                mapping[str(index)] = str(value)
        return mapping
    index = 0
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.split(None, 1)
        name = parts[1] if len(parts) > 1 else parts[0]
        mapping[parts[0]] = name
        mapping[str(index)] = name
        index += 1
    return mapping


def open_maybe_compressed(path: str) -> io.BufferedIOBase:
    """Open a file for binary reading, decompressing .gz, .zst/.zstd and .lz4 by suffix."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith((".zst", ".zstd")):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    if lower.endswith(".lz4"):
        import lz4.frame

        return lz4.frame.open(path, "rb")
    return open(path, "rb")


def _strip_compression(path: str) -> str:
    lower = path.lower()
    for suffix in (".gz", ".zst", ".zstd", ".lz4"):
        if lower.endswith(suffix):
            return lower[: -len(suffix)]
    return lower


def expand_inputs(paths: list[str], fmt: str) -> list[str]:
    """Inputs as given, except that a folder of shards becomes its sorted files (imagenet folders stay)."""
    expanded: list[str] = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"input {path!r} does not exist")
        if not os.path.isdir(path) and not os.path.isfile(path):
            raise FileNotFoundError(f"input {path!r} is not a regular file or a folder (a FIFO or device); "
                                    "give the data files themselves")
        if os.path.isdir(path) and not (fmt == "imagenet" and not _has_tar_shards(path)):
            # A folder with tar shards is a webdataset: img2dataset also leaves NNNNN.parquet and
            # NNNNN_stats.json next to them (metadata, not samples), so only the shards are read.
            suffixes = (".tar",) if _has_tar_shards(path) else (".jsonl", ".json", ".parquet")
            files = sorted(os.path.join(path, name) for name in os.listdir(path)
                           if _strip_compression(name).endswith(suffixes) and os.path.isfile(os.path.join(path, name)))
            if not files:
                raise FileNotFoundError(f"input folder {path!r} holds no .jsonl/.json/.parquet/.tar files")
            expanded.extend(files)
        else:
            expanded.append(path)
    return expanded


def _has_tar_shards(path: str) -> bool:
    return any(_strip_compression(name).endswith(".tar") for name in os.listdir(path))


def iter_records(paths: list[str], options: SourceOptions) -> Iterator[Record]:
    """Yield the raw records of all inputs in a deterministic order (inputs in the order given)."""
    for input_index, path in enumerate(paths):
        base_dir = options.image_root or os.path.dirname(os.path.abspath(path))
        label = os.path.basename(path.rstrip("/"))
        if os.path.isdir(path):
            yield from _iter_class_folders(input_index, path, label)
            continue
        plain = _strip_compression(path)
        if plain.endswith(".tar"):
            yield from _iter_tar(input_index, path, label, base_dir, options.max_image_bytes)
        elif plain.endswith(".parquet"):
            yield from _iter_parquet(input_index, path, label, base_dir)
        elif plain.endswith(".json"):
            yield from _iter_json_list(input_index, path, label, base_dir, options.max_record_bytes)
        else:  # .jsonl and anything line-based
            yield from _iter_lines(input_index, path, label, base_dir, options.max_record_bytes)


def _iter_lines(input_index: int, path: str, label: str, base_dir: str, limit: int) -> Iterator[Record]:
    """One record per non-blank line; a line longer than `limit` bytes is one rejected record
    (never held in memory: the rest of it is skipped in bounded reads)."""
    number = 0
    line_number = 0
    with open_maybe_compressed(path) as handle:
        while True:
            line = handle.readline(limit + 1)
            if not line:
                return
            line_number += 1
            if len(line) > limit and not line.endswith(b"\n"):
                while True:  # skip to the end of the over-long line
                    rest = handle.readline(1 << 20)
                    if not rest or rest.endswith(b"\n"):
                        break
                yield Record(input_index, number, f"{label}:{line_number}", "error",
                             f"record is larger than {limit:,} bytes", base_dir)
                number += 1
                continue
            if not line.strip():
                continue  # blank lines (a trailing newline) are not records
            yield Record(input_index, number, f"{label}:{line_number}", "line", bytes(line), base_dir)
            number += 1


def _iter_json_list(input_index: int, path: str, label: str, base_dir: str, limit: int) -> Iterator[Record]:
    """The entries of a JSON file holding one list (or one object), parsed one entry at a time, so
    memory holds one entry (at most `limit` bytes of text), not the whole file and its parsed form
    (about 15x the file). Text that is not JSON, or an entry over the limit, ends the file as one
    rejected record saying where (the entries before it are used)."""
    decoder = json.JSONDecoder()
    number = 0

    def problem(reason: str) -> Record:
        return Record(input_index, number, f"{label}:{number}", "error", reason, base_dir)

    with open_maybe_compressed(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig") as text:
        buffer, position, end_of_file = "", 0, False

        def more() -> None:  # read at least as much again as is buffered: re-parsing stays linear
            nonlocal buffer, position, end_of_file
            buffer, position = buffer[position:], 0
            chunk = text.read(max(1 << 20, len(buffer)))
            end_of_file = not chunk
            buffer += chunk

        def next_char() -> str:  # the next non-blank character ("" at the end), not consumed
            nonlocal position
            while True:
                while position < len(buffer) and buffer[position].isspace():
                    position += 1
                if position < len(buffer) or end_of_file:
                    return buffer[position:position + 1]
                more()

        try:
            first = next_char()
            if first not in ("[", "{"):
                yield problem("file is not valid JSON (expected a list of records or one record)")
                return
            single = first == "{"
            position += 0 if single else 1
            while True:
                if not single:
                    if next_char() == "]":
                        return
                    if number and next_char() != ",":
                        yield problem(f"file is not valid JSON (expected ',' or ']' after entry {number - 1})")
                        return
                    position += 1 if number else 0
                    next_char()
                while True:  # an entry is taken once text follows it (a number could go on) or the file ends
                    try:
                        entry, end = decoder.raw_decode(buffer, position)
                        if end < len(buffer) or end_of_file:
                            break
                    except json.JSONDecodeError as error:
                        # Cut off by the buffer's end (read on), or broken where it stands (report it now).
                        cut_off = error.pos >= len(buffer) - 16 or error.msg.startswith("Unterminated string")
                        if end_of_file or not cut_off:
                            yield problem(f"file is not valid JSON ({error})")
                            return
                    if len(buffer) - position > limit:
                        yield problem(f"record is larger than {limit:,} bytes; the rest of the file is not read "
                                      "(split it into JSONL, one record per line)")
                        return
                    more()
                if end - position > limit:  # as an over-long JSONL line: this entry is rejected, the rest read
                    yield problem(f"record is larger than {limit:,} bytes")
                else:
                    ident = entry.get("id") if isinstance(entry, dict) else None
                    name = f"{label}:{number}" + (f" (id {ident})" if ident is not None else "")
                    yield Record(input_index, number, name, "object", entry, base_dir)
                position = end
                number += 1
                if single:
                    return
        except UnicodeDecodeError as error:
            yield problem(f"file is not valid JSON ({error})")


def _iter_parquet(input_index: int, path: str, label: str, base_dir: str) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield Record(input_index, number, f"{label}:row {number}", "object", row, base_dir)
            number += 1


def _tar_key(member_name: str) -> tuple[str, str]:
    """Webdataset convention: key = path up to the first dot of the basename; extension = the rest."""
    folder, base = os.path.split(member_name)
    if "." not in base:
        return member_name, ""
    stem, ext = base.split(".", 1)
    return os.path.join(folder, stem), ext.lower()


class TarMemberRef(NamedTuple):
    """Where a member's data lies in an uncompressed tar: the worker reads it (parallel I/O)."""

    path: str
    offset: int
    size: int


class MemberError(NamedTuple):
    """A tar member that was not read (too large): rejects its sample with `reason`."""

    reason: str


class _RecordingReader(io.RawIOBase):
    """Passes a stream through and keeps its last bytes, so the end of a streamed tar can be checked."""

    def __init__(self, stream, keep: int = 1 << 16):
        self.stream, self.keep = stream, keep
        self.position = 0  # bytes read so far
        self.tail = bytearray()  # the last `keep` (or more) of them

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.position += len(data)
        self.tail += data
        if len(self.tail) > 2 * self.keep:
            del self.tail[: len(self.tail) - self.keep]
        return data

    def bytes_at(self, offset: int, length: int) -> bytes:
        start = offset - (self.position - len(self.tail))
        return bytes(self.tail[max(start, 0): max(start + length, 0)]) if start >= 0 else b""


def _iter_tar(input_index: int, path: str, label: str, base_dir: str, member_limit: int) -> Iterator[Record]:
    """Group members by webdataset key. Uncompressed shards: only headers are read here and the
    members travel as (offset, size) references; compressed shards are streamed, each member read
    only up to `member_limit` bytes. A shard must end with its end-of-archive block: a shard cut
    at a header boundary otherwise looks complete, and its loss is reported as a rejected record."""
    compressed = _strip_compression(path) != path.lower() or not path.lower().endswith(".tar")
    number = 0
    current_key: str | None = None
    sample: dict[str, Any] = {}
    end_error = None
    stream = _RecordingReader(open_maybe_compressed(path)) if compressed else None
    try:
        with (tarfile.open(fileobj=stream, mode="r|") if compressed else tarfile.open(path, "r:")) as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, ext = _tar_key(member.name)
                if key != current_key and current_key is not None:
                    yield Record(input_index, number, f"{label}:{current_key}", "tar", sample, base_dir)
                    number += 1
                    sample = {}
                current_key = key
                if member.size > member_limit:
                    sample[ext] = MemberError(f"tar member {member.name} is {member.size:,} bytes, above the "
                                              f"{member_limit:,}-byte cap (--max-image-bytes)")
                elif compressed:
                    handle = archive.extractfile(member)
                    sample[ext] = read_capped(handle, member_limit, f"tar member {member.name}") if handle else b""
                else:
                    sample[ext] = TarMemberRef(os.path.abspath(path), member.offset_data, member.size)
            end = archive.offset  # where the end-of-archive block must be
        if compressed:
            stream.read(1)  # the end block may still sit in the decompressor
            end_block = stream.bytes_at(end, tarfile.BLOCKSIZE)
        else:
            with open(path, "rb") as handle:
                end_block = os.pread(handle.fileno(), tarfile.BLOCKSIZE, end)
        if end_block != bytes(tarfile.BLOCKSIZE):
            end_error = (f"tar shard is truncated or corrupt: no end-of-archive block at byte {end:,} "
                         "(the samples after that point are lost)")
    except (tarfile.TarError, EOFError, OSError) as exc:
        # The sample being read when the shard broke is reported; earlier samples stand.
        sample["__error__"] = f"tar shard is truncated or corrupt ({type(exc).__name__}: {exc})".encode()
        current_key = current_key if current_key is not None else "<start of shard>"
    finally:
        if stream is not None:
            stream.stream.close()
    if current_key is not None:
        yield Record(input_index, number, f"{label}:{current_key}", "tar", sample, base_dir)
        number += 1
    if end_error is not None:  # the loss is one rejected record of its own
        yield Record(input_index, number, f"{label}:<end of shard>", "tar",
                     {"__error__": end_error.encode()}, base_dir)


class SourcedBytes(bytes):
    """Bytes read from a file region that stays on disk for the whole run.

    `source` = (path, offset, length, file size, file mtime_ns): the packer copies the image from
    there into the output instead of keeping a second copy in the run's work files.
    """

    source: tuple[str, int, int, int, int]


def _sourced(data: bytes, path: str, offset: int, stat: os.stat_result) -> SourcedBytes:
    sourced = SourcedBytes(data)
    sourced.source = (os.path.abspath(path), offset, len(data), stat.st_size, stat.st_mtime_ns)
    return sourced


def _member(sample: dict[str, Any], ext: str) -> bytes:
    """The bytes of one tar member (read here, in the worker, when it is a reference)."""
    value = sample[ext]
    if isinstance(value, MemberError):
        raise RejectedInput(value.reason)
    if not isinstance(value, TarMemberRef):
        return value
    with open(value.path, "rb") as handle:
        data = os.pread(handle.fileno(), value.size, value.offset)  # size capped when the header was read
        stat = os.fstat(handle.fileno())
    if len(data) != value.size:
        raise RejectedInput(f"tar shard is truncated: member .{ext} has {len(data)} of {value.size} bytes")
    return _sourced(data, value.path, value.offset, stat)


def _iter_class_folders(input_index: int, root: str, label: str) -> Iterator[Record]:
    number = 0
    for class_name in sorted(os.listdir(root)):
        class_dir = os.path.join(root, class_name)
        if not os.path.isdir(class_dir):
            continue
        for file_name in sorted(os.listdir(class_dir)):
            file_path = os.path.join(class_dir, file_name)
            if os.path.isfile(file_path):
                yield Record(input_index, number, f"{label}/{class_name}/{file_name}", "file",
                             (class_name, file_path), root)
                number += 1


# --------------------------------------------------------------------------- converting (workers)


def record_to_document(record: Record, options: SourceOptions) -> Document:
    """Turn one raw record into a `Document`; raise `RejectedInput` or `FilteredOut`."""
    converter = _CONVERTERS.get(options.format)
    if converter is None:
        raise ValueError(f"unknown format {options.format!r}; choose one of {', '.join(FORMATS)}")
    document = converter(record, options)
    for segment in document.segments:
        if segment.is_image and len(segment.image) > options.max_image_bytes:
            raise RejectedInput(f"image {segment.image_name} is {len(segment.image)} bytes, "
                                f"above --max-image-bytes {options.max_image_bytes}")
    if not any((segment.is_image or (segment.text or "").strip()) for segment in document.segments):
        raise RejectedInput("empty document (no text and no image)")
    return document


def _parse_json_record(record: Record) -> Any:
    if record.kind == "object":
        return record.payload
    if record.kind == "error":
        raise RejectedInput(record.payload)
    if record.kind != "line":
        raise RejectedInput(f"expected a JSON record, got a {record.kind} record; check --format")
    raw: bytes = record.payload
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RejectedInput(f"not valid UTF-8 text (byte {error.start}: {raw[error.start:error.start + 1]!r})") from None
    try:
        return json.loads(text.lstrip("\ufeff"))  # a byte-order mark may open the file
    except json.JSONDecodeError as error:
        raise RejectedInput(f"bad JSON line ({error.msg} at column {error.colno})") from None


def _decode_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RejectedInput(f"{what} is not valid UTF-8 text (byte {error.start})") from None


def _read_image_file(reference: str, record: Record, options: SourceOptions) -> tuple[bytes, str]:
    if reference.startswith(("http://", "https://")):
        raise RejectedInput(f"image {reference!r} is a remote URL; download the images first (no network at pack time)")
    if reference.startswith("file://"):
        reference = reference[len("file://"):]
    path = reference if os.path.isabs(reference) else os.path.join(record.base_dir, reference)
    try:
        with open_regular_file(path, "image") as handle:  # never a FIFO (hangs) or a device (endless)
            stat = os.fstat(handle.fileno())
            if stat.st_size > options.max_image_bytes:
                raise TooLargeError(f"image file {reference!r} is {stat.st_size} bytes, "
                                    f"above --max-image-bytes {options.max_image_bytes}")
            data = read_capped(handle, options.max_image_bytes, f"image file {reference!r}")
    except (NotRegularFileError, TooLargeError) as error:
        raise RejectedInput(str(error)) from None
    except OSError:
        raise RejectedInput(f"missing image file {reference!r} (looked in {record.base_dir})") from None
    return _sourced(data, path, 0, stat), reference


def _image_from_value(value: Any, record: Record, options: SourceOptions) -> tuple[bytes, str]:
    """An image given as a path, a data URL, raw bytes or a HF-datasets {"bytes", "path"} dict."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "<inline bytes>"
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), str(value.get("path") or "<inline bytes>")
        if value.get("path"):
            return _read_image_file(str(value["path"]), record, options)
        if value.get("url"):
            return _image_from_value(value["url"], record, options)
        raise RejectedInput("image entry has neither bytes nor a path")
    if isinstance(value, str):
        if value.startswith("data:"):
            header, _, encoded = value.partition(",")
            if ";base64" not in header:
                raise RejectedInput("image data URL is not base64-encoded")
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise RejectedInput("image data URL holds invalid base64") from None
            return data, "<data URL>"  # its size is checked with every image in record_to_document
        return _read_image_file(value, record, options)
    raise RejectedInput(f"cannot read an image from a {type(value).__name__}")


def _first_field(entry: dict, names: tuple[str, ...]) -> Any:
    for name in names:
        if name in entry and entry[name] is not None:
            return entry[name]
    return None


def _convert_imagenet(record: Record, options: SourceOptions) -> Document:
    if not options.class_map:
        raise ValueError("the imagenet format needs --class-map (synset → class name)")
    if record.kind == "file":
        synset, path = record.payload
        data, _ = _read_image_file(path, record, options)  # size-checked before it is read
        image_name = record.name
        class_key = synset
    elif record.kind == "tar":
        sample: dict[str, bytes] = record.payload
        image_ext = _tar_image_ext(sample)
        data, image_name = _member(sample, image_ext), record.name
        key = record.name.rsplit(":", 1)[-1]
        match = SYNSET_PATTERN.match(os.path.basename(key))
        if match:
            class_key = match.group(0)
        elif "cls" in sample:
            class_key = _decode_text(_member(sample, "cls"), "class index").strip()
        else:
            raise RejectedInput("cannot tell the class: key has no synset prefix and no .cls member")
    else:
        raise RejectedInput("imagenet records come from class folders or tar shards")
    if class_key not in options.class_map:
        raise RejectedInput(f"class {class_key!r} is not in the class map")
    label = re.sub(r"[_-]", " ", options.class_map[class_key]).strip()
    document = Document()
    document.add_image("assistant", data, image_name)
    document.add_text("assistant", label)
    return document


def _tar_image_ext(sample: dict[str, bytes]) -> str:
    """The image member's extension of a webdataset sample; a broken shard or no image rejects it."""
    if "__error__" in sample:
        raise RejectedInput(sample["__error__"].decode())
    image_ext = next((ext for ext in sample if ext in IMAGE_EXTENSIONS), None)
    if image_ext is None:
        raise RejectedInput(f"sample has no image member (members: {', '.join(sorted(sample)) or 'none'})")
    return image_ext


def _convert_caption(record: Record, options: SourceOptions) -> Document:
    if record.kind == "tar":
        sample: dict[str, bytes] = record.payload
        image_ext = _tar_image_ext(sample)
        if "txt" in sample:
            caption = _decode_text(_member(sample, "txt"), "caption")
        elif "json" in sample:
            meta = json.loads(_decode_text(_member(sample, "json"), "json member"))
            caption = _first_field(meta, ("caption", "text", "txt"))
        else:
            raise RejectedInput("sample has no caption (.txt or .json member)")
        data, image_name = _member(sample, image_ext), f"{record.name}.{image_ext}"
    else:
        entry = _parse_json_record(record)
        if not isinstance(entry, dict):
            raise RejectedInput("caption record must be a JSON object with an image and a caption")
        image_value = _first_field(entry, ("image", "image_path", "path", "file_name", "jpg", "url"))
        if image_value is None:
            raise RejectedInput("caption record has no image field (image, image_path, path, file_name)")
        caption = _first_field(entry, ("caption", "text", "txt"))
        data, image_name = _image_from_value(image_value, record, options)
    if not isinstance(caption, str) or not caption.strip():
        raise RejectedInput("empty or missing caption")
    document = Document()
    document.add_image("assistant", data, image_name)
    document.add_text("assistant", caption.strip())
    return document


def _convert_interleaved(record: Record, options: SourceOptions) -> Document:
    entry = _parse_json_record(record)
    if not isinstance(entry, dict):
        raise RejectedInput("interleaved record must be a JSON object")
    document = Document()
    if "text_list" in entry:  # MMC4
        texts = entry["text_list"] or []
        before: dict[int, list[Any]] = {}
        for info in entry.get("image_info") or []:
            index = info.get("matched_text_index")
            if not isinstance(index, int) or not 0 <= index < max(len(texts), 1):
                raise RejectedInput(f"image_info matched_text_index {index!r} is outside text_list")
            before.setdefault(index, []).append(info)
        pending: list[str] = []
        for index, sentence in enumerate(texts):
            if index in before:
                if pending:
                    document.add_text("assistant", " ".join(pending))
                    pending = []
                for info in before[index]:
                    value = _first_field(info, ("image_bytes", "image_path", "image_name", "path"))
                    if value is None:
                        raise RejectedInput("image_info entry has no image_path/image_name")
                    data, name = _image_from_value(value, record, options)
                    document.add_image("assistant", data, name)
            if not isinstance(sentence, str):
                raise RejectedInput("text_list holds a non-string entry")
            pending.append(sentence.strip())
        if pending:
            document.add_text("assistant", " ".join(pending))
    elif "texts" in entry and "images" in entry:  # OBELICS
        texts, images = entry["texts"] or [], entry["images"] or []
        if len(texts) != len(images):
            raise RejectedInput(f"texts ({len(texts)}) and images ({len(images)}) lists differ in length")
        for text, image in zip(texts, images):
            if image is not None:
                data, name = _image_from_value(image, record, options)
                document.add_image("assistant", data, name)
            elif isinstance(text, str):
                document.add_text("assistant", text if not document.segments else "\n\n" + text)
    else:
        raise RejectedInput("interleaved record needs text_list/image_info (MMC4) or texts/images (OBELICS)")
    return document


def _subset_of(entry: dict) -> str | None:
    meta = entry.get("meta")
    if isinstance(meta, dict):
        for key in ("redpajama_set_name", "subset", "source"):
            if isinstance(meta.get(key), str):
                return meta[key]
    for key in ("subset", "source"):
        if isinstance(entry.get(key), str):
            return entry[key]
    return None


def _convert_text(record: Record, options: SourceOptions) -> Document:
    entry = _parse_json_record(record)
    if not isinstance(entry, dict):
        raise RejectedInput("text record must be a JSON object with a 'text' field")
    subset = _subset_of(entry)
    if subset is not None and subset in options.exclude_subsets:
        raise FilteredOut(subset)
    text = entry.get("text")
    if not isinstance(text, str):
        raise RejectedInput("text record has no string 'text' field")
    document = Document()
    document.add_text("assistant", text)
    return document


def _convert_llava(record: Record, options: SourceOptions, roles: dict[str, str] = LLAVA_ROLES,
                   expected: str = "human, gpt or system") -> Document:
    entry = _parse_json_record(record)
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        raise RejectedInput("LLaVA record needs a 'conversations' list")
    image_refs = entry.get("image")
    if image_refs is None:
        image_refs = []
    elif not isinstance(image_refs, list):
        image_refs = [image_refs]
    turns = []
    for turn in entry["conversations"]:
        if not isinstance(turn, dict) or "from" not in turn or not isinstance(turn.get("value"), str):
            raise RejectedInput("conversation turn needs 'from' and a string 'value'")
        role = roles.get(turn["from"])
        if role is None:
            raise RejectedInput(f"unknown role {turn['from']!r}; expected {expected}")
        turns.append((role, turn["value"]))
    placeholders = sum(value.count(IMAGE_PLACEHOLDER) for _, value in turns)
    if placeholders == 0 and image_refs:
        # LLaVA convention: an image without a placeholder goes before the first user turn.
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), 0)
        role, value = turns[first_user]
        turns[first_user] = (role, IMAGE_PLACEHOLDER * len(image_refs) + "\n" + value)
        placeholders = len(image_refs)
    if placeholders != len(image_refs):
        raise RejectedInput(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(image_refs)} images")
    images = iter(image_refs)
    document = Document()
    for role, value in turns:
        parts = value.split(IMAGE_PLACEHOLDER)
        for index, part in enumerate(parts):
            if index > 0:
                data, name = _image_from_value(next(images), record, options)
                document.add_image(role, data, name)
                part = part[1:] if part.startswith("\n") else part
            document.add_text(role, part)
    return document


def _convert_sharegpt(record: Record, options: SourceOptions) -> Document:
    return _convert_llava(record, options, SHAREGPT_ROLES, "human, gpt, chatgpt, bing, bard or system")


def _chat_messages(entry: Any) -> list[Any]:
    if isinstance(entry, list):
        return entry
    if isinstance(entry, dict):
        for key in ("messages", "conversations"):
            if isinstance(entry.get(key), list):
                return entry[key]
        if "role" in entry:
            return [entry]
    raise RejectedInput("chat record must be a list of messages, {'messages': [...]}, or one message")


def _convert_chat(record: Record, options: SourceOptions) -> Document:
    messages = _chat_messages(_parse_json_record(record))
    document = Document()
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise RejectedInput("chat message must be an object with a 'role'")
        role = message["role"]
        check_role(role)
        content = message.get("content")
        if isinstance(content, str):
            document.add_text(role, content)
            continue
        if not isinstance(content, list):
            raise RejectedInput(f"message content must be a string or a list, got {type(content).__name__}")
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise RejectedInput("text item without a string 'text'")
                document.add_text(role, item["text"])
            elif kind == "image_url":
                url = item.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                data, name = _image_from_value(url, record, options)
                document.add_image(role, data, name)
            elif kind == "image":
                data, name = _image_from_value(item.get("image") or item.get("path"), record, options)
                document.add_image(role, data, name)
            else:
                raise RejectedInput(f"unknown content item type {kind!r}; expected text, image_url or image")
    return document


_CONVERTERS = {
    "imagenet": _convert_imagenet,
    "caption": _convert_caption,
    "interleaved": _convert_interleaved,
    "text": _convert_text,
    "llava": _convert_llava,
    "sharegpt": _convert_sharegpt,
    "chat": _convert_chat,
}
