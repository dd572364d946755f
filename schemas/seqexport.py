"""The sequence export contract: record layouts and the pure fold "snapshot + deltas -> each user's sequence".

Why. Publishing every changed user's WHOLE sequence per batch costs ``64 B x history`` per event (65 KB for a
191-byte event at the 1,024-pair cap). The export is instead two topics (``schemas.topics``):

``sequence-deltas`` (delete, 7 days), key = user id, partition = the user's ``behaviors`` partition
    One ``DELTA`` record per changed user per agent batch, carrying only that batch's new pairs and the cap
    the agent applied. Bytes per event do not depend on the history length.
``user-sequences`` (compacted), key = user id
    ``SNAPSHOT`` records: a user's full sequence as of the snapshot, in the compact layout below (today's
    fixed int64 layout, codec version 1, still reads). Plus, per partition p, one ``MARKER`` record under the
    key ``#deltas-p<p>``: the ``sequence-deltas`` offset of partition p from which the deltas are NOT yet in
    the snapshot. Written by the snapshot job (``streaming.kafka.sequences``) and ``lum backfill``.

Fold (exact by construction). A sequence is the ``cap`` latest distinct events (dedup by ``event_key``) in
(event_time, event_key) order: the top-``cap`` of a SET. Top-k of a union equals top-k of (top-k of one
part) united with the other, and union is idempotent, so ``fold(snapshot, deltas)`` equals the agent's state
for any interleaving, duplicates, late events landing mid-history, and for deltas applied twice (a delta
already inside the snapshot changes nothing). A reader therefore needs only: the latest snapshot, and every
delta from the marker offset on (a marker that is too LOW is harmless). Runs of deltas with the same cap are
merged in one sort (``fold``); a cap change applies in order, exactly like the agent. ``catch_up`` applies
these rules to record streams (snapshot records replace, markers say where each record's deltas start),
chunk by chunk into the caller's store: the Kafka reader, the refresh view and the agents' rebuild use it.

Compact pair layout (snapshot codec version 2 and deltas). Columnar, little endian, numpy-vectorised:
    header  tokenizer_version u8 | n_kinds u8 | varint user_id | varint updated_at_ms (snapshots) or cap
            (deltas) | varint n_pairs
    columns event_time as differences (first absolute), event_key (raw i64: a 63-bit hash, incompressible),
            each condition kind dictionary-coded (varint n_distinct, distinct ids i64, then the index column),
            item_id, category_id.
    A numeric column is "frame of reference": varint(zigzag(min)) | width u8 in {0,1,2,4,8} | n x (v - min)
    as unsigned ``width``-byte integers. About 26 B per pair against 64 at 1,024 pairs (``benchmarks/bench_scale.py``).
    Records under 8 pairs (most deltas) take a plain-Python path that writes and reads the same bytes; the
    sequence agent encodes a batch's deltas together (``encode_deltas``: vectorised passes, the same bytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from . import codec
from .codec import FORMAT_SEQUENCE, MAGIC, DecodeError
from .tokenize import CONDITION_KINDS, KINDS_BY_VERSION, SEQ_HEADER_SIZE, TOKENIZER_VERSION, UserSequence

ROW = 4 + len(CONDITION_KINDS)  # int64 columns of a pair: time, key, conditions..., item, category
FORMAT_DELTA = 0x64  # "d"
FORMAT_MARKER = 0x6D  # "m"
SNAPSHOT_VERSION = 2  # user-sequences codec version written now (1: fixed int64 layout, read only)
DELTA_VERSION = 1
MARKER_VERSION = 1
MARKER_PREFIX = b"#deltas-p"
_V1_PAYLOAD = 3 + SEQ_HEADER_SIZE  # codec header + today's fixed sequence header


def marker_key(partition: int) -> bytes:
    return MARKER_PREFIX + str(partition).encode()


# --- varints and frame-of-reference columns -------------------------------------------------------------
def _zz(v: int) -> int:
    return (v << 1) ^ (v >> 63) if v < 0 else v << 1


def _unzz(u: int) -> int:
    return (u >> 1) ^ -(u & 1)


def _put_varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _get_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


_WIDTHS = {0: None, 1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}


def _put_column(out: bytearray, col: np.ndarray) -> None:
    lo = int(col.min())
    _put_varint(out, _zz(lo))
    # Differences as uint64: wrap-around arithmetic keeps them exact even for the full int64 range.
    span = col.astype(np.int64).view(np.uint64) - np.uint64(lo & 0xFFFFFFFFFFFFFFFF)
    top = int(span.max())
    width = 0 if top == 0 else 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4 if top < 1 << 32 else 8
    out.append(width)
    if width:
        out += span.astype(_WIDTHS[width]).tobytes()


def _column_header(buf: bytes, pos: int, n: int) -> tuple[int, int, int]:
    """(minimum, byte width, position of the values) of a column of ``n`` values, checked against ``buf``."""
    u, pos = _get_varint(buf, pos)
    width = buf[pos]
    pos += 1
    if width not in _WIDTHS:
        raise ValueError(f"bad column width {width}")
    if pos + n * width > len(buf):
        raise ValueError("truncated column")
    return _unzz(u), width, pos


def _get_column(buf: bytes, pos: int, n: int) -> tuple[np.ndarray, int]:
    lo, width, pos = _column_header(buf, pos, n)
    if width == 0:
        return np.full(n, lo, dtype=np.int64), pos
    span = np.frombuffer(buf, dtype=_WIDTHS[width], count=n, offset=pos).astype(np.uint64)
    return (span + np.uint64(lo & 0xFFFFFFFFFFFFFFFF)).view(np.int64), pos + n * width


_HALF, _MASK = 1 << 63, (1 << 64) - 1
_SMALL = 8  # rows: below this a plain-Python encoder (same bytes) beats numpy's per-call overhead ~50x


def _put_column_py(out: bytearray, col: list[int]) -> None:
    lo = min(col)
    _put_varint(out, _zz(lo))
    span = [(v - lo) & _MASK for v in col]
    top = max(span)
    width = 0 if top == 0 else 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4 if top < 1 << 32 else 8
    out.append(width)
    for v in span if width else ():
        out += v.to_bytes(width, "little")


def _put_pairs_py(out: bytearray, rows: list[list[int]]) -> None:
    n_kinds = len(rows[0]) - 4
    if len(rows) == 1:  # the common delta: every column is its own base, width 0
        r = rows[0]
        _put_varint(out, _zz(r[0]))
        out += b"\x00" + r[1].to_bytes(8, "little", signed=True)
        for k in range(n_kinds):
            out += b"\x01" + r[2 + k].to_bytes(8, "little", signed=True) + b"\x00\x00"
        _put_varint(out, _zz(r[2 + n_kinds]))
        out.append(0)
        _put_varint(out, _zz(r[3 + n_kinds]))
        out.append(0)
        return
    t = [r[0] for r in rows]
    _put_column_py(out, [t[0]] + [((b - a + _HALF) & _MASK) - _HALF for a, b in zip(t, t[1:])])  # int64 wrap
    for r in rows:
        out += r[1].to_bytes(8, "little", signed=True)
    for k in range(n_kinds):
        values = sorted({r[2 + k] for r in rows})
        _put_varint(out, len(values))
        for v in values:
            out += v.to_bytes(8, "little", signed=True)
        where = {v: i for i, v in enumerate(values)}
        _put_column_py(out, [where[r[2 + k]] for r in rows])
    _put_column_py(out, [r[2 + n_kinds] for r in rows])
    _put_column_py(out, [r[3 + n_kinds] for r in rows])


def _put_pairs(out: bytearray, rows: np.ndarray) -> None:
    n_kinds = rows.shape[1] - 4
    _put_varint(out, len(rows))
    if not len(rows):
        return
    if len(rows) < _SMALL:
        return _put_pairs_py(out, rows.tolist())
    # Every numeric column in one (columns, n) array (a fold of a 1,024-pair base writes one per ~32 events):
    # time differences, each condition kind's dictionary index (np.unique's sorted values and inverse, by a
    # sort and a binary search: faster than an argsort), item, category; then each one's frame of reference.
    n = len(rows)
    cols_in = np.ascontiguousarray(rows.T)
    cols = np.empty((3 + n_kinds, n), dtype=np.int64)
    cols[0, 0] = cols_in[0, 0]
    np.subtract(cols_in[0, 1:], cols_in[0, :-1], out=cols[0, 1:])  # int64 wrap-around, as np.diff
    dicts = []
    for k in range(n_kinds):
        srt = np.sort(cols_in[2 + k])
        first = np.empty(n, dtype=bool)
        first[0] = True
        np.not_equal(srt[1:], srt[:-1], out=first[1:])
        dicts.append(srt[first])
        cols[1 + k] = np.searchsorted(dicts[k], cols_in[2 + k])
    cols[1 + n_kinds:] = cols_in[2 + n_kinds:4 + n_kinds]
    lo = cols.min(axis=1)
    span = cols.view(np.uint64) - lo.view(np.uint64)[:, None]  # wrap-around: exact for the full int64 range
    tops, los = span.max(axis=1).tolist(), lo.tolist()

    def column(j: int) -> None:
        _put_varint(out, _zz(los[j]))
        top = tops[j]
        width = 0 if top == 0 else 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4 if top < 1 << 32 else 8
        out.append(width)
        if width:
            out.extend(span[j].astype(_WIDTHS[width]).tobytes())

    column(0)
    out += cols_in[1].astype("<i8").tobytes()
    for k in range(n_kinds):
        _put_varint(out, len(dicts[k]))
        out += dicts[k].astype("<i8").tobytes()
        column(1 + k)
    column(1 + n_kinds)
    column(2 + n_kinds)


def _get_column_py(buf: bytes, pos: int, n: int) -> tuple[list[int], int]:
    lo, width, pos = _column_header(buf, pos, n)
    if width == 0:
        return [lo] * n, pos
    vals = [((int.from_bytes(buf[pos + i * width:pos + (i + 1) * width], "little") + lo + _HALF) & _MASK) - _HALF
            for i in range(n)]
    return vals, pos + n * width


def _get_pairs_py(buf: bytes, pos: int, n: int, n_kinds: int) -> tuple[np.ndarray, int]:
    cols: list[list[int]] = []
    d, pos = _get_column_py(buf, pos, n)
    t, acc = [], 0
    for x in d:
        acc = ((acc + x + _HALF) & _MASK) - _HALF
        t.append(acc)
    cols.append(t)
    if pos + 8 * n > len(buf):
        raise ValueError("truncated event keys")
    cols.append([int.from_bytes(buf[pos + 8 * i:pos + 8 * i + 8], "little", signed=True) for i in range(n)])
    pos += 8 * n
    for _ in range(n_kinds):
        m, pos = _get_varint(buf, pos)
        if pos + 8 * m > len(buf):
            raise ValueError("truncated condition dictionary")
        values = [int.from_bytes(buf[pos + 8 * i:pos + 8 * i + 8], "little", signed=True) for i in range(m)]
        pos += 8 * m
        idx, pos = _get_column_py(buf, pos, n)
        if any(i < 0 or i >= m for i in idx):
            raise ValueError("condition index out of range")
        cols.append([values[i] for i in idx])
    cols += [[0] * n] * (len(CONDITION_KINDS) - n_kinds)  # kinds newer than the record's tokenizer: ANY
    for _ in range(2):
        c, pos = _get_column_py(buf, pos, n)
        cols.append(c)
    return np.array(cols, dtype=np.int64).T.reshape(n, ROW), pos


def _get_column_into(buf: bytes, pos: int, out: np.ndarray) -> int:
    """``_get_column`` written into ``out`` (a contiguous int64 row of ``len(out)`` values): no temporaries."""
    lo, width, pos = _column_header(buf, pos, len(out))
    if width == 0:
        out.fill(lo)
        return pos
    span = np.frombuffer(buf, dtype=_WIDTHS[width], count=len(out), offset=pos)
    np.add(span, np.uint64(lo & 0xFFFFFFFFFFFFFFFF), out=out.view(np.uint64), casting="unsafe")  # wraps as int64
    return pos + len(out) * width


def _get_pairs(buf: bytes, pos: int, n_kinds: int) -> tuple[np.ndarray, int]:
    n, pos = _get_varint(buf, pos)
    if 0 < n < _SMALL:
        return _get_pairs_py(buf, pos, n, n_kinds)
    if not n:
        return np.zeros((0, ROW), dtype=np.int64), pos
    cols = np.zeros((ROW, n), dtype=np.int64)  # one contiguous row per column; kinds newer than the record's
    pos = _get_column_into(buf, pos, cols[0])  # tokenizer stay ANY (0)
    np.cumsum(cols[0], out=cols[0])
    if pos + 8 * n > len(buf):
        raise ValueError("truncated event keys")
    cols[1] = np.frombuffer(buf, dtype="<i8", count=n, offset=pos)
    pos += 8 * n
    idx = np.empty(n, dtype=np.int64)
    for k in range(n_kinds):
        m, pos = _get_varint(buf, pos)
        if pos + 8 * m > len(buf):
            raise ValueError("truncated condition dictionary")
        values = np.frombuffer(buf, dtype="<i8", count=m, offset=pos)
        pos += 8 * m
        pos = _get_column_into(buf, pos, idx)
        if m == 0 or idx.min() < 0 or idx.max() >= m:
            raise ValueError("condition index out of range")
        np.take(values, idx, out=cols[2 + k])
    pos = _get_column_into(buf, pos, cols[2 + len(CONDITION_KINDS)])
    pos = _get_column_into(buf, pos, cols[3 + len(CONDITION_KINDS)])
    return np.ascontiguousarray(cols.T), pos


def _kinds_header(out: bytearray) -> None:
    out += bytes((TOKENIZER_VERSION, len(CONDITION_KINDS)))


def _read_kinds(buf: bytes, pos: int) -> tuple[int, int]:
    version, n_kinds = buf[pos], buf[pos + 1]
    if version not in KINDS_BY_VERSION or version > TOKENIZER_VERSION or KINDS_BY_VERSION[version] != n_kinds:
        raise ValueError(f"unknown tokenizer version {version} with {n_kinds} kinds")
    return n_kinds, pos + 2


# --- records --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Delta:
    """The pairs one agent batch added to a user (any order, duplicates allowed) and the cap it applied."""

    user_id: int
    cap: int
    rows: np.ndarray  # (n, ROW) int64


@dataclass(frozen=True)
class Marker:
    """Snapshot coverage of one partition: deltas at offsets >= ``delta_offset`` are not in the snapshot."""

    partition: int
    delta_offset: int


def encode_snapshot(user_id: int, rows: np.ndarray, updated_at_ms: int | None = None) -> bytes:
    """A user's full sequence (rows oldest first) as a ``user-sequences`` value, compact layout (v2);
    ``updated_at_ms`` defaults to the newest pair's event time."""
    out = bytearray((MAGIC, FORMAT_SEQUENCE, SNAPSHOT_VERSION))
    _kinds_header(out)
    _put_varint(out, _zz(user_id))
    _put_varint(out, _zz(updated_at_ms if updated_at_ms is not None else int(rows[-1, 0]) if len(rows) else 0))
    _put_pairs(out, rows)
    return bytes(out)


