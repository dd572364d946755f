"""A historical log (MovieLens 100K, 1997-98) through the agents and ``lum replay`` end to end: the records
are stamped with ingest time (so Apache Kafka's retention keeps them), everything downstream works on the
payload's event time."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from deploy.cli import main as lum
from schemas.codec import decode
from schemas.datasets import read_movielens
from schemas.deadletter import DeadLetter
from schemas.events import BehaviorEvent, TrainingExample
from schemas.settings import load
from schemas.topics import DEAD_LETTERS, TRAINING_EXAMPLES
from streaming.agents.sequences import expected_sequences, snapshot
from streaming.agents.settings import AgentSettings
from streaming.kafka import read_to_end, reader
from streaming.producers import produce, with_impressions
from streaming.replay import parse_time

YEAR_2000 = 946_684_800_000


def _read(kafka, topic, model):
    c = reader(kafka)
    try:
        return [(m.timestamp()[1], decode(model, m.value())) for m in read_to_end(c, kafka.topic(topic))]
    finally:
        c.close()


def test_movielens_1997_through_agents_and_replay(kafka, kit, data_dir, tmp_path):
    started = int(time.time() * 1000)
    events = list(with_impressions(read_movielens(data_dir / "ml-100k", limit=1500)))
    behaviors = [e for e in events if isinstance(e, BehaviorEvent)]
    produce(kafka, events)
    cfg = load(AgentSettings, data_dir=tmp_path, join_window_ms=60_000, batch_size=500, log_interval_s=1)
    with kit.ThreadWorker("sequences", kafka, cfg), kit.ThreadWorker("joiner", kafka, cfg):
        kit.wait_for(lambda: snapshot(kafka)[0] == expected_sequences(behaviors), timeout=120,
                     what="MovieLens sequences")
        kit.wait_for(lambda: len(_read(kafka, TRAINING_EXAMPLES, TrainingExample)) > 100, timeout=120,
                     what="training examples from 1997 impressions")
    examples = _read(kafka, TRAINING_EXAMPLES, TrainingExample)
    assert all(ex.event_time_ms < YEAR_2000 and ts >= started - 1000 for ts, ex in examples)
    assert any(ex.label == 1 for _, ex in examples) and any(ex.label == 0 for _, ex in examples)
    assert _read(kafka, DEAD_LETTERS, DeadLetter) == []

    # lum replay selects by the payload's 1997 event time, not by today's record timestamps.
    times = sorted(e.event_time_ms for e in behaviors)
    lo, hi = times[len(times) // 3], times[2 * len(times) // 3]
    want = sorted(e.event_id for e in behaviors if lo <= e.event_time_ms < hi)
    assert want and hi < YEAR_2000
    out = tmp_path / "range.jsonl"
    iso = datetime.fromtimestamp(lo / 1000, timezone.utc).isoformat()
    assert parse_time(iso) == lo
    assert lum(["replay", "behaviors", "--from", iso, "--to", str(hi), "--into", str(out)]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert sorted(r["event_id"] for r in rows) == want
    assert all(r["_timestamp_ms"] >= started - 1000 for r in rows)
