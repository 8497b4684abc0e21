"""Source converters: raw datasets of the SOLO stages and SFT → `Document`s (one sample schema).

Reading is split in two so that packing can run in parallel and resume:

* `iter_records(paths, options)` runs in the main process and reads as little as it can: JSONL
  lines (plain, .gz, .zst, .lz4, or members of a .zip), entries of a JSON list, parquet rows,
  webdataset tar samples (members grouped by key, tars inside a tar read in place; for
  uncompressed tars only the headers — the members travel as (offset, size) references),
  img2dataset `files` folders (grouped alike), or the paths of class-folder images. Each record has a stable name
  (`file:line`, `file:key`, ...) used in report.json.
* `record_to_document(record, options)` runs in the workers: it parses, resolves and reads the
  image files, and returns a `Document`, or raises `RejectedInput` (bad JSON, non-UTF-8 text,
  unknown role, missing image file, empty document, ...) or `FilteredOut` (an excluded subset).

Formats (`--format`):

=============  ===========================================================================
imagenet       class folders (`ROOT/<synset>/*.JPEG`) or tar shards whose keys start with the
               synset (`n01440764_10026.JPEG`) or carry a `.cls` index; `--class-map` maps
               synsets to names (`load_class_map`). Document: one assistant message [image, class name].
caption        image–caption pairs: webdataset tars (`KEY.jpg` + `KEY.txt`/`KEY.json`), img2dataset
               `files` folders, or JSONL/parquet rows with an image (`IMAGE_FIELDS`) and a caption.
interleaved    MMC4 (`text_list` + `image_info[matched_text_index]`) or OBELICS (`texts` and
               `images` aligned lists) JSONL/parquet; images are inserted before their sentence;
               a missing one is dropped (counted) or rejects the document (`--missing-images`).
text           text-only JSONL/parquet (`text` field), with subset filtering
               (`--exclude-subset RedPajamaCommonCrawl` reads SlimPajama's
               `meta.redpajama_set_name`).
llava          LLaVA instruction JSON/JSONL (`image` or `images`, `conversations` of human/gpt
               turns with `<image>` placeholders; an opening assistant turn is dropped).
sharegpt       ShareGPT JSON/JSONL (`conversations` of `from`/`value` turns; `from` is
               human/user, gpt/chatgpt/bing/bard/assistant or system; an optional `image` as LLaVA).
chat           OpenAI-chat JSONL (SOLO's interchange format): a list of messages,
               `{"messages"|"conversations": [...]}` or one message; content a string or items
               `text` / `image_url` (base64 data URL or a local path) / `image` (a local path);
               with an `images` list (LLaMA-Factory), `<image>` in string contents takes them in order.
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
    missing_images: str = "drop"  # interleaved: an image that is not there is dropped, or rejects its document
    image_index: str | None = None  # interleaved: img2dataset output where images are found by URL
    shard: tuple[int, int] | None = None  # (I, N): read only shard I of N of the inputs (`iter_records`)
    image_index_db: str | None = None  # the run's SQLite index of image_index (made by the pack run; not an input)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "missing_images": self.missing_images,
            "image_index": os.path.abspath(self.image_index) if self.image_index else None,
            "shard": list(self.shard) if self.shard else None,
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


CLASS_MAP_FORMS = ("lines `n01440764<TAB>tench, Tinca tinca` or `n01440764 tench`, JSON {\"n01440764\": \"tench\"} / "
                   "{\"n01440764\": [\"tench\", ...]} / Keras {\"0\": [\"n01440764\", \"tench\"]}, or a file of "
                   "synset ids (one a line) with --class-names giving the aligned lemmas file")


def _class_name(value: Any) -> str:
    """One class map value → its caption: a list of names is joined with ", " (all lemmas, in order)."""
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    return str(value)


def load_class_map(path: str, names_path: str | None = None) -> dict[str, str]:
    """Read a class map → {synset: caption, class index: caption}.

    Accepted forms (`CLASS_MAP_FORMS`): text lines `SYNSET<TAB>lemmas` or `SYNSET name words`;
    JSON {synset: name}, {synset: [names]}, Keras' {index: [synset, name]}, or a list of names; or
    BiT's aligned pair, a file of synset ids (`path`) and one of lemmas (`names_path`), line by line.
    The caption is the whole name string as given (every lemma, comma-separated: "tench, Tinca
    tinca"); `_` and `-` become spaces. Class indices (for `.cls` members) are the line/list order,
    stored as keys "0", "1", ... A map that gives no names (only synset ids) is refused.
    """
    with open(path, "rb") as handle:
        raw = handle.read().decode("utf-8-sig")
    entries: list[tuple[str, str]] = []  # (key, name) in file order
    stripped = raw.lstrip()
    if names_path is not None:
        with open(names_path, "rb") as handle:
            names = [line.strip() for line in handle.read().decode("utf-8-sig").splitlines() if line.strip()]
        ids = [line.strip() for line in raw.splitlines() if line.strip()]
        if len(ids) != len(names):
            raise ValueError(f"--class-map {path} has {len(ids)} synset ids but --class-names {names_path} has "
                             f"{len(names)} lines; they must be aligned line by line")
        entries = list(zip(ids, names))
    elif stripped.startswith("{") or stripped.startswith("["):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ValueError(f"class map {path} is not valid JSON ({error})") from None
        if isinstance(data, dict):
            for key, value in data.items():
                if isinstance(value, list) and len(value) == 2 and SYNSET_PATTERN.fullmatch(str(value[0])):
                    entries.append((str(value[0]), str(value[1])))  # Keras: {index: [synset, name]}
                else:
                    entries.append((str(key), _class_name(value)))
        else:
            entries = [(str(index), _class_name(value)) for index, value in enumerate(data)]
    else:
        for line in raw.splitlines():
            if line.strip():
                parts = line.strip().split("\t", 1) if "\t" in line else line.strip().split(None, 1)
                entries.append((parts[0].strip(), parts[1].strip() if len(parts) > 1 else parts[0].strip()))
    if not entries or all(SYNSET_PATTERN.fullmatch(name) for _, name in entries):
        raise ValueError(f"class map {path} gives no class names (only synset ids); captions would be ids. "
                         f"Accepted forms: {CLASS_MAP_FORMS}")
    mapping: dict[str, str] = {}
    for index, (key, name) in enumerate(entries):
        mapping[key] = name
        mapping.setdefault(str(index), name)
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


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".zip")


def _walk_files(root: str) -> list[str]:
    """Every file under `root`, recursively, in sorted path order; dotfiles and dot-folders skipped."""
    found = []
    for folder, folders, names in os.walk(root):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found.extend(os.path.join(folder, name) for name in names
                     if not name.startswith(".") and os.path.isfile(os.path.join(folder, name)))
    return sorted(found, key=lambda path: os.path.relpath(path, root).split(os.sep))


def is_side_file(path: str) -> bool:
    """img2dataset's metadata beside its shards, never records: `NNNNN_stats.json`, and the
    `NNNNN.parquet` next to a `NNNNN.tar` shard or a `NNNNN/` folder of files."""
    name = os.path.basename(path)
    if name.endswith("_stats.json"):
        return True
    if _strip_compression(name).endswith(".parquet"):
        stem = os.path.join(os.path.dirname(path), name.split(".", 1)[0])
        return os.path.isfile(stem + ".tar") or os.path.isdir(stem)
    return False


def expand_inputs(paths: list[str], fmt: str) -> list[str]:
    """Inputs → the files (and folders) to read, in a stable order.

    A folder is searched recursively (sorted, dotfiles skipped): if it holds `.tar` shards, they are
    the inputs (a webdataset); else for imagenet the folder is read as class folders; else if
    subfolders hold images (img2dataset's `files` layout, `00000/KEY.jpg` + `KEY.txt`), each such
    subfolder is one input; else its .jsonl/.json/.parquet/.zip files (compressed too). img2dataset's
    side files (`is_side_file`) are never inputs, named or found.
    """
    expanded: list[str] = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"input {path!r} does not exist")
        if not os.path.isdir(path) and not os.path.isfile(path):
            raise FileNotFoundError(f"input {path!r} is not a regular file or a folder (a FIFO or device); "
                                    "give the data files themselves")
        if not os.path.isdir(path):
            if not is_side_file(path):
                expanded.append(path)
            continue
        files = _walk_files(path)
        tars = [name for name in files if _strip_compression(name).endswith(".tar")]
        image_folders = _files_layout_folders(files)
        if tars:
            expanded.extend(tars)
        elif fmt == "imagenet":
            expanded.append(path)
        elif image_folders and fmt == "caption":
            expanded.extend(image_folders)
        else:
            data = [name for name in files
                    if _strip_compression(name).endswith(DATA_SUFFIXES) and not is_side_file(name)]
            if not data:
                raise FileNotFoundError(f"input folder {path!r} holds no .jsonl/.json/.parquet/.zip/.tar files "
                                        "(searched recursively)")
            expanded.extend(data)
    if not expanded:
        raise FileNotFoundError("the inputs are only img2dataset side files (*_stats.json, the parquet beside "
                                "each shard); give the shards (.tar), the parquet output or the files folders")
    return expanded


def _files_layout_folders(files: list[str]) -> list[str]:
    """The folders of img2dataset's `files` layout among `files`: those holding an image `KEY.jpg`
    (or another image extension) with its caption `KEY.txt` or metadata `KEY.json` beside it."""
    keys: dict[str, dict[str, set[str]]] = {}
    for name in files:
        key, ext = _tar_key(name)
        keys.setdefault(os.path.dirname(name), {}).setdefault(key, set()).add(ext)
    return sorted((folder for folder, samples in keys.items()
                   if any(exts & set(IMAGE_EXTENSIONS) and exts & {"txt", "json"} for exts in samples.values())),
                  key=lambda folder: folder.split(os.sep))


def iter_records(paths: list[str], options: SourceOptions) -> Iterator[Record]:
    """Yield the raw records of all inputs in a deterministic order (inputs in the order given)."""
    for input_index, path in enumerate(paths):
        if options.shard and len(paths) >= options.shard[1] and input_index % options.shard[1] != options.shard[0]:
            continue  # another shard's file
        records = _iter_input(input_index, path, options)
        if options.shard and len(paths) < options.shard[1]:  # fewer files than shards: split each by records
            records = (record for record in records if record.number % options.shard[1] == options.shard[0])
        yield from records


def _iter_input(input_index: int, path: str, options: SourceOptions) -> Iterator[Record]:
    # The one path rule: a relative image reference resolves against the record's base_dir, an
    # absolute folder (--image-root, else the input file's folder; class folders: their root).
    base_dir = os.path.abspath(options.image_root or os.path.dirname(os.path.abspath(path)))
    label = os.path.basename(path.rstrip("/"))
    if os.path.isdir(path):
        if options.format == "imagenet":
            yield from _iter_class_folders(input_index, os.path.abspath(path), label)
        else:
            yield from _iter_files_folder(input_index, path, label, base_dir, options.max_image_bytes)
        return
    plain = _strip_compression(path)
    if plain.endswith(".tar"):
        yield from _iter_tar(input_index, path, label, base_dir, options.max_image_bytes)
    elif plain.endswith(".zip"):
        yield from _iter_zip(input_index, path, label, base_dir, options)
    elif plain.endswith(".parquet"):
        yield from _iter_parquet(input_index, path, label, base_dir)
    elif plain.endswith(".json"):
        yield from _iter_json_list(input_index, path, label, base_dir, options.max_record_bytes)
    else:  # .jsonl and anything line-based
        yield from _iter_lines(input_index, path, label, base_dir, options.max_record_bytes)


def _iter_zip(input_index: int, path: str, label: str, base_dir: str, options: SourceOptions) -> Iterator[Record]:
    """The .jsonl members of a zip (MMC4's `docs_shard_N_v2.jsonl.zip`), streamed in name order."""
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        yield Record(input_index, 0, label, "error", f"not a readable zip file ({error})", base_dir)
        return
    with archive:
        members = sorted(info.filename for info in archive.infolist() if not info.is_dir()
                         and not os.path.basename(info.filename).startswith(".")
                         and not info.filename.startswith("__MACOSX/"))
        offset = 0
        for member in members:
            member_label = f"{label}!{member}"
            if not member.lower().endswith(".jsonl"):
                yield Record(input_index, offset, member_label, "error",
                             "zip member is not .jsonl (one JSON record a line); unzip it and give its files", base_dir)
                offset += 1
                continue
            count = 0
            for count, record in enumerate(_iter_lines(input_index, path, member_label, base_dir,
                                                       options.max_record_bytes, archive.open(member)), 1):
                yield record._replace(number=record.number + offset)
            offset += count


def _iter_lines(input_index: int, path: str, label: str, base_dir: str, limit: int,
                stream: io.BufferedIOBase | None = None) -> Iterator[Record]:
    """One record per non-blank line (of `path`, or of `stream`, a zip member); a line longer than
    `limit` bytes is one rejected record (never held in memory: the rest of it is skipped in bounded reads)."""
    number = 0
    line_number = 0
    with stream or open_maybe_compressed(path) as handle:
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


def _tar_members(archive: tarfile.TarFile, path: str, base: int | None, member_limit: int) -> Iterator[tuple[str, Any]]:
    """(name, data) of each file member, in archive order. A member that is itself a tar (ImageNet-21K
    winter21: one tar per synset inside the outer one) is read in place, its members named
    `inner.tar/member`. `base`: where `archive` starts in the file `path` when it is uncompressed
    (members then travel as references), None when it is streamed (members are read, capped)."""
    for member in archive:
        if not member.isfile():
            continue
        if member.name.lower().endswith(".tar"):
            handle = archive.extractfile(member)
            inner_base = None if base is None else base + member.offset_data
            with tarfile.open(fileobj=handle, mode="r|" if base is None else "r:") as inner:
                for name, value in _tar_members(inner, path, inner_base, member_limit):
                    yield f"{member.name}/{name}", value
        elif member.size > member_limit:
            yield member.name, MemberError(f"tar member {member.name} is {member.size:,} bytes, above the "
                                           f"{member_limit:,}-byte cap (--max-image-bytes)")
        elif base is None:
            handle = archive.extractfile(member)
            yield member.name, read_capped(handle, member_limit, f"tar member {member.name}") if handle else b""
        else:
            yield member.name, TarMemberRef(os.path.abspath(path), base + member.offset_data, member.size)


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
            for name, value in _tar_members(archive, path, 0 if not compressed else None, member_limit):
                key, ext = _tar_key(name)
                if key != current_key and current_key is not None:
                    yield Record(input_index, number, f"{label}:{current_key}", "tar", sample, base_dir)
                    number += 1
                    sample = {}
                current_key = key
                sample[ext] = value
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
    """ImageNet class folders `ROOT/<synset>/<image>`; the payload's path is relative to ROOT (the
    record's base_dir), like every other relative image reference (the rule in `_iter_input`)."""
    number = 0
    for class_name in sorted(os.listdir(root)):
        class_dir = os.path.join(root, class_name)
        if class_name.startswith(".") or not os.path.isdir(class_dir):
            continue
        for file_name in sorted(os.listdir(class_dir)):
            if not file_name.startswith(".") and os.path.isfile(os.path.join(class_dir, file_name)):
                yield Record(input_index, number, f"{label}/{class_name}/{file_name}", "file",
                             (class_name, os.path.join(class_name, file_name)), root)
                number += 1


def _iter_files_folder(input_index: int, folder: str, label: str, base_dir: str,
                       member_limit: int) -> Iterator[Record]:
    """img2dataset's `files` layout: one folder per shard, `KEY.jpg` + `KEY.txt` + `KEY.json` files,
    grouped by key like the members of a webdataset tar (the files travel as references)."""
    samples: dict[str, dict[str, Any]] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        key, ext = _tar_key(name)
        size = os.path.getsize(path)
        samples.setdefault(key, {})[ext] = (
            MemberError(f"file {name} is {size:,} bytes, above the {member_limit:,}-byte cap (--max-image-bytes)")
            if size > member_limit else TarMemberRef(os.path.abspath(path), 0, size))
    for number, key in enumerate(sorted(samples)):
        yield Record(input_index, number, f"{label}/{key}", "tar", samples[key], base_dir)


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
        bad = raw[error.start:error.start + 1]
        raise RejectedInput(f"not valid UTF-8 text (byte {error.start}: {bad!r})") from None
    try:
        return json.loads(text.lstrip("\ufeff"))  # a byte-order mark may open the file
    except json.JSONDecodeError as error:
        raise RejectedInput(f"bad JSON line ({error.msg} at column {error.colno})") from None


def _decode_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RejectedInput(f"{what} is not valid UTF-8 text (byte {error.start})") from None


class MissingImage(RejectedInput):
    """An image that is not there: a missing file, a download that failed upstream, a URL the
    --image-index does not hold. Interleaved documents drop it under --missing-images drop."""


def _read_image_file(reference: str, record: Record, options: SourceOptions) -> tuple[bytes, str]:
    if reference.startswith(("http://", "https://")):
        return _image_by_url(reference, options), reference
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
        raise MissingImage(f"missing image file {reference!r} (looked in {record.base_dir})") from None
    return _sourced(data, path, 0, stat), reference


def _image_by_url(url: str, options: SourceOptions) -> bytes:
    """An image by its URL, from the img2dataset output given as --image-index (no network at pack time)."""
    if not options.image_index:
        raise RejectedInput(f"image {url!r} is a remote URL; fetch the URLs with img2dataset and give its output "
                            "folder as --image-index (no network at pack time)")
    from .image_index import ParquetImage, lookup, read_parquet_image, standalone_index

    found = lookup(options.image_index_db or standalone_index(os.path.abspath(options.image_index)), url)
    if found is None:
        raise MissingImage(f"image {url!r}: not found in --image-index (no img2dataset parquet there lists the URL)")
    if isinstance(found, str):
        raise MissingImage(f"image {url!r}: {found}")
    if isinstance(found, ParquetImage):
        return read_parquet_image(found)
    return _member({"image": found}, "image")


def _failed_download(entry: dict) -> MissingImage:
    """A row whose image field is empty: img2dataset keeps the rows of failed downloads (url, status,
    error_message) with a null image."""
    detail = ": ".join(str(entry[name]) for name in ("status", "error_message") if entry.get(name))
    return MissingImage((f"image {entry['url']!r}: " if entry.get("url") else "")
                        + "download failed upstream, the row has no image bytes" + (f" ({detail})" if detail else ""))


# The one image-column rule of rows (JSONL, JSON, parquet): `image` (bytes, path, data URL or a HF
# {"bytes", "path"} struct), a column named after an image extension (img2dataset's --encode_format:
# jpg, png, webp, ...), or a path field. Tar members and files follow the same extensions.
IMAGE_FIELDS = ("image", *IMAGE_EXTENSIONS, "image_path", "path", "file_name")


def _row_image(entry: dict, record: Record, options: SourceOptions) -> tuple[bytes, str]:
    for name in IMAGE_FIELDS:
        if name in entry:
            value = entry[name]
            if value is None or (isinstance(value, dict) and not value.get("bytes") and not value.get("path")):
                raise _failed_download(entry)
            return _image_from_value(value, record, options)
    if isinstance(entry.get("url"), str):
        return _image_from_value(entry["url"], record, options)
    raise RejectedInput(f"record has no image field ({', '.join(IMAGE_FIELDS)})")


def _image_from_value(value: Any, record: Record, options: SourceOptions) -> tuple[bytes, str]:
    """An image given as a path, a URL, a data URL, raw bytes or a HF-datasets {"bytes", "path"} dict."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "<inline bytes>"
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), str(value.get("path") or "<inline bytes>")
        if value.get("path"):
            return _read_image_file(str(value["path"]), record, options)
        if value.get("url"):
            return _image_from_value(value["url"], record, options)
        raise MissingImage("image entry has neither bytes nor a path")
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
        data, image_name = _row_image(entry, record, options)
        caption = _first_field(entry, ("caption", "text", "txt"))
    if not isinstance(caption, str) or not caption.strip():
        raise RejectedInput("empty or missing caption")
    document = Document()
    document.add_image("assistant", data, image_name)
    document.add_text("assistant", caption.strip())
    return document


def _interleaved_image(document: Document, value: Any, record: Record,
                       options: SourceOptions) -> tuple[bytes, str] | None:
    """One image of an interleaved document, or None: under --missing-images drop an image that is
    not there is left out and its reason kept on the document (counted in report.json)."""
    try:
        return _image_from_value(value, record, options)
    except MissingImage as missing:
        if options.missing_images != "drop":
            raise
        document.dropped_images.append(missing.reason)
        return None


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
            for info in before.get(index, ()):
                # By URL from img2dataset output (--image-index), else the downloaded file's name.
                names = ("raw_url",) if options.image_index and info.get("raw_url") else ()
                value = _first_field(info, names + ("image_bytes", "image_path", "image_name", "path"))
                if value is None:
                    raise RejectedInput("image_info entry has no image_path/image_name")
                image = _interleaved_image(document, value, record, options)
                if image is not None:  # the sentences around a dropped image stay one text
                    if pending:
                        document.add_text("assistant", " ".join(pending))
                        pending = []
                    document.add_image("assistant", *image)
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
                found = _interleaved_image(document, image, record, options)
                if found is not None:
                    document.add_image("assistant", *found)
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


def _image_list(entry: dict) -> list[Any]:
    """The images of an instruction record: `images` (a list: LLaMA-Factory, LLaVA-OneVision) or
    `image` (one path, or a list: LLaVA, ShareGPT4V)."""
    value = entry.get("images") if entry.get("images") is not None else entry.get("image")
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _check_placeholders(count: int, images: list[Any]) -> None:
    if count != len(images):
        raise RejectedInput(f"{count} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")


def _add_with_placeholders(document: Document, role: str, text: str, images: Iterator[Any], record: Record,
                           options: SourceOptions) -> None:
    """Text whose `<image>` placeholders take the next images, in order (a newline after one is dropped)."""
    for index, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index > 0:
            data, name = _image_from_value(next(images), record, options)
            document.add_image(role, data, name)
            part = part[1:] if part.startswith("\n") else part
        document.add_text(role, part)


def _convert_llava(record: Record, options: SourceOptions, roles: dict[str, str] = LLAVA_ROLES,
                   expected: str = "human, gpt or system") -> Document:
    entry = _parse_json_record(record)
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        raise RejectedInput("LLaVA record needs a 'conversations' list")
    image_refs = _image_list(entry)
    turns = []
    for turn in entry["conversations"]:
        if not isinstance(turn, dict) or "from" not in turn or not isinstance(turn.get("value"), str):
            raise RejectedInput("conversation turn needs 'from' and a string 'value'")
        role = roles.get(turn["from"])
        if role is None:
            raise RejectedInput(f"unknown role {turn['from']!r}; expected {expected}")
        turns.append((role, turn["value"]))
    # A conversation that opens with an answer (ShareGPT dumps cut mid-chat) loses that orphan turn,
    # as LLaVA's training does; system turns before it stay.
    first = next((i for i, (role, _) in enumerate(turns) if role != "system"), None)
    if first is not None and turns[first][0] == "assistant":
        del turns[first]
    placeholders = sum(value.count(IMAGE_PLACEHOLDER) for _, value in turns)
    if placeholders == 0 and image_refs:
        # LLaVA convention: an image without a placeholder goes before the first user turn.
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), 0)
        role, value = turns[first_user]
        turns[first_user] = (role, IMAGE_PLACEHOLDER * len(image_refs) + "\n" + value)
        placeholders = len(image_refs)
    _check_placeholders(placeholders, image_refs)
    images = iter(image_refs)
    document = Document()
    for role, value in turns:
        _add_with_placeholders(document, role, value, images, record, options)
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
    entry = _parse_json_record(record)
    messages = _chat_messages(entry)
    # LLaMA-Factory's multimodal form: {"messages": [...], "images": [...]}, with <image> placeholders
    # in the string contents taking the images in order. Without an image list, <image> is text.
    image_refs = _image_list(entry) if isinstance(entry, dict) and "role" not in entry else []
    if image_refs:
        _check_placeholders(sum(message.get("content").count(IMAGE_PLACEHOLDER) for message in messages
                                if isinstance(message, dict) and isinstance(message.get("content"), str)),
                            image_refs)
    images = iter(image_refs)
    document = Document()
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise RejectedInput("chat message must be an object with a 'role'")
        role = message["role"]
        check_role(role)
        content = message.get("content")
        if isinstance(content, str):
            if image_refs:
                _add_with_placeholders(document, role, content, images, record, options)
            else:
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
