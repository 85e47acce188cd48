"""The deployment files under deploy/ against the code and against each other.

* Prometheus: ``promtool check config``, ``promtool check rules`` and ``promtool test rules``
  (skipped only when ``promtool`` is not on PATH; CI installs Debian's prometheus package, which
  has it); every alert has ``for:``, a severity and a runbook line in docs/operations.md.
* Every metric name in the rules and in the Grafana dashboard is one the code exports (read from
  the metric registries of the worker, learner, serving and case bank modules).
* The dashboard JSON is exactly what deploy/grafana/make_dashboard.py writes.
* The Kubernetes manifests and the compose file: limits, probes, non-root security contexts, no
  ``:latest`` image, a PodDisruptionBudget for serving, Kafka's log directory on its volume, and
  only ``MEMENTO_*`` variables the code reads (YAML read with PyYAML, a test dependency).
* The Dockerfile: a non-root user, torch from the CPU index alone, a build-context ignore file.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES_DIR = DEPLOY / "prometheus" / "rules"
RULE_TESTS_DIR = DEPLOY / "prometheus" / "tests"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "memento.json"
MAKE_DASHBOARD = DEPLOY / "grafana" / "make_dashboard.py"
K8S = DEPLOY / "k8s" / "memento.yaml"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
OPERATIONS = ROOT / "docs" / "operations.md"

# Metric-name prefixes the code exports (its own, and prometheus_client's process and GC
# collectors in the default registry); any PromQL identifier with one of these must exist.
CODE_PREFIXES = ("memento_", "process_", "python_")


# -- helpers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH (Debian/Ubuntu: apt-get install prometheus; CI installs it)")
    return path


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def _rule_files() -> list[Path]:
    files = sorted(RULES_DIR.glob("*.yml"))
    assert files, f"no rule files in {RULES_DIR}"
    return files


def _all_rules() -> tuple[dict, ...]:
    """Each rule of the rule files: ``kind`` (alert or record), ``name``, ``expr``, ``for``,
    ``severity``, ``annotations``."""
    out = []
    for path in _rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            for r in group["rules"]:
                kind = "alert" if "alert" in r else "record"
                out.append({"kind": kind, "name": r[kind], "expr": str(r["expr"]), "for": r.get("for"),
                            "severity": (r.get("labels") or {}).get("severity"),
                            "annotations": r.get("annotations") or {}})
    return tuple(out)


def _load_yaml(path: Path) -> list:
    """Every document of a YAML file."""
    return list(yaml.safe_load_all(path.read_text()))


_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def _promql_names(expr: str) -> set[str]:
    """Identifiers of a PromQL expression that are metric names: the code's prefixes, or
    recording-rule names (they hold a colon). String literals (label values) are left out."""
    idents = set(_IDENT.findall(_STRING.sub('""', expr)))
    return {i for i in idents if ":" in i or i.startswith(CODE_PREFIXES)}


@functools.lru_cache(maxsize=None)
def _code_metric_names() -> frozenset[str]:
    """Every sample name the processes export, from the metric registries themselves: the stream
    worker's and the case bank's (default registry), serving's and the learner's (their own)."""
    import memory_store.metrics  # noqa: F401  (registers the case-bank metrics)
    import streams.app  # noqa: F401  (registers the worker's metrics)
    from learner.service import LearnerMetrics
    from prometheus_client import REGISTRY
    from serving.metrics import ServingMetrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created", ""), "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
                "info": ("_info",), "stateset": ("",), "gauge": ("",), "unknown": ("",)}
    names = set()
    for registry in (REGISTRY, ServingMetrics().registry, LearnerMetrics().registry):
        for family in registry.collect():
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
            names.update(s.name for s in family.samples)
    return frozenset(names)


def _dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


@functools.lru_cache(maxsize=None)
def _known_env_names() -> frozenset[str]:
    """The MEMENTO_* variables the code reads: Settings (from_env / to_env) and every literal
    MEMENTO_ name in the packages' source (the CLIs' own variables)."""
    from memento.config import SECRET_FIELDS, Settings

    names = set(Settings().to_env()) | {f"MEMENTO_{f.name.upper()}" for f in fields(Settings)}
    names |= {f"MEMENTO_{name.upper()}_FILE" for name in SECRET_FIELDS}   # a secret may come from a file
    for package in ("memento", "memory_store", "streams", "learner", "serving", "evaluation", "harness", "cli"):
        for path in (ROOT / package).rglob("*.py"):
            names.update(re.findall(r"\bMEMENTO_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    return frozenset(names)


def _alerts_section() -> str:
    text = OPERATIONS.read_text()
    assert "\n## Alerts\n" in text, "docs/operations.md has no '## Alerts' section"
    section = text.split("\n## Alerts\n", 1)[1]
    return section.split("\n## ", 1)[0]


# -- promtool ------------------------------------------------------------------------------------

def test_promtool_check_config(promtool):
    out = _run([promtool, "check", "config", str(PROMETHEUS_CONFIG.relative_to(ROOT))])
    assert out.returncode == 0, out.stdout + out.stderr
    # the config loads the rule files (promtool checks them as part of the config)
    assert "rule files found" in out.stdout + out.stderr and " 0 rule files found" not in out.stdout + out.stderr


def test_promtool_check_rules(promtool):
    out = _run([promtool, "check", "rules", *(str(p.relative_to(ROOT)) for p in _rule_files())])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_test_rules(promtool):
    tests = sorted(RULE_TESTS_DIR.glob("*.yml"))
    assert tests, f"no rule unit tests in {RULE_TESTS_DIR}"
    out = _run([promtool, "test", "rules", *(str(p.relative_to(ROOT)) for p in tests)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


# -- the rules themselves ------------------------------------------------------------------------

def test_prometheus_config_loads_every_rule_file():
    text = PROMETHEUS_CONFIG.read_text()
    patterns = re.findall(r"^\s*-\s*(\S+\.ya?ml)\s*$", text.split("rule_files:", 1)[1].split("scrape_configs:", 1)[0],
                          re.M)
    assert patterns, "prometheus.yml has no rule_files"
    loaded = {p for pattern in patterns for p in PROMETHEUS_CONFIG.parent.glob(pattern)}
    assert set(_rule_files()) <= loaded


def test_alerts_have_for_severity_and_runbook():
    alerts = [r for r in _all_rules() if r["kind"] == "alert"]
    assert len(alerts) >= 10
    section = _alerts_section()
    for a in alerts:
        assert a["for"], f"{a['name']}: no 'for:'"
        assert a["severity"] in ("critical", "warning", "info"), f"{a['name']}: severity {a['severity']!r}"
        notes = a["annotations"]
        assert notes.get("summary") and notes.get("description"), f"{a['name']}: summary and description"
        assert any(f"docs/operations.md, Alerts, {a['name']}" in str(v) for v in notes.values()), \
            f"{a['name']}: no runbook reference"
        assert f"**{a['name']}**" in section, f"{a['name']} has no line in docs/operations.md '## Alerts'"
    documented = set(re.findall(r"\*\*(Memento\w+)\*\*", section))
    assert documented == {a["name"] for a in alerts}, "docs/operations.md '## Alerts' and the rules differ"


def test_every_alert_has_a_unit_test_where_it_fires():
    """Each alert appears in the promtool tests with an expected firing alert (the tests also
    hold cases where it does not fire)."""
    text = "\n".join(p.read_text() for p in sorted(RULE_TESTS_DIR.glob("*.yml")))
    fired = set()
    for block in re.split(r"\n\s*- eval_time:", text):
        m = re.search(r"alertname:\s*(\w+)", block)
        if m and re.search(r"exp_alerts:\s*\n\s*- ", block):
            fired.add(m[1])
    missing = {r["name"] for r in _all_rules() if r["kind"] == "alert"} - fired
    assert not missing, f"alerts never expected to fire in {RULE_TESTS_DIR}: {sorted(missing)}"


# -- metric names ----------------------------------------------------------------------------------

def test_code_metric_names_are_collected():
    names = _code_metric_names()
    for expected in ("memento_stream_consumer_lag", "memento_stream_stalls_total", "memento_serving_policy_version",
                     "memento_serving_request_seconds_bucket", "memento_learner_checkpoint_version",
                     "memento_casebank_wal_failed", "memento_learner_transitions_total"):
        assert expected in names


def test_rule_metric_names_exist_in_code():
    code = _code_metric_names()
    rules = _all_rules()
    recorded = {r["name"] for r in rules if r["kind"] == "record"}
    used = set()
    for r in rules:
        assert r["expr"], f"{r['name']}: no expr read"
        names = _promql_names(r["expr"])
        assert names & (code | recorded), f"{r['name']}: names no metric ({r['expr']!r})"
        used |= names
        for name in names:
            if ":" in name:
                assert name in recorded, f"{r['name']}: {name} is not a recording rule"
            else:
                assert name in code, f"{r['name']}: {name} is not a metric the code exports"
    # what the alerts were asked to watch
    for required in ("memento_stream_consumer_lag", "memento_stream_stalls_total", "memento_serving_policy_version",
                     "memento_learner_checkpoint_version", "memento_serving_reload_failures_total",
                     "memento_stream_dead_letters_total", "memento_stream_transitions_total",
                     "memento_serving_request_seconds_bucket", "memento_serving_thread_alive",
                     "memento_casebank_wal_failed"):
        assert required in used, f"no rule uses {required}"


def test_dashboard_metric_names_exist_in_code():
    code = _code_metric_names()
    exprs = _dashboard_exprs()
    assert exprs
    for expr in exprs:
        names = _promql_names(expr)
        assert names, f"dashboard query names no metric: {expr!r}"
        unknown = names - code
        assert not unknown, f"dashboard query {expr!r} uses {sorted(unknown)}, which the code does not export"


def test_promql_names_reader():
    assert _promql_names('sum by (le) (rate(memento_serving_request_seconds_bucket{endpoint="/v1/memento_x"}[5m]))') \
        == {"memento_serving_request_seconds_bucket"}
    assert _promql_names("topic:memento_stream_consumer_lag:sum > 10 and up") == {"topic:memento_stream_consumer_lag:sum"}


# -- Grafana ---------------------------------------------------------------------------------------

def _make_dashboard_module():
    spec = importlib.util.spec_from_file_location("_memento_make_dashboard", MAKE_DASHBOARD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # writes nothing: main() runs only as a script
    return module


def test_dashboard_json_is_make_dashboard_output():
    module = _make_dashboard_module()
    assert DASHBOARD.read_text() == module.render(), \
        "deploy/grafana/dashboards/memento.json is stale: run python deploy/grafana/make_dashboard.py"
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_policy_version_is_per_replica():
    board = json.loads(DASHBOARD.read_text())
    panel = next(p for p in board["panels"] if "olicy version" in p["title"])
    serving = [t["expr"] for t in panel["targets"] if "memento_serving_policy_version" in t["expr"]]
    assert any("by (instance)" in e for e in serving) or any(e.startswith("min(") for e in serving), serving


# -- Kubernetes ------------------------------------------------------------------------------------

def _workloads(docs: list) -> list[dict]:
    return [d for d in docs if d and d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet")]


def test_k8s_workloads():
    docs = _load_yaml(K8S)
    workloads = _workloads(docs)
    assert {w["metadata"]["name"] for w in workloads} >= {"memento-worker", "memento-learner", "memento-serve"}
    for w in workloads:
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]["spec"]
        pod_sc = pod.get("securityContext") or {}
        volumes = {v["name"] for v in pod.get("volumes", [])} | \
                  {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        for c in pod["containers"]:
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext") or {}
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, f"{where}: runs as root"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: image {image!r}"
            limits = (c.get("resources") or {}).get("limits") or {}
            requests = (c.get("resources") or {}).get("requests") or {}
            assert {"cpu", "memory"} <= limits.keys(), f"{where}: resources.limits"
            assert {"cpu", "memory"} <= requests.keys(), f"{where}: resources.requests"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{where}: mounts unknown volume {m['name']}"
            ports = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            if c.get("ports"):
                for probe in ("livenessProbe", "readinessProbe"):
                    assert probe in c, f"{where}: has an HTTP port but no {probe}"
                for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                    if probe in c:
                        assert c[probe]["httpGet"]["port"] in ports, f"{where}: {probe} on an undeclared port"
            args = [str(a) for a in c.get("args", [])]
            for flag in ("--metrics-port", "--port"):
                if flag in args:
                    assert int(args[args.index(flag) + 1]) in ports, f"{where}: {flag} not a containerPort"
            annotations = w["spec"]["template"]["metadata"].get("annotations") or {}
            if "prometheus.io/port" in annotations and "--metrics-port" in args:
                assert annotations["prometheus.io/port"] == args[args.index("--metrics-port") + 1], (
                    f"{where}: Prometheus scrapes a port other than its --metrics-port")
            for env in c.get("env", []):
                if env["name"].startswith("MEMENTO_"):
                    assert env["name"] in _known_env_names(), f"{where}: {env['name']} is read by no code"
    serve = next(w for w in workloads if w["metadata"]["name"] == "memento-serve")
    container = serve["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_k8s_pods_share_no_volume():
    """Checkpoints travel inside their announcements on Kafka, so no claim is ReadWriteMany
    (default storage classes do not provide it) and every volume claim is a pod's own
    (a StatefulSet's claim template); before, the learner and every serving replica mounted
    one ReadWriteMany claim for the checkpoint files."""
    docs = _load_yaml(K8S)
    claims = [d for d in docs if d and d.get("kind") == "PersistentVolumeClaim"]
    assert claims == []
    for w in _workloads(docs):
        pod = w["spec"]["template"]["spec"]
        assert not [v for v in pod.get("volumes", []) if "persistentVolumeClaim" in v], w["metadata"]["name"]
        for t in w["spec"].get("volumeClaimTemplates", []):
            assert t["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_k8s_pdb_for_serving():
    docs = _load_yaml(K8S)
    serve = next(w for w in _workloads(docs) if w["metadata"]["name"] == "memento-serve")
    labels = serve["spec"]["template"]["metadata"]["labels"]
    pdbs = [d for d in docs if d and d.get("kind") == "PodDisruptionBudget"]
    assert any(p["spec"]["selector"]["matchLabels"].items() <= labels.items() for p in pdbs), \
        "no PodDisruptionBudget selects the serving pods"
    for p in pdbs:
        assert ("minAvailable" in p["spec"]) != ("maxUnavailable" in p["spec"])


def test_k8s_env_names_exist_in_code():
    docs = _load_yaml(K8S)
    names = set()
    for d in docs:
        if d and d.get("kind") == "ConfigMap":
            names |= {k for k in d.get("data", {}) if k.startswith("MEMENTO_")}
    assert names
    unknown = names - _known_env_names()
    assert not unknown, f"MEMENTO_* variables in {K8S.name} that no code reads: {sorted(unknown)}"


# -- docker compose --------------------------------------------------------------------------------

def test_compose():
    compose = _load_yaml(COMPOSE)[0]
    services = compose["services"]
    named_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        image = svc.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image.rsplit("/", 1)[-1], f"{name}: image {image!r}"
        for mount in svc.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: mounts missing {source}"
            else:
                assert source in named_volumes, f"{name}: volume {source} not declared"
        env = svc.get("environment") or {}
        unknown = {k for k in env if k.startswith("MEMENTO_")} - _known_env_names()
        assert not unknown, f"{name}: MEMENTO_* variables no code reads: {sorted(unknown)}"
        if "build" in svc:
            context = COMPOSE.parent / svc["build"]["context"]
            assert (context / svc["build"].get("dockerfile", "Dockerfile")).is_file()
        command = [str(a) for a in svc.get("command", [])]
        # the health check is on the API port where there is one, else on the metrics port
        flag = next((f for f in ("--port", "--metrics-port") if f in command), None)
        if flag is not None:
            port = command[command.index(flag) + 1]
            test = " ".join(map(str, (svc.get("healthcheck") or {}).get("test", [])))
            assert f":{port}/" in test, f"{name}: no healthcheck on its port {port}"
    assert "/healthz" in " ".join(services["serve"]["healthcheck"]["test"])


def test_compose_kafka_log_dirs_on_its_volume():
    kafka = _load_yaml(COMPOSE)[0]["services"]["kafka"]
    log_dirs = str(kafka["environment"].get("KAFKA_LOG_DIRS", ""))
    assert log_dirs, "KAFKA_LOG_DIRS unset: the apache/kafka image keeps its logs in /tmp, lost on re-creation"
    mounts = dict(m.split(":")[:2][::-1] for m in kafka["volumes"])  # container path -> volume
    for d in log_dirs.split(","):
        assert any(mounts[path] == "kafka-data" and (d == path or d.startswith(path.rstrip("/") + "/"))
                   for path in mounts), f"Kafka log dir {d} is not on the kafka-data volume"


def test_compose_prometheus_mounts_its_rules():
    prometheus = _load_yaml(COMPOSE)[0]["services"]["prometheus"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in prometheus["volumes"]}
    assert mounts.get("./prometheus/prometheus.yml") == "/etc/prometheus/prometheus.yml"
    # rule_files are relative to the config file
    assert mounts.get("./prometheus/rules") == "/etc/prometheus/rules"


# -- Dockerfile ------------------------------------------------------------------------------------

def test_dockerfile():
    text = DOCKERFILE.read_text()
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    users = [line.split(None, 1)[1] for line in instructions if line.upper().startswith("USER ")]
    assert users, "the image runs as root: no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: must be numeric (runAsNonRoot) and not root"
    assert "--extra-index-url" not in text, "torch must come from the CPU index alone (--index-url)"
    assert re.search(r"--index-url\s+https://download\.pytorch\.org/whl/cpu\s+\"?torch==", text)
    # the build context is the repository root (compose: context ..); BuildKit reads
    # <Dockerfile>.dockerignore next to the Dockerfile, the classic builder only <context>/.dockerignore
    ignore = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    if not ignore.exists():
        ignore = ROOT / ".dockerignore"
    assert ignore.exists(), "no .dockerignore for the build context"
    patterns = {line.strip() for line in ignore.read_text().splitlines()}
    assert {".git", ".venv"} <= patterns


def test_dockerfile_copies_every_installed_package():
    """``pip install .`` in the image installs what pyproject's package list finds: each must be
    copied in first, or the ``memento`` command it installs fails to import (cli/ holds it)."""
    text = DOCKERFILE.read_text()
    copied = set(re.findall(r"^COPY\s+(\w+)\s+\1\s*$", text, flags=re.M))
    include = re.search(r"^include\s*=\s*\[(.*?)\]", (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    packages = {name.strip().strip('"').rstrip("*") for name in include.split(",")}
    assert packages and packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
