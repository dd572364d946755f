"""The export contract: compact layout round trips (and reads today's layout), and snapshot + deltas folds to
exactly the sequence defined by the agent's rule, whatever the interleaving, duplicates, lateness, cap or
restart point."""

from __future__ import annotations

import numpy as np
import pytest

from schemas import seqexport as sx
from schemas.codec import DecodeError
from schemas.events import BehaviorEvent
from schemas.tokenize import UserSequence, tokenize
from schemas.topics import SEQUENCE_DELTAS, USER_SEQUENCES

T0 = 1_767_225_600_000


def event(i: int, user: int, t: int, dup_of: int | None = None) -> BehaviorEvent:
    scen = ("home", "search", "detail")[i % 3]
    return BehaviorEvent(event_id=f"e{dup_of if dup_of is not None else i}", user_id=user, item_id=(i * 7919) % 5000,
                         category_id=i % 13, behavior=("view", "click", "cart", "buy")[i % 4], scenario=scen,
                         query="red shoes" if scen == "search" else None, event_time_ms=T0 + t)


def row(e: BehaviorEvent) -> tuple[int, ...]:
    p = tokenize(e)
    return (p.event_time_ms, p.event_key, *p.conditions, p.item_id, p.category_id)


def reference(events, cap: int) -> dict[int, np.ndarray]:
    """The definition, written independently: the cap latest distinct events in (time, key) order."""
    by_user: dict[int, dict[int, tuple]] = {}
    for e in events:
        r = row(e)
        by_user.setdefault(e.user_id, {})[r[1]] = r
    return {u: np.array(sorted(rs.values())[-cap:], dtype=np.int64).reshape(-1, sx.ROW) for u, rs in by_user.items()}


def messy_stream(n: int = 3000, users: int = 40, seed: int = 0) -> list[BehaviorEvent]:
    """Interleaved users, 10% duplicates (retries), 15% late events that land mid-history."""
    rng = np.random.default_rng(seed)
    out: list[BehaviorEvent] = []
    for i in range(n):
        user = int(rng.integers(0, users))
        t = i * 1000 - (int(rng.integers(0, 500_000)) if rng.random() < 0.15 else 0)
        if out and rng.random() < 0.1:
            src = out[int(rng.integers(0, len(out)))]
            out.append(src)  # the very same event again
            continue
        out.append(event(i, user, t))
    return out


def run_agent(events, cap: int, batch: int = 97, snapshot_after: int | None = None):
    """What the agent does, batch by batch: state per user, one delta per changed user per batch.
    Returns (final state, list of (batch index, Delta)), and the state right after batch ``snapshot_after``."""
    state: dict[int, np.ndarray] = {}
    deltas, snap = [], None
    for b, start in enumerate(range(0, len(events), batch)):
        rows: dict[int, list] = {}
        for e in events[start:start + batch]:
            rows.setdefault(e.user_id, []).append(row(e))
        for u, rs in rows.items():
            new = np.array(rs, dtype=np.int64)
            merged = sx.merge_rows(np.concatenate((state.get(u, np.zeros((0, sx.ROW), np.int64)), new)), cap)
            if u not in state or not np.array_equal(merged, state[u]):
                state[u] = merged
                deltas.append((b, sx.decode(sx.encode_delta(u, new, cap))))  # through the wire format
        if b == snapshot_after:
            snap = {u: sx.decode(sx.encode_snapshot(u, r))[1] for u, r in state.items()}
    return state, deltas, snap


def fold_all(snapshot: dict[int, np.ndarray], deltas) -> dict[int, np.ndarray]:
    per_user: dict[int, list] = {}
    for _, d in deltas:
        per_user.setdefault(d.user_id, []).append(d)
    users = set(snapshot) | set(per_user)
    return {u: sx.fold(snapshot.get(u), per_user.get(u, [])) for u in users}


def assert_equal(got: dict[int, np.ndarray], want: dict[int, np.ndarray]) -> None:
    assert set(got) == set(want)
    for u in want:
        np.testing.assert_array_equal(got[u], want[u], err_msg=f"user {u}")


@pytest.mark.parametrize("cap", [1, 16, 1024])
def test_fold_of_deltas_equals_the_definition(cap):
    events = messy_stream()
    want = reference(events, cap)
    state, deltas, _ = run_agent(events, cap)
    assert_equal(state, want)  # the simulated agent follows the rule
    assert_equal(fold_all({}, deltas), want)  # deltas alone, from the start


