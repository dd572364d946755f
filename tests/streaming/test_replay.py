"""``lum replay`` and ``lum backfill sequences`` against the real embedded broker.

Events are stamped 2026-01-01 (payload ``event_time_ms``) but produced now (record timestamp = ingest time):
every range below selects by payload time, which a record-timestamp selection would get wrong.
"""

from __future__ import annotations

import json
import random
import time
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
    events.sort(key=lambda e: e.event_time_ms)  # producers write in event-time order
    started = int(time.time() * 1000)
    kit.produce(kafka, events)
    lo, hi = kit.T0 + 20_000, kit.T0 + 50_000
    want = sorted(e.event_id for e in events if lo <= e.event_time_ms < hi)
    assert 0 < len(want) < len(events)
    iso = datetime.fromtimestamp(lo / 1000, timezone.utc).isoformat()

    assert lum(["replay", "behaviors", "--from", iso, "--to", str(hi), "--into", "behaviors-copy"]) == 0
    c = reader(kafka)
    copied = [(m.timestamp()[1], BEHAVIORS.decode(m.value())) for m in read_to_end(c, kafka.topic_prefix + "behaviors-copy")]
    c.close()
    assert sorted(e.event_id for _, e in copied) == want
    assert all(ts >= started - 1000 for ts, _ in copied)  # the copy has its own ingest time

    assert lum(["replay", "behaviors", "--from", str(lo), "--to", str(hi), "--into", str(tmp_path / "r.jsonl")]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert sorted(r["event_id"] for r in rows) == want
    assert all(lo <= r["event_time_ms"] < hi and r["_key"] == str(r["user_id"]) for r in rows)
    assert all(r["_timestamp_ms"] >= started - 1000 for r in rows)  # record timestamps: ingest time

    assert lum(["replay", "behaviors", "--from", str(lo), "--to", str(hi), "--into", str(tmp_path / "r.parquet"),
                "--max-disorder-ms", "0"]) == 0
    table = pq.read_table(tmp_path / "r.parquet")
    assert sorted(table.column("event_id").to_pylist()) == want


def test_backfill_sequences_rebuilds_from_time_and_agents_continue(kafka, kit, tmp_path, monkeypatch, capsys,
                                                                  caplog):
    monkeypatch.setenv("LUM_DATA_DIR", str(tmp_path))
    rng = random.Random(1)
    events = [kit.behavior(i, rng.randrange(30), t=rng.randrange(100) * 1000, item=rng.randrange(99))
              for i in range(600)]
    events += [kit.behavior(700 + i, 100 + i, t=i * 1000) for i in range(5)]  # users with early events only
    kit.produce(kafka, events)
    caplog.set_level("INFO", logger="lum.progress")
    assert lum(["backfill", "sequences"]) == 0
    assert snapshot(kafka)[0] == expected_sequences(events)
    assert any("backfill sequences: 605/605 records (100.0%)" in r.getMessage() for r in caplog.records), caplog.text

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


def test_replay_into_an_existing_file_needs_force(kafka, kit, tmp_path, capsys, caplog):
    kit.produce(kafka, [kit.behavior(i, i % 5, t=i * 1000) for i in range(20)])
    target = tmp_path / "mine.jsonl"
    target.write_text("precious\n")
    args = ["replay", "behaviors", "--from", str(kit.T0), "--to", str(kit.T0 + 10_000), "--into", str(target)]
    assert lum(args) != 0
    assert "--force" in capsys.readouterr().err and target.read_text() == "precious\n"
    caplog.set_level("INFO", logger="lum.progress")
    assert lum([*args, "--force"]) == 0
    assert len(target.read_text().splitlines()) == 10
    # Progress (not a terminal: log lines): records scanned out of the range's total, and those kept.
    assert any(": 20/20 records (100.0%)" in r.getMessage() and "kept 10" in r.getMessage()
               for r in caplog.records if r.name == "lum.progress"), caplog.text


def test_backfill_refuses_while_the_sequence_agents_run(kafka, kit, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LUM_DATA_DIR", str(tmp_path))
    events = [kit.behavior(i, i % 7, t=i * 1000) for i in range(50)]
    kit.produce(kafka, events)
    cfg = load(AgentSettings, data_dir=tmp_path)
    with kit.ThreadWorker("sequences", kafka, cfg) as w:
        kit.wait_for(lambda: w.consumed == len(events), what="agent consumed the events")
        assert lum(["backfill", "sequences"]) == 1
        err = capsys.readouterr().err
        assert "refusing" in err and kafka.topic_prefix + cfg.sequences_group in err
        assert (tmp_path / "sequences" / (kafka.topic_prefix + cfg.sequences_group) / "p0").exists()
    assert lum(["backfill", "sequences"]) == 0  # stopped: the group is empty, the backfill runs
    assert snapshot(kafka)[0] == expected_sequences(events)
