"""Process liveness, for helpers that must not outlive the process that started them."""

from __future__ import annotations

import os


def process_gone(pid: int) -> bool:
    """True if ``pid`` has exited (also when it is a zombie: killed, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return False
