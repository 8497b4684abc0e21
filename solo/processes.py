"""Process helpers: liveness (for helpers that must not outlive their starter) and a free local port."""

from __future__ import annotations

import os
import socket


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group of one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
