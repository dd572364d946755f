"""Replay a time range of a topic into another topic or a file, and rebuild the sequence state (backfill).

    lum replay behaviors --from 2026-01-01T00:00:00Z --to 2026-01-02T00:00:00Z --into behaviors-day1
    lum replay impressions --from 1767225600000 --to 1767312000000 --into impressions.parquet [--force]
    lum backfill sequences [--from 1997-01-01]      # refuses while the sequence agents' group has members

Time range: PAYLOAD time (``event_time_ms`` of behaviors, impressions and training examples;
``updated_at_ms`` of sequences; ``computed_at_ms`` of LUM features and item embeddings; ``failed_at_ms`` of
dead letters), ``--from`` inclusive, ``--to`` exclusive; TIME is ISO-8601 (naive = UTC) or epoch
milliseconds. Record timestamps are ingest time (``streaming.kafka.producer``), so a MovieLens 1997 replay
produced today is selected by its 1997 event times. Topics outside the registry have no known payload:
they are selected by record (ingest) timestamp. Where to start reading: ``offsets_for_times(--from -
--max-future-ms)`` per partition, a lower bound as long as no event is stamped more than that (default 1 h)
after it was produced (the embedded broker always answers 0; Kafka answers the first record ingested at or
after that time). A partition ends at its high-water mark as carried by fetched data, or, with
``--max-disorder-ms D``, at the first record whose payload time is at or after ``--to + D`` (faster on long
topics, exact only if payload times are never more than D out of order).

Into a topic: key, value and headers are copied unchanged (the copy's record timestamps are its own ingest
time), to the same partition number when the target has as many partitions (created like the source if
missing; names without the registry get the topic prefix). Into ``.jsonl`` / ``.parquet``: one row per
record with ``_partition``, ``_offset``, ``_timestamp_ms`` (record, i.e. ingest, time), ``_key`` and the
decoded value's fields (sequences: user_id, updated_at_ms, pairs). An existing file is never overwritten
without ``--force``. Records of a registry topic that do not decode have no payload time: they go to
``dead-letters``. Files are built in memory: meant for analyst-sized ranges.

Backfill: first checks that the sequence agents' consumer group has no live member (their databases are
about to be replaced) and refuses, naming the members, if it has. Then rebuilds every partition's sequence
database from ``behaviors`` (events with payload time at or after TIME, default all) with the sequence
agent's own code, republishes every rebuilt user to ``user-sequences``, publishes a tombstone for users that
had a sequence but no event since TIME, and sets the agent group's offsets to the end of what it read, so
that ``lum agents`` continues from there.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from confluent_kafka import Consumer, Message, TopicPartition

from schemas.codec import DecodeError
from schemas.progress import progress as track
from schemas.settings import KafkaSettings
from schemas.topics import BY_NAME, Topic
from schemas.tokenize import UserSequence

from .kafka import DeadLetters, Output, group_members, partitions_of, read_to_end, reader
from .kafka.admin import ensure_topic, partition_count

log = logging.getLogger(__name__)

MAX_FUTURE_MS = 3600_000  # default bound on (payload time - ingest time): where a time-range read may start
_TIME_FIELDS = ("event_time_ms", "updated_at_ms", "computed_at_ms", "failed_at_ms")


class AgentsRunning(RuntimeError):
    """``lum backfill`` found live members in the agents' consumer group."""


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


def payload_time(value) -> int:
    """The time a decoded registry value is about (see the module docstring)."""
    for name in _TIME_FIELDS:
        t = getattr(value, name, None)
        if t is not None:
            return int(t)
    raise ValueError(f"{type(value).__name__} carries no time")


def start_offsets(consumer: Consumer, topic: str, from_ms: int | None,
                  max_future_ms: int = MAX_FUTURE_MS) -> dict[int, int]:
    """Per partition, where to start reading for payload times at or after ``from_ms`` (a lower bound:
    records ingested before ``from_ms - max_future_ms`` carry older payload times)."""
    parts = partitions_of(consumer, topic)
    if from_ms is None:
        return {p: 0 for p in parts}
    found = consumer.offsets_for_times([TopicPartition(topic, p, max(from_ms - max_future_ms, 0)) for p in parts],
                                       timeout=30)
    # -1: nothing ingested at or after that time (Kafka) -> nothing to read there.
    return {tp.partition: max(tp.offset, 0) for tp in found if tp.offset != -1}


def records_after(settings: KafkaSettings, topic: str, starts: dict[int, int]) -> int | None:
    """How many records lie between ``starts`` and the partitions' current ends (a progress bar's total)."""
    from .status import end_offsets

    if not starts:
        return 0
    ends = end_offsets(settings, {topic: max(starts) + 1})[topic]
    return sum(max(ends[p] - s, 0) for p, s in starts.items() if ends.get(p) is not None)


