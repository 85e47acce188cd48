"""Settings shared by every memento-stream process.

Each field can be set by an environment variable ``MEMENTO_<FIELD>`` (upper case) and, in the
CLI, by the matching ``--flag``. Production deployments point ``bootstrap_servers`` at Apache
Kafka; the embedded profile (:mod:`harness.broker`) only changes client timeouts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from memento.schemas import MAX_CHECKPOINT_RECORD_BYTES

__all__ = ["Settings", "TopicNames", "RewardWeights", "parse_reward_mapping", "TOPIC_PARTITIONS",
           "DEFAULT_ALPHA", "DEFAULT_MIN_PROB", "DEFAULT_SIMILARITY_PRIOR", "DEFAULT_VOTE_PRIOR", "DEFAULT_TOP_K",
           "DEFAULT_ALTERNATIVE_PRIORS", "DEFAULT_OWN_CASES",
           "add_settings_arguments", "settings_from_args", "KAFKA_SECURITY_PROTOCOLS", "KAFKA_SASL_MECHANISMS",
           "SECRET_FIELDS", "read_secret", "TOPIC_CONFIGS"]


# μ's defaults, for the learner (SoftQConfig), serving's flags, PolicyOptions and the evaluation
# alike (docs/evaluation.md has the ablation that chose them): the candidates per request, the
# temperature, and a floor that keeps every candidate's propensity above 0 (so any policy over the
# same candidates can be evaluated off-policy from the log) and every weight 1/μ ≤ 10,000, at a
# total uniform share of at most 0.8% over 80 candidates: exploration is the softmax's and the
# priors' Thompson sampling, and a larger uniform share only cost reward.
DEFAULT_TOP_K = 64
DEFAULT_ALPHA = 0.1
DEFAULT_MIN_PROB = 0.0001
# Weights of the retrieval prior softmax(β·cos(s, c_state) + w·log(1 + V(c))) in μ
# (memento.softq.retrieval_prior): nearness β, and the neighbours' vote w.
DEFAULT_SIMILARITY_PRIOR = 0.0
DEFAULT_VOTE_PRIOR = 20.0
# The priors μ may move to, drawn per request by Thompson sampling on their rewards
# (memento.priors): the user's own recent items first, newest first, then nearness, each strong
# enough to rank as plain RAG over the user's own memory does until Q has learned.
DEFAULT_ALTERNATIVE_PRIORS = "1000:0:1000"
# The user's own newest cases (one per distinct item) added to the nearest ones as candidates,
# and the recent items the prior's recency term ranks (memento.personal); 0 = none.
DEFAULT_OWN_CASES = 16

@dataclass(frozen=True)
class TopicNames:
    """Names of the Kafka topics the system uses."""

    actions: str = "memento.actions"
    recommendations: str = "memento.recommendations"
    transitions: str = "memento.transitions"
    cases: str = "memento.cases"
    checkpoints: str = "memento.checkpoints"
    dead_letter: str = "memento.dead-letter"
    ticks: str = "memento.ticks"

    def all(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def prefixed(self, prefix: str) -> "TopicNames":
        """These names with ``prefix.`` in front (topics of their own for a test or bench run).

        >>> TopicNames().prefixed("t1").actions
        't1.memento.actions'
        """
        return TopicNames(**{role: f"{prefix}.{name}" for role, name in self.all().items()})


# Partition counts by topic role. Actions, recommendations and ticks must be co-partitioned
# (same count, keyed by user id) because the stream worker joins them in one partitioned table.
TOPIC_PARTITIONS: dict[str, int] = {
    "actions": 4,
    "recommendations": 4,
    "ticks": 4,
    "transitions": 4,
    "cases": 2,
    "checkpoints": 1,
    "dead_letter": 1,
}


# Topic configs by role, on top of the broker's defaults: checkpoint announcements and cases are
# compacted (the latest record per key is what a new reader needs; cases are also kept by the
# case bank's own WAL; an announcement carries its checkpoint's bytes, so it may be larger than
# the broker's default record size), the event topics are kept for a week (a restarted worker or learner reads
# back at most that far), ticks and dead letters for a day and a month.
TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    "actions": {"retention.ms": str(7 * 86_400_000)},
    "recommendations": {"retention.ms": str(7 * 86_400_000)},
    "ticks": {"retention.ms": str(86_400_000)},
    "transitions": {"retention.ms": str(7 * 86_400_000)},
    "cases": {"cleanup.policy": "compact"},
    "checkpoints": {"cleanup.policy": "compact", "max.message.bytes": str(MAX_CHECKPOINT_RECORD_BYTES)},
    "dead_letter": {"retention.ms": str(30 * 86_400_000)},
}


@dataclass(frozen=True)
class RewardWeights:
    """Reward for each action type; the reward of a recommendation is the largest weight among
    the user's actions on the recommended item inside the attribution window (0 if none)."""

    click: float = 1.0
    collect: float = 2.0
    cart: float = 3.0
    purchase: float = 5.0

    def weight(self, action: str) -> float:
        return float(getattr(self, action))

    @classmethod
    def parse(cls, spec: str) -> "RewardWeights":
        """Parse ``"click=1,cart=3"`` (:func:`parse_reward_mapping`); unnamed actions keep their
        defaults, and only this class's actions are allowed.

        >>> RewardWeights.parse("cart=4").cart
        4.0
        >>> RewardWeights.parse("view=1")
        Traceback (most recent call last):
        ...
        ValueError: bad reward weight 'view': the actions are ['click', 'collect', 'cart', 'purchase']
        """
        values = parse_reward_mapping(spec)
        known = [f.name for f in fields(cls)]
        for name in values:
            if name not in known:
                raise ValueError(f"bad reward weight {name!r}: the actions are {known}")
        return cls(**values)


