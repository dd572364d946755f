"""The worker that runs one agent over its share of a topic's partitions (consumer group, plain confluent-kafka).

    python -m streaming.agents.worker sequences [--index 0]     # what ``lum agents`` starts, per worker
    python -m streaming.agents.worker joiner

Why not Faust: on this broker Faust's per-event machinery caps a worker near 4,500 events/s, its table writes
cost ~0.6 ms each (~1,100-1,700 events/s with one write per event) and its exactly_once mode does not work
(README, Limits). Faust at-least-once also commits offsets separately from table state. This
worker gets "exactly-once effect on state" from a simpler rule: every batch of ``LUM_AGENT_BATCH_SIZE``
messages is applied to the partition's RocksDB in ONE WriteBatch that also records the consumed offsets; the
batch's outputs are flushed to Kafka before the group offsets are committed. Delivery stays at-least-once
(a crash replays from the committed offset), so every agent's state update is idempotent. The measured
comparison with Faust (``benchmarks/bench_streaming.py``) is in the module docstring of ``streaming.agents``.

Partitions are the unit of state: an agent opens a state store when a partition is assigned and closes it
when it is revoked; agents that read several topics subscribe to co-partitioned topics (same partition
count, same key) and the range assignor gives partition p of every topic to the same worker.

Observability: a log line every ``LUM_AGENT_LOG_INTERVAL_S`` with events/s and consumer lag (high-water
mark carried by fetched data minus position), and the same figures as Prometheus text on
``LUM_AGENT_METRICS_PORT + index`` (``/metrics``) when that setting is not 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from schemas.settings import KafkaSettings, load
from schemas.topics import Topic

from ..kafka import DeadLetters, Output, group_consumer
from .settings import AgentSettings

log = logging.getLogger(__name__)


class Agent(Protocol):
    """What the worker drives. ``open`` returns the offset to resume from per input topic (physical name)."""

    name: str
    group: str
    topics: tuple[Topic, ...]
    high_water: Callable[[str, int], int]  # set by the worker: end of an input partition per the last fetch

    def open(self, partition: int, committed: dict[str, int | None]) -> dict[str, int]: ...
    def process(self, partition: int, msgs: list[Message]) -> None: ...
    def flushed(self) -> None: ...
    def close(self, partition: int) -> None: ...
    def poll_side_inputs(self) -> None: ...
    def gauges(self) -> dict[str, float]: ...
    def shutdown(self) -> None: ...


class Worker:
    """Consume -> agent.process per partition -> flush outputs -> commit, with rebalances handled in order."""

    def __init__(self, agent_name: str, kafka: KafkaSettings, cfg: AgentSettings, index: int = 0):
        from .joiner import JoinerAgent
        from .sequences import SequenceAgent

        self.kafka, self.cfg, self.index = kafka, cfg, index
        self.out = Output(kafka)
        self.dead = DeadLetters(self.out, kafka, f"{agent_name}-{index}")
        cls = {"sequences": SequenceAgent, "joiner": JoinerAgent}[agent_name]
        self.agent: Agent = cls(kafka, cfg, self.out, self.dead)
        self.agent.high_water = self.high_water
        self.consumer = group_consumer(kafka, kafka.topic_prefix + self.agent.group, **{
            "partition.assignment.strategy": "range",  # co-partitioned inputs: partition p of each topic together
            "fetch.wait.max.ms": 50})
        self.topic_names = [kafka.topic(t) for t in self.agent.topics]
        self.positions: dict[tuple[str, int], int] = {}  # next offset to commit, per (topic, partition)
        self.assigned: list[int] = []
        self.consumed = 0
        self.first_event_at = self.last_event_at = 0.0  # wall clock of the first/last processed batch
        self.cpu_first = self.cpu_last = 0.0  # process CPU time at those batches (all threads)
        self.started = time.monotonic()
        self._last_report = (self.started, 0)
        self.rate = 0.0
        self.lag_cache: dict[str, int] = {}  # refreshed by the consuming thread; read by the metrics thread
        self._lag_at = 0.0
        self.stop_event = threading.Event()

    # --- rebalance -------------------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        committed = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(tps, timeout=30)}
        by_part: dict[int, dict[str, int | None]] = defaultdict(dict)
        for (topic, p), off in committed.items():
            by_part[p][topic] = off if off >= 0 else None
        starts: dict[tuple[str, int], int] = {}
        for p, offs in sorted(by_part.items()):
            for topic, off in self.agent.open(p, offs).items():
                starts[(topic, p)] = off
        for tp in tps:
            tp.offset = starts.get((tp.topic, tp.partition), OFFSET_BEGINNING)
        consumer.assign(tps)
        self.assigned = sorted(by_part)
        log.info("%s-%d assigned partitions %s", self.agent.name, self.index, self.assigned)

    def _on_revoke(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        self._commit(asynchronous=False)
        self._close_partitions({tp.partition for tp in tps})

    def _on_lost(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        self._close_partitions({tp.partition for tp in tps})  # someone else owns them now: no commit

    def _close_partitions(self, parts: set[int]) -> None:
        for p in sorted(parts):
            self.agent.close(p)
        self.positions = {k: v for k, v in self.positions.items() if k[1] not in parts}
        self.assigned = [p for p in self.assigned if p not in parts]
        log.info("%s-%d released partitions %s", self.agent.name, self.index, sorted(parts))

    # --- main loop --------------------------------------------------------------------------------------
    def _commit(self, asynchronous: bool = True) -> None:
        if self.positions:
            try:
                self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in self.positions.items()],
                                     asynchronous=asynchronous)
            except Exception as e:  # a failed commit only means more replay after a crash
                log.warning("offset commit failed: %s", e)

    def step(self) -> int:
        msgs = self.consumer.consume(self.cfg.batch_size, self.cfg.batch_wait_ms / 1000)
        self.agent.poll_side_inputs()
        by_part: dict[int, list[Message]] = defaultdict(list)
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise RuntimeError(f"consumer: {err}")
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer: %s", err)
                continue
            by_part[m.partition()].append(m)
            self.positions[(m.topic(), m.partition())] = m.offset() + 1
        for p, part_msgs in by_part.items():
            self.agent.process(p, part_msgs)
        n = sum(len(v) for v in by_part.values())
        if n:
            self.out.flush()  # outputs durable before the offsets that produced them are committed
            self.agent.flushed()
            self._commit()
            self.consumed += n
            self.last_event_at, self.cpu_last = time.time(), time.process_time()
            if not self.first_event_at:
                self.first_event_at, self.cpu_first = self.last_event_at, self.cpu_last
        else:
            self.out.producer.poll(0)
        self._report()
        return n

    def start(self) -> None:
        self.consumer.subscribe(self.topic_names, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        log.info("%s-%d started (group %s, topics %s)", self.agent.name, self.index,
                 self.kafka.topic_prefix + self.agent.group, self.topic_names)

    def close(self) -> None:
        self.consumer.close()  # revokes (commit + close stores) and leaves the group
        self.agent.shutdown()
        self.out.flush()
        log.info("%s-%d stopped after %d events", self.agent.name, self.index, self.consumed)

    def run(self) -> None:
        self.start()
        try:
            while not self.stop_event.is_set():
                self.step()
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
        return dict(out)

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._lag_at >= 1.0:
            # Only this thread touches the consumer: calls from the metrics thread block behind consume().
            self.lag_cache, self._lag_at = self.lag(), now
        t0, n0 = self._last_report
        if now - t0 < self.cfg.log_interval_s:
            return
        self.rate = (self.consumed - n0) / (now - t0)
        self._last_report = (now, self.consumed)
        gauges = " ".join(f"{k}={v:g}" for k, v in self.agent.gauges().items())
        log.info("%s-%d: %d events, %.0f events/s, lag %s, partitions %s, dead letters %d %s", self.agent.name,
                 self.index, self.consumed, self.rate, self.lag_cache, self.assigned, self.dead.total, gauges)

    def metrics_text(self) -> str:
        labels = f'agent="{self.agent.name}",worker="{self.index}"'
        lines = [f"lum_agent_events_total{{{labels}}} {self.consumed}",
                 f"lum_agent_events_per_second{{{labels}}} {self.rate:.1f}",
                 f"lum_agent_assigned_partitions{{{labels}}} {len(self.assigned)}",
                 f"lum_agent_dead_letters_total{{{labels}}} {self.dead.total}",
                 f"lum_agent_first_batch_timestamp_seconds{{{labels}}} {self.first_event_at:.3f}",
                 f"lum_agent_last_batch_timestamp_seconds{{{labels}}} {self.last_event_at:.3f}",
                 f"lum_agent_cpu_seconds_between_batches{{{labels}}} {self.cpu_last - self.cpu_first:.3f}",
                 f"process_cpu_seconds_total{{{labels}}} {time.process_time():.3f}"]
        lines += [f'lum_agent_lag{{{labels},topic="{t}"}} {v}' for t, v in self.lag_cache.items()]
        lines += [f"lum_agent_{k}{{{labels}}} {v:g}" for k, v in self.agent.gauges().items()]
        return "\n".join(lines) + "\n"

    def serve_metrics(self, port: int) -> ThreadingHTTPServer:
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                body = worker.metrics_text().encode()
                try:
                    self.send_response(200 if self.path.startswith("/metrics") else 404)
                    self.send_header("Content-Type", "text/plain; version=0.0.4")
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the scraper went away
                    pass

            def log_message(self, *args):  # scrapes are not worth a log line each
                pass

        server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
        log.info("metrics on http://0.0.0.0:%d/metrics", port)
        return server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run one lum agent worker")
    ap.add_argument("agent", choices=["sequences", "joiner"])
    ap.add_argument("--index", type=int, default=0, help="worker index (metrics port offset, log name)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    cfg = load(AgentSettings)
    worker = Worker(args.agent, load(KafkaSettings), cfg, args.index)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop_event.set())
    server = worker.serve_metrics(cfg.metrics_port + args.index) if cfg.metrics_port else None
    try:
        worker.run()
    finally:
        if server:
            server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
