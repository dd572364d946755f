"""The reader: read_to_end reads every partition to its end, and skips the empty ones without a fetch."""

import time

from confluent_kafka import OFFSET_BEGINNING

from schemas.topics import JOINER_CHANGELOG
from streaming.kafka import Output, partitions_of, read_to_end, reader


def test_read_to_end_reads_what_partitions_hold_and_passes_empty_ones_at_once(kafka):
    """Rebuilds read a changelog partition per assigned partition, most of them empty on a fresh start: an
    empty partition's end-of-partition event takes a fetch wait (~0.6 s each on the embedded broker)."""
    topic = kafka.topic(JOINER_CHANGELOG)
    out = Output(kafka)
    for i in range(5):
        out.produce(topic, value=b"v%d" % i, key=b"k%d" % i, partition=1)
    out.flush(30)
    def read(starts):  # a fresh reader each time, as a worker's rebuild of one partition uses
        consumer = reader(kafka)
        try:
            return [m.value() for m in read_to_end(consumer, topic, starts)]
        finally:
            consumer.close()

    consumer = reader(kafka)
    parts = partitions_of(consumer, topic)
    consumer.close()
    assert len(parts) >= 4
    t0 = time.monotonic()
    empty = [v for p in parts if p != 1 for v in read({p: OFFSET_BEGINNING})]
    took = time.monotonic() - t0
    got = read({p: OFFSET_BEGINNING for p in parts})
    assert empty == [] and got == [b"v%d" % i for i in range(5)]
    assert took < 0.4 * (len(parts) - 1), f"{len(parts) - 1} empty partitions took {took:.2f}s"
