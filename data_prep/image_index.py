"""`--image-index`: images of interleaved documents (OBELICS, MMC4) found by URL in img2dataset output.

img2dataset writes, for each shard `NNNNN`, a parquet file with one row per URL it tried (`url`,
`key`, `status`, `error_message`, ...) and the images themselves in one of its output layouts:
`NNNNN.tar` (webdataset: member `KEY.jpg`), `NNNNN/KEY.jpg` (files), or the parquet itself (an
image column named after `--encode_format`: jpg, png, webp). The index maps each URL to where its
image lies (a file region, or a parquet cell) or to why it has none (the download failed upstream).

Web-scale sources hold hundreds of millions of URLs, so the index is an SQLite file built once per
run by the main process (`build_image_index`, in the run's work folder) from the parquet files and
the shard headers (tar headers or folder listings; no image is read to build it); the workers
look URLs up in it read-only (`lookup`), sharing the OS page cache instead of a copy each.
"""

from __future__ import annotations

import os
import sqlite3
import tarfile
from functools import lru_cache
from typing import Any, Iterator, NamedTuple

INDEX_FILE = "image-index.sqlite"


class ParquetImage(NamedTuple):
    """An image stored in img2dataset's parquet output: (file, row group, row in the group, column)."""

    path: str
    row_group: int
    row: int
    column: str


def _entries(folder: str) -> Iterator[tuple]:
    """(url, path, offset, size, row group, row, column, reason) for every URL in img2dataset output."""
    import pyarrow.parquet as pq

    from .sources import IMAGE_EXTENSIONS, _tar_key, _tar_members, _walk_files

    parquets = [path for path in _walk_files(folder) if path.endswith(".parquet")]
    if not parquets:
        raise FileNotFoundError(f"--image-index {folder!r} holds no img2dataset .parquet files (url, key, status)")
    for path in parquets:
        stem = path[: -len(".parquet")]
        located: dict[str, tuple[str, int, int]] = {}  # key → (file, offset, size)
        if os.path.isfile(stem + ".tar"):
            with tarfile.open(stem + ".tar", "r:") as archive:
                for name, ref in _tar_members(archive, stem + ".tar", 0, 1 << 62):
                    key, ext = _tar_key(name)
                    if ext in IMAGE_EXTENSIONS:
                        located[os.path.basename(key)] = (ref.path, ref.offset, ref.size)
        elif os.path.isdir(stem):
            for name in os.listdir(stem):
                key, ext = _tar_key(name)
                if ext in IMAGE_EXTENSIONS:
                    member = os.path.abspath(os.path.join(stem, name))
                    located[key] = (member, 0, os.path.getsize(member))
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if "url" not in names:
            raise ValueError(f"--image-index: {path} has no 'url' column; is it img2dataset output?")
        image_column = next((name for name in IMAGE_EXTENSIONS if name in names), None)
        wanted = [name for name in ("url", "key", "status", "error_message") if name in names]
        for group in range(parquet.num_row_groups):
            rows = parquet.read_row_group(group, columns=wanted).to_pylist()
            present = (parquet.read_row_group(group, columns=[image_column]).column(0).is_valid().to_pylist()
                       if image_column else [False] * len(rows))
            for number, (row, has_bytes) in enumerate(zip(rows, present)):
                if has_bytes:
                    yield row["url"], os.path.abspath(path), None, None, group, number, image_column, None
                elif row.get("key") in located and row.get("status", "success") == "success":
                    yield (row["url"], *located[row["key"]], None, None, None, None)
                else:
                    reason = (f"download failed upstream ({row.get('status') or 'no image'}"
                              + (f": {row['error_message']}" if row.get("error_message") else "") + ")")
                    yield row["url"], None, None, None, None, None, None, reason


def build_image_index(folder: str, work_dir: str) -> str:
    """Write the URL index of img2dataset output `folder` into `work_dir` (atomically; kept for a
    resumed run) and return its path. A URL listed twice keeps its first image."""
    path = os.path.join(work_dir, INDEX_FILE)
    if os.path.exists(path):
        return path
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--image-index {folder!r} is not a folder (give img2dataset's output folder)")
    temporary = f"{path}.tmp{os.getpid()}"
    if os.path.exists(temporary):
        os.remove(temporary)
    connection = sqlite3.connect(temporary)
    try:
        connection.execute("CREATE TABLE images (url TEXT PRIMARY KEY, path TEXT, file_offset INTEGER, "
                           "file_size INTEGER, row_group INTEGER, group_row INTEGER, column_name TEXT, reason TEXT)")
        # A success wins over a failure of the same URL; otherwise the first row stays.
        connection.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(url) DO UPDATE SET "
                               "path = excluded.path, file_offset = excluded.file_offset, "
                               "file_size = excluded.file_size, row_group = excluded.row_group, "
                               "group_row = excluded.group_row, "
                               "column_name = excluded.column_name, reason = NULL "
                               "WHERE images.reason IS NOT NULL AND excluded.reason IS NULL",
                               _entries(os.path.abspath(folder)))
        connection.commit()
    finally:
        connection.close()
    os.replace(temporary, path)
    return path


@lru_cache(maxsize=4)
def _connect(database: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{database}?mode=ro", uri=True, check_same_thread=False)


def lookup(database: str, url: str) -> Any:
    """url → TarMemberRef (a file region) | ParquetImage | str (why there is no image) | None (not listed)."""
    from .sources import TarMemberRef

    row = _connect(database).execute("SELECT path, file_offset, file_size, row_group, group_row, column_name, "
                                     "reason FROM images WHERE url = ?", (url,)).fetchone()
    if row is None:
        return None
    path, offset, size, group, number, column, reason = row
    if reason is not None:
        return reason
    if column is not None:
        return ParquetImage(path, group, number, column)
    return TarMemberRef(path, offset, size)


@lru_cache(maxsize=4)
def standalone_index(folder: str) -> str:
    """The index of `folder` for a reader outside a pack run (no work folder): built once per process
    in a temporary folder that is removed at exit."""
    import atexit
    import shutil
    import tempfile

    work_dir = tempfile.mkdtemp(prefix="solo-image-index-")
    atexit.register(shutil.rmtree, work_dir, True)
    return build_image_index(folder, work_dir)


@lru_cache(maxsize=8)
def _row_group(path: str, group: int, column: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0)


def read_parquet_image(ref: ParquetImage) -> bytes:
    return _row_group(ref.path, ref.row_group, ref.column)[ref.row].as_py()
