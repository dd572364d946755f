"""Sequence agent: each user's rolling (condition, item) sequence, in its state store and in ``user-sequences``.

    lum agents --only sequences [--workers N]        # or: python -m streaming.agents.worker sequences

Pure logic (``SequenceLogic``) over the runtime-neutral contract of ``streaming.agents.store``: decoded
``Record``s of ``behaviors`` in, a ``Store`` per partition, an ``Emit`` for outputs and dead letters. No Kafka
client or RocksDB type appears here; the runtime (``streaming.agents.worker``) hosts it.

State (store layout 3). Per ``behaviors`` partition, per user (id as 8 bytes big endian) a capped BASE
(key ``b|user``, the compact ``user-sequences`` record of ``schemas.seqexport``) with its INDEX (key
``c|user``: the base's newest pair and a Bloom filter of its event keys, 2 KB at 1,024 pairs) and KEYS (key
``k|user``: the event keys, int64; stores of earlier builds hold the keys in the index, which still reads
and is rewritten at the next fold), and a short append TAIL (key ``a|user``, at most ``TAIL_PAIRS`` pairs
in the fixed layout of ``USER_SEQUENCES.encode``, codec version 1); the user's sequence is the last
``LUM_AGENT_MAX_PAIRS`` rows of base + tail. An event reads the index and the tail, and the keys only when
the filter cannot rule out a duplicate (a retry, or < 0.3% false positives); one newer than the user's
newest pair rewrites only the tail (its bytes copied, nothing decoded); a full tail, a late event landing
inside the sequence, or a lowered cap reads the base and folds the tail into it. So bytes and CPU per event
do not grow with the history beyond reading the filter (2-4 B per pair). Key ``\\x00`` records the layout
version and the cap: a store of another layout or cap is rebuilt from the export on assignment, except
layout 2 (keys in the index), which reads as it is and is marked 3, so that a rolled-back build (layout 2)
rebuilds rather than misread the new index.
``read_sequences`` is the one reader of this state (backfill, tools, tests). The store's committed position of
``behaviors`` says which offsets the state covers.

Semantics. A user's sequence is the ``LUM_AGENT_MAX_PAIRS`` (default 1,024) latest distinct events in
(event_time, event_key) order, events deduplicated by ``event_key`` (hash of event_id): a pure function of
the SET of events seen. So duplicates (producer retries) and replays after a crash change nothing, a late
event lands in its event-time place (or falls off the old end if the cap is full), and users interleaving
across partitions do not matter. ``updated_at_ms`` is the newest pair's event time (deterministic).
Rejected, to ``dead-letters`` with the reason and source offset: anything that does not decode and validate
as a ``BehaviorEvent`` (any size), and events later than now + ``LUM_AGENT_MAX_FUTURE_SKEW_MS`` (default 1 h),
which would otherwise sit at the new end of the sequence for good. Stored sequences written by an older
tokenizer version are read in the current layout (new kinds ANY) and rewritten on their next change.

Batch path (one call per partition and batch): the batch is validated record by record with the
``BehaviorEvent`` schema's own field validator (no model objects), tokenized at once
(``schemas.tokenize.tokenize_rows``), grouped by user with numpy; one multi-get of the users' indexes and
tails. Users without state whose rows are already a sequence (distinct, in order: most new users) get their
tails in one encoding pass; users with state and ONE new row (most users, with many users) are decided
together with numpy (duplicate of the tail, the index's filter, order) and get their tails appended as bytes
in one pass (``_append_ones``); other users whose rows are in order append them to the tail as bytes after
one duplicate comparison; the rest (a key the filter cannot rule out, late events, folds) take the general
per-user merge. One-pair deltas (most, with many users) are encoded in one vectorised pass and the batch's
deltas are handed to the emit in one call (``send_many`` where the runtime has it). Writes are staged in the
store, which commits them once per batch.

Export (``schemas.seqexport`` is the contract, ``streaming.kafka.sequences`` the one reader): per batch, ONE
``sequence-deltas`` record per changed user carrying that batch's pairs of the user and the cap (key = user id,
partition = the user's ``behaviors`` partition), delivered before the batch's offsets are committed; bytes per
event do not grow with the history. Full sequences live in the compacted ``user-sequences`` topic, written by
the snapshot job (``lum sequences snapshot``) and ``lum backfill``; a reader folds the
snapshot with the deltas after its marker, which equals this agent's state exactly (a delta re-sent after a
crash changes nothing).

Recovery. On assignment of partition p the agent resumes from the group's committed offset C. If the store
covers at least C it is used as is (events in [C, store position) were applied but maybe not published: they
are re-applied, change nothing, and their users' deltas are re-sent). If it is missing or behind (the
partition was processed elsewhere, or the store's identity did not match) or of another layout or cap, it is
rebuilt from partition p of the export (snapshot + deltas), which holds everything up to C because outputs
are delivered before commits.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from pydantic import ValidationError
from pydantic_core import SchemaValidator

from schemas import seqexport as sx
from schemas.codec import DecodeError
from schemas.events import BehaviorEvent
from schemas.tokenize import (COL_KEY, COL_TIME, ROW_WIDTH, UserSequence, append_row_many, append_rows, encode_rows,
                              encode_rows_many, record_rows, record_rows_many, tokenize, tokenize_rows)
from schemas.seqexport import encode_deltas, encode_snapshot, fold_partition_records
from schemas.topics import BEHAVIORS, SEQUENCE_DELTAS, USER_SEQUENCES, key_of

from .store import Emit, Reader, Record, Store

log = logging.getLogger(__name__)

ROW = ROW_WIDTH  # int64 columns of one pair (schemas.tokenize owns the layout)
REBUILD_CHUNK = 10_000  # users per store commit while rebuilding (bounded memory)
EXPORT = {USER_SEQUENCES.name: USER_SEQUENCES, SEQUENCE_DELTAS.name: SEQUENCE_DELTAS}
# Pairs appended after a user's base before they are folded into it. Bytes rewritten per event are about
# 64 B x TAIL/2 (the tail) + base / TAIL (the folds): smallest near 32 for a 26 KB base (1,024 pairs).
TAIL_PAIRS = 32
LAYOUT = 3  # of the store (1: one value per user under the bare user id; 2: keys inside the index)
UPGRADES = (2,)  # layouts this build reads as they are (marked LAYOUT at the next commit); older builds that
# see LAYOUT rebuild from the export instead of misreading the index
META = b"\x00"  # the store's layout and cap record; sorts before every user key
# Key prefixes, each kind in its own key range so that a lookup reads blocks of its kind only (a tail read
# never decompresses a neighbour's 26 KB base); tails sort first (a scan of (key, value) pairs buffers them).
TAIL, BASE, INDEX, KEYS = b"a", b"b", b"c", b"k"
INDEX_TAG = b"Lk\x02\x00\x00\x00\x00\x00"  # an index record's first 8 bytes (format "k", version 2)
_INDEX_HEAD = 32  # tag, newest event time, newest event key, number of keys; then the filter
# Bloom filter of a base's event keys (already uniform 63-bit hashes): 4 multiplicative hashes into a power of
# two >= 16 bits per key (< 0.3% false positives): 2 KB at 1,024 pairs where the keys are 8 KB.
_BLOOM_MULT = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
_M64 = (1 << 64) - 1
_FEW = 16  # new rows of a user per batch up to which plain Python beats numpy's set operations
_NO_ROWS = np.zeros((0, ROW_WIDTH), dtype=np.int64)
_NO_HEAD = bytes(_INDEX_HEAD - 8)  # (newest time, newest key, number of keys) of a user without a base: zeros
_BEHAVIORS_HEADER = BEHAVIORS.encode(BehaviorEvent(event_id="x", user_id=0, item_id=0, category_id=0, behavior="view",
                                                   scenario="x", event_time_ms=1_000_000_000_000))[:3]
_SEQ_PREFIX = USER_SEQUENCES.encode(UserSequence(0, 0, []))[:3]  # the codec's format header, version 1


def _fields_validator() -> SchemaValidator | None:
    """``BehaviorEvent``'s own field validation (same constraints, strictness and extra=forbid) returning the
    field dict instead of building the model; None if the model gains validators this shortcut would skip."""
    schema = BehaviorEvent.__pydantic_core_schema__
    if schema.get("type") != "model" or schema["schema"].get("type") != "model-fields":
        return None
    return SchemaValidator(schema["schema"], config=schema.get("config"))


_FIELDS = _fields_validator()


def user_key(user_id: int) -> bytes:
    return user_id.to_bytes(8, "big")


def base_key(user_id: int) -> bytes:
    return BASE + user_id.to_bytes(8, "big")


def tail_key(user_id: int) -> bytes:
    return TAIL + user_id.to_bytes(8, "big")


def index_key(user_id: int) -> bytes:
    return INDEX + user_id.to_bytes(8, "big")


def keys_key(user_id: int) -> bytes:
    return KEYS + user_id.to_bytes(8, "big")


def _bloom(keys: np.ndarray) -> bytes:
    m = max(64, 1 << (16 * len(keys) - 1).bit_length())
    shift = np.uint64(65 - m.bit_length())
    bits = np.zeros(m, dtype=bool)
    u = keys.astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        for c in _BLOOM_MULT:
            bits[(u * np.uint64(c)) >> shift] = True
    return np.packbits(bits, bitorder="little").tobytes()


def _maybe_in_base(index: bytes, key: int) -> bool:
    """False when ``key`` is certainly not among the base's keys (the index's filter)."""
    shift = 65 - ((len(index) - _INDEX_HEAD) * 8).bit_length()
    key &= _M64
    for c in _BLOOM_MULT:
        p = ((key * c) & _M64) >> shift
        if not (index[_INDEX_HEAD + (p >> 3)] >> (p & 7)) & 1:
            return False
    return True


def _put_base(store: Store, user: int, rows: np.ndarray) -> None:
    """The base, its event keys (int64, oldest first: 8 B per pair, read only when needed) and its index, what
    every event reads: ``INDEX_TAG``, the newest pair's event time and key, the number of keys, and a Bloom
    filter of the keys (2-4 B per pair, where a key takes 8): a new key that the filter rules out needs no key read."""
    keys = rows[:, COL_KEY].astype("<i8")
    store.put(base_key(user), encode_snapshot(user, rows))
    store.put(keys_key(user), keys.tobytes())
    head = np.array([int(rows[-1, COL_TIME]), int(keys[-1]), len(keys)], dtype="<i8").tobytes()
    store.put(index_key(user), b"".join((INDEX_TAG, head, _bloom(keys))))


def _newest(index: bytes) -> tuple[int, int, int]:
    """(newest event time, newest event key, number of keys) of the base, from its index (any version)."""
    if index[:8] == INDEX_TAG:
        t, k, n = np.frombuffer(index, dtype="<i8", count=3, offset=8).tolist()
        return t, k, n
    newest, keys = _old_index(index)
    return newest, int(keys[-1]), len(keys)


def _old_index(value: bytes) -> tuple[int, np.ndarray]:
    """(newest time, keys) of an index of earlier builds (a compact snapshot record with only the keys): it
    still reads, and is rewritten at the next fold."""
    return sx.snapshot_keys(value)


def _base_keys(store: Store, user: int, index: bytes) -> tuple[int, np.ndarray]:
    """(newest event time, event keys oldest first: a read-only view) of a user's base."""
    if index[:8] == INDEX_TAG:
        return _newest(index)[0], np.frombuffer(store.get(keys_key(user)), dtype="<i8")
    return _old_index(index)


