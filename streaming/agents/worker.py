"""The batch worker: the default runtime hosting agent logic over a consumer group (plain confluent-kafka).

    python -m streaming.agents.worker sequences [--index 0]     # what ``lum agents`` starts, per worker
    python -m streaming.agents.worker joiner

It hosts the pure logic of ``streaming.agents.store``'s contract: it consumes batches of
``LUM_AGENT_BATCH_SIZE`` messages, turns them into ``Record``s, and per batch runs, in this order:

    1. ``logic.process(partition, records, emit)`` for each partition of the batch
    2. ``store.commit(positions)``: ONE RocksDB WriteBatch (synced) with the state and the consumed positions
    3. flush: every output of the batch delivered (``LUM_AGENT_FLUSH_TIMEOUT_S``), else an exception
    4. consumer-group offset commit of the batch's positions

Offsets advance only for completed work: any exception in 1-3 (a bug, a delivery failure, a flush that
times out) stops the worker with exit code 1 and a log line saying so; NOTHING of the failed batch is
committed (the revoke callback of the shutdown commits only completed batches, and none after a failure).
A restart redoes the batch from the group's offsets; the logic is idempotent per record and its store's
positions tell what was applied but maybe not published. ``lum agents`` restarts dead workers with
back-off (``streaming.agents.supervisor``). Delivery is at-least-once; the state is exactly-once in effect.

Partitions are the unit of state: the worker opens a ``RocksStore`` (``$LUM_DATA_DIR/<agent>/<group>/p<N>``)
when a partition is assigned and closes it when it is revoked; the store records an identity (cluster id,
physical topics and their topic ids, partition) and discards state written for another one. Agents that
read several topics subscribe to co-partitioned topics (same partition count, same key) and the range
assignor gives partition p of every topic to the same worker.

Why this runtime by default: Faust's per-event machinery caps a Faust worker far below this batch worker
(``benchmarks/bench_streaming.py``; figures and when to pick which: README, "Runtimes: worker vs Faust").

Observability: a log line every ``LUM_AGENT_LOG_INTERVAL_S`` with events/s and consumer lag (high-water
mark carried by fetched data minus position), and Prometheus metrics (``schemas.metrics``, ``job`` = the
agent: events consumed, lag, dead letters, batch seconds, the logic's counts) on
``LUM_METRICS_HOST:LUM_METRICS_PORT + index`` (``/metrics``) when that port is not 0.
Crash injection for tests: ``LUM_AGENT_CRASH_AT`` (``streaming.agents.runtime``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from operator import itemgetter
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from schemas import metrics
from schemas.logs import setup_logging
from schemas.settings import KafkaSettings, load
from schemas.topics import Topic

from ..kafka import DeadLetters, Output, group_consumer
from .runtime import Crash, make_logic
from .settings import AgentSettings
from .store import Logic, Record, RocksStore, Store

log = logging.getLogger(__name__)
_topic_of = itemgetter(0)  # a Record's topic


class KafkaEmit:
    """The worker's ``Emit``: logical topics to physical names, through the producer that fails loudly."""

    def __init__(self, out: Output, kafka: KafkaSettings, dead: DeadLetters, crash: Crash):
        self.out, self.kafka, self.dead, self.crash = out, kafka, dead, crash
        self.names: dict[str, str] = {}  # registry name -> physical name
        if crash.point != "mid_produce":
            self.crash = None  # the hot path skips the check

    def send(self, topic: Topic, value: bytes | None, key: bytes | None = None, partition: int | None = None) -> None:
        if self.crash is not None:
            self.crash("mid_produce")
        name = self.names.get(topic.name)
        if name is None:
            name = self.names[topic.name] = self.kafka.topic(topic)
        if partition is None:
            self.out.produce(name, value, key)
        else:
            self.out.produce(name, value, key, partition=partition)

    def send_many(self, topic: Topic, values: list[bytes | None], keys: list[bytes | None],
                  partition: int | None = None) -> None:
        """``send`` of each (value, key) in order (what a logic emits in bulk: examples, changelog)."""
        if self.crash is not None:  # the crash point counts messages
            for value, key in zip(values, keys):
                self.send(topic, value, key, partition)
            return
        name = self.names.get(topic.name)
        if name is None:
            name = self.names[topic.name] = self.kafka.topic(topic)
        self.out.produce_many(name, values, keys, partition)

    def dead_letter(self, record: Record, reason: str | BaseException) -> None:
        self.dead.send(self.kafka.topic_prefix + record.topic, record.partition, record.offset, record.key,
                       record.value, reason)


