"""Sequence agent: each user's rolling (condition, item) sequence, in its state store and in ``user-sequences``.

    lum agents --only sequences [--workers N]        # or: python -m streaming.agents.worker sequences

Pure logic (``SequenceLogic``) over the runtime-neutral contract of ``streaming.agents.store``: decoded
``Record``s of ``behaviors`` in, a ``Store`` per partition, an ``Emit`` for outputs and dead letters. No Kafka
client or RocksDB type appears here; the runtime (``streaming.agents.worker``) hosts it.

State. Per ``behaviors`` partition: key = user id (8 bytes big endian), value = the user's sequence in the
exact bytes of the export topic (``USER_SEQUENCES.encode``: a codec header and the binary sequence record
of ``schemas.tokenize``, pairs ``[event_time, event_key, condition ids..., item_id, category_id]``). The
store's committed position of ``behaviors`` says which offsets the state covers.

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
(``schemas.tokenize.tokenize_rows``), grouped by user with numpy; users without a stored sequence are
deduplicated, sorted and capped for the whole batch in a few array operations; users with one are merged
one by one (a numpy merge on an (n, ROW_WIDTH) int64 view of the stored bytes, no per-pair Python work).
One multi-get per batch; writes are staged in the store, which commits them once per batch.

Export: the ``user-sequences`` topic (compacted, binary ``UserSequence``; the trainers' contract)
    * key = user id as decimal text; value = the user's FULL current sequence (never a delta), decoded with
      ``schemas.topics.USER_SEQUENCES.decode`` (no Faust, no RocksDB needed); partition = the user's
      ``behaviors`` partition (so partition p holds exactly the users of behaviors partition p).
    * One message per changed user per batch, delivered before the batch's offsets are committed.
    * Full snapshot: read every partition from the beginning to its end (high-water mark of the fetch),
      keep the last value per key. Apache Kafka's compaction keeps this cheap; the embedded broker never
      compacts, so the read grows with history (``snapshot()`` below does exactly this).
    * Incremental: remember the end offset of each partition after a read; later, read from there: the keys
      seen are the users changed since, their values are their complete new sequences.

Recovery. The export topic doubles as the changelog. On assignment of partition p the agent resumes from
the group's committed offset C. If the store covers at least C it is used as is (events in [C, store
position) were applied but maybe not published: they are re-applied, change nothing, and their users are
republished). If it is missing or behind (the partition was processed elsewhere, or the store's identity
did not match), it is rebuilt from partition p of ``user-sequences`` (latest value per key, streamed into
the store in chunks), which holds everything up to C because outputs are delivered before commits.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from pydantic import ValidationError
from pydantic_core import SchemaValidator

from schemas.codec import DecodeError
from schemas.events import BehaviorEvent
from schemas.tokenize import (COL_KEY, COL_TIME, ROW_WIDTH, UserSequence, decode_rows, decode_rows_many, encode_rows,
                              encode_rows_many, tokenize, tokenize_rows)
from schemas.topics import BEHAVIORS, USER_SEQUENCES, key_of

from .store import Emit, Reader, Record, Store

log = logging.getLogger(__name__)

ROW = ROW_WIDTH  # int64 columns of one pair (schemas.tokenize owns the layout)
REBUILD_CHUNK = 10_000  # users per store commit while rebuilding (bounded memory)
VECTOR_ROWS = 1_000_000  # stored rows per batch up to which all users are merged in one array operation
_BEHAVIORS_HEADER = BEHAVIORS.encode(BehaviorEvent(event_id="x", user_id=0, item_id=0, category_id=0, behavior="view",
                                                   scenario="x", event_time_ms=1_000_000_000_000))[:3]
_SEQ_PREFIX = USER_SEQUENCES.encode(UserSequence(0, 0, []))[:3]  # the codec's format header of the export


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


def encode_value(user_id: int, rows: np.ndarray) -> bytes:
    """A sequence's export/storage bytes from its (n, ROW) int64 rows, oldest first."""
    return _SEQ_PREFIX + encode_rows(user_id, rows)


