"""The sequence export on the real embedded broker: the one reader (full snapshot, "changed since", the
partition rebuild) equals the sequences defined by the agent's rule, across a snapshot job, a restart of the
reader's view, a backfill-style reset, and bad records."""

from __future__ import annotations

import json

import numpy as np
from confluent_kafka import Producer

from deploy.cli import main as cli
from schemas import seqexport as sx
from schemas.codec import decode
from schemas.events import DeadLetter
from schemas.topics import DEAD_LETTERS, SEQUENCE_DELTAS, USER_SEQUENCES, key_of
from streaming.kafka.sequences import changed_since, fold_partition, snapshot, write_snapshot
from streaming.kafka import DeadLetters, Output

CAP = 16
PARTS = 4


def stream(n: int, users: int, seed: int) -> list[tuple[int, tuple[int, ...]]]:
    """(user, pair row): interleaved users, 10% duplicates, 15% late events that land mid-history."""
    rng = np.random.default_rng(seed)
    out: list = []
    for i in range(n):
        if out and rng.random() < 0.1:
            out.append(out[int(rng.integers(0, len(out)))])
            continue
        user = int(rng.integers(0, users))
        t = 1_767_225_600_000 + i * 1000 - (int(rng.integers(0, 300_000)) if rng.random() < 0.15 else 0)
        out.append((user, (t, int(rng.integers(0, 2**62)), int(rng.integers(1, 4)), int(rng.integers(1, 5)),
                           int(rng.integers(1, 40)), 0, int(rng.integers(0, 5000)), int(rng.integers(0, 40)))))
    return out


def reference(events) -> dict[int, np.ndarray]:
    by_user: dict[int, dict[int, tuple]] = {}
    for u, r in events:
        by_user.setdefault(u, {})[r[1]] = r
    return {u: np.array(sorted(rs.values())[-CAP:], dtype=np.int64) for u, rs in by_user.items()}


def publish_deltas(kafka, events, batch: int = 50, raw: list[tuple[bytes, bytes, int]] = ()) -> None:
    """What the sequence agent publishes: per batch, one delta per user, on the user's partition."""
    p = Producer(kafka.producer_config())
    topic = kafka.topic(SEQUENCE_DELTAS)
    for start in range(0, len(events), batch):
        rows: dict[int, list] = {}
        for u, r in events[start:start + batch]:
            rows.setdefault(u, []).append(r)
        for u, rs in rows.items():
            p.produce(topic, sx.encode_delta(u, np.array(rs, dtype=np.int64), CAP), key_of(u), partition=u % PARTS)
    for key, value, part in raw:
        p.produce(topic, value, key, partition=part)
    assert p.flush(30) == 0


def as_rows(seqs) -> dict[int, np.ndarray]:
    return {u: sx.rows_of(s) for u, s in seqs.items()}


