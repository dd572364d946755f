"""(condition, item) tokenization: the one place that turns events into LUM tokens.

The LUM paper (sec. 4.1.1) expands every behavior into two tokens, ``[c1, i1, c2, i2, ...]``: a *condition*
token (the context the item was met in) followed by the *item* token. Both the streaming agents that build
per-user sequences and the trainers that read them use this module, so they can never disagree.

Condition token
    One id per condition kind, in ``CONDITION_KINDS`` order: scenario, behavior type, item category,
    search query. Each id is a stable 63-bit hash of (kind, value); 0 means "any / not given". A query
    for knowledge (sec. 4.2) is a condition with only some kinds set, e.g. ``scenario=search`` or
    ``category=17,behavior=buy``; unset kinds are 0, exactly as in training (the trainer drops kinds at
    random so that partial conditions are in-distribution).

Item token
    ``(item_id, category_id)``, the raw ids. Models hash them into their own tables.

Versioning
    ``TOKENIZER_VERSION`` names this layout. Adding a condition kind appends it to ``CONDITION_KINDS`` and
    bumps the version; sequences stored under an older version decode with the new kinds set to 0
    ("any"), so stored sequences stay valid. Changing how an existing kind is hashed is a breaking change
    (new version, re-tokenize from the ``behaviors`` topic with ``lum backfill sequences``).
    ``tests/schemas/golden/tokenize_vN.json`` pins the output of each version (``tokenize(e, version=N)``).

    v1: behavior kind = the event's behavior ("rate" for every rating).
    v2: behavior kind = the *feedback level* (``feedback``): ratings become "liked" (>= 4 of 5), "neutral"
        (>= 3) or "disliked", so "behavior=liked" is a query aligned with a rating label; implicit feedback
        keeps its behavior (view/click/cart/fav/buy: already levels). Same kinds and byte layout as v1, so
        v1 sequences still decode (their "rate" tokens stay as they were).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence as _Sequence
from functools import lru_cache
from typing import NamedTuple

from .events import BehaviorEvent

TOKENIZER_VERSION = 2
# Order matters: it is the layout of the condition tuple. Append only (see module docstring).
CONDITION_KINDS: tuple[str, ...] = ("scenario", "behavior", "category", "query")
# How many condition kinds each tokenizer version had, to decode old stored sequences.
KINDS_BY_VERSION: dict[int, int] = {1: 4, 2: 4}
LIKED_AT, NEUTRAL_AT = 4.0, 3.0  # rating thresholds (5-point scales: MovieLens, Amazon)
ANY = 0

_MASK63 = (1 << 63) - 1


@lru_cache(maxsize=1 << 16)
def condition_id(kind: str, value: str | int) -> int:
    """Stable id of one condition value, in [1, 2**63): same on every machine, process and run."""
    if kind not in CONDITION_KINDS:
        raise ValueError(f"unknown condition kind {kind!r}; known: {', '.join(CONDITION_KINDS)}")
    if kind == "query":
        value = " ".join(str(value).lower().split())  # "Red  Shoes " and "red shoes" are one query
    digest = hashlib.blake2b(f"{kind}\x00{value}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & _MASK63) or 1


def event_key(event_id: str) -> int:
    """63-bit hash of an event id: what sequences store to deduplicate replayed events."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


class TokenPair(NamedTuple):
    """One behavior as a (condition token, item token) pair, plus when it happened and its dedup key."""

    event_time_ms: int
    event_key: int
    conditions: tuple[int, ...]  # one id per CONDITION_KINDS entry, ANY where not given
    item_id: int
    category_id: int


def _level(rating: float) -> str:
    return "liked" if rating >= LIKED_AT else "neutral" if rating >= NEUTRAL_AT else "disliked"


def feedback(event: BehaviorEvent) -> str:
    """The behavior condition value (v2): a rating's level, else the behavior itself."""
    if event.behavior == "rate" and event.rating is not None:
        return _level(event.rating)
    return event.behavior


