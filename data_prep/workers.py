"""How `solo-data pack` starts its worker processes.

A fork server: one clean process imports the packing code (torch, transformers) once and forks the
workers from it, so a worker costs no import and none of fork's thread hazards. The command starts
it first thing, so that its imports run beside the main process's own instead of after them.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver


def worker_context():
    """The multiprocessing context of the workers (the fork server, preloading the packing code)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["data_prep.pack"])
    return context


def start_worker_server() -> None:
    """Start the fork server now (idempotent); the workers started later fork from it."""
    worker_context()
    multiprocessing.forkserver.ensure_running()
