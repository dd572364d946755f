"""Producers write what they generate or replay: same count, same content, per-user order, event-time order;
record timestamps are ingest time, event time is in the payload."""

import time
from collections import defaultdict

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME

from schemas.datasets import read_movielens, read_taobao
from schemas.events import BehaviorEvent
from schemas.topics import BEHAVIORS, IMPRESSIONS
from streaming.kafka import read_to_end, reader
from streaming.producers import produce, with_impressions
from streaming.producers.synthetic import SyntheticConfig, SyntheticStream


def _decoded(records, topic):
    return [(p, o, k, topic.decode(v)) for p, o, k, v in records]


def test_100k_synthetic_events_round_trip(kafka, read_topic, caplog):
    expected = list(SyntheticStream(SyntheticConfig(users=300, items=2000, events=100_000, seed=7)))
    caplog.set_level("INFO", logger="lum.progress")
    stats = produce(kafka, expected, total=len(expected))
    assert stats["events"] == 100_000
    # Progress (not a terminal: log lines), ending with the count out of the expected total.
    last = [r.getMessage() for r in caplog.records if r.name == "lum.progress"][-1]
    assert "produce: 100,000/100,000 events (100.0%)" in last, caplog.text
    got = _decoded(read_topic(BEHAVIORS, stats["behaviors"]), BEHAVIORS) + \
        _decoded(read_topic(IMPRESSIONS, stats["impressions"]), IMPRESSIONS)
    assert len(got) == 100_000
    # Same content: every generated event is read back exactly once.
    assert sorted(map(repr, (e for *_, e in got))) == sorted(map(repr, expected))
    # Per-user order: within a partition, each user's events keep the producer's order.
    per_user_read = defaultdict(list)
    for p, o, k, e in sorted(got, key=lambda r: (r[0], r[1])):
        if isinstance(e, BehaviorEvent):
            assert k == str(e.user_id).encode()
            per_user_read[e.user_id].append(e.event_id)
    per_user_sent = defaultdict(list)
    for e in expected:
        if isinstance(e, BehaviorEvent):
            per_user_sent[e.user_id].append(e.event_id)
    assert per_user_read == per_user_sent


def test_synthetic_stream_is_seeded_and_time_ordered():
    a = list(SyntheticStream(SyntheticConfig(users=50, items=200, events=3000, seed=3, duplicate_rate=0.05)))
    assert a == list(SyntheticStream(SyntheticConfig(users=50, items=200, events=3000, seed=3, duplicate_rate=0.05)))
    assert a != list(SyntheticStream(SyntheticConfig(users=50, items=200, events=3000, seed=4)))
    times = [e.event_time_ms for e in a]
    assert times == sorted(times)
    ids = [e.event_id for e in a if isinstance(e, BehaviorEvent)]
    assert len(ids) > len(set(ids)), "duplicate_rate should produce producer retries"


@pytest.mark.parametrize("source", ["movielens", "taobao"])
def test_real_data_replays_completely_in_time_order(kafka, read_topic, data_dir, source):
    import gzip

    if source == "movielens":
        path, reader = data_dir / "ml-100k", read_movielens
        rows = sum(1 for _ in gzip.open(path / "u.data.gz"))
    else:
        path, reader = data_dir / "taobao-userbehavior", read_taobao
        rows = sum(1 for _ in gzip.open(path / "UserBehavior.sample.csv.gz"))
    stats = produce(kafka, reader(path))
    assert stats["events"] == rows
    got = _decoded(read_topic(BEHAVIORS, rows), BEHAVIORS)
    assert len(got) == rows
    assert len({e.event_id for *_, e in got}) == rows
    for part in {p for p, *_ in got}:
        times = [e.event_time_ms for p, o, k, e in sorted(got, key=lambda r: r[1]) if p == part]
        assert times == sorted(times), "each partition must be in event-time order"


def test_derived_impressions_label_like_the_protocol(data_dir):
    events = list(read_movielens(data_dir / "ml-100k", limit=2000))
    out = list(with_impressions(events))
    impressions = [e for e in out if not isinstance(e, BehaviorEvent)]
    clicks = [e for e in out if isinstance(e, BehaviorEvent) and e.behavior == "click"]
    assert len(impressions) == len(events)
    assert len(clicks) == sum(1 for e in events if e.rating >= 4)


def test_record_timestamps_are_ingest_time_and_event_time_is_in_the_payload(kafka, data_dir):
    """MovieLens is from 1997-98: stamped with event time, Apache Kafka's 7-day retention would delete it at
    once. The records carry the producing moment; the payload keeps the 1997 event time."""
    before = int(time.time() * 1000)
    stats = produce(kafka, read_movielens(data_dir / "ml-100k", limit=500))
    after = int(time.time() * 1000)
    consumer = reader(kafka)
    records = [(m.timestamp(), BEHAVIORS.decode(m.value())) for m in read_to_end(consumer, kafka.topic(BEHAVIORS))]
    consumer.close()
    assert len(records) == stats["events"] == 500
    for (kind, ts), event in records:
        assert kind == TIMESTAMP_CREATE_TIME and before - 1000 <= ts <= after + 1000
        assert event.event_time_ms < 946_684_800_000  # before 2000: the payload keeps the event time
