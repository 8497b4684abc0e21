"""The one place that writes outputs safely, for every command (`solo create`, conversion, SFT
exports, `solo-data pack`, checkpoints):

- ``atomic_output_dir``: a directory appears complete or not at all (written into a hidden sibling,
  renamed into place at the end); a failed or killed run never leaves one that looks complete.
- ``check_output_dir`` (= ``check_outside_inputs`` + ``check_replaceable``): ``--overwrite`` replaces only a previous output of the same command
  (recognised by the marker file this module writes into it), never a directory that contains, or
  is inside, one of the command's inputs, and never a plain file.
- ``write_json_atomic`` / ``write_text_atomic``: one file replaced atomically.
- ``read_capped`` / ``read_file_capped``: read at most ``limit`` bytes (+1 to detect more), never an
  unbounded read; ``open_regular_file`` opens only regular files (a FIFO hangs, /dev/zero never ends).
- ``is_disk_full`` / ``no_space_message``: disk-full errors recognised and turned into what the user should do.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

MARKER_FILE = ".solo-output.json"


class OutputError(ValueError):
    """An output path that must not be written (the message says why and what to do)."""


class TooLargeError(ValueError):
    """Input larger than its cap."""


class NotRegularFileError(ValueError):
    """A path that is not a regular file where one is read (a FIFO would hang, /dev/zero never ends)."""


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def read_marker(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a directory this package wrote, or None."""
    try:
        with open(Path(directory) / MARKER_FILE, encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def check_outside_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Raise OutputError if ``out`` is a file, or contains or lies inside one of ``inputs``."""
    target = Path(out).resolve()
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {out} is a file, not a directory; choose a directory path")
    for item in inputs:
        source = Path(item).resolve()
        if _within(source, target):
            raise OutputError(f"output {out} contains the input {item}; choose an output directory outside the inputs")
        if _within(target, source):
            raise OutputError(f"output {out} is inside the input {item}; choose an output directory outside the inputs")


def check_replaceable(out: str | os.PathLike, command: str) -> None:
    """Raise OutputError unless ``out`` is a previous output of ``command`` (carries its marker)."""
    marker = read_marker(out)
    if marker is None or marker.get("command") != command:
        made_by = f"it was written by `{marker.get('command')}`" if marker else "it was not written by this command"
        raise OutputError(
            f"--overwrite refused: {out} is not a previous output of `{command}` ({made_by}); "
            "--overwrite only replaces this command's own outputs — remove it yourself or choose another output"
        )


def check_output_dir(
    out: str | os.PathLike, *, command: str, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False
) -> None:
    """Raise OutputError unless ``out`` may be written by ``command`` (see the module docstring)."""
    check_outside_inputs(out, inputs)
    target = Path(out)
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise OutputError(f"output directory {out} exists and is not empty; choose another or pass --overwrite")
    check_replaceable(target, command)


def write_marker(directory: str | os.PathLike, command: str, **details: Any) -> None:
    """Mark ``directory`` as an output of ``command`` (what ``check_replaceable`` looks for)."""
    write_json_atomic(os.path.join(directory, MARKER_FILE), {"command": command, **details})


@contextmanager
def atomic_output_dir(
    out: str | os.PathLike, *, command: str, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False
) -> Iterator[Path]:
    """Yield a staging directory; on success it gets the marker and replaces ``out`` atomically.

    On any failure (including KeyboardInterrupt) the staging directory is removed and ``out`` is left
    as it was. Disk-full errors are re-raised as OutputError with the path and what to do.
    """
    inputs = list(inputs)
    check_output_dir(out, command=command, inputs=inputs, overwrite=overwrite)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        write_marker(staging, command)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        if target.exists():
            check_output_dir(out, command=command, inputs=inputs, overwrite=overwrite)  # still ours?
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(exc):
            raise OutputError(no_space_message(target.parent)) from exc
        raise


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, also as writers outside Python's I/O report it (safetensors: "... (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return type(exc).__name__ == "SafetensorError" and f"(os error {errno.ENOSPC})" in str(exc)


def no_space_message(path: str | os.PathLike) -> str:
    """What to tell a user whose disk filled up while writing under ``path``."""
    return f"no space left on {path}; free space and run the same command again"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temporary file, fsync, rename)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Replace ``path`` with ``data`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_capped(handle: IO[bytes], limit: int, what: str) -> bytes:
    """Read all of ``handle`` if it holds at most ``limit`` bytes, else raise TooLargeError naming ``what``."""
    chunks, size = [], 0
    while size <= limit:  # a stream may return short reads: loop, but never past limit + 1 bytes
        chunk = handle.read(min(limit + 1 - size, 1 << 24))  # read(n) allocates n bytes up front
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise TooLargeError(f"{what} is larger than {limit:,} bytes")
    return b"".join(chunks)


def open_regular_file(path: str | os.PathLike, what: str) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file (never a FIFO, device or socket).

    The open itself does not block (O_NONBLOCK: a FIFO with no writer would hang a plain open);
    the descriptor is checked with fstat, so a path swapped after a stat cannot slip through.
    """
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise NotRegularFileError(f"{what} {path} is not a regular file (a device, FIFO or socket); "
                                      "only regular files are read")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_file_capped(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, or TooLargeError / NotRegularFileError naming ``what``."""
    with open_regular_file(path, what) as handle:
        return read_capped(handle, limit, f"{what} {path}")
