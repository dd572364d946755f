"""What hosting the agent logic in Faust needs: App settings from ``KafkaSettings`` and the host.

    python -m streaming.agents.faust_app sequences --index 0     # see streaming.agents.faust_app

The host drives the runtime-neutral logic exactly as the batch worker does (``streaming.agents.store``):
per batch of ``stream.take_events``, records are grouped by partition, ``logic.process`` stages writes in
the partition's ``RocksStore``, ``store.commit(positions)`` writes them with the consumed offsets in one
RocksDB write, the outputs are flushed (``Output.flush`` fails loudly), and only then does the batch end, so
that Faust acks its events and commits their offsets (at-least-once; the logic is idempotent and the
store's positions tell it what it has already applied). A failed batch discards the staged writes and
stops the process with exit code 1, as the batch worker does: nothing of it is committed, a restart
redoes it.

Why not Faust tables: every table write costs ~0.6 ms on the embedded broker (a store write plus one
changelog send through aiokafka), needs Faust's per-event context (``_current_event``) that a batch does not
have, commits apart from the input offsets, and table recovery trusts the broker's "latest offset", which
the embedded broker reports wrong. The logic's stores are RocksDB (rocksdict) too, and changelog-backed by
the logic itself, through its outputs: the sequence agent rebuilds a moved partition from
``user-sequences``, the joiner from ``joiner-changelog``, both read to the high-water mark of the fetch.

Partitions. Faust assigns them (its assignor keeps partition p of co-partitioned inputs together). A
partition's store is opened when its first record arrives and the partition is in the consumer's current
assignment; ``logic.assign`` gets the group's committed offsets (read with an OffsetFetch by a client that
never joins the group) and returns where to resume; records below that are skipped (already applied). On
``on_partitions_revoked`` the store is closed. Records of a partition no longer assigned are dropped (the
new owner replays them from the committed offset).
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition

from schemas import metrics
from schemas.settings import EMBEDDED_PROFILE, KafkaSettings
from schemas.topics import Topic

from ..kafka import Output, read_to_end, reader
from .runtime import Crash
from .store import Logic, Reader, Record, Store

log = logging.getLogger(__name__)


# --- Faust App settings from the one KafkaSettings ----------------------------------------------------------
def faust_credentials(kafka: KafkaSettings) -> Any:
    """``broker_credentials`` for the security settings of ``KafkaSettings`` (None: PLAINTEXT)."""
    import faust

    proto = kafka.security_protocol
    if proto == "PLAINTEXT":
        return None
    ctx = None
    if proto.endswith("SSL"):
        ctx = ssl.create_default_context(cafile=kafka.ssl_ca_location)
        if kafka.ssl_certificate_location:
            ctx.load_cert_chain(kafka.ssl_certificate_location, kafka.ssl_key_location)
    if proto.startswith("SASL"):
        password = kafka.sasl_password
        if password is not None and hasattr(password, "get_secret_value"):  # SecretStr
            password = password.get_secret_value()
        return faust.SASLCredentials(username=kafka.sasl_username, password=password,
                                     mechanism=kafka.sasl_mechanism or "PLAIN", ssl_context=ctx)
    return faust.SSLCredentials(ctx)


def faust_settings(kafka: KafkaSettings, app_id: str, datadir: Path) -> dict[str, Any]:
    """Keyword arguments of ``faust.App`` for these settings. The only embedded-broker specific value, the
    session timeout (group joins wait half of it there), comes from ``EMBEDDED_PROFILE``."""
    conf: dict[str, Any] = {
        "id": app_id,
        "broker": ";".join(f"kafka://{hp.strip()}" for hp in kafka.bootstrap.split(",")),
        "broker_credentials": faust_credentials(kafka),
        # exactly_once needs aiokafka's transactional producer (the embedded broker rejects it); the logic is
        # idempotent, so at-least-once is exact on state.
        "processing_guarantee": "at_least_once",
        "store": "memory://",  # no Faust tables: state lives in the logic's RocksStores
        "consumer_auto_offset_reset": "earliest",
        "consumer_max_fetch_size": 8 * 1024 * 1024,  # a message of several MB is fetched (and dead-lettered)
        "datadir": str(datadir),
    }
    if kafka.profile == "embedded":
        conf["broker_session_timeout"] = int(EMBEDDED_PROFILE["session.timeout.ms"]) / 1000
    return conf


# --- inputs ----------------------------------------------------------------------------------------------
def kafka_reader(kafka: KafkaSettings) -> Reader:
    """``read(topic, partition)``: the partition from its beginning to the end reported by the fetch."""

    def read(topic: Topic, partition: int) -> Iterable[Record]:
        consumer = reader(kafka)
        try:
            for m in read_to_end(consumer, kafka.topic(topic), {partition: 0}):
                yield Record(topic.name, m.partition(), m.offset(), m.timestamp()[1], m.key(), m.value())
        finally:
            consumer.close()

    return read


# --- the host ----------------------------------------------------------------------------------------------
class Host:
    """One agent's logic, its stores (one per partition) and counters, inside one Faust worker."""

    def __init__(self, logic: Logic, kafka: KafkaSettings, out: Output, emit: Any, open_store: Callable[[int], Store],
                 group: str, flush_timeout_s: float = 60.0, crash: Crash | None = None):
        self.name, self.kafka, self.logic, self.out, self.emit = logic.name, kafka, logic, out, emit
        self.open_store, self.group, self.flush_timeout_s = open_store, group, flush_timeout_s
        self.crash = crash or Crash()
        self.physical = {kafka.topic(t): t.name for t in logic.inputs}
        self.read = kafka_reader(kafka)
        self.stores: dict[int, Store] = {}
        self.starts: dict[int, Mapping[str, int]] = {}
        # (physical topic, partition) pairs assigned to this worker now: set by the app from Faust's consumer
        self.assignment: Callable[[], set[tuple[str, int]]] = set
        self.highwater: Callable[[str, int], int] = lambda topic, p: -1
        self.positions: dict[tuple[str, int], int] = {}
        self.consumed = self.skipped = self.batches = 0
        self.first_batch_at = self.last_batch_at = 0.0
        self.cpu_first = self.cpu_last = 0.0
        self._committed_reader = None
        self.rate = 0.0
        self.first_batch_events = 0
        self.rec = metrics.Recorder(self.name)  # faust_app.build_host binds the worker index
        self._last_report = (time.monotonic(), 0)

    # --- partitions -----------------------------------------------------------------------------------
    def committed_reader(self):
        """A client of the group that never joins it: OffsetFetch and metadata only."""
        if self._committed_reader is None:
            self._committed_reader = reader(self.kafka, **{"group.id": self.group})
        return self._committed_reader

    def committed(self, partition: int) -> dict[str, int | None]:
        """The group's committed next offset per input topic (logical name; None: nothing committed)."""
        tps = [TopicPartition(t, partition) for t in self.physical]
        got = self.committed_reader().committed(tps, timeout=30)
        return {self.physical[tp.topic]: (tp.offset if tp.offset >= 0 else None) for tp in got}

    def open(self, partition: int) -> None:
        committed = self.committed(partition)
        store = self.open_store(partition)
        self.stores[partition] = store
        self.starts[partition] = dict(self.logic.assign(partition, store, committed, self.emit, self.read))
        self.crash("assign")
        log.info("%s: assigned partition %d (committed %s, resume at %s)", self.name, partition, committed,
                 self.starts[partition])

    def revoke(self, partitions: Iterable[int]) -> None:
        for p in sorted(partitions):
            store = self.stores.pop(p, None)
            if store is not None:
                self.logic.revoke(p)
                store.discard()
                store.close()
                self.starts.pop(p, None)
                self.positions = {k: v for k, v in self.positions.items() if k[1] != p}
                for t in self.physical.values():  # no longer ours to consume: this worker's lag there is 0
                    self.rec.lag(t, p, 0)
                log.info("%s: released partition %d", self.name, p)

    def close(self) -> None:
        self.revoke(list(self.stores))
        hook = getattr(self.logic, "shutdown", None)
        if hook is not None:
            hook()
        if self._committed_reader is not None:
            self._committed_reader.close()
            self._committed_reader = None

    # --- batches --------------------------------------------------------------------------------------
    def process_messages(self, messages: Iterable[Any]) -> int:
        """One batch of Faust messages (``event.message``): process, commit stores, flush outputs."""
        by_part: dict[int, list[Record]] = defaultdict(list)
        owned = self.assignment()
        physical = self.physical
        for m in messages:
            if (m.topic, m.partition) not in owned:
                self.skipped += 1
                continue
            ts = m.timestamp
            by_part[m.partition].append(Record(physical[m.topic], m.partition, m.offset,
                                               int(ts * 1000) if ts is not None else -1, m.key, m.value))
        n = 0
        for p, records in by_part.items():
            if p not in self.stores:
                self.open(p)
            starts = self.starts[p]
            if any(r.offset < starts.get(r.topic, 0) for r in records):  # already applied (store ahead)
                kept = [r for r in records if r.offset >= starts.get(r.topic, 0)]
                self.skipped += len(records) - len(kept)
                records = kept
            if not records:
                continue
            positions = {r.topic: r.offset + 1 for r in records}
            store = self.stores[p]
            try:
                self.logic.process(p, records, self.emit)
                store.commit(positions)
            except BaseException:
                for st in self.stores.values():
                    st.discard()
                raise
            self.crash("after_state_write")
            for t, off in positions.items():
                self.positions[(self.kafka.topic_prefix + t, p)] = off
            n += len(records)
            for t, k in Counter(r.topic for r in records).items():
                self.rec.consumed(t, p, k)
        self.out.flush(self.flush_timeout_s)  # outputs delivered before the batch ends and Faust acks its offsets
        self.crash("after_flush")
        hook = getattr(self.logic, "delivered", None)
        if hook is not None:
            hook()
        if n:
            self.consumed += n
            self.batches += 1
            self.last_batch_at, self.cpu_last = time.time(), time.process_time()
            if not self.first_batch_at:
                self.first_batch_at, self.cpu_first = self.last_batch_at, self.cpu_last
                self.first_batch_events = n
            self.rec.agent_figures(getattr(self.logic, "gauges", dict)())
            self.rec.state(assigned_partitions=self.assigned_partitions(), skipped_total=self.skipped,
                           cpu_seconds_between_batches=self.cpu_last - self.cpu_first,
                           first_batch_events=self.first_batch_events)
            self.lag()
        return n

    # --- observability ----------------------------------------------------------------------------------
    def lag(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (topic, p), pos in list(self.positions.items()):
            hi = self.highwater(topic, p)
            if hi is not None and hi >= 0:
                out[topic] += max(hi - pos, 0)
                self.rec.lag(self.physical.get(topic, topic), p, max(hi - pos, 0))
        return dict(out)

    def assigned_partitions(self) -> int:
        try:
            return len({p for t, p in self.assignment() if t in self.physical})
        except Exception:  # the consumer is not started yet
            return 0

    def report(self, index: int) -> None:
        """The periodic log line (events/s since the last one, lag), as the batch worker writes it."""
        now = time.monotonic()
        t0, n0 = self._last_report
        self.rate = (self.consumed - n0) / max(now - t0, 1e-9)
        self._last_report = (now, self.consumed)
        log.info("%s-faust-%d: %d events, %.0f events/s, lag %s, partitions %s, dead letters %d", self.name, index,
                 self.consumed, self.rate, self.lag(), sorted(self.stores), self.emit.dead.total)


def fail(host: Host, exc: BaseException) -> None:
    """A batch failed (a bug or an infrastructure fault, never bad input): stop without committing it."""
    log.critical("%s: batch failed, stopping without committing it: %r", host.name, exc, exc_info=exc)
    logging.shutdown()
    os._exit(1)  # the batch worker's exit code for a failed batch: the supervisor restarts it