def tokenize(event: BehaviorEvent, version: int = TOKENIZER_VERSION) -> TokenPair:
    """The (condition, item) pair of one behavior event (``version``: an older layout, for golden tests)."""
    if version not in KINDS_BY_VERSION:
        raise ValueError(f"unknown tokenizer version {version}")
    conditions = (
        condition_id("scenario", event.scenario),
        condition_id("behavior", feedback(event) if version >= 2 else event.behavior),
        condition_id("category", event.category_id),
        condition_id("query", event.query) if event.query else ANY,
    )
    return TokenPair(event.event_time_ms, event_key(event.event_id), conditions, event.item_id, event.category_id)


def parse_condition(spec: str) -> tuple[int, ...]:
    """A query condition from its name, e.g. ``"scenario=search"`` or ``"category=17,behavior=buy"``.

    ``"any"`` is the condition with every kind unset. Kinds not named are ANY.
    """
    ids = [ANY] * len(CONDITION_KINDS)
    if spec.strip() in ("", "any", "*"):
        return tuple(ids)
    for part in spec.split(","):
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if not sep or not value.strip():
            raise ValueError(f"condition {spec!r}: expected kind=value[,kind=value], got {part!r}")
        ids[CONDITION_KINDS.index(kind) if kind in CONDITION_KINDS else _unknown(kind)] = condition_id(
            kind, value.strip()
        )
    return tuple(ids)


def _unknown(kind: str) -> int:
    raise ValueError(f"unknown condition kind {kind!r}; known: {', '.join(CONDITION_KINDS)}")


# --- Binary sequence codec ----------------------------------------------------------------------------
# A user's sequence is stored and exported as bytes, not JSON: up to thousands of pairs per user, rewritten
# on every update. Layout (little endian):
#   header  "LSEQ" | codec u8 (=1) | tokenizer_version u8 | n_kinds u8 | pad u8 | user_id i64 |
#           updated_at_ms i64 | n_pairs u32
#   pairs   n_pairs x [event_time_ms i64, event_key i64, n_kinds x condition i64, item_id i64, category_id i64]
# Readers with numpy can view the pairs as one int64 array of shape (n_pairs, 4 + n_kinds).
_SEQ_MAGIC = b"LSEQ"
_SEQ_CODEC = 1
_SEQ_HEADER = struct.Struct("<4sBBBxqqI")
SEQ_HEADER_SIZE = _SEQ_HEADER.size


class UserSequence(NamedTuple):
    """A user's rolling behavior sequence, oldest first (value of topic ``user-sequences``)."""

    user_id: int
    updated_at_ms: int
    pairs: list[TokenPair]
    tokenizer_version: int = TOKENIZER_VERSION


@lru_cache(maxsize=16)
def _pair_struct(n_kinds: int) -> struct.Struct:
    return struct.Struct(f"<{4 + n_kinds}q")


def encode_sequence(seq: UserSequence) -> bytes:
    n_kinds = KINDS_BY_VERSION[seq.tokenizer_version]
    ps = _pair_struct(n_kinds)
    out = bytearray(_SEQ_HEADER.pack(_SEQ_MAGIC, _SEQ_CODEC, seq.tokenizer_version, n_kinds, seq.user_id,
                                     seq.updated_at_ms, len(seq.pairs)))
    for p in seq.pairs:
        if len(p.conditions) != n_kinds:
            raise ValueError(f"pair has {len(p.conditions)} condition ids, tokenizer v{seq.tokenizer_version} has {n_kinds}")
        out += ps.pack(p.event_time_ms, p.event_key, *p.conditions, p.item_id, p.category_id)
    return bytes(out)


def decode_sequence(data: bytes) -> UserSequence:
    """Decode a stored sequence; older tokenizer versions come back in the current layout (new kinds ANY)."""
    if len(data) < SEQ_HEADER_SIZE:
        raise ValueError(f"sequence record too short ({len(data)} bytes)")
    magic, codec, version, n_kinds, user_id, updated, n = _SEQ_HEADER.unpack_from(data)
    if magic != _SEQ_MAGIC or codec != _SEQ_CODEC:
        raise ValueError(f"not a sequence record (magic {magic!r}, codec {codec})")
    if version not in KINDS_BY_VERSION or version > TOKENIZER_VERSION:
        raise ValueError(f"unknown tokenizer version {version} (this build knows up to {TOKENIZER_VERSION})")
    ps = _pair_struct(n_kinds)
    if len(data) != SEQ_HEADER_SIZE + n * ps.size:
        raise ValueError(f"sequence record length {len(data)} does not match {n} pairs of {n_kinds} kinds")
    pad = (ANY,) * (len(CONDITION_KINDS) - n_kinds)
    pairs = [
        TokenPair(f[0], f[1], tuple(f[2:2 + n_kinds]) + pad, f[2 + n_kinds], f[3 + n_kinds])
        for f in ps.iter_unpack(memoryview(data)[SEQ_HEADER_SIZE:])
    ]
    return UserSequence(user_id, updated, pairs, TOKENIZER_VERSION)