def snapshot_keys(data: bytes) -> tuple[int, np.ndarray]:
    """(newest event time, event keys oldest first as a read-only view) of a compact (v2) snapshot record,
    without decoding its other columns: the sequence agent's per-event order and duplicate checks of a
    user's stored base cost a view, not a decode."""
    if data[:3] != bytes((MAGIC, FORMAT_SEQUENCE, SNAPSHOT_VERSION)):
        raise ValueError(f"not a compact user-sequence record (header {bytes(data[:3])!r})")
    _, pos = _read_kinds(data, 3)
    _, pos = _get_varint(data, pos)  # user id
    newest, pos = _get_varint(data, pos)
    n, pos = _get_varint(data, pos)
    if n:
        _, width, pos = _column_header(data, pos, n)  # event times: skipped
        pos += n * width
    return _unzz(newest), np.frombuffer(data, dtype="<i8", count=n, offset=pos)


def _delta_head() -> bytearray:
    """A delta record's first bytes: codec header and the tokenizer's kinds."""
    out = bytearray((MAGIC, FORMAT_DELTA, DELTA_VERSION))
    _kinds_header(out)
    return out


def encode_delta(user_id: int, rows: np.ndarray, cap: int) -> bytes:
    out = _delta_head()
    _put_varint(out, _zz(user_id))
    _put_varint(out, cap)
    _put_pairs(out, rows[np.lexsort((rows[:, 1], rows[:, 0]))] if len(rows) > 1 else rows)  # small diffs
    return bytes(out)


