"""Sequence agent against the real embedded broker: exact sequences, crash recovery, rebalances."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest

from schemas.codec import decode
from schemas.events import DeadLetter
from schemas.settings import load
from schemas.topics import BEHAVIORS, DEAD_LETTERS, USER_SEQUENCES
from streaming.kafka import read_to_end, reader
from schemas.seqexport import to_sequence
from streaming.agents.sequences import encode_value, expected_sequences, merge, pair_rows, read_sequences, snapshot
from streaming.agents.settings import AgentSettings
from streaming.agents.store import read_state



def make_events(kit, n_users: int, per_user: int, seed: int, dup_rate: float = 0.1):
    """Interleaved users, out-of-order event times within a user, and retried (duplicate) events."""
    rng = random.Random(seed)
    events = []
    for u in range(n_users):
        user = 10_000 + u * 7919
        times = rng.sample(range(per_user * 10), per_user)  # unsorted: arrival order != event-time order
        for j, t in enumerate(times):
            events.append(kit.behavior(len(events), user, t, item=rng.randrange(500),
                                       scenario=rng.choice(["home", "search"]),
                                       behavior=rng.choice(["view", "click", "buy"])))
    rng.shuffle(events)
    dups = [e for e in events if rng.random() < dup_rate]
    for d in dups:  # a retry arrives later, after other events
        events.insert(rng.randrange(events.index(d), len(events) + 1), d)
    return events


def local_state(root: Path) -> dict:
    """Every user's sequence in the agents' RocksDB directories, through the agent's one reader."""
    state = {}
    for p in sorted(root.glob("p*")):
        state |= {u: to_sequence(u, rows) for u, rows in read_sequences(read_state(p))}
    return state


def test_sequences_equal_direct_computation_and_bad_messages_go_to_dead_letters(kafka, kit, tmp_path):
    events = make_events(kit, n_users=12, per_user=40, seed=1)
    half = len(events) // 2
    bad = [(BEHAVIORS, b"1", b"not an event", None),
           (BEHAVIORS, b"2", BEHAVIORS.encode(events[0])[:-5] + b"oops}", None)]
    kit.produce(kafka, events[:half], raw=bad)
    kit.produce(kafka, events[half:])
    cap = 16  # smaller than per-user counts: the oldest pairs must fall off, late ones land in place
    expected = expected_sequences(events, cap=cap)
    assert any(len(s.pairs) == cap for s in expected.values())
    cfg = load(AgentSettings, data_dir=tmp_path, max_pairs=cap, batch_size=97, log_interval_s=1)
    with kit.ThreadWorker("sequences", kafka, cfg) as w:
        kit.wait_for(lambda: snapshot(kafka)[0] == expected, timeout=60, what="snapshot == expected")
        assert w.dead.total == 2
    # the RocksDB state (its one reader) equals the export
    assert local_state(tmp_path / "sequences" / (kafka.topic_prefix + cfg.sequences_group)) == expected
    c = reader(kafka)
    letters = [decode(DeadLetter, m.value()) for m in read_to_end(c, kafka.topic(DEAD_LETTERS))]
    c.close()
    assert len(letters) == 2 and {x.source_topic for x in letters} == {kafka.topic(BEHAVIORS)}
    assert all(x.error for x in letters)


@pytest.mark.parametrize("cap", [1, 2, 7, 1000])
def test_merge_in_any_batching_equals_the_set_definition(kit, cap):
    """merge() is idempotent and order-free: any batching of any arrival order gives top-cap of the set."""
    rng = random.Random(cap)
    base = [kit.behavior(i, 1, t=rng.randrange(500)) for i in range(200)]  # tied times included
    arrivals = [rng.choice(base) for _ in range(400)]  # duplicates, out of order
    rows = None
    i = 0
    while i < len(arrivals):
        k = rng.choice([1, 1, 2, 5])
        merged = merge(rows, np.array([pair_rows(e) for e in arrivals[i:i + k]], dtype=np.int64), cap)
        rows = merged if merged is not None else rows
        i += k
    assert USER_SEQUENCES.decode(encode_value(1, rows)) == expected_sequences(arrivals, cap=cap)[1]


def test_encoded_rows_decode_with_schemas_codec(kit):
    ev = [kit.behavior(i, 5, t=i) for i in range(3)]
    seq = expected_sequences(ev)[5]
    assert [p.item_id for p in seq.pairs] == [e.item_id for e in ev]
    assert seq.updated_at_ms == ev[-1].event_time_ms
    assert USER_SEQUENCES.decode(encode_value(5, np.zeros((0, 8), dtype="int64"))).pairs == []


def test_two_workers_on_one_host_split_partitions_and_a_rebalance_loses_nothing(kafka, kit, tmp_path, procs):
    events = make_events(kit, n_users=200, per_user=10, seed=3)
    expected = expected_sequences(events)
    # One host: a shared state dir, moved partitions reuse the local RocksDB (two hosts, where moved partitions
    # are rebuilt from the export: tests/streaming/agents/test_runtimes.py).
    env = {"LUM_AGENT_BATCH_SIZE": "100", "LUM_AGENT_LOG_INTERVAL_S": "1", "LUM_DATA_DIR": str(tmp_path / "s")}
    procs.append(a := kit.ProcWorker("sequences", tmp_path / "a.log", env, 0))
    procs.append(b := kit.ProcWorker("sequences", tmp_path / "b.log", env, 1))
    kit.wait_for(lambda: {"assigned partitions [0, 1]" in x.text() or "assigned partitions [2, 3]" in x.text()
                      for x in (a, b)} == {True} and "[0, 1, 2, 3]" not in a.text() + b.text(), timeout=60,
             what="two workers with two partitions each")
    kit.produce(kafka, events[:len(events) // 2])
    first = expected_sequences(events[:len(events) // 2])
    kit.wait_for(lambda: snapshot(kafka)[0] == first, timeout=60, what="first half processed")
    assert a.stop() == 0  # one stops: the other takes over its partitions
    kit.produce(kafka, events[len(events) // 2:])
    kit.wait_for(lambda: snapshot(kafka)[0] == expected, timeout=90, what="all events after the rebalance")
    assert "assigned partitions [0, 1, 2, 3]" in b.text()
    assert max(int(n) for n in re.findall(r"rebuilt (\d+) users", b.text())) == 0  # fresh partitions only
    assert b.stop() == 0
