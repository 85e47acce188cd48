"""A real Prometheus server (Debian's ``prometheus`` package) scraping memento's processes, for
tests and local dashboards.

>>> config = scrape_config({"worker": ["127.0.0.1:9101"]}, interval_s=1)
>>> "job_name: worker" in config
True
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

from harness.processes import ProcessGroup, ManagedProcess, wait_http

__all__ = ["scrape_config", "start_prometheus", "query"]


def scrape_config(jobs: dict[str, list[str]], interval_s: float = 5.0) -> str:
    interval = f"{round(interval_s * 1000)}ms"  # Prometheus durations take integers only
    lines = ["global:", f"  scrape_interval: {interval}", f"  evaluation_interval: {interval}", "scrape_configs:"]
    for job, targets in jobs.items():
        lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: {json.dumps(targets)}"]
    return "\n".join(lines) + "\n"


def start_prometheus(group: ProcessGroup, jobs: dict[str, list[str]], workdir: str | Path, port: int,
                     interval_s: float = 1.0) -> ManagedProcess:
    """Start ``prometheus`` on 127.0.0.1:``port`` scraping ``jobs``; waits until it is ready."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus is not installed (Debian: apt-get install prometheus)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(scrape_config(jobs, interval_s))
    proc = group.start("prometheus", [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{port}"], log_dir=workdir)
    wait_http(f"http://127.0.0.1:{port}/-/ready", timeout=30, group=group)
    return proc


def query(port: int, expr: str) -> list[dict]:
    """Instant query; returns the result vector."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    if body.get("status") != "success":
        raise RuntimeError(f"prometheus query {expr!r} failed: {body}")
    return body["data"]["result"]
