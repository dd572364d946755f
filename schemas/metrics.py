"""Prometheus metrics of every long-running lum-stream process (agents, refresh, trainers), one definition each.

    from schemas import metrics
    metrics.serve()                                   # LUM_METRICS_PORT (0: off) on LUM_METRICS_HOST (127.0.0.1)
    rec = metrics.Recorder("joiner", worker=0)        # job and worker labels, bound once
    rec.consumed("impressions", partition, n)         # lum_events_consumed_total -> rate() is events/s
    rec.lag("impressions", partition, lag)            # lum_consumer_lag
    with rec.batch():                                 # lum_batch_seconds (histogram)
        ...
    rec.dead_letter("behaviors", err)                 # lum_dead_letters_total{reason=<error class>}
    metrics.scrape(port)                              # {(name, labels): value}: the client's own parser

Labels are stable and few: ``job`` (sequences, joiner, refresh, dlrm-baseline, ...), ``worker`` (index or
rank), ``topic`` (registry name, without ``LUM_KAFKA_TOPIC_PREFIX``), ``partition``; dead letters add a
low-cardinality ``reason`` (the error's class, never its text). Ages are exported as Unix timestamps
(``*_timestamp_seconds``, the Prometheus convention: age is ``time() - x`` in PromQL) and also as
``*_age_seconds`` gauges computed at scrape time, for readers without PromQL (``lum status``, the demo).
Every process serves its own registry on its own port: worker i of ``lum agents`` on ``LUM_METRICS_PORT + i``.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import time
import urllib.request
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)


class MetricsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LUM_METRICS_", extra="ignore")

    host: str = Field("127.0.0.1", description="address the /metrics endpoint binds (0.0.0.0 in containers)")
    port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; worker i of `lum agents` uses "
                      "port+i (0: off)")


_W = ("job", "worker")
_TP = ("job", "worker", "topic", "partition")

# Stream processing (agents on either runtime).
EVENTS = Counter("lum_events_consumed", "events consumed (rate() gives events/s)", _TP)
LAG = Gauge("lum_consumer_lag", "messages between the consumer's position and the partition's end", _TP)
DEAD_LETTERS = Counter("lum_dead_letters", "messages sent to dead-letters, by source topic and error class",
                       ("job", "worker", "topic", "reason"))
BATCH_SECONDS = Histogram("lum_batch_seconds", "time to process one batch (state written, outputs flushed)", _W,
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
SEQUENCES = Counter("lum_sequences_published", "user sequences published to user-sequences", _W)
EXAMPLES = Counter("lum_examples_emitted", "training examples emitted by the joiner", _W)
LATE = Counter("lum_examples_late", "clicks that arrived after their window closed (routed to late-clicks)", _W)
PRODUCED = Counter("lum_events_produced", "events produced to a topic", ("job", "worker", "topic"))
FIRST_BATCH = Gauge("lum_first_batch_timestamp_seconds", "when the first batch was processed (Unix time)", _W)
LAST_BATCH = Gauge("lum_last_batch_timestamp_seconds", "when the last batch was processed (Unix time)", _W)
AGENT_STATE = Gauge("lum_agent_state", "an agent's own figures (open windows, held-back features, ...)",
                    ("job", "worker", "name"))

# LUM refresh.
REFRESH_USERS = Counter("lum_refresh_users", "users whose LUM features were republished", _W)
REFRESH_ITEMS = Counter("lum_refresh_items", "items whose LUM embeddings were republished", _W)
REFRESH_SECONDS = Histogram("lum_refresh_seconds", "duration of one refresh", _W,
                            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600))
REFRESH_LAST = Gauge("lum_refresh_last_timestamp_seconds", "when the last refresh finished (Unix time)", _W)
REFRESH_AGE = Gauge("lum_refresh_age_seconds", "seconds since the last refresh finished", _W)
MODEL_INFO = Gauge("lum_model_info", "the LUM model version being served (value 1)", ("job", "worker", "model_version"))
MODEL_SAVED = Gauge("lum_model_saved_timestamp_seconds", "when the served LUM checkpoint was saved (Unix time)", _W)
MODEL_AGE = Gauge("lum_model_age_seconds", "age of the served LUM checkpoint", _W)

# DLRM trainers.
TRAINER_EXAMPLES = Counter("lum_trainer_examples", "examples trained on (rate() gives examples/s)", _W)
WINDOW_AUC = Gauge("lum_trainer_window_auc", "progressive AUC of the newest event-time window", _W)
WINDOW_NE = Gauge("lum_trainer_window_ne", "normalized entropy of the newest event-time window", _W)
WINDOW_LOGLOSS = Gauge("lum_trainer_window_logloss", "log loss of the newest event-time window", _W)
CHECKPOINT_LAST = Gauge("lum_checkpoint_last_timestamp_seconds", "when the last durable checkpoint was written", _W)
CHECKPOINT_AGE = Gauge("lum_checkpoint_age_seconds", "seconds since the last durable checkpoint", _W)

def _series_names(metric) -> set[str]:
    names = set()
    for family in metric.describe():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_count", "_sum", "_created")}
        else:
            names.add(family.name)
    return names


# Every series name a scrape can show (the dashboard test checks its queries against these).
NAMES: frozenset[str] = frozenset().union(*(_series_names(m) for m in (
    EVENTS, LAG, DEAD_LETTERS, BATCH_SECONDS, SEQUENCES, EXAMPLES, LATE, PRODUCED, FIRST_BATCH, LAST_BATCH,
    AGENT_STATE, REFRESH_USERS, REFRESH_ITEMS,
    REFRESH_SECONDS, REFRESH_LAST, REFRESH_AGE, MODEL_INFO, MODEL_SAVED, MODEL_AGE, TRAINER_EXAMPLES, WINDOW_AUC,
    WINDOW_NE, WINDOW_LOGLOSS, CHECKPOINT_LAST, CHECKPOINT_AGE)))


def reason_of(error: str | BaseException) -> str:
    """A dead letter's ``reason`` label: the error's class (bounded cardinality), not its message."""
    if isinstance(error, BaseException):
        return type(error).__name__
    head = error.split(":", 1)[0].strip()
    return head[:40] if head and len(head) <= 40 and " " not in head else "other"


class Recorder:
    """The metrics of one process, with ``job`` and ``worker`` bound; every method is one call at its site."""

    def __init__(self, job: str, worker: int | str = 0):
        self.job, self.worker = job, str(worker)
        self._w = {"job": self.job, "worker": self.worker}
        self._model: str | None = None
        self._first: float | None = None
        self._seen: dict[str, float] = {}

    # -- stream processing
    def consumed(self, topic: str, partition: int, n: int = 1) -> None:
        EVENTS.labels(topic=topic, partition=str(partition), **self._w).inc(n)

    def lag(self, topic: str, partition: int, lag: int | float) -> None:
        LAG.labels(topic=topic, partition=str(partition), **self._w).set(lag)

    def dead_letter(self, topic: str, error: str | BaseException, n: int = 1) -> None:
        DEAD_LETTERS.labels(topic=topic, reason=reason_of(error), **self._w).inc(n)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Times one batch (``lum_batch_seconds``) and stamps the first/last batch times (throughput windows)."""
        with BATCH_SECONDS.labels(**self._w).time():
            yield
        now = time.time()
        if self._first is None:
            self._first = now
            FIRST_BATCH.labels(**self._w).set(now)
        LAST_BATCH.labels(**self._w).set(now)

    def agent_figures(self, figures: dict[str, float]) -> None:
        """An agent's ``gauges()`` as they are today (cumulative ``*_total`` counts and levels): the counts with
        a metric of their own advance it by their increase since the last call, the rest become ``lum_agent_state``."""
        for name, value in figures.items():
            counter = _AGENT_COUNTERS.get(name)
            if counter is None:
                AGENT_STATE.labels(name=name, **self._w).set(value)
                continue
            delta = value - self._seen.get(name, 0)
            self._seen[name] = value
            if delta > 0:
                counter.labels(**self._w).inc(delta)

    def state(self, **figures: float) -> None:
        """An agent's own gauges (``Agent.gauges()``), one ``name`` label each."""
        for name, value in figures.items():
            AGENT_STATE.labels(name=name, **self._w).set(value)

    def sequences(self, n: int) -> None:
        SEQUENCES.labels(**self._w).inc(n)

    def examples(self, emitted: int = 0, late: int = 0) -> None:
        EXAMPLES.labels(**self._w).inc(emitted)
        LATE.labels(**self._w).inc(late)

    def produced(self, topic: str, n: int = 1) -> None:
        PRODUCED.labels(topic=topic, **self._w).inc(n)

    # -- refresh
    def refreshed(self, model_version: str, users: int, items: int = 0, seconds: float | None = None,
                  model_saved_at: float | None = None) -> None:
        REFRESH_USERS.labels(**self._w).inc(users)
        REFRESH_ITEMS.labels(**self._w).inc(items)
        if seconds is not None:
            REFRESH_SECONDS.labels(**self._w).observe(seconds)
        _stamp(REFRESH_LAST, REFRESH_AGE, self._w, time.time())
        if model_version != self._model:
            if self._model is not None:  # one version at a time: the old series disappears
                MODEL_INFO.remove(self.job, self.worker, self._model)
            MODEL_INFO.labels(model_version=model_version, **self._w).set(1)
            self._model = model_version
        if model_saved_at is not None:
            _stamp(MODEL_SAVED, MODEL_AGE, self._w, model_saved_at)

    # -- trainers
    def trained(self, n: int) -> None:
        TRAINER_EXAMPLES.labels(**self._w).inc(n)

    def window(self, auc: float | None = None, ne: float | None = None, logloss: float | None = None) -> None:
        """The newest window's progressive metrics (None leaves a gauge as it was: one class only, no AUC)."""
        for gauge, value in ((WINDOW_AUC, auc), (WINDOW_NE, ne), (WINDOW_LOGLOSS, logloss)):
            if value is not None:
                gauge.labels(**self._w).set(value)

    def checkpointed(self, at: float | None = None) -> None:
        _stamp(CHECKPOINT_LAST, CHECKPOINT_AGE, self._w, time.time() if at is None else at)