_VARINT_LIMITS = np.array([1 << 7 * k for k in range(1, 10)], dtype=np.uint64)


def _varints(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LEB128 varints of uint64 values: (n, w) uint8 bytes and the mask of each one's bytes (``_put_varint``'s),
    w the longest one's length."""
    v = v.astype(np.uint64)
    if not len(v) or v.max() < 0x80:  # one byte each (counts, small ids)
        return v.astype(np.uint8)[:, None], np.ones((len(v), 1), dtype=bool)
    lens = np.searchsorted(_VARINT_LIMITS, v, side="right") + 1
    at = np.arange(int(lens.max()))
    groups = (v[:, None] >> (7 * at).astype(np.uint64)) & np.uint64(0x7F)
    cont = (at < (lens - 1)[:, None]).astype(np.uint64) << np.uint64(7)
    return (groups | cont).astype(np.uint8), at < lens[:, None]


def _zz_array(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.int64)
    return (v.view(np.uint64) << np.uint64(1)) ^ (v >> 63).view(np.uint64)


# Deltas of 2.._BATCH_MAX pairs are encoded in one padded pass (its dictionaries compare M x M) when a call has
# at least _BATCH_MIN of them: the pass costs ~0.8 ms at a few dozen (numpy calls), one delta alone ~45 us.
_BATCH_MAX, _BATCH_MIN = 64, 16


