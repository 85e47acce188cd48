"""Starting, probing, timing and stopping the server processes the bench measures."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

__all__ = ["wait_ready", "stop_server", "cpu_seconds"]


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