def iter_range(settings: KafkaSettings, topic: str, src_topic: Topic | None, from_ms: int | None, to_ms: int | None,
               dead: DeadLetters, max_disorder_ms: int | None = None, progress: str | None = None,
               max_future_ms: int = MAX_FUTURE_MS):
    """(message, decoded value or None) of ``topic`` with from_ms <= payload time < to_ms, per partition in
    offset order. Registry records that do not decode are dead-lettered (their time is unknown). With
    ``progress`` (a description), a bar (terminal) or periodic log lines report records scanned and kept."""
    consumer = reader(settings)
    stack = contextlib.ExitStack()
    try:
        starts = start_offsets(consumer, topic, from_ms, max_future_ms)
        bar = stack.enter_context(track(progress, records_after(settings, topic, starts), "records")) \
            if progress else None
        kept = 0
        stopped: set[int] = set()
        for m in read_to_end(consumer, topic, starts):
            if bar:
                bar.update(1)
            if m.partition() in stopped:
                continue
            value = None
            if src_topic is None:  # not a registry topic: no known payload, the record (ingest) time
                ts = m.timestamp()[1]
            else:
                try:
                    value = src_topic.decode(m.value())
                    ts = payload_time(value)
                except (DecodeError, ValueError) as e:
                    dead.send_message(m, e)
                    continue
            if from_ms is not None and ts < from_ms:
                continue
            if to_ms is not None and ts >= to_ms:
                if max_disorder_ms is not None and ts >= to_ms + max_disorder_ms:
                    stopped.add(m.partition())
                    if len(stopped) == len(starts):
                        return
                continue
            if bar:
                kept += 1
                bar.note(kept=kept)
            yield m, value
    finally:
        stack.close()
        consumer.close()


def _row(m: Message, value) -> dict:
    row = {"_partition": m.partition(), "_offset": m.offset(), "_timestamp_ms": m.timestamp()[1],
           "_key": m.key().decode(errors="replace") if m.key() is not None else None}
    if value is None:  # not a registry topic: raw bytes
        return row | {"value_b64": base64.b64encode(m.value() or b"").decode()}
    if isinstance(value, UserSequence):
        return row | {"user_id": value.user_id, "updated_at_ms": value.updated_at_ms,
                      "pairs": [[p.event_time_ms, p.event_key, *p.conditions, p.item_id, p.category_id]
                                for p in value.pairs]}
    return row | value.model_dump(mode="json")


def _resolve(settings: KafkaSettings, name: str) -> tuple[str, Topic | None]:
    topic = BY_NAME.get(name)
    return (settings.topic(topic), topic) if topic else (settings.topic_prefix + name, None)


def replay(settings: KafkaSettings, source: str, from_ms: int | None, to_ms: int | None, into: str,
           max_disorder_ms: int | None = None, force: bool = False, max_future_ms: int = MAX_FUTURE_MS) -> int:
    """Copy the range; returns the number of records written."""
    to_file = into.endswith((".jsonl", ".parquet"))
    path = Path(into)
    if to_file and path.exists() and not force:  # before any work: never clobber a file by accident
        raise FileExistsError(f"{into} exists: choose another path or pass --force to overwrite it")
    src_name, src_topic = _resolve(settings, source)
    out = Output(settings, **{"linger.ms": 20})
    dead = DeadLetters(out, settings, "replay")
    records = iter_range(settings, src_name, src_topic, from_ms, to_ms, dead, max_disorder_ms,
                         f"replay {src_name} -> {into}",
                         max_future_ms)
    if to_file:
        rows = [_row(m, v) for m, v in records]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")  # a failed run leaves no half-written file under the name
        if into.endswith(".jsonl"):
            with open(tmp, "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        out.flush()  # dead letters delivered before the result counts as done
        tmp.replace(path)
        written = len(rows)
    else:
        dst_name, _ = _resolve(settings, into)
        if dst_name == src_name:
            raise ValueError("--into must differ from the source topic")
        n_src = partition_count(settings, src_name)
        if n_src is None:
            raise ValueError(f"source topic {src_name} does not exist")
        n_dst = ensure_topic(settings, dst_name, n_src, src_topic.kafka_config() if src_topic else {})
        written = 0
        for m, _ in records:
            kw = {"partition": m.partition()} if m.partition() < n_dst else {}
            # No timestamp: the copy is stamped with its own ingest time (event time stays in the payload).
            out.produce(dst_name, value=m.value(), key=m.key(), headers=m.headers(), **kw)
            written += 1
        out.flush()
    log.info("replay done: %d records into %s", written, into)
    return written


def check_group_idle(settings: KafkaSettings, group: str) -> None:
    """Raise ``AgentsRunning`` naming the members when consumer group ``group`` has any."""
    members = group_members(settings, group)
    if members:
        raise AgentsRunning(f"consumer group {group} has {len(members)} live member(s): {'; '.join(members)}. "
                            "Stop `lum agents` (the sequence workers) before a backfill: it replaces their "
                            "databases and offsets.")


def backfill_sequences(settings: KafkaSettings, cfg, from_ms: int | None = None,
                       max_future_ms: int = MAX_FUTURE_MS) -> dict[str, int]:
    """Rebuild the sequence agent's state and export from ``behaviors`` (see module docstring)."""
    from .agents.backfill import backfill_sequences as run

    return run(settings, cfg, from_ms, max_future_ms)