def _columns_blocks(cols: np.ndarray, valid: np.ndarray) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """``_put_column`` of each row of C columns at once: (G, C, M) int64 -> per column, its blocks
    (varint of the minimum, width byte, values); entries where ``valid`` (G, M) is False are copies of valid
    ones (they leave minima and widths alone) and their bytes are masked out."""
    G, C, M = cols.shape
    lo = cols.min(axis=2)  # (G, C)
    span = cols.view(np.uint64) - lo.view(np.uint64)[:, :, None]  # wrap-around: exact for the full int64 range
    top = span.max(axis=2)
    width = np.select([top == 0, top < 1 << 8, top < 1 << 16, top < 1 << 32], [0, 1, 2, 4], 8)  # (G, C)
    lo_bytes, lo_mask = _varints(_zz_array(lo.reshape(-1)))
    lo_bytes, lo_mask = lo_bytes.reshape(G, C, -1), lo_mask.reshape(G, C, -1)
    w = max(int(width.max()), 1)  # bytes no value needs are left out before the mask
    data = np.ascontiguousarray(span, dtype="<u8").view(np.uint8).reshape(G, C, M, 8)[..., :w].reshape(G, C, M * w)
    mask = (np.tile(np.arange(w), M)[None, None, :] < width[:, :, None]) & np.repeat(valid, w, axis=1)[:, None, :]
    one = np.ones((G, 1), dtype=bool)
    return [[(lo_bytes[:, c], lo_mask[:, c]), (width[:, c, None].astype(np.uint8), one), (data[:, c], mask[:, c])]
            for c in range(C)]


