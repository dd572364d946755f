"""Read topic partitions from given offsets up to their end, with assign() (no consumer group).

"End" is the high-water mark carried by fetched data: librdkafka's partition-EOF event fires when a fetch
reaches it. The embedded broker's ListOffsets answer is wrong (README, Limits), its fetch
high-water mark is right, and this is also correct on Apache Kafka. Used by the sequence agent's rebuild,
``lum replay``, ``lum backfill sequences`` and the tests' snapshot readers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from schemas.settings import KafkaSettings


def reader(settings: KafkaSettings, **overrides: object) -> Consumer:
    # A throwaway group id: assign() never joins it and nothing is committed.
    return Consumer(settings.consumer_config(f"lum-reader-{uuid.uuid4().hex[:8]}", **{
        "enable.partition.eof": True, "enable.auto.commit": False, "fetch.wait.max.ms": 50} | overrides))


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