def parse_reward_mapping(spec: str) -> dict[str, float]:
    """Parse ``"click=1,cart=3,view=0.5"`` into ``{action: reward}``.

    Any action name is allowed; names are stripped and lower-cased. :meth:`RewardWeights.parse`
    allows only its own actions; the log loaders of :mod:`evaluation.logs` apply the
    result on top of the default rewards, so actions not named keep their default reward.

    Parameters
    ----------
    spec
        Comma-separated ``ACTION=NUMBER`` parts.

    >>> parse_reward_mapping("click=1, cart=3,view=0.5")
    {'click': 1.0, 'cart': 3.0, 'view': 0.5}
    >>> parse_reward_mapping("click=lots")
    Traceback (most recent call last):
    ...
    ValueError: bad reward mapping part 'click=lots': 'lots' is not a number (expected ACTION=NUMBER, e.g. click=1,cart=3)
    """
    out: dict[str, float] = {}
    parts = [p.strip() for p in spec.split(",")]
    if not any(parts):
        raise ValueError(f"empty reward mapping {spec!r} (expected ACTION=NUMBER, e.g. click=1,cart=3)")
    for part in parts:
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        hint = "(expected ACTION=NUMBER, e.g. click=1,cart=3)"
        if not sep or not name:
            raise ValueError(f"bad reward mapping part {part!r} {hint}")
        try:
            reward = float(value)
        except ValueError:
            raise ValueError(f"bad reward mapping part {part!r}: {value.strip()!r} is not a number {hint}") from None
        if not math.isfinite(reward):
            raise ValueError(f"bad reward mapping part {part!r}: the reward must be finite")
        if name in out:
            raise ValueError(f"bad reward mapping {spec!r}: action {name!r} is given twice")
        out[name] = reward
    return out


KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# Settings that are secrets: read from MEMENTO_<NAME> or the file MEMENTO_<NAME>_FILE names (a
# mounted Kubernetes or Docker secret), never from a flag, never printed.
SECRET_FIELDS = ("checkpoint_key", "kafka_sasl_password")