# --- Sequences as numpy rows: the one owner of the pair layout for batch code --------------------------
# (Kept as its own block: the condition vocabulary above may change independently.) A pair is one row of
# ROW_WIDTH int64 columns, [event_time_ms, event_key, CONDITION_KINDS ids..., item_id, category_id], exactly
# the pair layout of the binary codec above; a sequence is an (n, ROW_WIDTH) array, oldest first. The agent,
# packing, replay and the LUM data reader use these instead of per-pair Python objects.
import numpy as _np  # noqa: E402

ROW_WIDTH = 4 + len(CONDITION_KINDS)
COL_TIME, COL_KEY, COL_ITEM, COL_CATEGORY = 0, 1, ROW_WIDTH - 2, ROW_WIDTH - 1


def encode_rows(user_id: int, rows: _np.ndarray, updated_at_ms: int | None = None) -> bytes:
    """The binary sequence record (``encode_sequence``'s bytes) of (n, ROW_WIDTH) int64 rows, oldest first;
    ``updated_at_ms`` defaults to the newest pair's event time (0 when empty)."""
    if rows.ndim != 2 or rows.shape[1] != ROW_WIDTH:
        raise ValueError(f"rows must have shape (n, {ROW_WIDTH}), got {rows.shape}")
    n = len(rows)
    if updated_at_ms is None:
        updated_at_ms = int(rows[-1, COL_TIME]) if n else 0
    head = _SEQ_HEADER.pack(_SEQ_MAGIC, _SEQ_CODEC, TOKENIZER_VERSION, len(CONDITION_KINDS), user_id, updated_at_ms, n)
    return head + rows.astype("<i8", copy=False).tobytes()


def decode_rows(data: bytes | memoryview) -> tuple[int, int, _np.ndarray]:
    """(user_id, updated_at_ms, rows) of a binary sequence record; rows are (n, ROW_WIDTH) int64 in the
    CURRENT layout: records of older tokenizer versions get the kinds they lacked as ANY (a read-only view
    of ``data`` when the record is already current)."""
    if len(data) < SEQ_HEADER_SIZE:
        raise ValueError(f"sequence record too short ({len(data)} bytes)")
    magic, codec, version, n_kinds, user_id, updated, n = _SEQ_HEADER.unpack_from(data)
    if magic != _SEQ_MAGIC or codec != _SEQ_CODEC:
        raise ValueError(f"not a sequence record (magic {magic!r}, codec {codec})")
    if version not in KINDS_BY_VERSION or version > TOKENIZER_VERSION or KINDS_BY_VERSION[version] != n_kinds:
        raise ValueError(f"unknown tokenizer version {version} with {n_kinds} kinds "
                         f"(this build knows up to {TOKENIZER_VERSION})")
    width = 4 + n_kinds
    if len(data) != SEQ_HEADER_SIZE + n * width * 8:
        raise ValueError(f"sequence record length {len(data)} does not match {n} pairs of {n_kinds} kinds")
    rows = _np.frombuffer(data, dtype="<i8", offset=SEQ_HEADER_SIZE).reshape(n, width)
    if width != ROW_WIDTH:  # older version: insert ANY for the kinds added since, before item/category
        rows = _np.concatenate((rows[:, :2 + n_kinds], _np.full((n, ROW_WIDTH - width), ANY, "<i8"),
                                rows[:, 2 + n_kinds:]), axis=1)
    return user_id, updated, rows


_VECTOR_KINDS = ("scenario", "behavior", "category", "query")  # the kinds tokenize_rows maps like tokenize()


