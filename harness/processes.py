"""Child processes of the demo and the integration tests: the worker, the learner and serving,
each started as its own OS process with ``memento <command>`` and stopped by PID.

>>> group = ProcessGroup()
>>> p = group.start("sleeper", ["python", "-c", "import time; time.sleep(30)"], log_dir="/tmp")
>>> p.alive()
True
>>> group.stop_all()
{'sleeper': -15}
>>> p.alive()
False
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ManagedProcess", "ProcessGroup", "memento_command", "wait_http"]


def memento_command(*args: str) -> list[str]:
    """The command line that runs ``memento ARGS`` with this interpreter."""
    return [sys.executable, "-m", "cli.main", *args]


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(10)
        return self.popen.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """Processes started together and stopped together, newest first."""

    processes: list[ManagedProcess] = field(default_factory=list)

    def start(self, name: str, command: list[str], *, env: dict[str, str] | None = None,
              log_dir: str | Path) -> ManagedProcess:
        log_path = Path(log_dir, f"{name}.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        proc = ManagedProcess(name, popen, log_path)
        self.processes.append(proc)
        return proc

    def check(self) -> None:
        """Raise if a process exited on its own, with the tail of its log."""
        for proc in self.processes:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} (pid {proc.pid}) exited with code {proc.popen.returncode}:\n"
                                   f"{proc.log_tail()}")

    def stop_all(self, timeout: float = 20.0) -> dict[str, int | None]:
        codes = {}
        for proc in reversed(self.processes):
            codes[proc.name] = proc.stop(timeout)
        return codes

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def wait_http(url: str, *, timeout: float, group: ProcessGroup | None = None, expect_status: int = 200) -> bytes:
    """Poll ``url`` until it answers ``expect_status``; returns the body."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if group is not None:
            group.check()
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == expect_status:
                    return resp.read()
                last = resp.status
        except urllib.error.HTTPError as exc:
            last = f"{exc.code} {exc.read()[:200]!r}"
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer {expect_status} within {timeout:.0f}s (last: {last})")