# The agents' cumulative counts that have a metric of their own (streaming.agents: Agent.gauges()).
_AGENT_COUNTERS = {"sequences_published_total": SEQUENCES, "examples_total": EXAMPLES, "late_clicks_total": LATE}


def _stamp(last: Gauge, age: Gauge, labels: dict, ts: float) -> None:
    last.labels(**labels).set(ts)
    age.labels(**labels).set_function(lambda: time.time() - ts)


def serve(port: int | None = None, host: str | None = None, offset: int = 0) -> int | None:
    """Serve this process's metrics on ``http://host:port+offset/metrics`` (settings by default); returns the
    port, or None when the port is 0 (off). A port in use fails here, naming the setting."""
    from .settings import load

    cfg = load(MetricsSettings, port=port, host=host)
    if not cfg.port:
        return None
    bound = cfg.port + offset
    try:
        start_http_server(bound, addr=cfg.host)
    except OSError as e:
        raise SystemExit(f"LUM_METRICS_PORT: cannot serve metrics on {cfg.host}:{bound}: {e}") from None
    log.info("metrics on http://%s:%d/metrics", cfg.host, bound)
    return bound


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> dict[tuple[str, tuple], float]:
    """One endpoint's samples as {(name, sorted label items): value}, parsed by prometheus_client's own
    parser; empty when it does not answer (the process is not up yet, or gone).

    A connect to a local port in the ephemeral range that nobody listens on can connect to itself (TCP
    simultaneous open) and read back its own request: that is "not up yet" too, not an error."""
    try:
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout).read().decode()
    except (OSError, http.client.HTTPException):
        return {}
    return parse(text)


def parse(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict[tuple[str, tuple], float], metric: str, /, **labels: str) -> float:
    """Sum of the samples named ``metric`` whose labels include ``labels`` (0.0 when none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == metric and want <= set(lab))


__all__ = ["MetricsSettings", "Recorder", "serve", "scrape", "parse", "total", "reason_of", "NAMES", "REGISTRY"]