def _encode_deltas_multi(user_ids: np.ndarray, rows: np.ndarray, starts: np.ndarray, sizes: np.ndarray,
                         cap: int) -> list[bytes]:
    """``encode_deltas`` of deltas of 2.._BATCH_MAX pairs in one pass: each padded to the longest with copies
    of its last (sorted) pair, so that minima, widths and dictionaries are its own, and the copies' bytes
    masked out."""
    G, M = len(sizes), int(sizes.max())
    K = rows.shape[1] - 4  # condition kinds
    valid = np.arange(M)[None, :] < sizes[:, None]  # (G, M)
    last = np.minimum(np.arange(M)[None, :], sizes[:, None] - 1)[:, :, None]  # (G, M, 1): or the last valid

    R = rows[starts[:, None] + last[:, :, 0]]  # (G, M, ROW)
    order = np.lexsort((R[:, :, 1], R[:, :, 0], ~valid), axis=-1)  # (time, key) as encode_delta; copies last
    R = np.take_along_axis(np.take_along_axis(R, order[:, :, None], axis=1), last, axis=1)
    t = R[:, :, 0].copy()
    t[:, 1:] = R[:, 1:, 0] - R[:, :-1, 0]  # int64 wrap-around, as _put_pairs
    t = np.take_along_axis(t, last[:, :, 0], axis=1)  # a copy repeats the last difference, not 0
    # Dictionaries of all kinds at once: distinct values sorted, then each pair's index among them.
    v = R[:, :, 2:2 + K].transpose(0, 2, 1)  # (G, K, M)
    srt = np.sort(v, axis=2)
    first = np.ones((G, K, M), dtype=bool)
    first[:, :, 1:] = srt[:, :, 1:] != srt[:, :, :-1]
    idx = (first[:, :, None, :] & (srt[:, :, None, :] < v[:, :, :, None])).sum(axis=3)  # (G, K, M)
    n_distinct, n_mask = _varints(first.sum(axis=2).reshape(-1))
    n_distinct, n_mask = n_distinct.reshape(G, K, -1), n_mask.reshape(G, K, -1)
    values = np.ascontiguousarray(srt, dtype="<i8").view(np.uint8).reshape(G, K, 8 * M)
    values_mask = np.repeat(first, 8, axis=2)
    cols = _columns_blocks(np.concatenate((t[:, None], idx, R[:, None, :, 2 + K], R[:, None, :, 3 + K]), axis=1),
                           valid)  # time, index of each kind, item, category

    head = _delta_head()
    after_user = bytearray()
    _put_varint(after_user, cap)
    keys = np.ascontiguousarray(R[:, :, 1], dtype="<i8").view(np.uint8).reshape(G, 8 * M)
    blocks = [_fixed(head, G), _varints(_zz_array(user_ids)), _fixed(after_user, G), _varints(sizes), *cols[0],
              (keys, np.repeat(valid, 8, axis=1))]
    for k in range(K):
        blocks += [(n_distinct[:, k], n_mask[:, k]), (values[:, k], values_mask[:, k]), *cols[1 + k]]
    return _cut(blocks + cols[1 + K] + cols[2 + K])


def _encode_deltas_one(user_ids: np.ndarray, rows: np.ndarray, cap: int) -> list[bytes]:
    """``encode_deltas`` of one-pair deltas (the common one: one new pair per changed user and batch), whose
    columns are each their own base (width 0): no sort, no dictionary, fixed bytes around the varints."""
    n = len(rows)
    n_kinds = rows.shape[1] - 4
    head = _delta_head()
    after_user = bytearray()
    _put_varint(after_user, cap)
    _put_varint(after_user, 1)
    le = np.ascontiguousarray(rows, dtype="<i8").view(np.uint8).reshape(n, -1, 8)
    z, o = np.zeros((n, 1), np.uint8), np.ones((n, 1), np.uint8)
    blocks = [_fixed(head, n), _varints(_zz_array(user_ids)), _fixed(after_user, n), _varints(_zz_array(rows[:, 0])),
              (np.concatenate((z, le[:, 1]), axis=1), np.ones((n, 9), dtype=bool))]
    for k in range(n_kinds):
        blocks.append((np.concatenate((o, le[:, 2 + k], z, z), axis=1), np.ones((n, 11), dtype=bool)))
    for c in (2 + n_kinds, 3 + n_kinds):
        blocks += [_varints(_zz_array(rows[:, c])), _fixed(b"\x00", n)]
    return _cut(blocks)


