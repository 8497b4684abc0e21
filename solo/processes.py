"""Process helpers: liveness (for helpers that must not outlive their starter), a free local port,
and the graceful stop of the training loops (SIGTERM or the launcher's death: finish the step, save, exit)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

logger = logging.getLogger(__name__)


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


class GracefulStop:
    """A training loop's stop request. ``requested`` turns true on SIGTERM (``sigterm=True``) or once
    the launcher is gone; the loop then finishes its step, saves a checkpoint and exits.

    The launcher is the parent (torchrun, accelerate) or the launch script named by
    ``SOLO_LAUNCHER_PID``: killed with kill -9 it cannot signal its workers, so a thread watches for
    it (every ``interval`` seconds) and no worker goes on training unattended. Use as a context
    manager: on exit the watch ends and the previous SIGTERM handler is back."""

    def __init__(self, sigterm: bool = True, interval: float = 1.0):
        self.requested = False
        self._sigterm, self._interval = sigterm, interval
        self._done = threading.Event()
        self._previous_handler = None

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def _watch(self, parent: int, launcher: int) -> None:
        while not self._done.wait(self._interval):
            if os.getppid() != parent or (launcher and process_gone(launcher)):
                logger.warning("the launcher is gone: finishing this step, saving and stopping")
                self.requested = True
                return

    def __enter__(self) -> "GracefulStop":
        if self._sigterm:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        launcher = int(os.environ.get("SOLO_LAUNCHER_PID", "0") or 0)
        threading.Thread(target=self._watch, args=(os.getppid(), launcher), daemon=True, name="launcher-watch").start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


def ignore_sigterm(_worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: workers share the job's process group, so a scheduler's SIGTERM
    reaches them too; they must live on while the trainer finishes its step and saves."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
