"""The sequence agent as pure logic: store + records + emit, no broker."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

import schemas.tokenize as tk
from schemas.events import BehaviorEvent
from schemas import seqexport as sx
from schemas.topics import BEHAVIORS, SEQUENCE_DELTAS, USER_SEQUENCES, key_of
import streaming.agents.sequences as seqmod
from streaming.agents.sequences import (META, SequenceLogic, base_key, tail_key, encode_value, expected_sequences,
                                         read_sequences, user_key)
from streaming.agents.store import MemoryEmit, MemoryStore, Record

T0 = 1_767_225_600_000
NOW_S = (T0 + 10 * 86_400_000) / 1000  # the logic's clock: ten days after T0


def ev(i: int, user: int, t: int, item: int | None = None, eid: str | None = None, **kw) -> BehaviorEvent:
    return BehaviorEvent(event_id=eid or f"e{i}", user_id=user, item_id=item if item is not None else 100 + i,
                         category_id=i % 5, behavior=kw.pop("behavior", "view"), scenario=kw.pop("scenario", "home"),
                         event_time_ms=T0 + t, **kw)


def records(values, partition: int = 0, start: int = 0) -> list[Record]:
    return [Record("behaviors", partition, start + i, T0, b"k", v if isinstance(v, (bytes, type(None)))
                   else BEHAVIORS.encode(v)) for i, v in enumerate(values)]


def run(batches, cap: int = 1024, store=None, committed=None, read=None):
    logic = SequenceLogic(max_pairs=cap, clock=lambda: NOW_S)
    store = store or MemoryStore()
    emit = MemoryEmit()
    logic.assign(0, store, committed or {}, emit, read or (lambda topic, p: []))
    offset = store.positions().get("behaviors", 0)
    for batch in batches:
        recs = records(batch, start=offset)
        logic.process(0, recs, emit)
        offset += len(recs)
        store.commit({"behaviors": offset})
    return logic, store, emit


def state(store) -> dict:
    """Every user's sequence as the agent's one reader of its store says (from the store, and from its
    (key, value) pairs in key order as ``store.read_state`` gives them: the same)."""
    seqs = {u: sx.to_sequence(u, rows) for u, rows in read_sequences(store)}
    assert {u: sx.to_sequence(u, rows) for u, rows in read_sequences(sorted(store.data.items()))} == seqs
    return seqs


def export_reader(*emits):
    """``read(topic, partition)`` over the deltas the logic sent (its export), for rebuilds."""
    deltas = [Record(SEQUENCE_DELTAS.name, 0, i, 0, key, value) for i, (_t, key, value, _p) in
              enumerate(x for e in emits for x in e.sent)]
    return lambda topic, p: iter(deltas if topic is SEQUENCE_DELTAS else [])


def published(emit) -> dict:
    """The export the logic sent: its deltas folded (``schemas.seqexport``), per user."""
    deltas: dict = {}
    for topic, key, value, part in emit.sent:
        assert topic == SEQUENCE_DELTAS.name and part == 0
        d = SEQUENCE_DELTAS.decode(value)
        assert int(key) == d.user_id
        deltas.setdefault(d.user_id, []).append(d)
    return {u: sx.to_sequence(u, sx.fold(None, ds)) for u, ds in deltas.items()}


def split(items, rng, most: int = 7):
    out, i = [], 0
    while i < len(items):
        n = rng.randint(1, most)
        out.append(items[i:i + n])
        i += n
    return out


@pytest.mark.parametrize("tail", [1, 3, 32])
@pytest.mark.parametrize("seed", range(6))
def test_any_arrival_order_duplicates_and_batching_give_the_direct_computation(seed, tail, monkeypatch):
    monkeypatch.setattr(seqmod, "TAIL_PAIRS", tail)
    rng = random.Random(seed)
    events = [ev(i, rng.randrange(6), t=rng.randrange(50) * 1000, item=rng.randrange(30)) for i in range(150)]
    arrivals = events + [rng.choice(events) for _ in range(60)]  # producer retries and replays
    rng.shuffle(arrivals)
    cap = rng.choice([3, 10, 1024])
    _, store, emit = run(split(arrivals, rng, most=rng.choice([1, 5, 40])), cap=cap)
    want = expected_sequences(events, cap=cap)
    assert state(store) == want
    assert published(emit) == want  # the deltas folded equal the state


@pytest.mark.parametrize("tail", [1, 2, 5])
def test_tail_fold_boundary_mostly_in_order_with_late_events_and_duplicates(tail, monkeypatch):
    """The steady state: a mature user at the cap receives events mostly in order (tail appends), some late
    (inside the window: fold; older than it: nothing) and retries of kept, overflowing and dropped events.
    Checked after every batch, and the tail never exceeds its bound."""
    monkeypatch.setattr(seqmod, "TAIL_PAIRS", tail)
    rng = random.Random(tail)
    cap = 6
    seen: list = []
    store, emits = MemoryStore(), []
    for b in range(40):
        batch = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            i = len(seen) + len(batch)
            r = rng.random()
            if r < 0.15 and seen:
                batch.append(rng.choice(seen))  # a retry: in the window, in the overflow or long dropped
            elif r < 0.2 and seen:  # same event id, other content, its first copy still in the sequence
                first = {tk.event_key(e.event_id): e for e in reversed(seen)}
                kept = [first[p.event_key] for p in expected_sequences(seen, cap=cap)[1].pairs]
                retry = rng.choice([kept[0], rng.choice(kept)])
                batch.append(retry.model_copy(update={"event_time_ms": T0 + i * 1000, "item_id": 7}))
            elif r < 0.3:
                batch.append(ev(i, 1, t=(i - rng.randrange(1, 12)) * 1000))  # late
            else:
                batch.append(ev(i, 1, t=i * 1000))
        seen += [e for e in batch if e not in seen]
        _, store, emit = run([batch], cap=cap, store=store, read=export_reader(*emits))
        emits.append(emit)
        want = expected_sequences(seen, cap=cap)
        assert state(store) == want, b
        assert {u: s for u, s in published(_merged(emits)).items()} == want, b
        tail_value = store.data.get(tail_key(1))
        assert tail_value is None or len(sx.decode(tail_value)[1]) <= tail


def _merged(emits):
    m = MemoryEmit()
    m.sent = [x for e in emits for x in e.sent]
    return m


def test_in_order_events_rewrite_only_the_tail_until_it_is_full(monkeypatch):
    monkeypatch.setattr(seqmod, "TAIL_PAIRS", 4)
    logic, store, _ = run([[ev(i, 2, i * 1000) for i in range(10)]])  # a new user's batch: over the tail -> base
    base = store.data[base_key(2)]
    assert tail_key(2) not in store.data
    for j in (0, 5, 9):  # a retry of a stored event with other content (a later time): still a duplicate
        logic.process(0, records([ev(j, 2, 50_000 + j, item=1)], start=10), emit := MemoryEmit())
        assert not emit.sent and not store.staged
    for i in range(10, 14):  # 4 appends: the base is not rewritten
        logic.process(0, records([ev(i, 2, i * 1000)], start=i), emit := MemoryEmit())
        store.commit({"behaviors": i + 1})
        assert store.data[base_key(2)] is base and len(emit.sent) == 1
        assert len(sx.decode(store.data[tail_key(2)])[1]) == i - 9
    logic.process(0, records([ev(14, 2, 14_000)], start=14), MemoryEmit())  # the 5th folds
    store.commit({"behaviors": 15})
    assert tail_key(2) not in store.data and store.data[base_key(2)] != base
    assert state(store) == expected_sequences([ev(i, 2, i * 1000) for i in range(15)])


@pytest.mark.parametrize("tail", [2, 32])
def test_crash_replay_from_behind_the_store_and_rebuild_from_the_export_equal_the_direct_computation(tail,
                                                                                                     monkeypatch):
    """The store committed batches whose outputs and group commit were lost (a crash): the replay from the
    group's offset re-applies them idempotently and re-sends their deltas. Then the partition moves: a fresh
    store rebuilt from the export continues to the same result."""
    monkeypatch.setattr(seqmod, "TAIL_PAIRS", tail)
    rng = random.Random(tail)
    events = [ev(i, rng.randrange(4), t=rng.randrange(400) * 1000 if rng.random() < 0.2 else i * 1000,
                 item=rng.randrange(30)) for i in range(300)]
    arrivals = events + [rng.choice(events) for _ in range(40)]
    arrivals[250:] = rng.sample(arrivals[250:], len(arrivals) - 250)  # mostly in order, a shuffled end
    cap = 20
    batches = split(arrivals, rng, most=9)
    k = len(batches) // 2
    logic, store, delivered, offset = SequenceLogic(max_pairs=cap, clock=lambda: NOW_S), MemoryStore(), [], 0
    logic.assign(0, store, {}, MemoryEmit(), lambda *_: iter([]))
    for j, batch in enumerate(batches[:k]):
        logic.process(0, records(batch, start=offset), emit := MemoryEmit())
        offset += len(batch)
        store.commit({"behaviors": offset})
        if j < k - 3:  # the last 3 batches: state committed, outputs lost, group offset not committed
            delivered.append(emit)
            committed = offset
    logic, emit2 = SequenceLogic(max_pairs=cap, clock=lambda: NOW_S), MemoryEmit()
    assert logic.assign(0, store, {"behaviors": committed}, emit2, lambda *_: iter([])) == {"behaviors": committed}
    offset = committed
    for batch in batches[k - 3:]:
        logic.process(0, records(batch, start=offset), emit2)
        offset += len(batch)
        store.commit({"behaviors": offset})
    want = expected_sequences(events, cap=cap)
    assert state(store) == want
    assert published(_merged(delivered + [emit2])) == want
    # Moved to a host without the state: rebuilt from the export, then more events.
    more = [ev(1000 + i, rng.randrange(4), t=(300 + i) * 1000) for i in range(30)] + events[:10]
    _, fresh, emit3 = run([more], cap=cap, committed={"behaviors": offset}, read=export_reader(*delivered, emit2))
    assert state(fresh) == expected_sequences(events + more, cap=cap)
    assert published(_merged(delivered + [emit2, emit3])) == expected_sequences(events + more, cap=cap)


def test_a_store_of_the_previous_layout_is_rebuilt_not_misread():
    """Layout 1 kept one fixed-layout value under the bare user id and no layout record: even with its
    position ahead of the committed offset it is rebuilt from the export."""
    e = [ev(i, i % 3, i * 1000) for i in range(9)]
    _, _, emit = run([e])
    old = MemoryStore()
    for u, seq in expected_sequences(e[:4]).items():
        old.put(user_key(u), USER_SEQUENCES.encode(seq))
    old.commit({"behaviors": 50})
    logic = SequenceLogic(clock=lambda: NOW_S)
    logic.assign(0, old, {"behaviors": 9}, MemoryEmit(), export_reader(emit))
    assert state(old) == expected_sequences(e) and old.positions() == {"behaviors": 9}
    assert user_key(0) not in old.data and old.data[META]
    with pytest.raises(ValueError, match="layout"):
        list(read_sequences([(user_key(0), b"x")]))


def test_out_of_order_event_lands_in_its_place_and_cap_drops_the_oldest():
    a, b, c, late = ev(1, 7, 3000), ev(2, 7, 5000), ev(3, 7, 9000), ev(4, 7, 4000)
    _, store, _ = run([[a, b, c], [late]], cap=3)
    assert [p.event_time_ms - T0 for p in state(store)[7].pairs] == [4000, 5000, 9000]
    # Older than everything kept under a full cap: no change, nothing published.
    _, store, emit = run([[b, c, late], [a]], cap=3)
    assert [p.event_time_ms - T0 for p in state(store)[7].pairs] == [4000, 5000, 9000]
    assert len(emit.sent) == 1


def test_duplicate_changes_nothing_and_publishes_nothing():
    e = ev(1, 3, 1000)
    _, store, emit = run([[e], [e], [ev(9, 3, 500, eid="e1")]])  # same event id, other content: still a duplicate
    assert state(store) == expected_sequences([e]) and len(emit.sent) == 1


def test_far_future_events_are_dead_lettered_and_near_future_ones_kept():
    now_ms = int(NOW_S * 1000)
    near = ev(1, 1, now_ms - T0 + 30 * 60_000)
    far = ev(2, 1, now_ms - T0 + 2 * 3_600_000)
    _, store, emit = run([[near, far]])
    assert [p.event_key for p in state(store)[1].pairs] == [tk.event_key("e1")]
    [(rec, reason)] = emit.dead
    assert rec.offset == 1 and "LUM_AGENT_MAX_FUTURE_SKEW_MS" in reason


BAD = {
    "none": None,
    "empty": b"",
    "garbage 2 MB": bytes(random.Random(0).getrandbits(8) for _ in range(1024)) * 2048,
    "no header": b'{"event_id": "x"}',
    "other schema version": b"Lj\x09" + BEHAVIORS.encode(ev(0, 1, 0))[3:],
    "bad json": b"Lj\x01{not json",
    "two objects": b"Lj\x01" + BEHAVIORS.encode(ev(0, 1, 0))[3:] + b"," + BEHAVIORS.encode(ev(1, 1, 0))[3:],
    "negative user": BEHAVIORS.encode(ev(0, 1, 0)).replace(b'"user_id":1', b'"user_id":-1'),
    "extra field": BEHAVIORS.encode(ev(0, 1, 0))[:-1] + b',"x":1}',
    "string for int": BEHAVIORS.encode(ev(0, 1, 0)).replace(b'"user_id":1', b'"user_id":"1"'),
    "huge valid header": b"Lj\x01" + b'{"event_id":"' + b"a" * 3_000_000 + b'"}',
}


def test_bad_input_of_any_size_is_dead_lettered_with_a_reason_and_good_input_applied():
    good = [ev(i, i % 3, i * 1000) for i in range(9)]
    mixed = []
    for i, v in enumerate(BAD.values()):
        mixed += [good[i % len(good)], v]
    mixed += good
    _, store, emit = run([mixed])
    assert state(store) == expected_sequences(good)
    assert len(emit.dead) == len(BAD)
    for (rec, reason), (name, value) in zip(emit.dead, BAD.items()):
        assert rec.value == value and reason, name


def test_fast_decode_accepts_exactly_what_the_codec_accepts(monkeypatch):
    import schemas.codec
    from schemas.codec import DecodeError

    logic = SequenceLogic(clock=lambda: NOW_S)
    with monkeypatch.context() as m:  # good records never need the (slower) codec path
        m.setattr(schemas.codec, "decode", lambda *a: pytest.fail("codec.decode called for a good record"))
        assert len(logic.decode(records([ev(1, 2, 3), ev(2, 2, 4, query="q", rating=4.5)]), MemoryEmit())[0]) == 2
    for name, v in BAD.items() | {"ok": BEHAVIORS.encode(ev(1, 2, 3, query="q", scenario="search"))}.items():
        emit = MemoryEmit()
        good, _ = logic.decode(records([v]), emit)
        try:
            want = [dict(BEHAVIORS.decode(v))]
        except DecodeError as e:
            want = []
            assert emit.dead[0][1] == str(e), name  # the codec's own reason
        assert good == want, name


def test_tokenizer_upgrade_of_stored_state(monkeypatch):
    """A sequence stored by an older tokenizer version (fewer condition kinds) is read with the missing
    kinds as ANY, merged, and rewritten in the current version."""
    monkeypatch.setitem(tk.KINDS_BY_VERSION, 0, tk.KINDS_BY_VERSION[tk.TOKENIZER_VERSION] - 1)
    old = ev(1, 5, 1000, scenario="search", query="shoes")
    t = tk.tokenize(old)
    n_old = len(tk.CONDITION_KINDS) - 1
    body = struct.pack("<4sBBBxqqI", b"LSEQ", 1, 0, n_old, 5, old.event_time_ms, 1)
    body += struct.pack(f"<{4 + n_old}q", t.event_time_ms, t.event_key, *t.conditions[:n_old], t.item_id,
                        t.category_id)
    store = MemoryStore()
    store.put(tail_key(5), encode_value(0, np.zeros((0, tk.ROW_WIDTH), np.int64))[:3] + body)
    store.put(META, seqmod._meta(1024))
    store.commit({"behaviors": 0})
    new = ev(2, 5, 2000)
    _, store, emit = run([[new]], store=store)
    seq = state(store)[5]
    assert seq.tokenizer_version == tk.TOKENIZER_VERSION
    assert seq.pairs[0].conditions == t.conditions[:n_old] + (tk.ANY,)
    assert seq.pairs[1] == tk.tokenize(new)
    assert published(emit)[5].pairs == [tk.tokenize(new)]  # the delta: only the new pair


def test_replayed_records_below_the_store_position_republish_their_users():
    """State committed, outputs lost (crash before the flush): the replay from the group's offset changes
    nothing in the state but publishes those users again."""
    e = [ev(i, i % 2, i * 1000) for i in range(4)]
    _, store, _ = run([e])
    assert store.positions() == {"behaviors": 4}
    logic, store, emit = SequenceLogic(clock=lambda: NOW_S), store, MemoryEmit()
    assert logic.assign(0, store, {"behaviors": 2}, emit, lambda *_: []) == {"behaviors": 2}
    logic.process(0, records(e[2:], start=2), emit)
    assert published(emit) == expected_sequences(e[2:])  # their deltas again (those of e[:2] were delivered)


def test_missing_or_behind_state_is_rebuilt_streaming_from_the_changelog(monkeypatch):
    import streaming.agents.sequences as seqmod

    monkeypatch.setattr(seqmod, "REBUILD_CHUNK", 2)  # several commits, never the whole partition staged
    e = [ev(i, i % 5, i * 1000) for i in range(10)]
    want = expected_sequences(e)
    log = [Record("user-sequences", 0, i, 0, key_of(u), USER_SEQUENCES.encode(s)) for i, (u, s) in
           enumerate(sorted(want.items()))]
    log += [Record("user-sequences", 0, 99, 0, key_of(4), None), Record("user-sequences", 0, 100, 0, b"junk", b"x"),
            Record("user-sequences", 0, 101, 0, key_of(88), b"Ls\x01not a sequence")]
    store = MemoryStore()
    store.put(user_key(77), b"stale")
    store.commit({"behaviors": 3})  # behind the group's offset: rebuilt
    logic, emit = SequenceLogic(clock=lambda: NOW_S), MemoryEmit()
    read = lambda topic, p: iter(log if topic is USER_SEQUENCES else [])  # noqa: E731
    assert logic.assign(0, store, {"behaviors": 10}, emit, read) == {"behaviors": 10}
    assert state(store) == {u: s for u, s in want.items() if u != 4}
    assert store.positions() == {"behaviors": 10} and store.commits > 3


def test_rows_round_trip_and_vector_tokenize_equals_tokenize():
    rng = random.Random(3)
    events = [ev(i, 1, rng.randrange(10**6), scenario=rng.choice(["home", "search"]),
                 behavior=rng.choice(["view", "buy"]), query=rng.choice([None, "Red  Shoes", "x"])) for i in range(50)]
    rows = tk.tokenize_rows(events)
    assert rows.tolist() == [[t.event_time_ms, t.event_key, *t.conditions, t.item_id, t.category_id]
                             for t in map(tk.tokenize, events)]
    assert tk.tokenize_rows([dict(e) for e in events]).tolist() == rows.tolist()
    data = tk.encode_rows(9, rows)
    assert tk.decode_sequence(data) == tk.UserSequence(9, int(rows[-1, 0]), [tk.tokenize(e) for e in events])
    user, updated, back = tk.decode_rows(data)
    assert (user, updated) == (9, int(rows[-1, 0])) and (back == rows).all()
    with pytest.raises(ValueError):
        tk.decode_rows(data[:-1])


def test_a_lowered_cap_rebuilds_the_store_and_trims_a_sequence_at_its_next_event():
    five = [ev(i, 1, 1000 * (i + 1)) for i in range(5)]
    _, store, emit1 = run([five], cap=5)
    # The store's cap differs: rebuilt from the export, then trimmed (and published) at the user's next event.
    _, store, emit = run([[ev(9, 1, 0)]], cap=3, store=store, read=export_reader(emit1))  # older than all
    assert state(store) == expected_sequences(five, cap=3) and len(emit.sent) == 1
    assert published(_merged([emit1, emit])) == expected_sequences(five, cap=3)
    _, store, emit = run([[ev(10, 1, 99_000)]], cap=7, store=store, read=export_reader(emit1, emit))  # raised
    assert state(store) == expected_sequences(five[2:] + [ev(10, 1, 99_000)], cap=7)


def test_a_base_index_of_the_earlier_format_still_reads_and_is_rewritten_at_the_fold(monkeypatch):
    """Stores written before the index became a raw key array hold it as a compact snapshot record with
    only the keys: events read it as before (duplicates, order), and the next fold writes the new format."""
    monkeypatch.setattr(seqmod, "TAIL_PAIRS", 2)
    first = [ev(i, 4, i * 1000) for i in range(5)]
    _, store, _ = run([first])  # five rows: over the tail, so a base
    rows = dict(read_sequences(store))[4]
    index = np.zeros_like(rows)
    index[:, tk.COL_KEY] = rows[:, tk.COL_KEY]
    store.put(seqmod.index_key(4), sx.encode_snapshot(4, index, int(rows[-1, tk.COL_TIME])))
    store.commit({})
    later = [first[2], ev(5, 4, 5000), first[0], ev(6, 4, 6000), ev(7, 4, 3500), ev(8, 4, 8000)]
    _, store, emit = run([[e] for e in later], store=store)
    assert state(store) == expected_sequences(first + later)
    assert len(emit.sent) == 4  # the duplicates published nothing
    assert store.data[seqmod.index_key(4)][:8] == seqmod.INDEX_TAG


def test_a_layout_2_store_is_kept_and_marked_so_that_a_rolled_back_build_rebuilds_it():
    """Layout 2 (keys inside the index) reads as it is: no rebuild on upgrade, but the store is marked with the
    current layout, which a layout-2 build does not accept (it rebuilds instead of misreading the new index)."""
    e = [ev(i, i % 3, i * 1000) for i in range(9)]
    _, store, _ = run([e])
    store.put(META, seqmod._meta(1024, layout=2))
    store.commit({"behaviors": 9})

    def no_rebuild(*_):
        raise AssertionError("rebuilt")

    logic = SequenceLogic(clock=lambda: NOW_S)
    logic.assign(0, store, {"behaviors": 9}, MemoryEmit(), no_rebuild)
    store.commit({"behaviors": 9})
    assert store.data[META] == seqmod._meta(1024) != seqmod._meta(1024, layout=2)
    assert state(store) == expected_sequences(e)


def test_many_new_users_take_the_batch_path_with_the_same_state_and_deltas_as_one_by_one():
    rng = random.Random(5)
    events = [ev(i, rng.randrange(300), t=rng.randrange(40) * 1000, item=rng.randrange(9)) for i in range(900)]
    events += [rng.choice(events) for _ in range(50)]
    _, batched, emit = run([events])
    _, single, emit1 = run([[e] for e in events])
    assert state(batched) == state(single) == expected_sequences(events)
    assert published(emit) == expected_sequences(events)
    assert {u: v for u, v in batched.data.items() if u[:1] == seqmod.TAIL} == \
        {u: v for u, v in run([sorted(events, key=lambda e: (e.user_id, e.event_time_ms))])[1].data.items()
         if u[:1] == seqmod.TAIL}


@pytest.mark.parametrize("n", [1, 50, 1024, 3000])
def test_the_base_key_filter_never_misses_a_key_and_rarely_admits_others(n):
    rng = np.random.default_rng(n)
    keys = rng.integers(0, 2**63 - 1, n)
    store = MemoryStore()
    rows = np.zeros((n, tk.ROW_WIDTH), np.int64)
    rows[:, tk.COL_KEY], rows[:, tk.COL_TIME] = keys, np.arange(n)
    seqmod._put_base(store, 1, rows)
    index = store._staged[seqmod.index_key(1)]
    assert all(seqmod._maybe_in_base(index, k) for k in keys.tolist())
    others = rng.integers(0, 2**63 - 1, 20_000).tolist()
    assert sum(seqmod._maybe_in_base(index, k) for k in others) < 0.01 * len(others)
    assert len(index) <= 32 + max(8, 32 * n // 8)  # at most half of the keys' 8 B each


@pytest.mark.parametrize("cap", [3, 8, 1024])
def test_one_row_appends_of_many_users_at_once_equal_the_per_user_append(cap, monkeypatch):
    """The vectorised path for users with one new row (most users, with many users) decides exactly what the
    per-user ``_append`` decides (duplicate, appended with the same tail bytes) or leaves the user to it:
    users of every state (none, tail only, base only, base + tail, full tail, an index of the earlier format),
    with duplicates of the tail and the base (also with a later time), late and in-order rows."""
    monkeypatch.setattr(seqmod, "TAIL_PAIRS", 4)
    rng = random.Random(cap)
    history = [ev(i, rng.randrange(60), t=i * 1000, eid=f"h{i}") for i in range(1500)]
    _, store, _ = run(split(history, rng, most=20), cap=cap)
    for u in (3, 4):  # their indexes as earlier builds wrote them: a compact snapshot record with the keys
        if seqmod.index_key(u) in store.data:
            store.data[seqmod.index_key(u)] = store.data[base_key(u)]
    users, new = [], []
    for u in range(65):  # 60 with state, 5 without
        stored = [e for e in history if e.user_id == u]
        kind = rng.choice(["new", "new", "late", "dup", "dup_recent", "retry"])
        if kind == "retry" and stored:  # a stored event's id with a later time: in order, yet a duplicate
            e = ev(5000 + u, u, t=2_000_000 + u, eid=rng.choice(stored).event_id)
        elif kind == "dup" and stored:
            e = rng.choice(stored)
        elif kind == "dup_recent" and stored:
            e = stored[-1]
        elif kind == "late" and stored:
            e = ev(5000 + u, u, t=rng.randrange(1500) * 1000 + 1)
        else:
            e = ev(5000 + u, u, t=2_000_000 + u)
        users.append(u)
        new.append(e)
    rows = tk.tokenize_rows(new)
    values = store.get_many([k for u in users for k in (seqmod.index_key(u), tail_key(u))])
    indexes, tails = values[0::2], values[1::2]
    got = SequenceLogic._append_ones(store, users, rows, indexes, tails, cap)
    vector = dict(store._staged)
    store.discard()
    for i, u in enumerate(users):
        want = SequenceLogic._append(store, u, indexes[i], tails[i], rows[i:i + 1], cap)
        if got[i] is not None:
            assert got[i] == want, (u, got[i], want)
            assert vector.get(tail_key(u)) == store._staged.get(tail_key(u)), u
        store.discard()
    assert set(vector) == {tail_key(u) for u, g in zip(users, got) if g}
    assert got.count(True) > 10 and got.count(False) >= 3  # the common cases are decided here
