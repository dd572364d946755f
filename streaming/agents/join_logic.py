"""The label join as pure logic: decoded records + a state store in, examples out; no Kafka or RocksDB type.

Hosted by a runtime (``streaming.agents.worker`` by default, or Faust) through ``JoinLogic`` below, which
follows the ``streaming.agents.store`` contract: ``assign`` / ``process`` / ``revoke`` over ``Record``s, one
``Store`` per partition, outputs through an ``Emit``. The rules, guarantees and settings are documented in
``streaming.agents.joiner`` (the launch point); this module is what implements them.

Every key the joiner stores is built and parsed by ``JoinKeys``; nothing else writes a key byte.

State is read from the store when a batch needs it (no partition is ever loaded whole into memory): pending
impressions, emitted ids and early clicks are point reads; the windows to close, the ids to forget and the
users to evict are found by streaming ordered index keys (deadline / expiry / activity time first), so
``assign`` reads a handful of keys and every batch touches only what it changes. Each index scan starts
where the previous batch's deletions ended (``_Part.cursor``), so tombstones that RocksDB has not compacted
yet are never stepped over again: per-event cost stays flat once windows close and retention and eviction
run (``benchmarks/bench_join_mature.py`` measures it).

Batch path (``process``, one call per partition and batch): impressions and behaviors are validated with
their schema's own pydantic-core field validator into field dicts (no model objects; the codec says why
anything else is refused, which is the dead letter's reason); one multi-get covers every id the batch touches;
histories are merged for all of the batch's users at once in numpy; examples are encoded from parts already
in wire form (``schemas.codec.encode_training_example``, the same bytes as encoding the model). The batch's
writes are collected in order (the changelog's order), handed to the store in one call, and the outputs go
out in bulk (``send_many`` where the runtime's Emit has it). Outputs are byte-identical to the per-message
path this replaced (tests/streaming/agents/test_join_logic.py, the mixed-stream test).
"""

from __future__ import annotations

import bisect
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from array import array
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple

import numpy as np

from pydantic import ValidationError
from pydantic_core import SchemaValidator

from schemas.codec import (FORMAT_JSON, HISTORY_DTYPES, MAGIC, DecodeError, encode_training_example,
                           history_widths)
from schemas.events import TARGET_CATEGORY, ItemVectors, LumFeatures
from schemas.tokenize import event_key
from schemas.topics import (BEHAVIORS, IMPRESSIONS, ITEM_EMBEDDINGS, JOINER_CHANGELOG, LATE_CLICKS, LUM_FEATURES,
                            TRAINING_EXAMPLES, key_of)

from .store import Emit, Reader, Record, Store

log = logging.getLogger(__name__)

HISTORY_CAP = 2048  # hard bound per user, even if a burst falls inside one window
FEATURE_VERSIONS = 4  # LUM feature versions kept per user, to find the newest one older than an impression
EVICT_PER_BATCH = 10_000  # activity-index entries examined per batch (bounds a batch's extra work)
RESTORE_CHUNK = 20_000  # changelog records staged between two store commits during a rebuild


# --- configuration -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JoinConfig:
    """The join's parameters (from ``AgentSettings``; names in parentheses are the environment variables)."""

    window_ms: int = 30 * 60_000  # attribution window (LUM_JOIN_WINDOW_MS)
    lateness_ms: int = 60_000  # watermark = event time reached - this (LUM_AGENT_ALLOWED_LATENESS_MS)
    retention_ms: int = 24 * 3600_000  # closed ids / early clicks remembered (LUM_AGENT_JOIN_RETENTION_MS)
    history_len: int = 50  # history items per example (LUM_AGENT_HISTORY_LEN)
    max_future_skew_ms: int = 3600_000  # later than now + this: dead letter (LUM_AGENT_MAX_FUTURE_SKEW_MS)
    max_watermark_step_ms: int = 3600_000  # isolated jump per batch (LUM_AGENT_MAX_WATERMARK_STEP_MS)
    state_horizon_ms: int = 30 * 24 * 3600_000  # idle users' history/features evicted (LUM_AGENT_JOIN_STATE_HORIZON_MS)
    changelog: bool = True  # write the joiner-changelog topic and rebuild from it (LUM_AGENT_JOINER_CHANGELOG)

    @classmethod
    def from_settings(cls, cfg) -> JoinConfig:
        """From ``streaming.agents.settings.AgentSettings``."""
        return cls(window_ms=cfg.join_window_ms, lateness_ms=cfg.allowed_lateness_ms,
                   retention_ms=cfg.join_retention_ms, history_len=cfg.history_len,
                   max_future_skew_ms=cfg.max_future_skew_ms, max_watermark_step_ms=cfg.max_watermark_step_ms,
                   state_horizon_ms=cfg.join_state_horizon_ms, changelog=cfg.joiner_changelog)