def decode_value(value: bytes) -> np.ndarray:
    """(n, ROW) int64 rows of stored/exported bytes, in the current tokenizer layout."""
    if value[:3] != _SEQ_PREFIX:
        raise ValueError(f"not a user-sequence value (header {bytes(value[:3])!r})")
    return decode_rows(memoryview(value)[3:])[2]


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
        if local is None or local < start:
            n = self.rebuild(store, read(USER_SEQUENCES, partition), start)
            log.info("partition %d: local state %s, rebuilt %d users from %s (resume at %d)", partition,
                     "missing" if local is None else f"behind ({local} < {start})", n, USER_SEQUENCES.name, start)
            local = start
        else:
            log.info("partition %d: local state at offset %d, committed %d", partition, local, start)
        self.stores[partition] = store
        self.republish_below[partition] = local
        return {BEHAVIORS.name: start}

    def rebuild(self, store: Store, records, start: int) -> int:
        """Refill ``store`` from a partition of user-sequences (latest value per key wins, a tombstone
        deletes), streamed in chunks; the position is written last, so a crash mid-way rebuilds again."""
        store.reset()
        users: set[bytes] = set()
        for r in records:
            try:
                key = user_key(int(r.key))
            except (TypeError, ValueError, OverflowError):
                log.warning("skipping %s record with key %r", USER_SEQUENCES.name, r.key)
                continue
            if r.value:
                try:
                    decode_value(r.value)  # header and length: the batch path trusts stored values
                except ValueError as e:
                    log.warning("skipping %s record at offset %d: %s", USER_SEQUENCES.name, r.offset, e)
                    continue
                store.put(key, r.value)
                users.add(key)
            else:  # a tombstone (backfill) deletes the user
                store.delete(key)
                users.discard(key)
            if store.staged >= REBUILD_CHUNK:
                store.commit({})
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
        rows = rows[order]
        uniq, starts = np.unique(users[order], return_index=True)
        lens = np.diff(np.append(starts, len(rows)))
        uniq_l = uniq.tolist()
        olds = store.get_many([user_key(u) for u in uniq_l])
        have = [i for i, o in enumerate(olds) if o is not None]
        for i in have:
            if olds[i][:3] != _SEQ_PREFIX:
                raise ValueError(f"stored value of user {uniq_l[i]} is not a user-sequence value")
        old_rows, old_lens = decode_rows_many([olds[i] for i in have], skip=3)
        if len(old_rows) <= VECTOR_ROWS:
            changed, values = self._merge_all(uniq_l, have, old_rows, old_lens, rows, lens)
        else:  # long stored sequences: merge user by user (each already costs a copy of its sequence)
            stored: list[np.ndarray | None] = [None] * len(uniq_l)
            for i, a, b in zip(have, np.cumsum([0] + old_lens[:-1]).tolist(), np.cumsum(old_lens).tolist()):
                stored[i] = old_rows[a:b]
            changed, values, i = [], [], 0
            for user, cur, n in zip(uniq_l, stored, lens.tolist()):
                merged = merge(cur, rows[i:i + n], self.cap)
                i += n
                changed.append(merged is not None)
                values.append(None if merged is None else encode_value(user, merged))
        publish: list[tuple[int, bytes]] = []
        for user, ok, value, old in zip(uniq_l, changed, values, olds):
            if ok:
                publish.append((user, value))
            elif user in forced and old is not None:
                publish.append((user, old))
        put, send = store.put, emit.send
        for user, value in publish:
            put(user.to_bytes(8, "big"), value)
            send(USER_SEQUENCES, value, key_of(user), partition)
        self.counts["sequences_published_total"] += len(publish)

    def _merge_all(self, users: list[int], have: list[int], old_rows: np.ndarray, old_lens: list[int],
                   new: np.ndarray, lens: np.ndarray) -> tuple[list[bool], list[bytes | None]]:
        """Every touched user's new sequence at once: stored rows (users ``have``; first, so they win
        duplicates) + the batch's rows grouped by user; dedup by (user, event key), sort by (user, time,
        key), keep each user's last ``cap``. A user changed iff one of its new rows is kept or the cap cut
        its stored rows. Python work is one header and slice per changed user."""
        n_users = len(users)
        new_owner = np.repeat(np.arange(n_users), lens)
        stored_len = np.zeros(n_users, dtype=np.int64)
        if len(old_rows):
            stored_len[have] = old_lens
            owner = np.concatenate((np.repeat(np.asarray(have), old_lens), new_owner))
            rows = np.concatenate((old_rows, new))
            is_new = np.concatenate((np.zeros(len(old_rows), bool), np.ones(len(new), bool)))
        else:
            owner, rows, is_new = new_owner, new, np.ones(len(new), bool)
        if len(rows) > n_users:  # some user has more than one row: dedup and sort
            o = np.lexsort((np.arange(len(rows)), rows[:, COL_KEY], owner))
            keep = np.ones(len(o), dtype=bool)
            keep[1:] = (owner[o[1:]] != owner[o[:-1]]) | (rows[o[1:], COL_KEY] != rows[o[:-1], COL_KEY])
            o = o[keep]
            o = o[np.lexsort((rows[o, COL_KEY], rows[o, COL_TIME], owner[o]))]
            rows, owner, is_new = rows[o], owner[o], is_new[o]
        counts = np.bincount(owner, minlength=n_users)
        g_end = np.cumsum(counts)
        g_start = np.maximum(g_end - counts, g_end - self.cap)
        kept_new = is_new & (np.arange(len(rows)) >= g_start[owner])
        changed = (np.bincount(owner[kept_new], minlength=n_users) > 0) | (g_end - g_start < stored_len)
        idx = np.flatnonzero(changed)
        values: list[bytes | None] = [None] * n_users
        encoded = encode_rows_many([users[i] for i in idx.tolist()], rows, g_start[idx].tolist(),
                                   g_end[idx].tolist(), prefix=_SEQ_PREFIX)
        for i, v in zip(idx.tolist(), encoded):
            values[i] = v
        return changed.tolist(), values

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


def snapshot(kafka, starts: dict[int, int] | None = None) -> tuple[dict[int, UserSequence], dict[int, int]]:
    """Latest sequence per user in ``user-sequences`` (from ``starts``, default the beginning) and the end
    offsets reached: the full-snapshot and incremental reads of the export contract (a Kafka read, for
    tools and tests; the logic above never reads Kafka)."""
    from ..kafka import read_to_end, reader

    topic = kafka.topic(USER_SEQUENCES)
    latest: dict[bytes, bytes | None] = {}
    ends: dict[int, int] = dict(starts or {})
    consumer = reader(kafka)
    t0 = time.monotonic()
    try:
        for m in read_to_end(consumer, topic, starts):
            latest[m.key()] = m.value()
            ends[m.partition()] = m.offset() + 1
    finally:
        consumer.close()
    log.debug("snapshot of %s: %d users in %.1fs", topic, len(latest), time.monotonic() - t0)
    return {int(k): USER_SEQUENCES.decode(v) for k, v in latest.items() if v}, ends