def assert_equal(got: dict[int, np.ndarray], want: dict[int, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for u in want:
        np.testing.assert_array_equal(got[u], want[u], err_msg=f"user {u}")


def test_reader_equals_definition_across_snapshot_job_and_view_restart(kafka, tmp_path, read_topic, capsys):
    events = stream(1500, users=30, seed=1)
    first, second = events[:900], events[900:]
    publish_deltas(kafka, first, raw=[(b"7", b"not a delta", 3)])
    view = tmp_path / "view"
    out = Output(kafka)
    dead = DeadLetters(out, kafka, "test-export")
    seqs, offsets = changed_since(kafka, None, view, dead)  # first use: everyone
    assert_equal(as_rows(seqs), reference(first))
    seqs, offsets = changed_since(kafka, None, view, dead)  # everyone again, from the view alone
    assert_equal(as_rows(seqs), reference(first))
    out.flush()
    letters = [decode(DeadLetter, v) for *_, v in read_topic(DEAD_LETTERS)]
    assert [(d.source_topic, d.partition, d.consumer) for d in letters] == [
        (kafka.topic(SEQUENCE_DELTAS), 3, "test-export")]  # the bad delta, once

    # The snapshot job (`lum sequences snapshot`) folds the deltas into user-sequences (compact layout) and
    # moves the markers.
    assert cli(["sequences", "snapshot", "--every", "0"]) == 2
    capsys.readouterr()
    assert cli(["sequences", "snapshot"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert cli(["sequences", "stats"]) == 0
    assert json.loads(capsys.readouterr().out)["users"] == len(reference(first))
    assert stats["users"] == len(reference(first))
    recs = read_topic(USER_SEQUENCES)
    assert sum(1 for *_, k, _v in recs if k.startswith(sx.MARKER_PREFIX)) == PARTS
    assert_equal(as_rows(snapshot(kafka)[0]), reference(first))
    # Nothing changed for the view: the snapshot job rewrote the same sequences.
    assert changed_since(kafka, offsets, view)[0] == {}
    _, offsets = changed_since(kafka, offsets, view)

    publish_deltas(kafka, second)
    # A reader restarted between the snapshot and the new deltas (a new View on the same directory).
    before = offsets
    seqs, offsets = changed_since(kafka, offsets, view)
    want = reference(events)
    assert sorted(seqs) == sorted({u for u, _ in second})
    assert_equal(as_rows(seqs), {u: want[u] for u in seqs})
    assert_equal(as_rows(snapshot(kafka)[0]), want)  # the full read after a snapshot + more deltas
    for p in range(PARTS):
        assert_equal(fold_partition(kafka, p), {u: r for u, r in want.items() if u % PARTS == p})
    # An older "since" (a refresh that crashed before saving its offsets) reports the same users again.
    assert changed_since(kafka, offsets, view)[0] == {}
    again, _ = changed_since(kafka, before, view)
    assert sorted(again) == sorted({u for u, _ in second})
    assert_equal(as_rows(again), {u: want[u] for u in again})


def test_snapshot_records_replace_and_reset(kafka, tmp_path):
    """A snapshot record written after the view (e.g. ``lum backfill``: new sequences + markers) replaces the
    user's sequence; a tombstone deletes the user; both count as changes; deltas before the marker are out."""
    events = stream(400, users=10, seed=2)
    publish_deltas(kafka, events)
    view = tmp_path / "view"
    _, offsets = changed_since(kafka, None, view)
    want = reference(events)
    new3 = want[3][-2:].copy()  # a rebuilt, shorter sequence for user 3 (a backfill from a later time)
    p = Producer(kafka.producer_config())
    topic = kafka.topic(USER_SEQUENCES)
    p.produce(topic, sx.encode_snapshot(3, new3), key_of(3), partition=3)
    p.produce(topic, None, key_of(7), partition=3)  # user 7: no events since the backfill's start
    p.produce(topic, sx.encode_marker(3, 10**9), sx.marker_key(3), partition=3)  # every old delta is before it
    assert p.flush(30) == 0
    seqs, _ = changed_since(kafka, offsets, view)
    assert sorted(seqs) == [3]  # 7 changed too, but it has no sequence any more
    np.testing.assert_array_equal(sx.rows_of(seqs[3]), new3)
    full = as_rows(snapshot(kafka)[0])
    assert 7 not in full and np.array_equal(full[3], new3)
    assert_equal({u: r for u, r in full.items() if u % PARTS != 3}, {u: r for u, r in want.items() if u % PARTS != 3})


def test_todays_layout_still_reads(kafka):
    """user-sequences written in today's fixed int64 layout (codec version 1) read unchanged."""
    from schemas.tokenize import TokenPair, UserSequence

    seq = UserSequence(42, 5, [TokenPair(1, 2, (3, 4, 5, 0), 6, 7), TokenPair(5, 9, (3, 4, 5, 0), 6, 7)])
    p = Producer(kafka.producer_config())
    p.produce(kafka.topic(USER_SEQUENCES), USER_SEQUENCES.encode(seq), key_of(42))
    assert p.flush(30) == 0
    got, offsets = snapshot(kafka)
    assert got == {42: seq} and sum(offsets.values()) == 1


def messy_events(kit, users: int, per_user: int, seed: int):
    """Interleaved users, arrival order != event time (late events land mid-history), retried duplicates."""
    import random

    rng = random.Random(seed)
    events = []
    for u in range(users):
        for t in rng.sample(range(per_user * 10), per_user):
            events.append(kit.behavior(len(events), 10_000 + u * 7919, t, item=rng.randrange(500),
                                       scenario=rng.choice(["home", "search"])))
    rng.shuffle(events)
    for d in [e for e in events if rng.random() < 0.1]:
        events.insert(rng.randrange(events.index(d), len(events) + 1), d)
    return events


def test_agent_export_equals_direct_computation_across_snapshot_and_restart(kafka, kit, tmp_path, read_topic):
    """The real sequence agent: its deltas (+ a snapshot job between two streams) fold to the direct
    computation; a worker restarted on an empty state directory rebuilds from snapshot + deltas and goes on
    exactly; and a delta carries only the batch's pairs, never the history."""
    from schemas.settings import load
    from streaming.agents.sequences import expected_sequences
    from streaming.agents.settings import AgentSettings

    cap = 16
    events = messy_events(kit, users=10, per_user=40, seed=4)
    first, second = events[:len(events) // 2], events[len(events) // 2:]
    kit.produce(kafka, first)
    cfg = load(AgentSettings, data_dir=tmp_path / "a", max_pairs=cap, batch_size=53, log_interval_s=1)
    with kit.ThreadWorker("sequences", kafka, cfg):
        kit.wait_for(lambda: snapshot(kafka)[0] == expected_sequences(first, cap=cap), timeout=60,
                     what="export == direct computation")
    write_snapshot(kafka)
    kit.produce(kafka, second)
    # Another host: no local state, so the partitions are rebuilt from the export, then the stream goes on.
    cfg2 = load(AgentSettings, data_dir=tmp_path / "b", max_pairs=cap, batch_size=53, log_interval_s=1)
    with kit.ThreadWorker("sequences", kafka, cfg2) as w:
        kit.wait_for(lambda: snapshot(kafka)[0] == expected_sequences(events, cap=cap), timeout=60,
                     what="export == direct computation after snapshot and restart")
        assert w.logic.gauges()["sequences_rebuilt_users_total"] == 10
    deltas = [SEQUENCE_DELTAS.decode(v) for *_, v in read_topic(SEQUENCE_DELTAS)]
    # Each event travels once (one worker, no replay); whole sequences would be ~cap pairs per publish.
    assert sum(len(d.rows) for d in deltas) <= len(events)
