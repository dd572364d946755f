"""Replay a time range of a topic into another topic or a file, and rebuild the sequence state (backfill).

    lum replay behaviors --from 2026-01-01T00:00:00Z --to 2026-01-02T00:00:00Z --into behaviors-day1
    lum replay impressions --from 1767225600000 --to 1767312000000 --into impressions.parquet   # or .jsonl
    lum backfill sequences [--from 2026-01-01T00:00:00Z]      # stop the sequence agents first

Time range: record timestamps (the producers set them to the event time), ``--from`` inclusive, ``--to``
exclusive; TIME is ISO-8601 (naive = UTC) or epoch milliseconds. Each partition is sought to
``offsets_for_times(--from)``, a lower bound only (the embedded broker always answers 0; Kafka answers the
first record at or after the time), and records older than ``--from`` are skipped. A partition ends at its
high-water mark as carried by fetched data, or, with ``--max-disorder-ms D``, at the first record later than
``--to + D`` (faster on long topics, exact only if timestamps are never more than D out of order).

Into a topic: key, value, timestamp and headers are copied unchanged, to the same partition number when the
target has as many partitions (created like the source if missing; names without the registry get the
topic prefix). Into ``.jsonl`` / ``.parquet``: one row per record with ``_partition``, ``_offset``,
``_timestamp_ms``, ``_key`` and the decoded value's fields (sequences: user_id, updated_at_ms, pairs);
records that do not decode go to ``dead-letters``. Files are built in memory: meant for analyst-sized ranges.

Backfill: rebuilds every partition's sequence database from ``behaviors`` (from TIME, default the beginning)
with the sequence agent's own code, republishes every rebuilt user to ``user-sequences``, publishes a
tombstone for users that had a sequence but no event since TIME, and sets the agent group's offsets to the
end of what it read, so that ``lum agents`` continues from there.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.settings import KafkaSettings
from schemas.topics import BEHAVIORS, BY_NAME, USER_SEQUENCES, Topic
from schemas.tokenize import UserSequence

from .agents.reading import partitions_of, read_to_end, reader

log = logging.getLogger(__name__)


def parse_time(text: str) -> int:
    """Epoch milliseconds from ``1767225600000`` or an ISO-8601 time (``2026-01-01T00:00:00Z``; naive = UTC)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither epoch milliseconds nor an ISO-8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def start_offsets(consumer: Consumer, topic: str, from_ms: int | None) -> dict[int, int]:
    """Per partition, where to start reading for records at or after ``from_ms`` (a lower bound)."""
    parts = partitions_of(consumer, topic)
    if from_ms is None:
        return {p: 0 for p in parts}
    found = consumer.offsets_for_times([TopicPartition(topic, p, from_ms) for p in parts], timeout=30)
    # -1: no record at or after from_ms (Kafka) -> nothing to read there.
    return {tp.partition: max(tp.offset, 0) for tp in found if tp.offset != -1}


class Progress:
    def __init__(self, what: str, every_s: float = 5.0):
        self.what, self.every, self.t0 = what, every_s, time.monotonic()
        self.last = self.t0
        self.scanned = self.kept = 0

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            log.info("%s: scanned %d records, kept %d (%.0f records/s)", self.what, self.scanned, self.kept,
                     self.scanned / max(now - self.t0, 1e-9))


def iter_range(settings: KafkaSettings, topic: str, from_ms: int | None, to_ms: int | None,
               max_disorder_ms: int | None = None, progress: Progress | None = None):
    """Messages of ``topic`` with from_ms <= timestamp < to_ms, partition by partition order of arrival."""
    consumer = reader(settings)
    try:
        starts = start_offsets(consumer, topic, from_ms)
        stopped: set[int] = set()
        for m in read_to_end(consumer, topic, starts):
            if progress:
                progress.scanned += 1
                progress.tick()
            if m.partition() in stopped:
                continue
            ts = m.timestamp()[1]
            if from_ms is not None and ts < from_ms:
                continue
            if to_ms is not None and ts >= to_ms:
                if max_disorder_ms is not None and ts >= to_ms + max_disorder_ms:
                    stopped.add(m.partition())
                    if len(stopped) == len(starts):
                        return
                continue
            if progress:
                progress.kept += 1
            yield m
    finally:
        consumer.close()