class Worker:
    """Consume -> logic.process per partition -> store commit -> flush outputs -> commit offsets."""

    def __init__(self, agent_name: str, kafka: KafkaSettings, cfg: AgentSettings, index: int = 0,
                 logic: Logic | None = None):
        self.kafka, self.cfg, self.index, self.name = kafka, cfg, index, agent_name
        self.crash = Crash.from_settings(cfg)
        self.out = Output(kafka)
        self.dead = DeadLetters(self.out, kafka, f"{agent_name}-{index}")
        self.rec = self.dead.recorder = metrics.Recorder(agent_name, index)  # lum_* metrics, job=<agent>
        self.emit = KafkaEmit(self.out, kafka, self.dead, self.crash)
        if logic is None:
            if agent_name == "joiner":  # the pure JoinLogic plus its side input read from Kafka (item embeddings)
                from .joiner import JoinerLogic

                logic = JoinerLogic(kafka, cfg, self.out, self.dead)
            else:
                logic = make_logic(agent_name, cfg)
        self.logic = self.agent = logic  # ``agent``: the name older callers use
        if hasattr(logic, "high_water"):
            logic.high_water = self.high_water
        self.group = kafka.topic_prefix + {"sequences": cfg.sequences_group, "joiner": cfg.joiner_group}[agent_name]
        self.root = Path(cfg.data_dir) / agent_name / self.group
        self.consumer = group_consumer(kafka, self.group, **{
            "partition.assignment.strategy": "range",  # co-partitioned inputs: partition p of each topic together
            "fetch.wait.max.ms": 50,
            # Prefetch bound: a worker behind its input would otherwise buffer up to librdkafka's default
            # 64 MB of fetched messages on top of its state (batches need well under 1 MB).
            "queued.max.messages.kbytes": 16384})
        self.logical = {kafka.topic(t): t.name for t in logic.inputs}  # physical name -> registry name
        self.topic_names = list(self.logical)
        self.stores: dict[int, Store] = {}
        self.positions: dict[tuple[str, int], int] = {}  # next offset consumed, per (physical topic, partition)
        self.done: dict[tuple[str, int], int] = {}  # next offset of COMPLETED batches: what may be committed
        self.failed = False
        self.assigned: list[int] = []
        self.consumed = 0
        self.first_event_at = self.last_event_at = 0.0  # wall clock of the first/last processed batch
        self.cpu_first = self.cpu_last = 0.0  # process CPU time at those batches (all threads)
        self.started = time.monotonic()
        self._last_report = (self.started, 0)
        self.rate = 0.0
        self.lag_cache: dict[str, int] = {}  # per topic, for the log line; lag() also sets lum_consumer_lag
        self._lag_at = 0.0
        self._identity: dict[str, str] | None = None
        self.stop_event = threading.Event()

    # --- state stores ---------------------------------------------------------------------------------
    def identity(self, partition: int) -> dict[str, object]:
        """What the partition's state belongs to: cluster, physical input topics (with their topic ids,
        which change when a topic is recreated) and partition."""
        if self._identity is None:
            self._identity = state_identity(self.kafka, self.consumer, self.topic_names)
        return self._identity | {"partition": partition}

    def read(self, topic: Topic, partition: int) -> Iterator[Record]:
        """One partition of ``topic`` from its beginning to its current end, as records (for rebuilds)."""
        from ..kafka import read_to_end, reader

        consumer = reader(self.kafka)
        try:
            for m in read_to_end(consumer, self.kafka.topic(topic), {partition: OFFSET_BEGINNING}):
                yield Record(topic.name, m.partition(), m.offset(), m.timestamp()[1], m.key(), m.value())
        finally:
            consumer.close()

    # --- rebalance -------------------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        committed = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(tps, timeout=30)}
        by_part: dict[int, dict[str, int | None]] = defaultdict(dict)
        for (topic, p), off in committed.items():
            by_part[p][self.logical[topic]] = off if off >= 0 else None
        starts: dict[tuple[str, int], int] = {}
        for p, offs in sorted(by_part.items()):
            store = RocksStore(self.root / f"p{p}", self.identity(p))
            self.stores[p] = store
            for name, off in self.logic.assign(p, store, offs, self.emit, self.read).items():
                starts[(self.kafka.topic_prefix + name, p)] = off
        for tp in tps:
            tp.offset = starts.get((tp.topic, tp.partition), OFFSET_BEGINNING)
        consumer.assign(tps)
        self.assigned = sorted(set(self.assigned) | set(by_part))
        self.crash("assign")
        log.info("%s-%d assigned partitions %s", self.name, self.index, sorted(by_part))

    def _on_revoke(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        self.crash("revoke")
        if not self.failed:  # completed batches only; after a failure, nothing at all
            self._commit(asynchronous=False)
        self._close_partitions({tp.partition for tp in tps})

    def _on_lost(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        self._close_partitions({tp.partition for tp in tps})  # someone else owns them now: no commit

    def _close_partitions(self, parts: set[int]) -> None:
        for p in sorted(parts):
            for t in self.logic.inputs:  # no longer ours to consume: this worker's lag there is 0
                self.rec.lag(t.name, p, 0)
            self.logic.revoke(p)
            store = self.stores.pop(p, None)
            if store is not None:
                store.discard()
                store.close()
        self.positions = {k: v for k, v in self.positions.items() if k[1] not in parts}
        self.done = {k: v for k, v in self.done.items() if k[1] not in parts}
        self.assigned = [p for p in self.assigned if p not in parts]
        log.info("%s-%d released partitions %s", self.name, self.index, sorted(parts))

    # --- main loop --------------------------------------------------------------------------------------
    def _commit(self, asynchronous: bool = True) -> None:
        if self.done:
            try:
                self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in self.done.items()],
                                     asynchronous=asynchronous)
            except Exception as e:  # a failed commit only means more replay after a crash
                log.warning("offset commit failed: %s", e)

    def step(self) -> int:
        msgs = self.consumer.consume(self.cfg.batch_size, self.cfg.batch_wait_ms / 1000)
        hook = getattr(self.logic, "poll_side_inputs", None)
        if hook:
            hook()
        by_part: dict[int, list[Record]] = defaultdict(list)
        batch_pos: dict[tuple[str, int], int] = {}
        logical, make = self.logical, tuple.__new__  # tuple.__new__: a Record without NamedTuple's Python __new__
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise RuntimeError(f"consumer: {err}")
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer: %s", err)
                continue
            topic, p, off = m.topic(), m.partition(), m.offset()
            by_part[p].append(make(Record, (logical[topic], p, off, m.timestamp()[1], m.key(), m.value())))
            batch_pos[(topic, p)] = off + 1
        n = sum(len(v) for v in by_part.values())
        if not n:
            self.out.poll(0)
            self._report()
            return 0
        with self.rec.batch():
            for p, records in by_part.items():
                self.logic.process(p, records, self.emit)
                self.stores[p].commit({logical[t]: o for (t, q), o in batch_pos.items() if q == p})
                self.crash("after_state_write")
            self.out.flush(self.cfg.flush_timeout_s)  # outputs delivered before the offsets that produced them
            self.crash("after_flush")
            hook = getattr(self.logic, "delivered", None)
            if hook:
                hook()
            self.positions.update(batch_pos)
            self.done.update(batch_pos)
            self.crash("before_commit")
            self._commit()
        self.consumed += n
        self.last_event_at, self.cpu_last = time.time(), time.process_time()
        if not self.first_event_at:
            self.first_event_at, self.cpu_first = self.last_event_at, self.cpu_last
        for p, rs in by_part.items():
            for t, k in Counter(map(_topic_of, rs)).items():
                self.rec.consumed(t, p, k)
        self.rec.agent_figures(self.logic.gauges())
        self.rec.state(assigned_partitions=len(self.assigned),
                       cpu_seconds_between_batches=self.cpu_last - self.cpu_first)
        self._report()
        return n

    def start(self) -> None:
        self.consumer.subscribe(self.topic_names, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        log.info("%s-%d started (group %s, topics %s)", self.name, self.index, self.group, self.topic_names)

    def fail(self, error: BaseException) -> None:
        """Mark the current batch failed: its staged state is dropped and nothing more is committed."""
        self.failed = True
        for store in self.stores.values():
            store.discard()
        log.critical("%s-%d STOPPED: batch failed (%s: %s); its offsets were NOT committed, a restart redoes it",
                     self.name, self.index, type(error).__name__, error, exc_info=error)

    def close(self) -> None:
        self.consumer.close()  # revokes (commits completed batches unless failed, closes stores), leaves the group
        hook = getattr(self.logic, "shutdown", None)
        if hook:
            hook()
        if not self.failed:
            self.out.flush(self.cfg.flush_timeout_s)
        log.info("%s-%d stopped after %d events", self.name, self.index, self.consumed)

    def run(self) -> None:
        self.start()
        try:
            while not self.stop_event.is_set():
                self.step()
        except BaseException as e:
            self.fail(e)
            raise
        finally:
            self.close()

    def high_water(self, topic: str, partition: int) -> int:
        """The partition's end as carried by the last fetch (-1 while unknown)."""
        try:
            return self.consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)[1]
        except Exception:
            return -1

    # --- observability ----------------------------------------------------------------------------------
    def lag(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (topic, p), pos in list(self.positions.items()):
            try:
                _lo, hi = self.consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)
            except Exception:
                continue
            if hi >= 0:
                out[topic] += max(hi - pos, 0)
                self.rec.lag(self.logical.get(topic, topic), p, max(hi - pos, 0))
        return dict(out)

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._lag_at >= 1.0:
            # Here, not at scrape time: a call from the metrics thread would block behind consume().
            self.lag_cache, self._lag_at = self.lag(), now
        t0, n0 = self._last_report
        if now - t0 < self.cfg.log_interval_s:
            return
        self.rate = (self.consumed - n0) / (now - t0)
        self._last_report = (now, self.consumed)
        gauges = " ".join(f"{k}={v:g}" for k, v in self.logic.gauges().items())
        log.info("%s-%d: %d events, %.0f events/s, lag %s, partitions %s, dead letters %d %s", self.name,
                 self.index, self.consumed, self.rate, self.lag_cache, self.assigned, self.dead.total, gauges)


