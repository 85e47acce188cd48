"""The load generator, run in a process of its own (``python -m harness.serving_bench drive``):
open loop at a fixed rate (latency from each request's scheduled send time) or flat out over a
number of keep-alive HTTP/1.1 connections, with pre-encoded requests."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from harness.serving_bench.workload import request_bodies
from memento.measure import percentile

__all__ = ["drive", "summarise", "driver_process", "run_driver", "wait_driver"]

ROOT = Path(__file__).resolve().parents[2]
_VERSION = re.compile(rb'"policy_version":\s*(-?\d+)')


class _Connections:
    """Keep-alive HTTP/1.1 connections: an idle one is reused, else a new one is opened."""

    def __init__(self, host: str, port: int, limit: int):
        self.host, self.port, self.limit = host, port, limit
        self.idle: list = []
        self.opened = 0
        self.freed = asyncio.Event()

    async def get(self):
        while True:
            if self.idle:
                return self.idle.pop()
            if self.opened < self.limit:
                self.opened += 1
                try:
                    return await asyncio.open_connection(self.host, self.port)
                except OSError:
                    self.opened -= 1
                    raise
            self.freed.clear()
            await self.freed.wait()

    def put(self, conn, reusable: bool) -> None:
        if reusable:
            self.idle.append(conn)
        else:
            self.opened -= 1
            conn[1].close()
        self.freed.set()


async def _exchange(conn, request: bytes) -> tuple[int, bytes, bool]:
    reader, writer = conn
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"content-length:")
    length = int(lower[at + 15:lower.index(b"\r\n", at)]) if at >= 0 else 0
    body = await reader.readexactly(length) if length else b""
    return status, body, b"connection: close" not in lower


async def _drive(url: str, rate: float, duration: float, concurrency: int, bodies: list[bytes]) -> list:
    host, _, port = url.removeprefix("http://").partition(":")
    requests = [(f"POST /v1/recommend HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    pool = _Connections(host, int(port), max(concurrency, 512 if rate > 0 else concurrency))
    log: list = []

    async def one(i: int, due: float) -> None:
        conn = None
        try:
            conn = await pool.get()
            status, body, reusable = await _exchange(conn, requests[i % len(requests)])
            pool.put(conn, reusable)
            conn = None
            match = _VERSION.search(body)
            log.append((time.time(), time.perf_counter() - due, status, int(match.group(1)) if match else None))
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            if conn is not None:
                pool.put(conn, False)
            log.append((time.time(), time.perf_counter() - due, repr(exc), None))

    t0 = time.perf_counter()
    stop_at = t0 + duration
    if rate > 0:  # open loop: request i is due at t0 + i / rate, whatever the answers do
        tasks, i = [], 0
        while True:
            now = time.perf_counter()
            while t0 + i / rate <= now:
                tasks.append(asyncio.ensure_future(one(i, t0 + i / rate)))
                i += 1
            if t0 + i / rate >= stop_at:
                break
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
    else:  # flat out: closed loop over `concurrency` connections
        async def client(c: int) -> None:
            n = c
            while time.perf_counter() < stop_at:
                await one(n, time.perf_counter())
                n += concurrency
        await asyncio.gather(*(client(c) for c in range(concurrency)))
    for reader_writer in pool.idle:
        reader_writer[1].close()
    return log


def drive(url: str, rate: float, duration: float, concurrency: int = 32, items: int = 20_000,
          seed: int = 0) -> list:
    """[(wall time done, latency s, status, policy version)] of every request sent."""
    bodies = request_bodies(2048, items, seed)
    return asyncio.run(_drive(url, rate, duration, concurrency, bodies))


def summarise(log: list, duration: float) -> dict:
    ok = np.array([lat for _, lat, status, _ in log if status == 200], dtype=np.float64) * 1e3
    errors = sum(1 for _, _, status, _ in log if status != 200)
    # Answers per second of wall time from the first send to the last answer (an overloaded
    # server stretches this past the phase's duration).
    span = max(t for t, _, _, _ in log) - min(t - lat for t, lat, _, _ in log) if log else duration
    out = {"requests": len(log), "errors": errors, "throughput_per_s": len(ok) / max(span, 1e-9)}
    if len(ok):
        out.update({"p50_ms": float(percentile(ok, 50)), "p95_ms": float(percentile(ok, 95)),
                    "p99_ms": float(percentile(ok, 99)), "max_ms": float(ok.max())})
    return out


def driver_process(url: str, rate: float, duration: float, concurrency: int, out: Path,
                    items: int = 20_000, seed: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.serving_bench", "drive", "--url", url, "--rate", str(rate),
                             "--duration", str(duration), "--concurrency", str(concurrency), "--out", str(out),
                             "--items", str(items), "--seed", str(seed)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def run_driver(url: str, rate: float, duration: float, concurrency: int, out: Path, items: int = 20_000,
                seed: int = 0) -> list:
    proc = driver_process(url, rate, duration, concurrency, out, items, seed)
    if wait_driver(proc, duration + 120) != 0:
        raise RuntimeError(f"load generator exited with {proc.returncode}")
    return json.loads(out.read_text())


def wait_driver(proc: subprocess.Popen, timeout: float) -> int:
    """The load generator's exit code; killed (by PID) if it outlives ``timeout``."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"load generator still running after {timeout:.0f} s; killed") from None