def encode_value(user_id: int, rows: np.ndarray) -> bytes:
    """A sequence's fixed-layout ``user-sequences`` bytes (codec version 1) from (n, ROW) int64 rows, oldest
    first: the layout of a user's tail in the store."""
    return _SEQ_PREFIX + encode_rows(user_id, rows)


def _meta(cap: int, layout: int = LAYOUT) -> bytes:
    return json.dumps({"layout": layout, "cap": cap}, sort_keys=True).encode()


def _stored_rows(base: bytes | None, tail: bytes | None) -> np.ndarray:
    """A user's stored rows, base then tail (sorted, distinct; the sequence is their last ``cap``)."""
    parts = [sx.decode(v)[1] for v in (base, tail) if v is not None]
    return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else _NO_ROWS


def put_sequence(store: Store, user: int, rows: np.ndarray | None) -> None:
    """Stage a user's whole sequence (rows oldest first; None deletes it) as its base, in a store that holds
    no tails (a rebuild after ``reset``, a benchmark's seed)."""
    if rows is None:
        store.delete(base_key(user))
        store.delete(index_key(user))
        store.delete(keys_key(user))
    else:
        _put_base(store, user, rows)


def read_sequences(source: Store | Iterable[tuple[bytes, bytes]], users: Sequence[int] | None = None
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """THE reader of the agent's stored state: ``(user, rows)`` of each user's sequence ((n, ROW) int64, oldest
    first), for ``users`` (point reads, staged writes included) or, without them, every user in key order
    (the committed state of a ``Store``, or the ``(key, value)`` pairs of ``store.read_state(path)``).
    Users without a sequence are skipped."""
    if users is not None:
        if not isinstance(source, Store):
            raise TypeError("point reads need a Store")
        meta = source.get(META)
        cap = json.loads(meta)["cap"] if meta else None
        for c in range(0, len(users), REBUILD_CHUNK):  # bounded memory whatever the number of users
            chunk = users[c:c + REBUILD_CHUNK]
            values = source.get_many([k for u in chunk for k in (base_key(u), tail_key(u))])
            for i, user in enumerate(chunk):
                b, t = values[2 * i], values[2 * i + 1]
                if b is not None or t is not None:
                    yield user, _stored_rows(b, t)[-cap:] if cap else _stored_rows(b, t)
        return
    if isinstance(source, Store):
        meta = source.get(META)
        tails, bases = source.scan(TAIL), source.scan(BASE)  # two streams in user order
    else:  # one stream in key order: the layout record, all tails, then all bases
        items = iter(source)
        first = next(items, None)
        meta = first[1] if first is not None and first[0] == META else None
        if meta is None and first is not None:
            items = itertools.chain([first], items)
        tails = []
        for key, value in items:
            if key[:1] == BASE:
                bases = itertools.takewhile(lambda kv: kv[0][:1] == BASE, itertools.chain([(key, value)], items))
                break
            tails.append((key, value))
        else:
            bases = iter(())
    if meta is None:
        if next(iter(tails), None) is not None or next(bases, None) is not None:
            raise ValueError(f"the store holds no layout record: not of the sequence agent's layout {LAYOUT}")
        return
    cap = json.loads(meta)["cap"]
    tails, bases = iter(tails), iter(bases)
    t, b = next(tails, None), next(bases, None)
    while t is not None or b is not None:
        for key, _ in (x for x in (t, b) if x is not None):
            if len(key) != 9 or key[:1] not in (BASE, TAIL):
                raise ValueError(f"store key {key[:16]!r} is not of the sequence agent's layout {LAYOUT}")
        tu = int.from_bytes(t[0][1:], "big") if t is not None else None
        bu = int.from_bytes(b[0][1:], "big") if b is not None else None
        user = min(u for u in (tu, bu) if u is not None)
        yield user, _stored_rows(b[1] if bu == user else None, t[1] if tu == user else None)[-cap:]
        if tu == user:
            t = next(tails, None)
        if bu == user:
            b = next(bases, None)


def _plain_groups(users: np.ndarray, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per user group (rows grouped by user, ``starts``/``ends``): whether its rows have distinct event keys
    and are in strictly increasing (time, key) order, i.e. already a sequence."""
    ok = np.ones(len(starts), dtype=bool)
    if len(rows) < 2:
        return ok
    same = users[1:] == users[:-1]
    t, k = rows[:, COL_TIME], rows[:, COL_KEY]
    bad = same & ~((t[1:] > t[:-1]) | ((t[1:] == t[:-1]) & (k[1:] > k[:-1])))
    by_key = np.lexsort((k, users))  # equal keys of one user become neighbours
    dup = (users[by_key][1:] == users[by_key][:-1]) & (k[by_key][1:] == k[by_key][:-1])
    at = np.concatenate((np.nonzero(bad)[0] + 1, by_key[1:][dup]))
    ok[np.searchsorted(starts, at, side="right") - 1] = False
    return ok


def merge(cur: np.ndarray | None, new: np.ndarray, cap: int) -> np.ndarray | None:
    """The cap latest distinct (by event_key) rows of cur + new in (time, key) order; None if unchanged.
    ``cur`` is a stored sequence (sorted, distinct, at most cap rows); ``new`` in arrival order."""
    if cur is not None and len(cur):
        if len(new) == 1:  # the common case with many users: one event per user per batch
            if (cur[:, COL_KEY] == new[0, COL_KEY]).any():
                return None
            if (new[0, 0], new[0, 1]) > (cur[-1, 0], cur[-1, 1]):  # in order: append, no sort
                return np.concatenate((cur[len(cur) + 1 - cap:] if len(cur) >= cap else cur, new))
        else:
            new = new[~np.isin(new[:, COL_KEY], cur[:, COL_KEY])]
            if not len(new):
                return None if len(cur) <= cap else cur[-cap:]
        rows = np.concatenate((cur, new))
    elif len(new) == 1:
        return new
    else:
        rows = new
    _, first = np.unique(rows[:, COL_KEY], return_index=True)  # duplicates within the batch: keep the first
    if len(first) != len(rows):
        rows = rows[np.sort(first)]
    rows = rows[np.lexsort((rows[:, COL_KEY], rows[:, COL_TIME]))][-cap:]
    if cur is not None and len(rows) == len(cur) and np.array_equal(rows, cur):
        return None  # only events older than the capped window arrived
    return rows


def pair_rows(event: BehaviorEvent) -> tuple[int, ...]:
    t = tokenize(event)
    return (t.event_time_ms, t.event_key, *t.conditions, t.item_id, t.category_id)


class SequenceLogic:
    """The sequence agent over (store, records, emit); see the module docstring for the rules."""

    name = "sequences"
    inputs = (BEHAVIORS,)

    def __init__(self, max_pairs: int = 1024, max_future_skew_ms: int = 3_600_000,
                 clock: Callable[[], float] = time.time):
        self.cap, self.skew_ms, self.clock = max_pairs, max_future_skew_ms, clock
        self.stores: dict[int, Store] = {}
        self.republish_below: dict[int, int] = {}
        self.counts = {"sequences_published_total": 0, "sequences_rebuilt_users_total": 0,
                       "sequences_events_total": 0, "sequences_dead_letters_total": 0,
                       "sequences_future_events_total": 0}

    @classmethod
    def from_settings(cls, cfg) -> SequenceLogic:
        return cls(cfg.max_pairs, cfg.max_future_skew_ms)

    # --- partition lifecycle -----------------------------------------------------------------------------
    def assign(self, partition: int, store: Store, committed: Mapping[str, int | None], emit: Emit,
               read: Reader) -> dict[str, int]:
        start = committed.get(BEHAVIORS.name) or 0
        local = store.positions().get(BEHAVIORS.name)
        meta = store.get(META)
        if meta in {_meta(self.cap, old) for old in UPGRADES}:
            store.put(META, _meta(self.cap))
            meta = _meta(self.cap)
        why = ("missing" if local is None else f"behind ({local} < {start})" if local < start
               else None if meta == _meta(self.cap) else f"of layout/cap {(meta or b'layout 1').decode()}")
        if why:
            n = self.rebuild(store, lambda name: read(EXPORT[name], partition), partition, start)
            log.info("partition %d: local state %s, rebuilt %d users from %s (resume at %d)", partition, why, n,
                     USER_SEQUENCES.name, start)
            local = start
        else:
            log.info("partition %d: local state at offset %d, committed %d", partition, local, start)
        self.stores[partition] = store
        self.republish_below[partition] = local
        return {BEHAVIORS.name: start}

    def reset(self, store: Store) -> None:
        """Empty ``store`` and mark it as this agent's layout and cap (committed with the next commit)."""
        store.reset()
        store.put(META, _meta(self.cap))

    def rebuild(self, store: Store, read, partition: int, start: int) -> int:
        """Refill ``store`` from the export (snapshot + deltas since its marker, ``schemas.seqexport``),
        committed in chunks; the layout record and the position are written last, so a crash mid-way rebuilds
        again. Every user gets a base (the export's rows, which a lowered cap trims at the user's next event)."""
        store.reset()
        users: set[int] = set()

        def get_rows(us: list[int]) -> dict[int, np.ndarray]:
            return dict(read_sequences(store, us))  # no layout record yet: the rows as stored, untrimmed

        def put_rows(rows: dict[int, np.ndarray | None]) -> None:
            for user, r in rows.items():
                put_sequence(store, user, r)
                (users.add if r is not None else users.discard)(user)
                if store.staged >= REBUILD_CHUNK:
                    store.commit({})

        for topic, _p, off, key, _v, err in fold_partition_records(read, partition, get_rows, put_rows):
            log.warning("rebuild: skipping %s record %d (key %r): %s", topic, off, key, err)
        store.put(META, _meta(self.cap))
        store.commit({BEHAVIORS.name: start})
        self.counts["sequences_rebuilt_users_total"] += len(users)
        return len(users)

    def revoke(self, partition: int) -> None:
        self.stores.pop(partition, None)
        self.republish_below.pop(partition, None)

    # --- processing --------------------------------------------------------------------------------------
    def decode(self, records: Sequence[Record], emit: Emit) -> tuple[list[dict], list[int]]:
        """Validated field dicts of the good records and their offsets; the rest dead-lettered."""
        good: list[dict] = []
        offsets: list[int] = []
        limit = int(self.clock() * 1000) + self.skew_ms
        validate = _FIELDS.validate_json if _FIELDS is not None else None
        for r in records:
            v = r.value
            fields = None
            if validate is not None and v is not None and v[:3] == _BEHAVIORS_HEADER:
                try:
                    fields = validate(v[3:])[0]
                except ValidationError:
                    pass
            if fields is None:  # the codec says why (and accepts exactly what the shortcut accepts)
                try:
                    fields = dict(BEHAVIORS.decode(v))
                except DecodeError as e:
                    self._dead(emit, r, e)
                    continue
            if fields["event_time_ms"] > limit:
                self.counts["sequences_future_events_total"] += 1
                self._dead(emit, r, f"event_time_ms {fields['event_time_ms']} is more than "
                                    f"LUM_AGENT_MAX_FUTURE_SKEW_MS={self.skew_ms} ahead of now ({limit - self.skew_ms})")
                continue
            good.append(fields)
            offsets.append(r.offset)
        return good, offsets

    def _dead(self, emit: Emit, record: Record, reason) -> None:
        self.counts["sequences_dead_letters_total"] += 1
        emit.dead_letter(record, reason)

    def process(self, partition: int, records: Sequence[Record], emit: Emit) -> None:
        store = self.stores[partition]
        good, offsets = self.decode(records, emit)
        if not good:
            return
        self.counts["sequences_events_total"] += len(good)
        rows = tokenize_rows(good)
        users = np.fromiter((f["user_id"] for f in good), dtype=np.int64, count=len(good))
        republish_below = self.republish_below.get(partition, 0)
        forced = set(users[np.asarray(offsets) < republish_below].tolist()) if offsets[0] < republish_below else ()
        # Group by user: rows of one user contiguous, in arrival order within the user.
        order = np.argsort(users, kind="stable")
        rows, users = rows[order], users[order]
        uniq, starts = np.unique(users, return_index=True)
        ends = np.append(starts[1:], len(rows))
        uniq_l, starts_l, ends_l = uniq.tolist(), starts.tolist(), ends.tolist()
        values = store.get_many([k for u in uniq_l for k in (index_key(u), tail_key(u))])
        changed = [False] * len(uniq_l)
        # Users without stored state whose rows are distinct and in (time, key) order (most new users): their
        # tails are the rows as they are, encoded in one pass. The rest: per user.
        plain = _plain_groups(users, rows, starts, ends)
        new_users = [i for i, p in enumerate(plain.tolist()) if p and values[2 * i] is None
                     and values[2 * i + 1] is None and ends_l[i] - starts_l[i] <= TAIL_PAIRS]
        if new_users:
            tails = encode_rows_many([uniq_l[i] for i in new_users], rows, [starts_l[i] for i in new_users],
                                     [ends_l[i] for i in new_users], _SEQ_PREFIX)
            store.update({tail_key(uniq_l[i]): v for i, v in zip(new_users, tails)})
            for i in new_users:
                changed[i] = True
        cap, new_set = self.cap, set(new_users)
        plain_l = plain.tolist()
        # One in-order row of a user with state (most users, with many users): the append, vectorised.
        ones = [i for i in range(len(uniq_l)) if plain_l[i] and ends_l[i] - starts_l[i] == 1 and i not in new_set]
        if ones:
            for i, done in zip(ones, self._append_ones(store, [uniq_l[i] for i in ones], rows[starts[ones]],
                                                       [values[2 * i] for i in ones],
                                                       [values[2 * i + 1] for i in ones], cap)):
                if done is not None:
                    changed[i] = done
                    new_set.add(i)
        for i, user in enumerate(uniq_l):
            if i in new_set:
                continue
            s, e = starts_l[i], ends_l[i]
            if plain_l[i]:  # in order and distinct (most): the append, inline
                done = self._append(store, user, values[2 * i], values[2 * i + 1], rows[s:e], cap)
                if done is not None:
                    changed[i] = done
                    continue
            changed[i] = self._apply(store, user, values[2 * i], values[2 * i + 1], rows[s:e])
        if forced:
            changed = [c or u in forced for c, u in zip(changed, uniq_l)]
        sent = [i for i, c in enumerate(changed) if c]
        if not sent:
            return
        # This batch's pairs of each changed user, in vectorised passes (``encode_deltas``).
        out = encode_deltas(uniq[sent], rows, starts[sent], ends[sent], cap)
        keys = [key_of(uniq_l[i]) for i in sent]
        send_many = getattr(emit, "send_many", None)  # the worker's emit: one call for the batch
        if send_many is not None:
            send_many(SEQUENCE_DELTAS, out, keys, partition)
        else:
            for value, key in zip(out, keys):
                emit.send(SEQUENCE_DELTAS, value, key, partition)
        self.counts["sequences_published_total"] += len(sent)

    @staticmethod
    def _append_ones(store: Store, users: list[int], new: np.ndarray, indexes: list[bytes | None],
                     tails: list[bytes | None], cap: int) -> list[bool | None]:
        """``_append`` of many users with ONE new row each (``new[i]`` for ``users[i]``) at once: the same
        result per user (False: a duplicate in the tail; True: appended to the tail, staged), or None where
        ``_append`` must decide alone (the filter cannot rule out a duplicate in the base, a late row, a
        fold, a lowered cap, a record of another version)."""
        n = len(users)
        trows, nt = record_rows_many(tails, len(_SEQ_PREFIX))
        tagged = [ix is not None and ix[:8] == INDEX_TAG for ix in indexes]
        head = np.frombuffer(b"".join([ix[8:_INDEX_HEAD] if t else _NO_HEAD for ix, t in zip(indexes, tagged)]),
                             dtype="<i8").reshape(n, 3)
        newest, last, nb = head[:, 0], head[:, 1], head[:, 2]
        ok = (nt >= 0) & (nt + 1 <= TAIL_PAIRS) & (nb <= cap) & np.array(
            [t or ix is None for ix, t in zip(indexes, tagged)], dtype=bool)
        t0, k0 = new[:, COL_TIME], new[:, COL_KEY]
        # Duplicates of the tail's rows inside the window (its last ``cap``).
        cnt = np.maximum(nt, 0)
        owner = np.repeat(np.arange(n), cnt)
        first = np.cumsum(cnt) - cnt
        pos = np.arange(len(trows)) - first[owner]
        hit = (pos >= (cnt - cap)[owner]) & (trows[:, COL_KEY] == k0[owner])
        dup = ok & (np.bincount(owner[hit], minlength=n) > 0)
        # Base rows inside the window: a duplicate there is ruled out by the index's filter, or left to _append.
        in_base = np.maximum(0, np.minimum(nb, cap - cnt))
        check = np.nonzero(ok & ~dup & (in_base > 0))[0]
        maybe = np.zeros(n, dtype=bool)
        if len(check):
            blooms = [indexes[i] for i in check.tolist()]
            lens = np.array([len(b) - _INDEX_HEAD for b in blooms], dtype=np.int64)
            starts = np.cumsum(lens) - lens
            bits = np.frombuffer(b"".join([b[_INDEX_HEAD:] for b in blooms]), dtype=np.uint8)
            shift = (65 - np.array([(8 * m).bit_length() for m in lens.tolist()])).astype(np.uint64)
            key = k0[check].view(np.uint64)
            all_set = np.ones(len(check), dtype=bool)
            with np.errstate(over="ignore"):
                for c in _BLOOM_MULT:
                    p = (key * np.uint64(c)) >> shift
                    all_set &= ((bits[starts + (p >> np.uint64(3)).astype(np.int64)] >> (p & np.uint64(7))) & 1) == 1
            maybe[check] = all_set
        # Order: after the tail's newest row, or the base's newest pair when the tail is empty.
        lt = np.maximum(first + cnt - 1, 0)
        if len(trows):
            tt, tk = trows[lt, COL_TIME], trows[lt, COL_KEY]
        else:
            tt = tk = np.zeros(n, dtype=np.int64)
        after_tail = (t0 > tt) | ((t0 == tt) & (k0 > tk))
        after_base = (t0 > newest) | ((t0 == newest) & (k0 > last))
        in_order = np.where(cnt > 0, after_tail, (nb == 0) | after_base)
        app = np.nonzero(ok & ~dup & ~maybe & in_order)[0].tolist()
        if app:
            values = append_row_many([tails[i] for i in app], [users[i] for i in app], new[app], len(_SEQ_PREFIX),
                                     _SEQ_PREFIX)
            store.update({tail_key(users[i]): v for i, v in zip(app, values)})
        out: list[bool | None] = [False if d else None for d in dup.tolist()]
        for i in app:
            out[i] = True
        return out

    @staticmethod
    def _append(store: Store, user: int, index: bytes | None, tail: bytes | None, new: np.ndarray, cap: int
                ) -> bool | None:
        """``_apply`` in its common cases without decoding anything, for ``new`` rows that are already a
        sequence (distinct, in (time, key) order): one duplicate of the window (False, for one row), or rows
        after every stored one that fit in the tail (True). None: any other case, for ``_apply``."""
        trows = record_rows(tail, len(_SEQ_PREFIX)) if tail is not None else _NO_ROWS
        if trows is None:  # a tail of an older tokenizer version
            return None
        newest, last, nb = _newest(index) if index is not None else (None, None, 0)
        nt, k = len(trows), len(new)
        if nb > cap or nt + k > TAIL_PAIRS:  # a lowered cap, or a fold: the general path
            return None
        in_base = max(0, min(nb, cap - nt))
        keys = new[:, COL_KEY] if k > 1 else new[0, COL_KEY]
        tkeys = trows[-cap:, COL_KEY]
        if (tkeys[:, None] == keys).any() if k > 1 else (tkeys == keys).any():
            return False if k == 1 else None  # a duplicate of the window
        if in_base and (index[:8] != INDEX_TAG or any(_maybe_in_base(index, x) for x in new[:, COL_KEY].tolist())):
            wkeys = _base_keys(store, user, index)[1][nb - in_base:]  # the filter could not rule them out
            if (wkeys[:, None] == keys).any() if k > 1 else (wkeys == keys).any():
                return False if k == 1 else None
        t0, k0 = int(new[0, COL_TIME]), int(new[0, COL_KEY])
        if nt:
            if (t0, k0) <= (int(trows[-1, COL_TIME]), int(trows[-1, COL_KEY])):
                return None  # a late event: the general path
        elif nb and (t0, k0) <= (newest, last):
            return None
        store.put(tail_key(user), append_rows(tail, user, new, len(_SEQ_PREFIX)) if nt else encode_value(user, new))
        return True

    def _apply(self, store: Store, user: int, index: bytes | None, tail: bytes | None, new: np.ndarray) -> bool:
        """Stage one user's new rows (arrival order); True if the user's sequence changed.

        The sequence is the last ``cap`` rows of base + tail (the window); ``index`` gives the base's keys and
        newest pair without its other columns. New rows newer than every stored row are appended to the tail
        (one small value rewritten); the tail is folded into the base (read only then) when it would exceed
        ``TAIL_PAIRS``, and a row landing inside the window, or a base longer than the cap (a lowered cap),
        folds at once with ``merge``'s rules."""
        cap = self.cap
        if index is not None:
            newest, bkeys = _base_keys(store, user, index)
        else:
            newest, bkeys = None, _NO_ROWS[:, COL_KEY]
        trows = sx.decode(tail)[1] if tail is not None else _NO_ROWS
        nb, nt = len(bkeys), len(trows)
        cut = nb > cap
        in_base = max(0, min(nb, cap - nt))  # base rows inside the window
        wkeys, tkeys = bkeys[nb - in_base:], trows[-cap:, COL_KEY]
        # Duplicates of the window (as merge: against the current sequence only) and within the batch.
        if len(new) == 1:
            if (wkeys == new[0, COL_KEY]).any() or (tkeys == new[0, COL_KEY]).any():
                new = new[:0]
        elif len(new) <= _FEW:  # a few rows: one comparison per stored key, the rest in plain Python
            k = new[:, COL_KEY]
            dup = ((wkeys[:, None] == k).any(0) | (tkeys[:, None] == k).any(0)).tolist()
            kept, first = [], set()
            for r, d in zip(new.tolist(), dup):
                if not d and r[COL_KEY] not in first:
                    first.add(r[COL_KEY])
                    kept.append(r)
            kept.sort()  # (time, key) order: keys are distinct
            new = np.array(kept, dtype=np.int64).reshape(-1, ROW)
        else:
            new = new[~(np.isin(new[:, COL_KEY], wkeys) | np.isin(new[:, COL_KEY], tkeys))]
            if len(new) > 1:
                _, first = np.unique(new[:, COL_KEY], return_index=True)
                if len(first) != len(new):
                    new = new[np.sort(first)]
                new = new[np.lexsort((new[:, COL_KEY], new[:, COL_TIME]))]
        if not len(new) and not cut:
            return False
        last = (trows[-1, COL_TIME], trows[-1, COL_KEY]) if nt else (newest, bkeys[-1]) if nb else None
        if not cut and (last is None or (new[0, COL_TIME], new[0, COL_KEY]) > last):  # in order: append
            trows = np.concatenate((trows, new)) if nt else new
            if len(trows) <= TAIL_PAIRS:
                store.put(tail_key(user), encode_value(user, trows))
                return True
            merged = np.concatenate((sx.decode(store.get(base_key(user)))[1], trows))[-cap:] if nb else trows[-cap:]
        else:
            window = _stored_rows(store.get(base_key(user)) if nb else None, tail)[-cap:]
            merged = merge(window, new, cap) if len(new) else None
            if merged is None:  # only pairs older than the full window arrived
                if not cut:
                    return False
                merged = window
        _put_base(store, user, merged)
        if tail is not None:
            store.delete(tail_key(user))
        return True

    def gauges(self) -> dict[str, float]:
        return dict(self.counts)


def expected_sequences(events, cap: int = 1024) -> dict[int, UserSequence]:
    """Sequences computed directly from events (the definition above), for tests and backfill checks."""
    by_user: dict[int, dict[int, tuple[int, ...]]] = defaultdict(dict)
    for e in events:
        r = pair_rows(e)
        by_user[e.user_id].setdefault(r[1], r)
    out = {}
    for user, rows in by_user.items():
        kept = sorted(rows.values(), key=lambda r: (r[0], r[1]))[-cap:]
        out[user] = USER_SEQUENCES.decode(encode_value(user, np.array(kept, dtype=np.int64).reshape(-1, ROW)))
    return out


def snapshot(kafka) -> tuple[dict[int, UserSequence], dict[str, int]]:
    """Every user's sequence as the export says (``streaming.kafka.sequences.snapshot``), for tools and tests."""
    from ..kafka.sequences import snapshot as read_export

    return read_export(kafka)
