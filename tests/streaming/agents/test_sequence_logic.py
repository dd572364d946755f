"""The sequence agent as pure logic: store + records + emit, no broker."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

import schemas.tokenize as tk
from schemas.events import BehaviorEvent
from schemas.topics import BEHAVIORS, USER_SEQUENCES, key_of
from streaming.agents.sequences import SequenceLogic, encode_value, expected_sequences, user_key
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
    return {int.from_bytes(k, "big"): USER_SEQUENCES.decode(v) for k, v in store.scan()}


def published(emit) -> dict:
    out = {}
    for topic, key, value, part in emit.sent:
        assert topic == USER_SEQUENCES.name and part == 0
        out[int(key)] = USER_SEQUENCES.decode(value)
    return out


def split(items, rng, most: int = 7):
    out, i = [], 0
    while i < len(items):
        n = rng.randint(1, most)
        out.append(items[i:i + n])
        i += n
    return out


@pytest.mark.parametrize("path", ["one array operation", "user by user"])
@pytest.mark.parametrize("seed", range(6))
def test_any_arrival_order_duplicates_and_batching_give_the_direct_computation(seed, path, monkeypatch):
    import streaming.agents.sequences as seqmod

    if path == "user by user":
        monkeypatch.setattr(seqmod, "VECTOR_ROWS", 0)
    rng = random.Random(seed)
    events = [ev(i, rng.randrange(6), t=rng.randrange(50) * 1000, item=rng.randrange(30)) for i in range(150)]
    arrivals = events + [rng.choice(events) for _ in range(60)]  # producer retries and replays
    rng.shuffle(arrivals)
    cap = rng.choice([3, 10, 1024])
    _, store, emit = run(split(arrivals, rng, most=rng.choice([1, 5, 40])), cap=cap)
    want = expected_sequences(events, cap=cap)
    assert state(store) == want
    assert published(emit) == want  # the last value published per user is the state


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
    store.put(user_key(5), encode_value(0, np.zeros((0, tk.ROW_WIDTH), np.int64))[:3] + body)
    store.commit({"behaviors": 0})
    new = ev(2, 5, 2000)
    _, store, emit = run([[new]], store=store)
    seq = state(store)[5]
    assert seq.tokenizer_version == tk.TOKENIZER_VERSION
    assert seq.pairs[0].conditions == t.conditions[:n_old] + (tk.ANY,)
    assert seq.pairs[1] == tk.tokenize(new)
    assert published(emit) == {5: seq}


def test_replayed_records_below_the_store_position_republish_their_users():
    """State committed, outputs lost (crash before the flush): the replay from the group's offset changes
    nothing in the state but publishes those users again."""
    e = [ev(i, i % 2, i * 1000) for i in range(4)]
    _, store, _ = run([e])
    assert store.positions() == {"behaviors": 4}
    logic, store, emit = SequenceLogic(clock=lambda: NOW_S), store, MemoryEmit()
    assert logic.assign(0, store, {"behaviors": 2}, emit, lambda *_: []) == {"behaviors": 2}
    logic.process(0, records(e[2:], start=2), emit)
    assert published(emit) == expected_sequences(e)


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
    assert logic.assign(0, store, {"behaviors": 10}, emit, lambda topic, p: iter(log)) == {"behaviors": 10}
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


@pytest.mark.parametrize("path", ["one array operation", "user by user"])
def test_a_lowered_cap_trims_a_stored_sequence_at_its_next_event(path, monkeypatch):
    import streaming.agents.sequences as seqmod

    if path == "user by user":
        monkeypatch.setattr(seqmod, "VECTOR_ROWS", 0)
    five = [ev(i, 1, 1000 * (i + 1)) for i in range(5)]
    _, store, _ = run([five], cap=5)
    _, store, emit = run([[ev(9, 1, 0)]], cap=3, store=store)  # older than all: only the cap changes it
    assert state(store) == expected_sequences(five, cap=3) and len(emit.sent) == 1