def _fixed(b: bytes | bytearray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The same bytes ``b`` in each of ``n`` rows, as a block."""
    return np.tile(np.frombuffer(bytes(b), np.uint8), (n, 1)), np.ones((n, len(b)), dtype=bool)


def _cut(blocks: list[tuple[np.ndarray, np.ndarray]]) -> list[bytes]:
    """Each row's bytes: the blocks' (G, L) bytes where their masks are set, concatenated per row."""
    data = np.concatenate([d for d, _ in blocks], axis=1)
    mask = np.concatenate([k for _, k in blocks], axis=1)
    flat = data[mask].tobytes()
    ends = np.cumsum(mask.sum(axis=1)).tolist()
    return [flat[a:b] for a, b in zip([0] + ends[:-1], ends)]


def encode_deltas(user_ids: np.ndarray, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                  cap: int) -> list[bytes]:
    """``encode_delta(user_ids[i], rows[starts[i]:ends[i]], cap)`` for every i: the same bytes, the one-pair
    deltas (most, with many users) in one vectorised pass and those of a few pairs (most, with active users) in
    another: one by one they cost ~2 and ~45 us each."""
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    user_ids = np.asarray(user_ids, dtype=np.int64)
    sizes = ends - starts
    one = np.nonzero(sizes == 1)[0]
    few = np.nonzero((sizes > 1) & (sizes <= _BATCH_MAX))[0]
    if len(few) < _BATCH_MIN:
        few = few[:0]
    rest = np.setdiff1d(np.arange(len(sizes)), np.concatenate((one, few)))  # empty, long, or too few for a pass
    out: list[bytes] = [b""] * len(sizes)

    def put(which: np.ndarray, values: list[bytes]) -> None:
        for i, v in zip(which.tolist(), values):
            out[i] = v

    if len(one):
        put(one, _encode_deltas_one(user_ids[one], rows[starts[one]], cap))
    if len(few):
        put(few, _encode_deltas_multi(user_ids[few], rows, starts[few], sizes[few], cap))
    put(rest, [encode_delta(int(user_ids[i]), rows[starts[i]:ends[i]], cap) for i in rest.tolist()])
    return out


def encode_marker(partition: int, delta_offset: int) -> bytes:
    body = json.dumps({"partition": partition, "delta_offset": delta_offset}).encode()
    return bytes((MAGIC, FORMAT_MARKER, MARKER_VERSION)) + body


def rows_of(seq: UserSequence) -> np.ndarray:
    return np.array([(p.event_time_ms, p.event_key, *p.conditions, p.item_id, p.category_id) for p in seq.pairs],
                    dtype=np.int64).reshape(-1, ROW)


def decode(data: bytes | None):
    """Any export record -> ``(user_id, rows)`` for a snapshot (either layout), ``Delta``, ``Marker``, or
    ``None`` for a tombstone; ``DecodeError`` (with the reason, for dead letters) otherwise."""
    if data is None:
        return None
    if len(data) < 5 or data[0] != MAGIC:
        raise DecodeError("not a lum sequence-export record")
    fmt, version = data[1], data[2]
    try:
        if fmt == FORMAT_SEQUENCE and version == 1:
            if len(data) >= _V1_PAYLOAD and data[8] == TOKENIZER_VERSION and data[9] == len(CONDITION_KINDS) \
                    and (len(data) - _V1_PAYLOAD) % (8 * ROW) == 0 and data[3:7] == b"LSEQ":
                user = int.from_bytes(data[11:19], "little", signed=True)
                n = int.from_bytes(data[_V1_PAYLOAD - 4:_V1_PAYLOAD], "little")
                if n * 8 * ROW == len(data) - _V1_PAYLOAD:  # the current tokenizer: a plain int64 view
                    return user, np.frombuffer(data, dtype="<i8", offset=_V1_PAYLOAD).reshape(-1, ROW)
            seq = codec.decode_user_sequence(data)
            return seq.user_id, rows_of(seq)
        if fmt == FORMAT_SEQUENCE and version == SNAPSHOT_VERSION:
            n_kinds, pos = _read_kinds(data, 3)
            u, pos = _get_varint(data, pos)
            _updated, pos = _get_varint(data, pos)
            rows, pos = _get_pairs(data, pos, n_kinds)
            _end(data, pos)
            return _unzz(u), rows
        if fmt == FORMAT_DELTA and version == DELTA_VERSION:
            n_kinds, pos = _read_kinds(data, 3)
            u, pos = _get_varint(data, pos)
            cap, pos = _get_varint(data, pos)
            rows, pos = _get_pairs(data, pos, n_kinds)
            _end(data, pos)
            if cap < 1:
                raise ValueError("cap must be >= 1")
            return Delta(_unzz(u), cap, rows)
        if fmt == FORMAT_MARKER and version == MARKER_VERSION:
            m = json.loads(data[3:])
            return Marker(int(m["partition"]), int(m["delta_offset"]))
    except DecodeError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise DecodeError(f"bad sequence-export record: {e}") from None
    raise DecodeError(f"unknown sequence-export record format {chr(fmt)!r} version {version}")


def _end(data: bytes, pos: int) -> None:
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} trailing bytes")


# --- the fold -------------------------------------------------------------------------------------------
def merge_rows(rows: np.ndarray, cap: int) -> np.ndarray:
    """The agent's rule on a bag of pairs: dedup by event_key, order by (event_time, event_key), keep the
    ``cap`` latest."""
    if len(rows) > 1:
        _, first = np.unique(rows[:, 1], return_index=True)
        if len(first) != len(rows):
            rows = rows[first]
        rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
    return rows[-cap:]


def fold(base: np.ndarray | None, deltas: list[Delta]) -> np.ndarray:
    """A user's sequence from a snapshot's rows (or None) and the deltas after it, in offset order."""
    rows = base if base is not None else np.zeros((0, ROW), dtype=np.int64)
    i = 0
    while i < len(deltas):
        j = i
        while j < len(deltas) and deltas[j].cap == deltas[i].cap:
            j += 1
        rows = merge_rows(np.concatenate([rows] + [d.rows for d in deltas[i:j]]), deltas[i].cap)
        i = j
    return rows


def to_sequence(user_id: int, rows: np.ndarray) -> UserSequence:
    """Rows -> the trainers' ``UserSequence`` (``updated_at_ms`` = newest pair's event time, as the agent)."""
    from .tokenize import TokenPair

    n_kinds = len(CONDITION_KINDS)
    pairs = [TokenPair(r[0], r[1], tuple(r[2:2 + n_kinds]), r[2 + n_kinds], r[3 + n_kinds]) for r in rows.tolist()]
    return UserSequence(user_id, pairs[-1].event_time_ms if pairs else 0, pairs, TOKENIZER_VERSION)


def decode_user_sequence(data: bytes | None) -> UserSequence:
    """A ``user-sequences`` snapshot value in either layout -> ``UserSequence`` (``DecodeError`` otherwise)."""
    if data and len(data) > 3 and data[1] == FORMAT_SEQUENCE and data[2] == 1:
        return codec.decode_user_sequence(data)  # today's layout, unchanged (its stored updated_at_ms)
    rec = decode(data)
    if not isinstance(rec, tuple):
        raise DecodeError(f"not a user-sequence snapshot record ({type(rec).__name__})")
    return to_sequence(*rec)


def decode_delta(data: bytes | None) -> Delta:
    rec = decode(data)
    if not isinstance(rec, Delta):
        raise DecodeError(f"not a sequence-delta record ({type(rec).__name__})")
    return rec


# --- catching a fold up with the topics (pure: the caller supplies the records) -------------------------
SNAPSHOT_TOPIC, DELTA_TOPIC = "user-sequences", "sequence-deltas"  # logical names, as in schemas.topics


@dataclass
class FoldState:
    """Where a fold stands: next offset per partition of both topics, and the last marker seen per partition.
    Flattened for checkpoints and state files as ``{"user-sequences/0": 12, "sequence-deltas/0": 40, ...}``."""

    snapshot: dict[int, int]
    deltas: dict[int, int]
    markers: dict[int, int]

    @classmethod
    def empty(cls) -> FoldState:
        return cls({}, {}, {})

    def flat(self) -> dict[str, int]:
        return ({f"{SNAPSHOT_TOPIC}/{p}": o for p, o in self.snapshot.items()}
                | {f"{DELTA_TOPIC}/{p}": o for p, o in self.deltas.items()}
                | {f"marker/{p}": o for p, o in self.markers.items()})

    @classmethod
    def from_flat(cls, flat: dict[str, int] | None) -> FoldState:
        s = cls.empty()
        for k, o in (flat or {}).items():
            name, _, p = k.rpartition("/")
            part = {SNAPSHOT_TOPIC: s.snapshot, DELTA_TOPIC: s.deltas, "marker": s.markers}.get(name)
            if part is not None:  # anything else (an older state file's offsets) reads as "from the start"
                part[int(p)] = int(o)
        return s


def catch_up(state: FoldState, partitions: list[int], read, get_rows, put_rows, since: FoldState | None = None,
             chunk: int = 10_000) -> tuple[set[int], FoldState, list]:
    """Bring a fold (``state`` + the rows behind ``get_rows(users) -> {user: rows}``) up to the topics' ends,
    writing with ``put_rows({user: rows or None (delete)})`` in chunks of ``chunk`` users or deltas, so that
    memory stays bounded whatever the partition's size.

    ``read(topic, {partition: start})`` yields ``(partition, offset, key, value)`` to each partition's end, in
    offset order per partition. Returns (users changed since ``since``; the new state, which the caller
    stores after the last ``put_rows``; bad records as ``(topic, partition, offset, key, value, DecodeError)``).

    Rules: a snapshot record newer than the fold REPLACES the user's rows and is then folded with the user's
    deltas from the first marker after it (else the last marker known; lower is harmless); other users fold
    the deltas after ``state.deltas``. ``since`` (default: ``state``) only widens the reads so that changes
    between ``since`` and ``state`` are reported too. Interrupted half-way (no new state stored), a rerun from
    the old state gives the same result: records replace again and deltas re-apply idempotently."""
    since = since or state
    bad: list = []
    rec_at: dict[int, tuple[int, int]] = {}  # user -> (partition, offset) of its newest fresh snapshot record
    markers: dict[int, list[tuple[int, int]]] = {p: [] for p in partitions}
    changed: set[int] = set()
    pending: dict[int, np.ndarray | None] = {}

    def flush_records() -> None:
        prev = get_rows(list(pending))
        for user, rows in pending.items():
            old = prev.get(user)
            if (old is None) != (rows is None) or (old is not None and not np.array_equal(old, rows)):
                changed.add(user)  # a rewritten record (the snapshot job) is a change only if it differs
        put_rows(dict(pending))
        pending.clear()

    snap_ends = {p: state.snapshot.get(p, 0) for p in partitions}
    snap_from = {p: min(snap_ends[p], since.snapshot.get(p, 0)) for p in partitions}
    for p, off, key, value in read(SNAPSHOT_TOPIC, snap_from):
        snap_ends[p] = off + 1
        key = key or b""
        fresh = off >= state.snapshot.get(p, 0)
        if key.startswith(MARKER_PREFIX):
            try:
                rec = decode(value)
                if not isinstance(rec, Marker):
                    raise DecodeError("marker key without a marker record")
            except DecodeError as e:
                bad.append((SNAPSHOT_TOPIC, p, off, key, value, e))
                continue
            if fresh:
                markers[p].append((off, rec.delta_offset))
            continue
        try:
            user = int(key)
        except ValueError:
            bad.append((SNAPSHOT_TOPIC, p, off, key, value, DecodeError(f"key {key[:40]!r} is not a user id")))
            continue
        if fresh:
            try:
                rec = decode(value)
                if rec is not None and not isinstance(rec, tuple):
                    raise DecodeError(f"{type(rec).__name__} record under a user key")
            except DecodeError as e:
                bad.append((SNAPSHOT_TOPIC, p, off, key, value, e))
                continue
            rec_at[user] = (p, off)
            pending[user] = None if rec is None or not len(rec[1]) else rec[1]
            if len(pending) >= chunk:
                flush_records()
        elif off >= since.snapshot.get(p, 0):
            changed.add(user)  # applied by an earlier read after ``since``: report it again
    if pending:
        flush_records()
    # The marker that vouches for each replaced user's record (first marker after it).
    start_of: dict[int, int] = {}
    for user, (p, off) in rec_at.items():
        later = [m for o, m in markers[p] if o > off]
        start_of[user] = later[0] if later else state.markers.get(p, 0)
    delta_from = {p: min(state.deltas.get(p, 0), since.deltas.get(p, 0)) for p in partitions}
    for user, (p, _) in rec_at.items():
        delta_from[p] = min(delta_from[p], start_of[user])
    deltas: dict[int, list[Delta]] = {}
    n_pending = 0

    def flush_deltas() -> None:
        cur = get_rows(list(deltas))
        out = {}
        for user, ds in deltas.items():
            r = fold(cur.get(user), ds)
            out[user] = r if len(r) else None
        put_rows(out)
        deltas.clear()

    delta_ends = {p: state.deltas.get(p, 0) for p in partitions}
    for p, off, key, value in read(DELTA_TOPIC, delta_from):
        delta_ends[p] = off + 1
        try:
            d = decode_delta(value)
        except DecodeError as e:
            bad.append((DELTA_TOPIC, p, off, key, value, e))
            continue
        if off >= since.deltas.get(p, 0):
            changed.add(d.user_id)
        if off >= (start_of[d.user_id] if d.user_id in start_of else state.deltas.get(p, 0)):
            deltas.setdefault(d.user_id, []).append(d)
            n_pending += 1
            if n_pending >= chunk:  # runs of one user's deltas stay in offset order across chunks
                flush_deltas()
                n_pending = 0
    if deltas:
        flush_deltas()
    new = FoldState(snap_ends, delta_ends,
                    {p: (markers[p][-1][1] if markers[p] else state.markers.get(p, 0)) for p in partitions})
    return changed, new, bad


def fold_partition_records(read, partition: int, get_rows, put_rows) -> list:
    """Rebuild one partition's fold from ``read(topic_name)``, which yields that partition's records (anything
    with ``offset``, ``key``, ``value``) from the beginning, into an empty store behind ``get_rows`` /
    ``put_rows`` (as in ``catch_up``): the agents' rebuild of a moved partition. Returns the bad records."""
    def records(topic: str, starts: dict[int, int]):
        for r in read(topic):
            if r.offset >= starts.get(partition, 0):
                yield partition, r.offset, r.key, r.value

    return catch_up(FoldState.empty(), [partition], records, get_rows, put_rows)[2]
