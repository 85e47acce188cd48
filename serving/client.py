"""A keep-alive JSON client for serving's HTTP API (standard library only), for callers that
are not an event loop: ``memento replay``, the demo, tests and tools.

>>> ServingClient("http://127.0.0.1:8000/api").base_url
'http://127.0.0.1:8000/api'
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import Any

__all__ = ["ServingClient", "ServingNotReady"]


class ServingNotReady(RuntimeError):
    """Serving did not become ready (or could not be reached) in time."""


class ServingClient:
    """A keep-alive JSON client for serving's HTTP API.

    Parameters
    ----------
    base_url
        ``http://host:port`` (a path prefix is kept).
    timeout_s
        Socket timeout of one request.
    """

    def __init__(self, base_url: str, timeout_s: float = 10.0):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"serving URL {base_url!r} must look like http://host:port")
        self.base_url = base_url
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout_s)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """Send one request; returns ``(status, JSON body)``. Reconnects once when a kept-alive
        connection turns out closed; raises ``OSError`` when serving cannot be reached."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, self._prefix + path, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if attempt:
                    raise OSError(f"{method} {self.base_url}{path}: connection lost ({exc})") from exc
                continue
            except (http.client.HTTPException, OSError):
                self.close()
                raise
            if (response.getheader("Connection") or "").lower() == "close":
                self.close()
            try:
                data = json.loads(raw) if raw else {}
            except json.JSONDecodeError:
                data = {"error": raw[:200].decode("utf-8", "replace")}
            return response.status, data if isinstance(data, dict) else {"body": data}
        raise AssertionError("unreachable")

    def wait_ready(self, timeout_s: float, poll_s: float = 0.25) -> dict:
        """Poll ``GET /readyz`` until it answers ready; raises :class:`ServingNotReady` naming
        what was missing (no policy, no cases, unreachable)."""
        deadline = time.monotonic() + timeout_s
        last: str = "no answer yet"
        while True:
            try:
                status, body = self.request("GET", "/readyz")
                if status == 200 and body.get("ready", True):
                    return body
                last = (f"HTTP {status}: policy_version={body.get('policy_version')}, "
                        f"cases={body.get('cases')}")
            except OSError as exc:
                last = f"unreachable ({exc})"
            if time.monotonic() >= deadline:
                raise ServingNotReady(f"serving at {self.base_url} not ready after {timeout_s:.0f} s: {last}")
            time.sleep(poll_s)

    def recommend(self, user_id: str, ts: float, retry_503_s: float = 10.0,
                  context: list[dict] | None = None) -> tuple[int, dict, float]:
        """``POST /v1/recommend``; retries 503 (and lost connections) with backoff for up to
        ``retry_503_s``. Returns ``(status, body, latency of the last attempt in s)``;
        status 0 means serving could not be reached."""
        body: dict[str, Any] = {"user_id": user_id, "ts": ts}
        if context:
            body["context"] = {"recent_items": context}
        deadline = time.monotonic() + retry_503_s
        backoff = 0.05
        while True:
            started = time.perf_counter()
            try:
                status, data = self.request("POST", "/v1/recommend", body)
            except OSError as exc:
                status, data = 0, {"error": str(exc)}
            latency = time.perf_counter() - started
            if status not in (0, 503) or time.monotonic() + backoff > deadline:
                return status, data, latency
            time.sleep(backoff)
            backoff = min(1.0, backoff * 2)
