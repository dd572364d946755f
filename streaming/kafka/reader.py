"""Consumers: read a topic to its end (assign(), no group), a snapshot (last value per key), a group consumer.

    consumer = reader(settings)                              # throwaway group id, nothing committed
    for msg in read_to_end(consumer, topic, {0: 1234}): ...  # partition 0 from offset 1234 to its end
    latest, ends = snapshot(settings, topic)                  # {key: value} (tombstones drop the key)
    consumer = group_consumer(settings, group_id, **overrides)  # the agent worker's and trainer's consumer

"End" is the high-water mark carried by fetched data: librdkafka's partition-EOF event fires when a fetch
reaches it. This is correct on Apache Kafka and on the embedded broker, whose ListOffsets answer (latest
offset) is wrong. Used by the sequence agent's rebuild, ``lum replay``, ``lum backfill sequences``, the
refresh job and the tests' snapshot readers. No other module builds a confluent-kafka ``Consumer``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from schemas.settings import KafkaSettings


def group_consumer(settings: KafkaSettings, group: str, **overrides: object) -> Consumer:
    """A consumer in group ``group`` (used as given: callers add ``settings.topic_prefix`` where they want
    it); auto-commit off, earliest reset, the profile's options, then ``overrides``."""
    return Consumer(settings.consumer_config(group, **overrides))


def reader(settings: KafkaSettings, **overrides: object) -> Consumer:
    # A throwaway group id: assign() never joins it and nothing is committed.
    return group_consumer(settings, f"lum-reader-{uuid.uuid4().hex[:8]}", **{
        "enable.partition.eof": True, "enable.auto.commit": False, "fetch.wait.max.ms": 50} | overrides)


def partitions_of(consumer: Consumer, topic: str, timeout: float = 10) -> list[int]:
    md = consumer.list_topics(topic, timeout=timeout).topics[topic]
    if md.error is not None:
        raise RuntimeError(f"topic {topic}: {md.error}")
    return sorted(md.partitions)


def read_to_end(consumer: Consumer, topic: str, starts: dict[int, int] | None = None, batch: int = 5000,
                idle_timeout_s: float = 30.0) -> Iterator[Message]:
    """Yield the messages of ``topic`` from ``starts`` ({partition: offset}, default: all from the beginning)
    until every partition has reached the end it reports; raises TimeoutError if nothing arrives for
    ``idle_timeout_s`` before that."""
    if starts is None:
        starts = {p: OFFSET_BEGINNING for p in partitions_of(consumer, topic)}
    # A partition that holds nothing is skipped without a fetch: its end-of-partition event costs ~0.6 s, once
    # per partition of every rebuild. Low >= high means empty on Kafka and on the embedded broker alike (whose
    # "latest" is only an underestimate, never 0 for a partition that holds data).
    starts = {p: o for p, o in starts.items() if _holds_data(consumer, topic, p)}
    if not starts:
        return
    consumer.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
    open_parts = set(starts)
    last = time.monotonic()
    try:
        while open_parts:
            msgs = consumer.consume(batch, 0.1)
            if msgs:
                last = time.monotonic()
            elif time.monotonic() - last > idle_timeout_s:
                raise TimeoutError(f"{topic}: no data and no end-of-partition for {idle_timeout_s:.0f}s "
                                   f"(partitions still open: {sorted(open_parts)})")
            for m in msgs:
                err = m.error()
                if err is None:
                    yield m
                elif err.code() == KafkaError._PARTITION_EOF:
                    open_parts.discard(m.partition())
                elif err.fatal():
                    raise RuntimeError(f"{topic}: {err}")
    finally:
        consumer.unassign()


def _holds_data(consumer: Consumer, topic: str, partition: int) -> bool:
    low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10, cached=False)
    return high > low


def snapshot(settings: KafkaSettings, topic: str, starts: dict[int, int] | None = None,
             on_message: Callable[[Message], None] | None = None,
             idle_timeout_s: float = 30.0) -> tuple[dict[bytes, bytes], dict[int, int]]:
    """The last value per key of ``topic`` (from ``starts``, default the beginning; a tombstone removes the
    key) and the next offset per partition reached. What compaction would keep, computed by the reader:
    the embedded broker never compacts, and on Apache Kafka the uncompacted head needs it anyway."""
    latest: dict[bytes, bytes] = {}
    ends: dict[int, int] = dict(starts or {})
    consumer = reader(settings)
    try:
        for m in read_to_end(consumer, topic, starts, idle_timeout_s=idle_timeout_s):
            ends[m.partition()] = m.offset() + 1
            if on_message is not None:
                on_message(m)
            if m.value():
                latest[m.key()] = m.value()
            else:
                latest.pop(m.key(), None)
    finally:
        consumer.close()
    return latest, ends
