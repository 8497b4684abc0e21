"""The one place that writes outputs safely, for every command (`solo create`, conversion, SFT
exports, `solo-data pack`, checkpoints):

- ``atomic_output_dir``: a directory appears complete or not at all (written into a hidden sibling,
  renamed into place at the end); a failed or killed run never leaves one that looks complete.
- ``check_output_dir``: ``--overwrite`` replaces only a previous output of the same command
  (recognised by the marker file this module writes into it), never a directory that contains, or
  is inside, one of the command's inputs, and never a plain file.
- ``write_json_atomic`` / ``write_text_atomic``: one file replaced atomically.
- ``read_capped``: read at most ``limit`` bytes (+1 to detect more), never an unbounded read.
- ``no_space_message``: disk-full errors turned into what the user should do.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

MARKER_FILE = ".solo-output.json"


class OutputError(ValueError):
    """An output path that must not be written (the message says why and what to do)."""


class TooLargeError(ValueError):
    """Input larger than its cap."""


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


def check_output_dir(
    out: str | os.PathLike, *, command: str, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False
) -> None:
    """Raise OutputError unless ``out`` may be written by ``command`` (see the module docstring)."""
    target = Path(out).resolve()
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {out} is a file, not a directory; choose a directory path")
    for item in inputs:
        source = Path(item).resolve()
        if _within(source, target):
            raise OutputError(f"output {out} contains the input {item}; choose an output directory outside the inputs")
        if _within(target, source):
            raise OutputError(f"output {out} is inside the input {item}; choose an output directory outside the inputs")
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise OutputError(f"output directory {out} exists and is not empty; choose another or pass --overwrite")
    marker = read_marker(target)
    if marker is None or marker.get("command") != command:
        made_by = f"it was written by `{marker.get('command')}`" if marker else "it was not written by this command"
        raise OutputError(
            f"--overwrite refused: {out} is not a previous output of `{command}` ({made_by}); "
            "--overwrite only replaces this command's own outputs — remove it yourself or choose another output"
        )


def write_marker(directory: str | os.PathLike, command: str, **details: Any) -> None:
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
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise OutputError(no_space_message(target.parent)) from exc
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def no_space_message(path: str | os.PathLike) -> str:
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
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_capped(handle: IO[bytes], limit: int, what: str) -> bytes:
    """Read all of ``handle`` if it holds at most ``limit`` bytes, else raise TooLargeError naming ``what``."""
    data = handle.read(limit + 1)
    if len(data) > limit:
        raise TooLargeError(f"{what} is larger than {limit:,} bytes")
    return data