def _row(topic: Topic | None, m, dead) -> dict | None:
    row = {"_partition": m.partition(), "_offset": m.offset(), "_timestamp_ms": m.timestamp()[1],
           "_key": m.key().decode(errors="replace") if m.key() is not None else None}
    if topic is None:  # not a registry topic: raw bytes
        return row | {"value_b64": base64.b64encode(m.value() or b"").decode()}
    try:
        value = topic.decode(m.value())
    except ValueError as e:  # DecodeError
        dead.send_message(m, e)
        return None
    if isinstance(value, UserSequence):
        return row | {"user_id": value.user_id, "updated_at_ms": value.updated_at_ms,
                      "pairs": [[p.event_time_ms, p.event_key, *p.conditions, p.item_id, p.category_id]
                                for p in value.pairs]}
    return row | value.model_dump(mode="json")


def _resolve(settings: KafkaSettings, name: str) -> tuple[str, Topic | None]:
    topic = BY_NAME.get(name)
    return (settings.topic(topic), topic) if topic else (settings.topic_prefix + name, None)


def replay(settings: KafkaSettings, source: str, from_ms: int | None, to_ms: int | None, into: str,
           max_disorder_ms: int | None = None) -> int:
    """Copy the range; returns the number of records written."""
    from schemas.deadletter import DeadLetters

    src_name, src_topic = _resolve(settings, source)
    progress = Progress(f"replay {src_name} -> {into}")
    records = iter_range(settings, src_name, from_ms, to_ms, max_disorder_ms, progress)
    producer = Producer(settings.producer_config())
    if into.endswith((".jsonl", ".parquet")):
        dead = DeadLetters(producer, settings, "replay")
        rows = [r for r in (_row(src_topic, m, dead) for m in records) if r is not None]
        path = Path(into)
        path.parent.mkdir(parents=True, exist_ok=True)
        if into.endswith(".jsonl"):
            with open(path, "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), path)
        written = len(rows)
    else:
        dst_name, _ = _resolve(settings, into)
        if dst_name == src_name:
            raise ValueError("--into must differ from the source topic")
        n_dst = _ensure_like(settings, dst_name, src_topic, src_name)
        written = 0
        for m in records:
            same = m.partition() < n_dst
            kw = {"partition": m.partition()} if same else {}
            while True:
                try:
                    producer.produce(dst_name, value=m.value(), key=m.key(), timestamp=m.timestamp()[1],
                                     headers=m.headers(), **kw)
                    break
                except BufferError:
                    producer.poll(0.05)
            written += 1
    if producer.flush(60):
        raise RuntimeError("replay: records left unsent")
    progress.tick(force=True)
    log.info("replay done: %d records into %s", written, into)
    return written


def _ensure_like(settings: KafkaSettings, dst: str, src_topic: Topic | None, src_name: str) -> int:
    """Create ``dst`` like the source if missing; returns how many partitions ``dst`` has."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(settings.client_config())
    md = admin.list_topics(timeout=30)
    if dst not in md.topics:
        n = len(md.topics[src_name].partitions)
        cfg = src_topic.kafka_config() if src_topic else {}
        for _, fut in admin.create_topics([NewTopic(dst, num_partitions=n, replication_factor=1, config=cfg)]).items():
            try:
                fut.result(30)
            except Exception as e:
                if "exist" not in str(e).lower():
                    raise
        return n
    return len(md.topics[dst].partitions)


def backfill_sequences(settings: KafkaSettings, cfg, from_ms: int | None = None) -> dict[str, int]:
    """Rebuild the sequence agent's state and export from ``behaviors`` (see module docstring)."""
    from .agents.backfill import backfill_sequences as run

    return run(settings, cfg, from_ms)
