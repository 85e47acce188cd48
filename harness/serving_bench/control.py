"""Starting, probing, timing and stopping the server processes the bench measures, and what the
bench's own two servers (baseline, reference) share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

__all__ = ["start_server", "wait_ready", "stop_server", "cpu_seconds", "serve_workers", "bad_request"]


def start_server(command: list[str], env: dict, ready_timeout: float = 600) -> tuple[subprocess.Popen, str]:
    """``python -m <command> --port P`` on a free port P, with ``env`` added to the environment,
    once it answers ``/readyz``: (the process, its URL). Stopped again if it never gets ready."""
    from harness.broker import free_port
    from harness.serving_bench.load import ROOT

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", *command, "--port", str(port)], cwd=ROOT,
                              env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
    try:
        wait_ready(url, server, ready_timeout)
    except BaseException:
        stop_server(server)
        raise
    return server, url


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    """Until ``url`` answers ``/readyz`` (:meth:`serving.client.ServingClient.wait_ready`, in
    short rounds), failing at once if the ``server`` process exits first."""
    from serving.client import ServingClient, ServingNotReady

    client = ServingClient(url, timeout_s=5.0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode} before it was ready")
            try:
                client.wait_ready(timeout_s=min(2.0, max(0.0, deadline - time.monotonic())), poll_s=0.5)
                return
            except ServingNotReady as exc:
                if time.monotonic() >= deadline:
                    raise RuntimeError(str(exc)) from None
    finally:
        client.close()


def stop_server(server: subprocess.Popen | None) -> None:
    if server is not None and server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its direct children (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def serve_workers(worker: Callable[[int, bool, int], None], port: int, workers: int) -> None:
    """Run ``worker(port, reuse_port, worker_index)`` in this process, or in ``workers`` spawned
    ones sharing the port (:func:`serving.cli.run_workers`), until SIGTERM."""
    from serving.cli import run_workers

    if workers == 1:
        worker(port, False, 0)
    else:
        run_workers(worker, (port, True), workers)


def bad_request(body) -> dict | None:
    """Why the bench's servers refuse a request body (as serving does a body without
    ``user_id``), None when they take it.

    >>> bad_request({"user_id": "u"}), bad_request([])
    (None, {'error': "field 'user_id' is required"})
    """
    if not isinstance(body, dict) or not isinstance(body.get("user_id"), str):
        return {"error": "field 'user_id' is required"}
    return None