def read_secret(path: str, what: str) -> str:
    """The secret in file ``path`` (one trailing newline dropped), for ``what``.

    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("w", delete=False) as fh:
    ...     _ = fh.write("s3cret\\n")
    >>> read_secret(fh.name, "MEMENTO_X_FILE"); os.unlink(fh.name)
    's3cret'
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path!r} ({exc.strerror})") from None
    secret = text[:-1] if text.endswith("\n") else text
    if not secret:
        raise ValueError(f"{what}: {path!r} is empty")
    return secret


@dataclass(frozen=True)
class Settings:
    """Every process's configuration.

    Parameters
    ----------
    bootstrap_servers
        Kafka bootstrap servers, comma separated.
    data_dir
        Root of the process's local state (case bank, replay buffer, Faust tables).
    checkpoint_dir
        Where the learner writes checkpoints and serving reads them (shared volume or path).
    products
        Optional product CSV (Tmall format) used to build item features.
    embedded_broker
        Empty in production. ``noida`` or ``tansu`` when talking to an embedded test broker:
        shortens consumer-group timeouts and enables that broker's workarounds
        (docs/embedded-brokers.md).
    item_dim
        Size of the hashed item feature vector; the state has the same size.
    top_k
        Number of nearest cases the retrieval policy chooses among.
    window_s
        Reward attribution window after a recommendation, in event-time seconds.
    allowed_lateness_s
        How long after the window end late events are still attributed.
    history_len
        Number of recent actions the state encoder sees.
    session_gap_s
        Event-time inactivity after a reward window's end that ends the user's session: the
        window's transition gets ``done=True`` when the user has no event in that gap
        (docs/streams.md). 0 disables session ends (``done`` is always False).
    max_future_skew_s
        How far an event's ``ts`` may lie ahead of the wall clock of the process that reads it
        (serving answers 422, the worker dead-letters the event): a timestamp in milliseconds,
        or from a client clock years off, would otherwise move a partition's watermark ahead
        and close every open window there with reward 0. Past times are never refused (logs
        are replayed).
    checkpoint_key
        A secret shared by the learner and serving (env ``MEMENTO_CHECKPOINT_KEY`` only, never a
        flag): the learner signs each checkpoint announcement with it and serving serves only
        announcements signed with it (``memento.checkpoint.announcement_problem``). Empty: not
        signed, not checked. Never printed.
    max_windows_per_user
        Most reward windows (open, or closed and held for the session gap) one user may have in
        the stream worker; a recommendation beyond them is dead-lettered. Bounds the user's
        state, which the worker writes as one table value (and changelog record).
    kafka_security_protocol
        ``PLAINTEXT`` (default), ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``: how every client
        (kafka-python and Faust's aiokafka, :func:`memento.kafka_io.client_kwargs` and
        :func:`memento.kafka_io.ssl_context`) talks to the brokers.
    kafka_sasl_mechanism, kafka_sasl_username, kafka_sasl_password
        SASL: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``, and the credentials. The
        password comes from ``MEMENTO_KAFKA_SASL_PASSWORD`` or the file named by
        ``MEMENTO_KAFKA_SASL_PASSWORD_FILE``, never a flag, and is never printed.
    kafka_ssl_cafile, kafka_ssl_certfile, kafka_ssl_keyfile
        TLS: the CA bundle that signs the brokers' certificates (empty: the system's), and the
        client's certificate and key for mutual TLS (empty: none).
    kafka_replication_factor
        Replicas of every topic the project creates, Faust's changelogs included (1 on the
        embedded brokers; 3 in the deploy profiles).
    kafka_min_insync_replicas
        ``min.insync.replicas`` of the created topics (0: the broker's default); with
        ``acks=all`` a write is acknowledged once that many replicas have it.
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    data_dir: str = ".memento/data"
    checkpoint_dir: str = ".memento/checkpoints"
    products: str = ""
    embedded_broker: str = ""
    topics: TopicNames = field(default_factory=TopicNames)
    rewards: RewardWeights = field(default_factory=RewardWeights)
    item_dim: int = 32
    top_k: int = DEFAULT_TOP_K
    window_s: float = 600.0
    allowed_lateness_s: float = 60.0
    history_len: int = 30
    session_gap_s: float = 1800.0
    max_future_skew_s: float = 3600.0
    max_windows_per_user: int = 100
    checkpoint_key: str = field(default="", repr=False)
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)
    kafka_ssl_cafile: str = ""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    kafka_replication_factor: int = 1
    kafka_min_insync_replicas: int = 0

    def __post_init__(self):
        if self.kafka_security_protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise ValueError(f"kafka_security_protocol must be one of {KAFKA_SECURITY_PROTOCOLS}, "
                             f"got {self.kafka_security_protocol!r}")
        if self.kafka_security_protocol.startswith("SASL_"):
            if self.kafka_sasl_mechanism not in KAFKA_SASL_MECHANISMS:
                raise ValueError(f"kafka_sasl_mechanism must be one of {KAFKA_SASL_MECHANISMS} under "
                                 f"{self.kafka_security_protocol}, got {self.kafka_sasl_mechanism!r}")
            if not (self.kafka_sasl_username and self.kafka_sasl_password):
                raise ValueError(f"{self.kafka_security_protocol} needs kafka_sasl_username and a password "
                                 "(MEMENTO_KAFKA_SASL_PASSWORD or MEMENTO_KAFKA_SASL_PASSWORD_FILE)")
        if self.kafka_replication_factor < 1 or self.kafka_min_insync_replicas < 0:
            raise ValueError("kafka_replication_factor must be >= 1 and kafka_min_insync_replicas >= 0")
        if self.kafka_min_insync_replicas > self.kafka_replication_factor:
            raise ValueError(f"kafka_min_insync_replicas ({self.kafka_min_insync_replicas}) cannot exceed "
                             f"kafka_replication_factor ({self.kafka_replication_factor})")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            key = f"MEMENTO_{f.name.upper()}"
            if f.name == "topics":
                values["topics"] = TopicNames(**{
                    t.name: env.get(f"MEMENTO_TOPIC_{t.name.upper()}", t.default)
                    for t in fields(TopicNames)})
            elif f.name == "rewards":
                if env.get(key, "").strip():  # set and not empty
                    values["rewards"] = RewardWeights.parse(env[key])
            elif f.name in SECRET_FIELDS and key not in env and env.get(f"{key}_FILE"):
                values[f.name] = read_secret(env[f"{key}_FILE"], f"{key}_FILE")
            elif key in env:
                raw = env[key]
                if f.type in ("bool", bool):
                    values[f.name] = raw.lower() in ("1", "true", "yes", "on")
                elif f.type in ("int", int):
                    values[f.name] = int(raw)
                elif f.type in ("float", float):
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "topics":
                env.update({f"MEMENTO_TOPIC_{k.upper()}": v for k, v in value.all().items()})
            elif f.name == "rewards":
                env["MEMENTO_REWARDS"] = ",".join(
                    f"{k}={v}" for k, v in dataclasses.asdict(value).items())
            else:
                env[f"MEMENTO_{f.name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    @property
    def state_dim(self) -> int:
        return self.item_dim

    def path(self, *parts: str) -> Path:
        p = Path(self.data_dir, *parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def describe(self) -> str:
        values = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            values[name] = "(set)" if values[name] else ""
        return json.dumps(values, indent=2, default=str)


def add_settings_arguments(parser) -> None:
    """Flags shared by every process; each overrides its ``MEMENTO_*`` environment variable."""
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (env MEMENTO_BOOTSTRAP_SERVERS)")
    parser.add_argument("--data-dir", help="local state directory (env MEMENTO_DATA_DIR)")
    parser.add_argument("--checkpoint-dir", help="checkpoint directory (env MEMENTO_CHECKPOINT_DIR)")
    parser.add_argument("--products", help="product CSV for item features (env MEMENTO_PRODUCTS)")


def settings_from_args(args, **overrides) -> Settings:
    """Settings from the environment, overridden by the shared flags present on ``args`` and by
    ``overrides`` (a process's own flags for other fields; None = not given)."""
    return Settings.from_env(**{name: getattr(args, name, None) for name in
                                ("bootstrap_servers", "data_dir", "checkpoint_dir", "products")}, **overrides)
