"""`--image-index`: images of interleaved documents (OBELICS, MMC4) found by URL in img2dataset output.

img2dataset writes, for each shard `NNNNN`, a parquet file with one row per URL it tried (`url`,
`key`, `status`, `error_message`, ...) and the images themselves in one of its output layouts:
`NNNNN.tar` (webdataset: member `KEY.jpg`), `NNNNN/KEY.jpg` (files), or the parquet itself (an
image column named after `--encode_format`: jpg, png, webp). The index maps each URL to where its
image lies (a file region, read later like any tar member) or to why it has none (the download
failed upstream). It is built once per process, on first use, from the parquet files and the
shard headers (tar headers or folder listings; no image is read to build it).
"""

from __future__ import annotations

import os
import tarfile
from functools import lru_cache
from typing import Any, NamedTuple


class ParquetImage(NamedTuple):
    """An image stored in img2dataset's parquet output: (file, row group, row in the group, column)."""

    path: str
    row_group: int
    row: int
    column: str


@lru_cache(maxsize=4)
def load_image_index(folder: str) -> dict[str, Any]:
    """url → TarMemberRef | ParquetImage | str (why there is no image) for an img2dataset output folder."""
    import pyarrow.parquet as pq

    from .sources import IMAGE_EXTENSIONS, TarMemberRef, _tar_key, _tar_members, _walk_files

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--image-index {folder!r} is not a folder (give img2dataset's output folder)")
    index: dict[str, Any] = {}
    parquets = [path for path in _walk_files(folder) if path.endswith(".parquet")]
    if not parquets:
        raise FileNotFoundError(f"--image-index {folder!r} holds no img2dataset .parquet files (url, key, status)")
    for path in parquets:
        stem = path[: -len(".parquet")]
        located: dict[str, Any] = {}
        if os.path.isfile(stem + ".tar"):
            with tarfile.open(stem + ".tar", "r:") as archive:
                for name, value in _tar_members(archive, stem + ".tar", 0, 1 << 62):
                    key, ext = _tar_key(name)
                    if ext in IMAGE_EXTENSIONS:
                        located[os.path.basename(key)] = value
        elif os.path.isdir(stem):
            for name in os.listdir(stem):
                key, ext = _tar_key(name)
                if ext in IMAGE_EXTENSIONS:
                    member = os.path.join(stem, name)
                    located[key] = TarMemberRef(os.path.abspath(member), 0, os.path.getsize(member))
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        image_column = next((name for name in IMAGE_EXTENSIONS if name in names), None)
        wanted = [name for name in ("url", "key", "status", "error_message") if name in names]
        if "url" not in wanted:
            raise ValueError(f"--image-index: {path} has no 'url' column; is it img2dataset output?")
        for group in range(parquet.num_row_groups):
            rows = parquet.read_row_group(group, columns=wanted).to_pylist()
            present = (parquet.read_row_group(group, columns=[image_column]).column(0).is_valid().to_pylist()
                       if image_column else [False] * len(rows))
            for number, (row, has_bytes) in enumerate(zip(rows, present)):
                url = row["url"]
                if has_bytes:
                    index[url] = ParquetImage(os.path.abspath(path), group, number, image_column)
                elif row.get("key") in located and row.get("status", "success") == "success":
                    index[url] = located[row["key"]]
                else:
                    index.setdefault(url, f"download failed upstream ({row.get('status') or 'no image'}"
                                          + (f": {row['error_message']}" if row.get("error_message") else "") + ")")
    return index


@lru_cache(maxsize=8)
def _row_group(path: str, group: int, column: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0)


def read_parquet_image(ref: ParquetImage) -> bytes:
    return _row_group(ref.path, ref.row_group, ref.column)[ref.row].as_py()
