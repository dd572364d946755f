"""``lum replay`` and ``lum backfill sequences`` against the real embedded broker."""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest

from deploy.cli import main as lum
from schemas.settings import load
from schemas.topics import BEHAVIORS
from streaming.kafka import read_to_end, reader
from streaming.agents.sequences import expected_sequences, snapshot
from streaming.agents.settings import AgentSettings
from streaming.replay import parse_time


def test_parse_time():
    assert parse_time("1767225600000") == 1_767_225_600_000
    assert parse_time("2026-01-01T00:00:00Z") == parse_time("2026-01-01T00:00:00") == 1_767_225_600_000
    assert parse_time("2026-01-01T01:00:00+01:00") == 1_767_225_600_000
    with pytest.raises(ValueError):
        parse_time("yesterday")


def test_replay_time_range_into_topic_jsonl_and_parquet(kafka, kit, tmp_path):
    rng = random.Random(0)
    events = [kit.behavior(i, rng.randrange(50), t=rng.randrange(100) * 1000) for i in range(400)]
    events.sort(key=lambda e: e.event_time_ms)  # producers write in event-time order (timestamps = event time)
    kit.produce(kafka, events)
    lo, hi = kit.T0 + 20_000, kit.T0 + 50_000
    want = sorted(e.event_id for e in events if lo <= e.event_time_ms < hi)
    assert 0 < len(want) < len(events)
    iso = datetime.fromtimestamp(lo / 1000, timezone.utc).isoformat()

    assert lum(["replay", "behaviors", "--from", iso, "--to", str(hi), "--into", "behaviors-copy"]) == 0
    c = reader(kafka)
    copied = [BEHAVIORS.decode(m.value()) for m in read_to_end(c, kafka.topic_prefix + "behaviors-copy")]
    c.close()
    assert sorted(e.event_id for e in copied) == want

    assert lum(["replay", "behaviors", "--from", str(lo), "--to", str(hi), "--into", str(tmp_path / "r.jsonl")]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert sorted(r["event_id"] for r in rows) == want
    assert all(lo <= r["_timestamp_ms"] < hi and r["_key"] == str(r["user_id"]) for r in rows)

    assert lum(["replay", "behaviors", "--from", str(lo), "--to", str(hi), "--into", str(tmp_path / "r.parquet"),
                "--max-disorder-ms", "0"]) == 0
    table = pq.read_table(tmp_path / "r.parquet")
    assert sorted(table.column("event_id").to_pylist()) == want


def test_backfill_sequences_rebuilds_from_time_and_agents_continue(kafka, kit, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LUM_DATA_DIR", str(tmp_path))
    rng = random.Random(1)
    events = [kit.behavior(i, rng.randrange(30), t=rng.randrange(100) * 1000, item=rng.randrange(99))
              for i in range(600)]
    events += [kit.behavior(700 + i, 100 + i, t=i * 1000) for i in range(5)]  # users with early events only
    kit.produce(kafka, events)
    assert lum(["backfill", "sequences"]) == 0
    assert snapshot(kafka)[0] == expected_sequences(events)

    since = kit.T0 + 60_000
    assert lum(["backfill", "sequences", "--from", str(since)]) == 0
    assert "tombstones=5" in capsys.readouterr().out
    recent = [e for e in events if e.event_time_ms >= since]
    assert snapshot(kafka)[0] == expected_sequences(recent)  # users with nothing since are tombstoned

    more = [kit.behavior(1000 + i, rng.randrange(40), t=200_000 + i, item=7) for i in range(50)]
    kit.produce(kafka, more)
    cfg = load(AgentSettings, data_dir=tmp_path)
    with kit.ThreadWorker("sequences", kafka, cfg) as w:  # continues from the backfill's offsets
        kit.wait_for(lambda: snapshot(kafka)[0] == expected_sequences(recent + more), what="agent after backfill")
        assert w.consumed == len(more)
