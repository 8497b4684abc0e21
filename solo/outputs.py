"""The one place that writes outputs safely, for every command (`solo create`, conversion, SFT
exports, `solo-data pack`, `solo demo`, checkpoints):

- ``output_lock``: the one output-directory rule: a command takes an exclusive lock on its output
  (``.NAME.lock`` beside it, so it survives the output being replaced) *before* it reads, creates,
  replaces or deletes anything there; a second run on the same output is refused untouched. The
  OS releases the lock when its holder dies (kill -9), so a crash never blocks the rerun.
- ``atomic_output_dir``: a directory appears complete or not at all (written into a hidden sibling,
  renamed into place at the end, under ``output_lock``); a failed or killed run never leaves one that
  looks complete, and the staging folders a killed run left behind are removed by the next run.
- ``check_output_dir`` (= ``check_outside_inputs`` + ``check_replaceable``): ``--overwrite`` replaces
  only a previous output of the same command
  (recognised by the marker file this module writes into it), never a directory that contains, or
  is inside, one of the command's inputs, and never a plain file.
- ``write_json_atomic`` / ``write_text_atomic``: one file replaced atomically.
- ``read_capped`` / ``read_file_capped``: read at most ``limit`` bytes (+1 to detect more), never an
  unbounded read; ``open_regular_file`` opens only regular files (a FIFO hangs, /dev/zero never ends).
- ``is_disk_full`` / ``no_space_message``: disk-full errors recognised and turned into what the user should do.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

MARKER_FILE = ".solo-output.json"
STAGING_INFIX, OLD_INFIX = ".tmp-", ".old-"  # hidden siblings of an output: `.NAME.tmp-XXXX`, `.NAME.old-XXXX`


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


def claim_output_dir(out: str | os.PathLike, command: str) -> None:
    """Make ``out`` the output a resumable ``command`` (SFT, the demo) works in: created and marked
    when it is missing or empty, accepted when it carries that command's marker (a rerun resumes
    there), else OutputError: a command never writes into, nor deletes from, a folder it did not
    create. Call it under ``output_lock``."""
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {out} is a file, not a directory; choose a directory path")
    if target.is_dir() and any(target.iterdir()):
        marker = read_marker(target)
        if marker is None or marker.get("command") != command:
            made_by = f"it holds an output of `{marker.get('command')}`" if marker else "it was not created by it"
            raise OutputError(f"{out} is not empty and is not an output of `{command}` ({made_by}); "
                              "choose a new or empty directory")
        return
    target.mkdir(parents=True, exist_ok=True)
    write_marker(target, command)


def write_marker(directory: str | os.PathLike, command: str, **details: Any) -> None:
    """Mark ``directory`` as an output of ``command`` (what ``check_replaceable`` looks for)."""
    write_json_atomic(os.path.join(directory, MARKER_FILE), {"command": command, **details})


def _lock_path(out: str | os.PathLike) -> Path:
    target = Path(out).resolve()  # one lock whatever path (relative, through a link) names the output
    return target.parent / f".{target.name}.lock"


@contextmanager
def output_lock(out: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold the exclusive lock on the output ``out`` (see the module docstring) for the block.

    Raises OutputError at once, having touched nothing, when another live process holds it. The lock
    file is removed on release; a holder re-checks after locking that the file it locked is still
    the one at the path, so a lock removed by its previous holder in between is never shared.
    """
    path = _lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(200).strip() or "another process"
            handle.close()
            raise OutputError(f"{out} is in use by a running `{holder}`; two runs must never write the same "
                              "output: wait for it to finish (or stop it), or choose another output") from None
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # its holder removed that file while we waited for it: lock the new one
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{command} (pid {os.getpid()} on {socket.gethostname()})\n")
        handle.flush()
        yield
    finally:
        try:
            os.unlink(path)  # still holding it: nobody can have taken it since
        finally:
            handle.close()


def remove_stale_staging(out: str | os.PathLike, command: str) -> None:
    """Remove the staging folders that killed runs of ``command`` left beside ``out`` (call it under
    ``output_lock``). Only folders carrying this module's marker for ``command`` are touched; an old
    output a kill left parked (replaced half-way) is moved back into place if ``out`` is missing."""
    target = Path(out).resolve()
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        if not entry.name.startswith(f".{target.name}.") or entry.is_symlink() or not entry.is_dir():
            continue
        rest = entry.name[len(target.name) + 1:]
        if rest.startswith(STAGING_INFIX):
            owner = entry
        elif rest.startswith(OLD_INFIX) and [child.name for child in entry.iterdir()] == [target.name]:
            owner = entry / target.name
            if not (owner / MARKER_FILE).is_file():
                continue
            if not os.path.lexists(target):  # killed between the two renames: put the old output back
                os.replace(owner, target)
                entry.rmdir()
                continue
        else:
            continue
        marker = read_marker(owner)
        if marker is not None and marker.get("command") == command:
            shutil.rmtree(entry)


@contextmanager
def atomic_output_dir(
    out: str | os.PathLike, *, command: str, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False
) -> Iterator[Path]:
    """Yield a staging directory; on success it gets the marker and replaces ``out`` atomically.

    All of it runs under ``output_lock``. On any failure (including KeyboardInterrupt) the staging
    directory is removed and ``out`` is left as it was. Disk-full errors are re-raised as
    OutputError with the path and what to do.
    """
    inputs = list(inputs)
    check_outside_inputs(out, inputs)
    target = Path(out)
    with output_lock(out, command):
        remove_stale_staging(out, command)  # first: it may put back an output a kill left parked
        check_output_dir(out, command=command, inputs=inputs, overwrite=overwrite)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_INFIX}", dir=target.parent))
        try:
            write_marker(staging, command)  # first: a killed run's staging folder is recognised as ours
            yield staging
            write_marker(staging, command)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_INFIX}", dir=target.parent))
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


def is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain of ``exc``, also as writers outside Python's I/O report it
    (safetensors: "... (os error 28)"; megatron-core's checkpoint writers re-raise a worker's OSError
    as text: "Worker failure: [Errno 28] No space left on device")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text = str(exc)
        if f"(os error {errno.ENOSPC})" in text or f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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