@pytest.mark.parametrize("snap_at", [0, 7, 20])
def test_restart_between_snapshot_and_deltas(snap_at):
    """A snapshot taken at batch k plus the deltas after it is exact; a marker that is too low (deltas that
    are already inside the snapshot applied again, as after a crash before the marker moved) changes nothing."""
    events = messy_stream(seed=snap_at)
    want = reference(events, 16)
    _, deltas, snap = run_agent(events, 16, snapshot_after=snap_at)
    assert_equal(fold_all(snap, [d for d in deltas if d[0] > snap_at]), want)
    assert_equal(fold_all(snap, deltas), want)
    assert_equal(fold_all(snap, deltas[len(deltas) // 3:]), want)


def test_fold_missing_a_delta_is_not_exact():
    """The equality tests can fail: dropping one delta after the snapshot changes a sequence."""
    events = messy_stream(seed=3)
    _, deltas, snap = run_agent(events, 16, snapshot_after=5)
    after = [d for d in deltas if d[0] > 5]
    with pytest.raises(AssertionError):
        assert_equal(fold_all(snap, after[:-1]), reference(events, 16))


def test_late_event_lands_mid_history_and_old_one_falls_off():
    cap = 4
    base = np.array([row(event(i, 1, i * 1000)) for i in range(4)], dtype=np.int64)
    late = sx.Delta(1, cap, np.array([row(event(99, 1, 1500))], dtype=np.int64))
    got = sx.fold(base, [late])
    assert got[:, 0].tolist() == [T0 + 1000, T0 + 1500, T0 + 2000, T0 + 3000]
    too_old = sx.Delta(1, cap, np.array([row(event(98, 1, -5))], dtype=np.int64))
    np.testing.assert_array_equal(sx.fold(got, [too_old]), got)


def test_cap_change_applies_in_order():
    rows = np.array([row(event(i, 1, i)) for i in range(10)], dtype=np.int64)
    deltas = [sx.Delta(1, 3, rows[:5]), sx.Delta(1, 8, rows[5:7])]
    # cap 3 drops events 0-1 for good; then the cap grows to 8: 2,3,4 + 5,6
    assert sx.fold(None, deltas)[:, 0].tolist() == [T0 + i for i in (2, 3, 4, 5, 6)]


def test_compact_layout_round_trips_and_is_smaller():
    events = messy_stream(n=2000, users=1)
    rows = reference(events, 1024)[next(iter({e.user_id for e in events}))]
    v2 = sx.encode_snapshot(7, rows)
    v1 = USER_SEQUENCES.encode(sx.to_sequence(7, rows))
    user, back = sx.decode(v2)
    assert user == 7
    np.testing.assert_array_equal(back, rows)
    assert USER_SEQUENCES.decode(v2) == USER_SEQUENCES.decode(v1)  # both layouts read as the same sequence
    assert len(v2) < len(v1) / 2
    d = SEQUENCE_DELTAS.decode(sx.encode_delta(7, rows[:1], 1024))
    assert (d.user_id, d.cap) == (7, 1024) and np.array_equal(d.rows, rows[:1])


def test_extreme_values_and_empty_round_trip():
    big = np.iinfo(np.int64)
    rows = np.array([[big.min, big.max, 0, big.max, 1, 2, -5, big.min],
                     [big.max, big.min, big.min, 0, 1, 2, big.max, 0]], dtype=np.int64)
    for enc in (sx.encode_snapshot(-3, rows), sx.encode_delta(-3, rows, 2)):
        got = sx.decode(enc)
        got_rows = got.rows if isinstance(got, sx.Delta) else got[1]
        np.testing.assert_array_equal(np.sort(got_rows, axis=0), np.sort(rows, axis=0))
    assert sx.decode(sx.encode_snapshot(5, np.zeros((0, sx.ROW), np.int64)))[1].shape == (0, sx.ROW)
    assert USER_SEQUENCES.decode(sx.encode_snapshot(5, np.zeros((0, sx.ROW), np.int64))) == UserSequence(5, 0, [])


def test_markers_tombstones_and_bad_records():
    assert sx.decode(sx.encode_marker(3, 1234)) == sx.Marker(3, 1234)
    assert sx.decode(None) is None
    good = sx.encode_snapshot(1, np.array([row(event(1, 1, 0))], dtype=np.int64))
    for bad in (b"", b"xyz12", good[:-3], good + b"\x00", b"L?\x01\x01\x04", bytes((0x4C, sx.FORMAT_DELTA, 9, 1, 4))):
        with pytest.raises(DecodeError):
            sx.decode(bad)
    with pytest.raises(DecodeError):
        USER_SEQUENCES.decode(sx.encode_marker(0, 1))


def test_small_record_encoder_writes_the_same_bytes_as_the_vector_one(monkeypatch):
    rng = np.random.default_rng(5)
    big = np.iinfo(np.int64)
    for n in range(1, sx._SMALL):
        rows = rng.integers(big.min, big.max, (n, sx.ROW), dtype=np.int64)
        rows[:, 2] = rng.integers(0, 3, n)  # repeated condition ids
        fast = sx.encode_delta(9, rows, 7)
        monkeypatch.setattr(sx, "_SMALL", 0)
        assert sx.encode_delta(9, rows, 7) == fast
        slow = sx.decode(fast).rows  # the vector decoder
        monkeypatch.setattr(sx, "_SMALL", 8)
        np.testing.assert_array_equal(sx.decode(fast).rows, rows[np.lexsort((rows[:, 1], rows[:, 0]))])
        np.testing.assert_array_equal(slow, sx.decode(fast).rows)


@pytest.mark.parametrize("chunk", [1, 3, 10_000])
def test_catch_up_in_chunks_equals_the_definition(chunk):
    """The streaming catch-up (records and deltas applied chunk by chunk into a store) is exact, and a
    snapshot record followed by its marker supersedes the deltas before the marker."""
    events = messy_stream(seed=11)
    want = reference(events, 16)
    _, deltas, snap = run_agent(events, 16, snapshot_after=9)
    cut = next(i for i, (b, _) in enumerate(deltas) if b > 9)  # deltas after the snapshot start here
    topics = {
        sx.SNAPSHOT_TOPIC: [(0, i, str(u).encode(), sx.encode_snapshot(u, r)) for i, (u, r) in enumerate(snap.items())]
        + [(0, len(snap), sx.marker_key(0), sx.encode_marker(0, cut))],
        sx.DELTA_TOPIC: [(0, i, str(d.user_id).encode(), sx.encode_delta(d.user_id, d.rows, d.cap))
                         for i, (_, d) in enumerate(deltas)],
    }
    store: dict[int, np.ndarray] = {}

    def read(topic, starts):
        return (r for r in topics[topic] if r[1] >= starts.get(r[0], 0))

    def put(rows):
        for u, r in rows.items():
            store.pop(u, None) if r is None else store.__setitem__(u, r)

    changed, state, bad = sx.catch_up(sx.FoldState.empty(), [0], read, lambda us: {u: store[u] for u in us if u in store},
                                      put, chunk=chunk)
    assert not bad and changed == set(want) and state.deltas == {0: len(deltas)} and state.markers == {0: cut}
    assert_equal(store, want)


@pytest.mark.parametrize("n", [8, 9, 300, 1024, 5000])
def test_vector_record_encoder_writes_the_bytes_of_the_plain_one(n, monkeypatch):
    """The columnar encoder of long records (snapshots, folds) against the plain-Python one, byte for byte:
    every width, signs and int64 extremes, repeated and distinct condition ids, equal and wrapping times."""
    rng = np.random.default_rng(n)
    big = np.iinfo(np.int64)
    for case in range(4):
        rows = rng.integers(big.min, big.max, (n, sx.ROW), dtype=np.int64, endpoint=True)
        if case == 1:  # realistic: times a minute apart, few conditions, small items
            rows[:, 0] = 1_767_225_600_000 + 60_000 * np.arange(n)
            rows[:, 2:-2] = rng.integers(0, 4, (n, sx.ROW - 4)) * (2**61 + 7)
            rows[:, -2:] = rng.integers(0, 300, (n, 2))
        elif case == 2:  # constant columns (width 0) and extremes
            rows[:, 2:] = big.max
            rows[::2, 0] = big.min
        elif case == 3:
            rows[:, 2] = rng.integers(-2, 2, n)
            rows[:, -1] = rng.integers(0, 70_000, n)
        fast = sx.encode_snapshot(3, rows)
        monkeypatch.setattr(sx, "_SMALL", 10**9)
        assert sx.encode_snapshot(3, rows) == fast, case
        monkeypatch.setattr(sx, "_SMALL", 8)
        np.testing.assert_array_equal(sx.decode(fast)[1], rows)