# --- key scheme --------------------------------------------------------------------------------------------
def _u8(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _n(b: bytes) -> int:
    return int.from_bytes(b, "big")


class JoinKeys:
    """The joiner's key scheme: every key it stores, built and parsed here (8-byte big-endian numbers, so
    that key order is numeric order and a prefix scan streams an index in time order).

    ``p<id>``                  pending impression: clicked flag (1 byte) + the impression's encoded bytes
    ``e<id>``                  emitted example id: label (1 byte) + window deadline (8)
    ``c<id>``                  click seen before its impression: click time (8) + the click's encoded bytes
    ``o\0<n>``                 outbox: the last batch's examples, chunk n (4 bytes) of (key, encoded example)
                               pairs, each as length (4) + bytes (re-sent by ``assign``); ``o<id>``: one
                               example, the layout before chunks (still read)
    ``h<user>``                history: int64 rows (event time, event key, item, category), sorted
    ``f<user>``                the user's LUM feature versions (up to 4, by as_of; 0: unknown), each as
                               as_of (8), trained_until (8; 0: unknown), activity time (8), length (4), encoded
    ``w<deadline><id>``        index: windows to close, by deadline
    ``r<expiry><kind><id>``    index: emitted ids (kind e) and early clicks (kind c) to forget, by expiry
    ``x<bucket><user>``        index: users by last activity bucket, for eviction
    ``m<name>``                meta: watermark, reached time per stream, open windows

    The indexes (``w``, ``r``, ``x``) are derived from the values they index, so the changelog leaves them
    out (they were most of its records) and a rebuild derives them again (``JoinLogic._reindex``).
    """

    PENDING, EMITTED, EARLY, OUTBOX, HISTORY, FEATURES = b"p", b"e", b"c", b"o", b"h", b"f"
    CLOSING, FORGET, ACTIVITY, META = b"w", b"r", b"x", b"m"
    POSITIONS = b"m\x00positions"  # changelog only: the input positions a changelog batch ends at

    @staticmethod
    def pending(eid: str) -> bytes:
        return b"p" + eid.encode()

    @staticmethod
    def emitted(eid: str) -> bytes:
        return b"e" + eid.encode()

    @staticmethod
    def early(eid: str) -> bytes:
        return b"c" + eid.encode()

    @staticmethod
    def outbox(eid: str) -> bytes:
        return b"o" + eid.encode()

    @staticmethod
    def outbox_chunk(n: int) -> bytes:
        return b"o\0" + n.to_bytes(4, "big")

    INDEXES = frozenset(b"wrx")  # first bytes of the derived keys (not in the changelog)

    @staticmethod
    def history(user: int) -> bytes:
        return b"h" + _u8(user)

    @staticmethod
    def features(user: int) -> bytes:
        return b"f" + _u8(user)

    @staticmethod
    def closing(deadline: int, eid: str) -> bytes:
        return b"w" + _u8(deadline) + eid.encode()

    @staticmethod
    def forget(expiry: int, kind: bytes, eid: str) -> bytes:
        return b"r" + _u8(expiry) + kind + eid.encode()

    @staticmethod
    def activity(bucket: int, user: int) -> bytes:
        return b"x" + _u8(bucket) + _u8(user)

    @staticmethod
    def meta(name: str) -> bytes:
        return b"m" + name.encode()

    # parsing (index keys: time first)
    @staticmethod
    def parse_closing(key: bytes) -> tuple[int, str]:
        return _n(key[1:9]), key[9:].decode()

    @staticmethod
    def parse_forget(key: bytes) -> tuple[int, bytes, str]:
        return _n(key[1:9]), key[9:10], key[10:].decode()

    @staticmethod
    def parse_activity(key: bytes) -> tuple[int, int]:
        return _n(key[1:9]), _n(key[9:17])



K = JoinKeys


# --- watermark ----------------------------------------------------------------------------------------------
def advance(reached: int | None, times: Sequence[int], step: int) -> int | None:
    """The event time a stream has reached after a batch with event ``times``.

    The reached time follows the batch's times upwards while consecutive times are at most ``step`` apart
    (dense data: a replay may cover days in one batch); at a larger jump it moves ``step`` and stops. So one
    isolated outlier, however far ahead, moves a stream by at most ``step`` per batch, and a genuine jump
    (a gap in the data) is crossed in ``gap / step`` batches. A stream's first batch starts at its median,
    so early outliers cannot anchor it either.
    """
    if not times:
        return reached
    ts = sorted(times)
    cur = ts[len(ts) // 2] if reached is None else reached
    for t in ts:
        if t <= cur:
            continue
        if t - cur > step:
            return cur + step
        cur = t
    return cur


# --- per-partition working state -----------------------------------------------------------------------------
class _Part:
    """A partition's few in-memory values (everything else is in the store)."""

    def __init__(self, store: Store, partition: int):
        self.store, self.partition = store, partition
        self.reached: dict[str, int] = {}  # input stream -> event time reached (see ``advance``)
        self.wm = 0  # watermark (event time), never decreases
        self.open = 0  # open windows (a gauge)
        self.next_offset: dict[str, int] = {}  # next offset per input topic
        self.outbox: list[bytes] = []  # outbox keys of the last committed batch: deleted by the next one
        self.changes: dict[bytes, bytes | None] = {}  # this batch's writes (None: delete), in order: the changelog
        self.closing: list[tuple[int, bytes]] = []  # windows this batch opened: (deadline, closing-index key)
        self.forgets: list[bytes] = []  # forget-index keys this batch wrote, in order
        # Where the next scan of each index starts (its first key that may still be due; None: the index's
        # start). Everything before it was deleted by earlier batches: the scan seeks past their tombstones,
        # which RocksDB would otherwise step over one by one on every batch until a compaction drops them.
        self.cursor: dict[bytes, bytes | None] = {K.CLOSING: None, K.FORGET: None, K.ACTIVITY: None}
        self.activity_low: bytes | None = None  # lowest activity-index key this batch wrote
        self.positions: dict[str, int] = {}  # the store's committed positions at assign (the changelog's base)

    def put(self, key: bytes, value: bytes) -> None:
        self.changes[key] = value

    def delete(self, key: bytes) -> None:
        self.changes[key] = None

    def get(self, key: bytes) -> bytes | None:
        ch = self.changes
        return ch[key] if key in ch else self.store.get(key)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values as of this batch's writes so far (they reach the store at the end of the batch)."""
        values = self.store.get_many(keys)
        ch = self.changes
        if ch:
            values = [ch[k] if k in ch else v for k, v in zip(keys, values)]
        return values

    def stage(self) -> None:
        """Hand the batch's writes to the store (committed by the runtime with the batch's positions)."""
        self.store.update(self.changes)

    def load_meta(self) -> None:
        m = dict(self.store.scan(K.META))
        self.wm = _n(m.get(K.meta("wm"), b"\0"))
        self.open = _n(m.get(K.meta("open"), b"\0"))
        for key, value in m.items():
            if key.startswith(K.meta("reached:")):
                self.reached[key[len(K.meta("reached:")):].decode()] = _n(value)

    def save_meta(self) -> None:
        self.put(K.meta("wm"), _u8(self.wm))
        self.put(K.meta("open"), _u8(self.open))
        for stream, t in self.reached.items():
            self.put(K.meta("reached:" + stream), _u8(t))


OUTBOX_CHUNK_BYTES = 256 << 10  # an outbox chunk (a changelog message) stays far below Kafka's 1 MB default


def _pack_outbox(keys: list[bytes], values: list[bytes]) -> list[bytes]:
    """(key, example) pairs as chunks of length-prefixed bytes, each under ``OUTBOX_CHUNK_BYTES``."""
    chunks, cur, size = [], [], 0
    for k, v in zip(keys, values):
        if cur and size + len(k) + len(v) + 8 > OUTBOX_CHUNK_BYTES:
            chunks.append(b"".join(cur))
            cur, size = [], 0
        cur += (len(k).to_bytes(4, "big"), k, len(v).to_bytes(4, "big"), v)
        size += len(k) + len(v) + 8
    if cur:
        chunks.append(b"".join(cur))
    return chunks


def _unpack_outbox(chunk: bytes) -> Iterator[tuple[bytes, bytes]]:
    i = 0
    while i < len(chunk):
        n = _n(chunk[i:i + 4])
        k = chunk[i + 4:i + 4 + n]
        i += 4 + n
        n = _n(chunk[i:i + 4])
        yield k, chunk[i + 4:i + 4 + n]
        i += 4 + n


class _Version(NamedTuple):
    as_of: int  # 0: unknown (usable for any impression)
    trained_until: int  # 0: unknown
    active: int  # event time of the user's activity it stands for (eviction)
    raw: bytes  # the encoded LumFeatures


def _pack_versions(versions: list[_Version]) -> bytes:
    return b"".join(_u8(v.as_of) + _u8(v.trained_until) + _u8(v.active) + len(v.raw).to_bytes(4, "big") + v.raw
                    for v in versions)


def _unpack_versions(value: bytes | None) -> list[_Version]:
    out, i = [], 0
    while value and i < len(value):
        n = _n(value[i + 24:i + 28])
        out.append(_Version(_n(value[i:i + 8]), _n(value[i + 8:i + 16]), _n(value[i + 16:i + 24]),
                            value[i + 28:i + 28 + n]))
        i += 28 + n
    return out


class _Histories:
    """The stored history rows (each user's sorted) of a batch's users as examples need them: times, and item and
    category ids in wire form (``schemas.codec``'s version 4: each column at the fewest bytes that hold the
    example's window), so that an example's history is two byte slices. An example's window is the last ``n``
    rows of its user before its time, so each row's window widths (of the ``n`` rows up to it) are computed for all
    users at once, a few numpy calls per batch and none per user or example; each column is converted once per
    width that some window needs."""

    __slots__ = ("n", "times", "cols", "codes", "wire", "spans")

    def __init__(self, values: list[bytes | None], n: int):
        rows = np.frombuffer(b"".join(v for v in values if v), dtype=">i8").reshape(-1, 4).astype(np.int64)
        counts = np.array([len(v) // 32 if v else 0 for v in values], dtype=np.int64)
        ends = np.cumsum(counts)
        starts = ends - counts
        self.n, self.times, self.cols = n, rows[:, 0].tolist(), (rows[:, 2], rows[:, 3])
        lo = np.maximum(np.repeat(starts, counts), np.arange(len(rows)) - n + 1)  # each row's window start
        self.codes = _window_widths(self.cols[0], lo) | _window_widths(self.cols[1], lo) << 2  # read per example
        self.wire: dict[int, bytes] = {}  # width code (items) or 4 + width code (categories) -> the column
        self.spans = list(zip(starts.tolist(), ends.tolist()))  # each user's rows

    def before(self, span: tuple[int, int], t: int) -> tuple[int, bytes, tuple[int, int]]:
        """(count, item ids + category ids, their width codes) of the last ``n`` of the user's rows (``span``)
        with time strictly before ``t``."""
        end = bisect.bisect_left(self.times, t, *span)
        a = max(span[0], end - self.n)
        if a == end:
            return 0, b"", (0, 0)
        w = self.codes.item(end - 1)
        wi, wc = w & 3, w >> 2
        items, cats = self.wire.get(wi), self.wire.get(4 + wc)
        if items is None:
            items = self.wire[wi] = self.cols[0].astype(HISTORY_DTYPES[wi]).tobytes()
        if cats is None:
            cats = self.wire[4 + wc] = self.cols[1].astype(HISTORY_DTYPES[wc]).tobytes()
        return end - a, items[a << wi:end << wi] + cats[a << wc:end << wc], (wi, wc)


def _window_widths(ids: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Per row i, the width code of ``ids[lo[i]:i + 1]`` (its largest id's): the codes at least k in the window
    counted by prefix sums, for each k."""
    codes = history_widths(ids)
    out = np.zeros(len(ids), dtype=np.int64)
    for k in range(1, int(codes.max(initial=0)) + 1):
        at_least = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(codes >= k, out=at_least[1:])
        out += at_least[1:] > at_least[lo]
    return out


class _Lum:
    """One stored LUM feature version as examples carry it (decoded once per batch): the shared conditions'
    vectors, and the own-category answers by category, of which an example carries only its candidate's."""

    __slots__ = ("model_version", "conditions", "dims", "vectors", "own")

    def __init__(self, f: LumFeatures):
        self.model_version = f.model_version
        shared = [c for c in f.conditions if c.own_category is None]
        self.conditions = [c.condition for c in shared]
        self.dims = [len(c.vector) for c in shared]
        self.vectors = _f64([x for c in shared for x in c.vector])
        self.own = {c.own_category: (len(c.vector), _f64(c.vector)) for c in f.conditions
                    if c.own_category is not None}

    def for_category(self, category: int) -> tuple[list[str], list[int], bytes]:
        """(condition names, dims, float64 bytes) an example of a ``category`` candidate carries: the shared
        conditions, then the user's answer for that category as ``TARGET_CATEGORY`` if there is one."""
        own = self.own.get(category)
        if own is None:
            return self.conditions, self.dims, self.vectors
        return [*self.conditions, TARGET_CATEGORY], [*self.dims, own[0]], self.vectors + own[1]


def _f64(values) -> bytes:
    return array("d", values).tobytes()  # float64 little-endian: the examples' wire form


def _fields(topic) -> Callable[[bytes | None], dict]:
    """Decode + validate a ``topic`` message into its field dict with the model's own field validator (same
    constraints, strictness, extra=forbid; no model object); the codec's ``DecodeError`` (the dead letter's
    reason) for anything that fails, or that is not in the current JSON format."""
    model = topic.value
    schema = model.__pydantic_core_schema__
    header = bytes((MAGIC, FORMAT_JSON, model.SCHEMA_VERSION))
    if schema.get("type") != "model" or schema["schema"].get("type") != "model-fields":
        raise TypeError(f"{model.__name__} has validators the field validator would skip")
    validate = SchemaValidator(schema["schema"], config=schema.get("config")).validate_json

    def decode(value: bytes | None) -> dict:
        if value is not None and value[:3] == header:
            try:
                return validate(value[3:])[0]
            except ValidationError:
                pass
        return dict(topic.decode(value))  # raises DecodeError saying why

    return decode


_IMP, _BEH, _FEAT = IMPRESSIONS.name, BEHAVIORS.name, LUM_FEATURES.name
_IMP_FIELDS, _BEH_FIELDS = _fields(IMPRESSIONS), _fields(BEHAVIORS)


def _send_many(emit: Emit, topic, values: list[bytes | None], keys: list[bytes], partition: int | None = None) -> None:
    """``emit.send`` of each (value, key) in order; one call where the runtime's Emit has ``send_many``."""
    many = getattr(emit, "send_many", None)
    if many is not None:
        many(topic, values, keys, partition)
    else:
        for value, key in zip(values, keys):
            emit.send(topic, value, key=key, partition=partition)


# --- the logic -------------------------------------------------------------------------------------------------
class JoinLogic:
    """The label joiner over records and per-partition stores (the ``streaming.agents.store.Logic`` shape).

    ``high_water(topic, partition)`` is set by the runtime: the end of an input partition as its consumer last
    saw it (None, -1 or -1001: unknown, which holds the watermark). ``clock()`` is the wall clock in ms (the
    future-skew check). ``side(record)`` takes ``item-embeddings`` records (every partition, from the start).
    """

    name = "joiner"
    inputs = (IMPRESSIONS, BEHAVIORS, LUM_FEATURES)
    side_inputs = (ITEM_EMBEDDINGS,)

    def __init__(self, cfg: JoinConfig, clock: Callable[[], int] | None = None):
        import time

        self.cfg = cfg
        self.clock = clock or (lambda: int(time.time() * 1000))
        self.high_water: Callable[[str, int], int | None] = lambda topic, partition: None
        self.items = ItemVectors()
        self.parts: dict[int, _Part] = {}
        self._last_emit: Emit | None = None  # of the last batch (``delivered`` writes outbox tombstones through it)
        self.counts = dict.fromkeys(
            ("examples_total", "positives_total", "late_clicks_total", "duplicate_impressions_total",
             "duplicate_clicks_total", "orphan_clicks_total", "lum_features_too_new_total",
             "item_vector_other_version_total", "future_events_total", "evicted_users_total", "restored_keys_total"),
            0)

    # --- side input -----------------------------------------------------------------------------------------
    def side(self, record: Record, emit: Emit) -> None:
        if record.value is None:  # a retired version's tombstone (for compaction): kept versions are by recency
            return
        try:
            dropped = self.items.add(ITEM_EMBEDDINGS.decode(record.value))
        except DecodeError as e:
            emit.dead_letter(record, e)
            return
        if dropped is not None:
            log.info("joiner: item embeddings of model version %s dropped (%d newer versions kept)", dropped,
                     self.items.keep)

    # --- partition lifecycle ------------------------------------------------------------------------------
    def assign(self, partition: int, store: Store, committed: Mapping[str, int | None], emit: Emit,
               read: Reader) -> dict[str, int]:
        """Open partition ``partition``: use the local state when it covers the group's committed offsets,
        otherwise rebuild it from the changelog; never start empty while either holds state."""
        local = store.positions()
        behind = [t for t, c in committed.items() if c is not None and local.get(t, 0) < c]
        if self.cfg.changelog and (not local or behind):
            why = "no local state" if not local else f"local state behind the group's offsets on {behind}"
            self._restore(partition, store, read, why)
            local = store.positions()
        st = _Part(store, partition)
        st.load_meta()
        st.positions = dict(local)
        resent = 0
        for key, value in store.scan(K.OUTBOX):  # examples of a batch whose delivery may not have completed
            if key[1:2] == b"\0":
                for k, v in _unpack_outbox(value):
                    emit.send(TRAINING_EXAMPLES, v, key=k)
                    resent += 1
            else:  # one example (the layout before chunks)
                emit.send(TRAINING_EXAMPLES, value, key=key_of(TRAINING_EXAMPLES.decode(value).user_id))
                resent += 1
            st.outbox.append(key)
        self.parts[partition] = st
        starts = {t.name: local.get(t.name, committed.get(t.name) or 0) for t in self.inputs}
        still_behind = {t: (starts[t], c) for t, c in committed.items() if c is not None and starts.get(t, 0) < c}
        if still_behind:  # reprocessing from here is idempotent; jumping ahead would lose the state between
            log.warning("joiner partition %d: state ends before the group's offsets %s: re-reading inputs from "
                        "the state's positions", partition, still_behind)
        st.next_offset = dict(starts)
        log.info("joiner partition %d: watermark %d, %d open windows, resume at %s%s", partition, st.wm, st.open,
                 starts, f", re-sent {resent} examples" if resent else "")
        return starts

    def _restore(self, partition: int, store: Store, read: Reader, why: str) -> None:
        """Rebuild the store from partition ``partition`` of the changelog (last value per key), streamed."""
        records = iter(read(JOINER_CHANGELOG, partition))
        first = next(records, None)
        if first is None:
            if store.positions():
                log.warning("joiner partition %d: %s and the changelog is empty: keeping the local state",
                            partition, why)
            return
        log.info("joiner partition %d: %s: rebuilding from %s", partition, why, JOINER_CHANGELOG.name)
        store.reset()
        positions: dict[str, int] = {}
        n = 0
        for r in _chain(first, records):
            if r.key == K.POSITIONS:
                positions = json.loads(r.value)
            elif r.value is None:
                store.delete(r.key)
            else:
                store.put(r.key, r.value)
            n += 1
            if store.staged >= RESTORE_CHUNK:
                store.commit({})  # bounded memory; positions come last, so a crash here restarts the rebuild
        store.commit({})
        self._reindex(store)
        store.commit(positions)
        self.counts["restored_keys_total"] += n
        log.info("joiner partition %d: rebuilt from %d changelog records, positions %s", partition, n, positions)

    def _reindex(self, store: Store) -> None:
        """Derive the indexes of a rebuilt store from the values they index (the changelog leaves them out):
        windows to close from pending impressions, ids to forget from emitted ids and early clicks (by their
        expiry), and each user's newest activity for eviction. Streamed, committed in chunks."""
        retention, bucket = self.cfg.retention_ms, self._bucket_ms

        def put(key: bytes) -> None:
            store.put(key, b"")
            if store.staged >= RESTORE_CHUNK:
                store.commit({})

        for key, value in store.scan(K.PENDING):
            put(K.closing(_IMP_FIELDS(value[1:])["event_time_ms"] + self.cfg.window_ms, key[1:].decode()))
        for key, value in store.scan(K.EMITTED):
            put(K.forget(_n(value[1:9]) + retention, K.EMITTED, key[1:].decode()))
        for key, value in store.scan(K.EARLY):
            put(K.forget(_n(value[:8]) + retention, K.EARLY, key[1:].decode()))
        for key, value in store.scan(K.HISTORY):
            if value:
                put(K.activity(_n(value[-32:-24]) // bucket, _n(key[1:9])))
        for key, value in store.scan(K.FEATURES):
            versions = _unpack_versions(value)
            if versions:
                put(K.activity(max(v.active for v in versions) // bucket, _n(key[1:9])))
        store.commit({})

    def revoke(self, partition: int) -> None:
        self.parts.pop(partition, None)

    def delivered(self) -> None:
        """The runtime says the last batch's outputs were delivered: its outbox is no longer needed (runtimes
        that do not say so leave it to the next batch's commit)."""
        for st in self.parts.values():
            if st.outbox:
                for key in st.outbox:
                    st.store.delete(key)
                if self.cfg.changelog and self._last_emit is not None:
                    _send_many(self._last_emit, JOINER_CHANGELOG, [None] * len(st.outbox), st.outbox, st.partition)
                st.store.commit({}, sync=False)  # lost in an OS crash: the outbox is re-sent (at-least-once)
                st.outbox = []

    # --- processing ---------------------------------------------------------------------------------------
    def process(self, partition: int, records: Sequence[Record], emit: Emit) -> None:
        st = self.parts[partition]
        self._last_emit = emit
        st.changes, st.closing, st.forgets, st.activity_low = {}, [], [], None
        for key in st.outbox:  # the previous batch was committed and delivered before this one was called
            st.delete(key)
        st.outbox = []
        limit = self.clock() + self.cfg.max_future_skew_ms
        imps: list[tuple[dict, bytes, str]] = []  # (validated fields, raw bytes, example id)
        behs: list[tuple[dict, bytes]] = []
        feats: list[tuple[LumFeatures, bytes]] = []
        imp_times: list[int] = []
        beh_times: list[int] = []
        next_offset, counts = st.next_offset, self.counts
        for r in records:
            topic, value = r[0], r[5]
            next_offset[topic] = r[2] + 1
            try:
                if topic == _IMP:
                    ev = _IMP_FIELDS(value)
                    t = ev["event_time_ms"]
                elif topic == _BEH:
                    ev = _BEH_FIELDS(value)
                    t = ev["event_time_ms"]
                elif topic == _FEAT:
                    ev = LUM_FEATURES.decode(value)
                    t = ev.as_of_ms or ev.computed_at_ms
                else:
                    raise KeyError(topic)
            except DecodeError as e:
                emit.dead_letter(r, e)
                continue
            if t > limit:
                counts["future_events_total"] += 1
                emit.dead_letter(r, f"event time {t} is later than now + LUM_AGENT_MAX_FUTURE_SKEW_MS "
                                    f"({self.cfg.max_future_skew_ms} ms)")
                continue
            if topic == _IMP:
                imps.append((ev, value, f"{ev['request_id']}/{ev['item_id']}"))
                imp_times.append(t)
            elif topic == _BEH:
                behs.append((ev, value))
                beh_times.append(t)
            else:
                feats.append((ev, value))
        self._apply(st, imps, behs, feats, emit)
        self._watermark(st, {_IMP: imp_times, _BEH: beh_times})
        self._close_windows(st, emit)
        self._forget(st)
        self._evict(st)
        st.save_meta()
        if self.cfg.changelog:
            self._changelog(st, emit)
        st.stage()

    def _apply(self, st: _Part, imps, behs, feats, emit: Emit) -> None:
        # One multi-get for every id the batch touches: pending impression, emitted id, early click.
        clicks = [(b, raw, f"{b['request_id']}/{b['item_id']}") for b, raw in behs
                  if b["behavior"] == "click" and b["request_id"]]
        ids = list(dict.fromkeys([eid for _, _, eid in imps] + [eid for _, _, eid in clicks]))
        keys = []
        for eid in ids:
            e = eid.encode()
            keys += (b"p" + e, b"e" + e, b"c" + e)
        vals = st.get_many(keys)
        known = {eid: vals[3 * i:3 * i + 3] for i, eid in enumerate(ids)}  # eid -> [pending, emitted, early]
        # Records in offset order per topic; impressions first or clicks first gives the same state, because
        # a click without its impression waits ("early") and windows close only at the end of the batch.
        ch, window, counts = st.changes, self.cfg.window_ms, self.counts
        for imp, raw, eid in imps:
            k = known[eid]
            if k[0] is not None or k[1] is not None:  # pending or emitted
                counts["duplicate_impressions_total"] += 1
                continue
            early = k[2]
            deadline = imp["event_time_ms"] + window
            clicked = False
            e = eid.encode()
            if early is not None:
                clicked = _n(early[:8]) <= deadline
                if not clicked:  # the click came after the window: late, though it arrived first
                    self._late(early[8:], emit)
                ch[b"c" + e] = None
                k[2] = None
            value = (b"\x01" if clicked else b"\x00") + raw
            ch[b"p" + e] = value
            key = b"w" + deadline.to_bytes(8, "big") + e
            ch[key] = b""
            st.closing.append((deadline, key))
            k[0] = value
            st.open += 1
        by_user: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
        for ev, _raw in behs:
            by_user[ev["user_id"]].append((ev["event_time_ms"], event_key(ev["event_id"]), ev["item_id"],
                                           ev["category_id"]))
        for ev, raw, eid in clicks:
            self._click(st, ev, raw, eid, known, emit)
        if by_user:
            self._merge_history(st, by_user)
        for f, raw in feats:
            self._features(st, f, raw)

    def _click(self, st: _Part, ev: dict, raw: bytes, eid: str, known, emit: Emit) -> None:
        pending, emitted, early = k = known[eid]
        t = ev["event_time_ms"]
        if pending is not None:
            if t <= _IMP_FIELDS(pending[1:])["event_time_ms"] + self.cfg.window_ms:
                if pending[:1] == b"\x00":
                    value = b"\x01" + pending[1:]
                    st.changes[K.pending(eid)] = value
                    k[0] = value
                return
        elif emitted is not None:
            if emitted[:1] == b"\x01" and t <= _n(emitted[1:9]):
                self.counts["duplicate_clicks_total"] += 1  # already counted (a retry, a replayed batch)
                return
        else:  # impression not seen yet: remember the click until it comes (the earliest click counts)
            if early is None or t < _n(early[:8]):
                value = _u8(t) + raw
                st.changes[K.early(eid)] = value
                key = K.forget(t + self.cfg.retention_ms, K.EARLY, eid)
                st.changes[key] = b""
                st.forgets.append(key)
                k[2] = value
            return
        self._late(raw, emit)

    def _late(self, raw: bytes, emit: Emit) -> None:
        self.counts["late_clicks_total"] += 1
        emit.send(LATE_CLICKS, raw, key=key_of(_BEH_FIELDS(raw)["user_id"]))

    def _merge_history(self, st: _Part, by_user: dict[int, list[tuple[int, int, int, int]]]) -> None:
        """Each user's stored history + this batch's rows: distinct rows in (time, key, item, category) order,
        trimmed to what a still-open window may need (time >= watermark - W) plus ``history_len`` rows before
        it (at most ``HISTORY_CAP``); written for the users that gained a row. All users at once, in numpy."""
        users = list(by_user)
        stored = st.get_many([K.history(u) for u in users])
        n = len(users)
        new_lens = [len(by_user[u]) for u in users]
        new = np.array([row for u in users for row in by_user[u]], dtype=np.int64).reshape(-1, 4)
        old = np.frombuffer(b"".join(v for v in stored if v), dtype=">i8").reshape(-1, 4).astype(np.int64)
        old_lens = [len(v) // 32 if v else 0 for v in stored]
        owner = np.concatenate((np.repeat(np.arange(n), old_lens), np.repeat(np.arange(n), new_lens)))
        rows = np.concatenate((old, new))
        is_new = np.concatenate((np.zeros(len(old), bool), np.ones(len(new), bool)))
        # Sort by (user, row), stored before new among equal rows; keep the first of equal rows.
        o = np.lexsort((is_new, rows[:, 3], rows[:, 2], rows[:, 1], rows[:, 0], owner))
        rows, owner, is_new = rows[o], owner[o], is_new[o]
        keep = np.ones(len(rows), bool)
        keep[1:] = (owner[1:] != owner[:-1]) | (rows[1:] != rows[:-1]).any(axis=1)
        rows, owner, is_new = rows[keep], owner[keep], is_new[keep]
        changed = np.flatnonzero(np.bincount(owner[is_new], minlength=n))  # a retried event is history once
        if not len(changed):
            return
        counts = np.bincount(owner, minlength=n)
        ends = np.cumsum(counts)
        # Trim: keep what a still-open window may need (time >= watermark - W) plus history_len rows before it.
        below = np.bincount(owner[rows[:, 0] < st.wm - self.cfg.window_ms], minlength=n)
        starts = ends - counts + np.maximum(np.maximum(below - self.cfg.history_len, counts - HISTORY_CAP), 0)
        data = rows.astype(">i8").tobytes()
        ch, bucket, low = st.changes, self._bucket_ms, st.activity_low
        for i, a, b, last in zip(changed.tolist(), starts[changed].tolist(), ends[changed].tolist(),
                                 rows[ends[changed] - 1, 0].tolist()):
            user = users[i]
            ch[b"h" + _u8(user)] = data[32 * a:32 * b]
            if b > a:
                key = K.activity(last // bucket, user)
                ch[key] = b""
                if low is None or key < low:
                    low = key
        st.activity_low = low

    def _features(self, st: _Part, f: LumFeatures, raw: bytes) -> None:
        """Keep ``f`` among the user's newest FEATURE_VERSIONS (a republish with the same as_of replaces)."""
        key = K.features(f.user_id)
        as_of = f.as_of_ms or 0
        versions = [v for v in _unpack_versions(st.get(key)) if v.as_of != as_of]
        versions.append(_Version(as_of, getattr(f, "trained_until_ms", None) or 0, f.as_of_ms or f.computed_at_ms, raw))
        versions.sort()
        st.put(key, _pack_versions(versions[-FEATURE_VERSIONS:]))
        self._touch(st, f.user_id, f.as_of_ms or f.computed_at_ms)

    def _touch(self, st: _Part, user: int, t: int) -> None:
        key = K.activity(t // self._bucket_ms, user)
        st.put(key, b"")
        if st.activity_low is None or key < st.activity_low:
            st.activity_low = key

    @property
    def _bucket_ms(self) -> int:
        return max(self.cfg.state_horizon_ms // 16, 1)

    # --- watermark and windows ----------------------------------------------------------------------------
    def _watermark(self, st: _Part, times: dict[str, list[int]]) -> None:
        """watermark = event time reached by the streams still reading behind their end, minus the lateness.

        A stream not known to be at its end (high-water mark unknown: None, -1, -1001; or ahead of the next
        offset) holds the watermark at its reached time, so a topic read ahead of the other cannot close
        windows whose clicks are unread; once every stream is at its end the newest reached time counts.
        """
        for stream, ts in times.items():
            r = advance(st.reached.get(stream), ts, self.cfg.max_watermark_step_ms)
            if r is not None:
                st.reached[stream] = r
        held = []
        for stream in times:
            hw = self.high_water(stream, st.partition)
            if hw is None or hw < 0 or st.next_offset.get(stream, 0) < hw:
                held.append(stream)
        if held:
            t = min(st.reached.get(s, 0) for s in held)
        else:
            t = max(st.reached.values(), default=0)
        st.wm = max(st.wm, t - self.cfg.lateness_ms)  # never moves back

    def _close_windows(self, st: _Part, emit: Emit) -> None:
        wm = st.wm
        # Closing-index keys due (their byte order is (deadline, example id) order): committed ones, by a
        # streamed scan, and the ones this batch wrote.
        end = K.closing(wm + 1, "")
        due = [k for k, _ in st.store.scan(K.CLOSING, st.cursor[K.CLOSING], end)]
        st.cursor[K.CLOSING] = end  # every closing key before it is deleted by this batch
        due += [k for d, k in st.closing if d <= wm]
        if not due:
            return
        due = sorted(set(due))
        pend = st.get_many([b"p" + k[9:] for k in due])
        emitting = [(k, v) for k, v in zip(due, pend) if v is not None]
        imps = [_IMP_FIELDS(v[1:]) for _, v in emitting]
        users = list(dict.fromkeys(i["user_id"] for i in imps))
        hist = _Histories(st.get_many([K.history(u) for u in users]), self.cfg.history_len)
        spans = dict(zip(users, hist.spans))
        versions = dict(zip(users, map(_unpack_versions, st.get_many([K.features(u) for u in users]))))
        user_keys = {u: key_of(u) for u in users}
        ch = st.changes
        for k in due:
            ch[k] = None
        lum: dict[bytes, _Lum] = {}  # decoded feature versions of this batch
        values, keys = [], []
        forgets = st.forgets.append
        retention, items, counts = self.cfg.retention_ms, self.items, self.counts
        positives = too_new = other_version = 0
        for (k, pending), imp in zip(emitting, imps):
            e, deadline = k[9:], k[1:9]
            clicked = pending[:1] == b"\x01"
            user, item_id, t = imp["user_id"], imp["item_id"], imp["event_time_ms"]
            n_hist, history, widths = hist.before(spans[user], t)
            # Point in time: the newest version computed from events before t by a model trained before t.
            versions_u = versions[user]
            v = None
            if versions_u:
                v = next((v for v in reversed(versions_u) if v.as_of < t and v.trained_until < t), None)
                too_new += v is None  # only features that have seen the future
            mv = conds = user_dims = item_dim = None
            vectors = b""
            if v is not None:
                f = lum.get(v.raw) or lum.setdefault(v.raw, _Lum(LUM_FEATURES.decode(v.raw)))
                mv = f.model_version
                conds, user_dims, vectors = f.for_category(imp["category_id"])
                item = items.get(item_id, mv, imp["category_id"])  # the same model version, or none
                if item is not None:
                    item_dim = len(item)
                    vectors += _f64(item)
                elif any(items.get(item_id, ver) is not None for ver in items.by_version):
                    other_version += 1  # dropped rather than mixed
            # Built from validated inputs: encoded without a model object (the hot path).
            value = encode_training_example(
                {"example_id": e.decode(), "request_id": imp["request_id"], "user_id": user, "item_id": item_id,
                 "category_id": imp["category_id"], "position": imp["position"], "scenario": imp["scenario"],
                 "query": imp["query"], "event_time_ms": t, "label": 1 if clicked else 0, "lum_model_version": mv,
                 "lum_conditions": conds}, n_hist, history, user_dims, item_dim, vectors, widths=widths)
            values.append(value)
            keys.append(user_keys[user])
            ch[b"p" + e] = None
            ch[b"e" + e] = (b"\x01" if clicked else b"\x00") + deadline
            key = b"r" + (_n(deadline) + retention).to_bytes(8, "big") + b"e" + e
            ch[key] = b""
            forgets(key)
            positives += clicked
        for i, chunk in enumerate(_pack_outbox(keys, values)):
            key = K.outbox_chunk(i)
            ch[key] = chunk
            st.outbox.append(key)
        st.open -= len(emitting)
        counts["examples_total"] += len(emitting)
        counts["positives_total"] += positives
        counts["lum_features_too_new_total"] += too_new
        counts["item_vector_other_version_total"] += other_version
        _send_many(emit, TRAINING_EXAMPLES, values, keys)

    def _forget(self, st: _Part) -> None:
        """Emitted ids and early clicks past their retention (event time) are forgotten."""
        wm = st.wm
        end = K.forget(wm + 1, b"", "")
        due = [k for k, _ in st.store.scan(K.FORGET, st.cursor[K.FORGET], end)]
        st.cursor[K.FORGET] = end  # every forget key before it is deleted by this batch
        due += [k for k in st.forgets if _n(k[1:9]) <= wm]
        if not due:
            return
        due = [K.parse_forget(k) + (k,) for k in dict.fromkeys(due)]
        early = dict(zip([eid for _, kind, eid, _ in due if kind != K.EMITTED],
                         st.get_many([K.early(eid) for _, kind, eid, _ in due if kind != K.EMITTED])))
        ch = st.changes
        for _, kind, eid, k in due:
            ch[k] = None
            if kind == K.EMITTED:
                ch[K.emitted(eid)] = None
            elif early.get(eid) is not None:
                ch[K.early(eid)] = None
                early[eid] = None  # a second entry for the same click finds it gone
                self.counts["orphan_clicks_total"] += 1

    def _evict(self, st: _Part) -> None:
        """Users idle for longer than the state horizon (event time) lose their history and features."""
        cursor, low = st.cursor[K.ACTIVITY], st.activity_low
        if cursor is not None and low is not None and low < cursor:
            st.cursor[K.ACTIVITY] = cursor = low  # an activity older than the cursor (a late event): seen next
        cutoff = st.wm - self.cfg.state_horizon_ms
        if cutoff <= 0:
            return
        last_bucket = cutoff // self._bucket_ms  # buckets before this one are entirely older than cutoff
        end = K.activity(last_bucket, 0)
        entries = list(islice(st.store.scan(K.ACTIVITY, cursor, end), EVICT_PER_BATCH))
        # Every entry before the new cursor is deleted now (the batch's own writes are scanned next batch).
        st.cursor[K.ACTIVITY] = entries[-1][0] + b"\0" if len(entries) == EVICT_PER_BATCH else end
        if low is not None and low < st.cursor[K.ACTIVITY]:
            st.cursor[K.ACTIVITY] = low
        if not entries:
            return
        users = list(dict.fromkeys(K.parse_activity(key)[1] for key, _ in entries))
        for key, _ in entries:
            st.delete(key)
        values = st.get_many([k for u in users for k in (K.history(u), K.features(u))])
        for i, user in enumerate(users):
            h, feats = values[2 * i], _unpack_versions(values[2 * i + 1])
            newest = max(([_n(h[-32:-24])] if h else []) + [v.active for v in feats], default=None)
            if newest is None or newest >= cutoff:
                continue  # active since: a newer activity entry exists
            if h:
                st.delete(K.history(user))
            if feats:
                st.delete(K.features(user))
            self.counts["evicted_users_total"] += 1

    def _changelog(self, st: _Part, emit: Emit) -> None:
        """This batch's writes to the changelog, outbox first and the positions last: a partition of the
        changelog is written in order, so a restored position implies everything before it arrived."""
        # The closed windows' pending-impression deletions right after the outbox: a rebuild from a changelog
        # cut inside this batch then either re-sends an example (outbox) or re-closes its window, rarely both.
        changes, indexes, head = st.changes, K.INDEXES, (K.OUTBOX, K.PENDING)
        keys = [k for k in changes if k[:1] == K.OUTBOX]
        keys += [k for k in changes if k[:1] == K.PENDING and changes[k] is None]
        keys += [k for k in changes if k[0] not in indexes and (k[:1] not in head or k[:1] == K.PENDING
                                                                and changes[k] is not None)]
        _send_many(emit, JOINER_CHANGELOG, [changes[k] for k in keys], keys, st.partition)
        positions = st.positions | st.next_offset
        emit.send(JOINER_CHANGELOG, json.dumps(positions, sort_keys=True).encode(), key=K.POSITIONS,
                  partition=st.partition)

    def gauges(self) -> dict[str, float]:
        g: dict[str, float] = dict(self.counts)
        g["open_windows"] = sum(s.open for s in self.parts.values())
        g["item_embeddings"] = len(self.items)
        return g


def _until(items: Iterator[tuple[bytes, bytes]], end: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Items of a key-ordered scan before ``end`` (the scan stops being read there)."""
    for k, v in items:
        if k >= end:
            return
        yield k, v


def _chain(first, rest):
    yield first
    yield from rest