def tokenize_rows(events) -> _np.ndarray:
    """``tokenize`` of many behavior events at once: (n, ROW_WIDTH) int64 rows. ``events`` are
    ``BehaviorEvent``s or mappings with its field names (e.g. validated but not yet built models)."""
    evs = [e if isinstance(e, dict) else e.__dict__ for e in events]
    n = len(evs)
    out = _np.empty((n, ROW_WIDTH), dtype=_np.int64)
    if not n:
        return out
    if CONDITION_KINDS != _VECTOR_KINDS:  # a vocabulary this fast path does not know yet: the scalar tokenizer
        for i, e in enumerate(evs):
            t = tokenize(BehaviorEvent.model_construct(**e))
            out[i] = (t.event_time_ms, t.event_key, *t.conditions, t.item_id, t.category_id)
        return out
    out[:, COL_TIME] = [e["event_time_ms"] for e in evs]
    digests = b"".join([hashlib.blake2b(e["event_id"].encode(), digest_size=8).digest() for e in evs])
    out[:, COL_KEY] = (_np.frombuffer(digests, dtype="<u8") & _np.uint64(_MASK63)).astype(_np.int64)
    behaviors = [_level(e["rating"]) if e["behavior"] == "rate" and e.get("rating") is not None else e["behavior"]
                 for e in evs]  # the feedback level, as ``feedback`` (v2)
    columns = {"scenario": [e["scenario"] for e in evs], "behavior": behaviors,
               "category": [e["category_id"] for e in evs], "query": [e["query"] for e in evs]}
    for j, kind in enumerate(CONDITION_KINDS):
        values = columns[kind]
        ids = {v: (condition_id(kind, v) if v is not None and v != "" else ANY) for v in set(values)}
        out[:, 2 + j] = [ids[v] for v in values]
    out[:, COL_ITEM] = [e["item_id"] for e in evs]
    out[:, COL_CATEGORY] = [e["category_id"] for e in evs]
    return out


def encode_rows_many(user_ids: list[int], rows: _np.ndarray, starts: list[int], ends: list[int],
                     prefix: bytes = b"") -> list[bytes]:
    """``prefix + encode_rows(user_ids[i], rows[starts[i]:ends[i]])`` for every i, from one copy of ``rows``
    (the per-sequence work is a header and a slice)."""
    data = _np.ascontiguousarray(rows, dtype="<i8").tobytes()
    width = ROW_WIDTH * 8
    times = rows[:, COL_TIME].tolist() if len(rows) else []
    head, n_kinds, magic = _SEQ_HEADER.pack, len(CONDITION_KINDS), _SEQ_MAGIC
    return [prefix + head(magic, _SEQ_CODEC, TOKENIZER_VERSION, n_kinds, u, times[b - 1] if b > a else 0, b - a)
            + data[a * width:b * width] for u, a, b in zip(user_ids, starts, ends)]


def decode_rows_many(records: list[bytes], skip: int = 0) -> tuple[_np.ndarray, list[int]]:
    """The rows of many binary sequence records (each after ``skip`` leading bytes), concatenated in the
    current layout, and the number of rows of each: one copy, no per-pair work."""
    parts, lens = [], []
    unpack, size = _SEQ_HEADER.unpack_from, SEQ_HEADER_SIZE
    current = (_SEQ_MAGIC, _SEQ_CODEC, TOKENIZER_VERSION, len(CONDITION_KINDS))
    for data in records:
        magic, codec, version, n_kinds, _user, _updated, n = unpack(data, skip)
        if (magic, codec, version, n_kinds) == current and len(data) == skip + size + n * ROW_WIDTH * 8:
            parts.append(memoryview(data)[skip + size:])
        else:  # another version (or a bad record: decode_rows says why)
            rows = decode_rows(memoryview(data)[skip:])[2]
            parts.append(_np.ascontiguousarray(rows, dtype="<i8").tobytes())
        lens.append(n)
    rows = _np.frombuffer(b"".join(parts), dtype="<i8").reshape(-1, ROW_WIDTH)
    return rows, lens


_CURRENT_HEAD = _SEQ_HEADER.pack(_SEQ_MAGIC, _SEQ_CODEC, TOKENIZER_VERSION, len(CONDITION_KINDS), 0, 0, 0)[:8]


