"""Independent subprocesses started at once. A single-process run (training, conversion, a CLI that
fails at its checks) spends most of its time importing torch and friends on one CPU core, so on a
2-core machine two of them together take about the time of one."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile


def free_ports(count: int) -> list[int]:
    """`count` different free local ports (all bound at once while they are picked)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def run_together(commands: list[list[str]], envs: list[dict], timeout: float = 600,
                 **popen) -> list[subprocess.CompletedProcess]:
    """`subprocess.run(command, env=env, capture_output=True, text=True, **popen)` for every command and
    its environment (each its own: a training process binds MASTER_PORT), all started before any is
    waited for. Output goes to files, so a chatty process never blocks on a full pipe."""
    assert len(envs) == len(commands)
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
    procs = [subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True, **popen)
             for command, env, (out, err) in zip(commands, envs, files)]
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for command, proc, (out, err) in zip(commands, procs, files):
        out.seek(0), err.seek(0)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results