def state_identity(kafka: KafkaSettings, consumer: Consumer, topics: list[str]) -> dict[str, object]:
    """Identity of state derived from ``topics`` (physical names) on this cluster, less the partition."""
    ids = _topic_ids(kafka, topics)
    return {"cluster": str(consumer.list_topics(timeout=30).cluster_id),
            "topics": ",".join(f"{t}={ids.get(t, '?')}" for t in sorted(topics))}


def _topic_ids(kafka: KafkaSettings, topics: list[str]) -> dict[str, str]:
    """Kafka topic ids (a new one per topic creation); empty where the cluster does not report them."""
    from confluent_kafka import TopicCollection

    from ..kafka.admin import _admin

    admin = _admin(kafka)  # kept referenced until the answers are in
    try:
        futures = admin.describe_topics(TopicCollection(topics))
        return {t: str(f.result(30).topic_id) for t, f in futures.items()}
    except Exception as e:  # an older broker: cluster id, names and partition still identify the state
        log.warning("topic ids unavailable (%s): state identity without them", e)
        return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run one lum agent worker")
    ap.add_argument("agent", choices=["sequences", "joiner"])
    ap.add_argument("--index", type=int, default=0, help="worker index (metrics port offset, log name)")
    ap.add_argument("--log-level", help="console log level (default LUM_LOG_LEVEL, else INFO)")
    args = ap.parse_args(argv)
    setup_logging(args.log_level)
    cfg = load(AgentSettings)
    worker = Worker(args.agent, load(KafkaSettings), cfg, args.index)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop_event.set())
    metrics.serve(offset=args.index)  # LUM_METRICS_PORT + index (0: off)
    try:
        worker.run()
    except Exception:  # worker.fail() logged why; the exit code tells the supervisor
        log.debug("traceback of the failed batch", exc_info=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