def record_rows(data: bytes, skip: int = 0) -> _np.ndarray | None:
    """A read-only (n, ROW_WIDTH) view of the rows of a binary sequence record of the CURRENT tokenizer
    version (after ``skip`` leading bytes), without parsing the rest of its header; None for anything else
    (an older version, a bad record: ``decode_rows`` reads or rejects those)."""
    body = len(data) - skip - SEQ_HEADER_SIZE
    if body < 0 or body % (ROW_WIDTH * 8) or data[skip:skip + 8] != _CURRENT_HEAD:
        return None
    if int.from_bytes(data[skip + SEQ_HEADER_SIZE - 4:skip + SEQ_HEADER_SIZE], "little") * ROW_WIDTH * 8 != body:
        return None
    return _np.frombuffer(data, dtype="<i8", offset=skip + SEQ_HEADER_SIZE).reshape(-1, ROW_WIDTH)


def append_rows(data: bytes, user_id: int, rows: _np.ndarray, skip: int = 0) -> bytes:
    """``data[:skip] + encode_rows(user_id, stored + rows)`` where ``stored`` are the rows of the record
    ``data[skip:]`` (any version): a current record's pairs are copied as bytes, not decoded."""
    old = record_rows(data, skip)
    if old is None:
        return data[:skip] + encode_rows(user_id, _np.concatenate((decode_rows(memoryview(data)[skip:])[2], rows)))
    n = len(old) + len(rows)
    updated = int(rows[-1, COL_TIME]) if len(rows) else int(old[-1, COL_TIME]) if len(old) else 0
    head = _SEQ_HEADER.pack(_SEQ_MAGIC, _SEQ_CODEC, TOKENIZER_VERSION, len(CONDITION_KINDS), user_id, updated, n)
    return b"".join((data[:skip], head, data[skip + SEQ_HEADER_SIZE:], rows.astype("<i8", copy=False).tobytes()))


def record_rows_many(records: _Sequence[bytes | None], skip: int = 0) -> tuple[_np.ndarray, _np.ndarray]:
    """``record_rows`` of many records at once: the rows of every record of the CURRENT tokenizer version
    concatenated ((total, ROW_WIDTH) int64) and each record's number of rows, -1 for one that ``record_rows``
    would not read (another version, a bad record) and 0 for None. One copy of the bodies, no per-pair work."""
    width, size, head = ROW_WIDTH * 8, SEQ_HEADER_SIZE, _CURRENT_HEAD
    counts, parts = [], []
    for data in records:
        if data is None:
            counts.append(0)
            continue
        body = len(data) - skip - size
        n = int.from_bytes(data[skip + size - 4:skip + size], "little") if body >= 0 else -1
        if n * width != body or data[skip:skip + 8] != head:
            counts.append(-1)
            continue
        counts.append(n)
        parts.append(memoryview(data)[skip + size:])
    rows = _np.frombuffer(b"".join(parts), dtype="<i8").reshape(-1, ROW_WIDTH)
    return rows, _np.array(counts, dtype=_np.int64)


def append_row_many(records: _Sequence[bytes | None], user_ids: _Sequence[int], rows: _np.ndarray,
                    skip: int = 0, prefix: bytes = b"") -> list[bytes]:
    """``append_rows(records[i], user_ids[i], rows[i:i + 1], skip)`` for every i whose record is of the
    CURRENT version (``record_rows`` reads it), and ``prefix + encode_rows(user_ids[i], rows[i:i + 1])`` where
    it is None: the stored pairs copied as bytes, one header packed per record."""
    data = _np.ascontiguousarray(rows, dtype="<i8").tobytes()
    width, size, pack = ROW_WIDTH * 8, SEQ_HEADER_SIZE, _SEQ_HEADER.pack
    magic, n_kinds, times = _SEQ_MAGIC, len(CONDITION_KINDS), rows[:, COL_TIME].tolist()
    out = []
    for i, (rec, user) in enumerate(zip(records, user_ids)):
        row = data[i * width:(i + 1) * width]
        if rec is None:
            out.append(prefix + pack(magic, _SEQ_CODEC, TOKENIZER_VERSION, n_kinds, user, times[i], 1) + row)
        else:
            n = (len(rec) - skip - size) // width + 1
            out.append(b"".join((rec[:skip], pack(magic, _SEQ_CODEC, TOKENIZER_VERSION, n_kinds, user, times[i], n),
                                 rec[skip + size:], row)))
    return out
