"""Message encoding with a format header, so that a reader can tell formats and schema versions apart.

Every value lum-stream writes starts with three bytes: ``b"L"``, a format byte (``b"j"`` JSON, ``b"s"`` the
binary sequence codec of ``schemas.tokenize``, ``b"v"`` JSON scalars + binary vectors) and the schema version
(u8), followed by the payload. A reader refuses what it does not know with a ``DecodeError`` that says why;
consumers send such messages to the dead-letter topic instead of crashing.

JSON goes through pydantic-core (Rust): ~440k encodes/s and ~190k strict decodes/s for a ``BehaviorEvent``
on one idle core (``benchmarks/bench_foundation.py``), several times what an agent worker processes (~30k
events/s), so the human-readable format costs the agents little. A ``TrainingExample`` carries K+1 LUM vectors
and two history lists, whose JSON dominates its size and decode time, so from schema version 2 it is written as ``b"L" b"v" 2`` + u32 length + JSON + vectors (little-endian): the JSON
is the whole model without the history lists and with each LUM vector replaced by the placeholder ``[0.0]`` (so
pydantic validates every other field and the vector counts as usual), then u16 history length H, H int64 item ids,
H int64 category ids, one u16 size per vector (the user vectors in order, then the item vector) and their float64
values. Sizes, bounds and finiteness of the binary parts are checked as the model declares them.

Vectors are float64 on the wire (values round-trip exactly, as in JSON; 8 bytes against ~19 characters) and
must be finite. The decoded example keeps those bytes so that a trainer can stack a batch's vectors with one
``np.frombuffer``; ``decode_many(..., lazy_vectors=True)`` goes further and returns ``LazyVectors``, which build
the Python lists only if read, and checks a whole fetch at once: the heads parsed in one call and validated a
column at a time with the model's own field annotations, the binary parts read with numpy; a message it cannot
vouch for is decoded on its own (same result, same reason). Version-1 JSON still decodes.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from itertools import repeat
from operator import itemgetter
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import to_json

from .events import MAX_HISTORY, MAX_VECTOR_DIM, TrainingExample
from .tokenize import UserSequence, decode_sequence, encode_sequence

MAGIC = 0x4C  # "L"
FORMAT_JSON = 0x6A  # "j"
FORMAT_SEQUENCE = 0x73  # "s"
FORMAT_VECTORS = 0x76  # "v": JSON scalars + float64 vectors (TrainingExample v2)
_NONE = 0xFFFF
assert sys.byteorder == "little" and array("d").itemsize == 8  # the vector layout is native float64 LE
_BINARY_FIELDS = {"lum_user", "lum_item", "history_items", "history_categories"}

M = TypeVar("M", bound=BaseModel)


class DecodeError(ValueError):
    """A message that cannot be decoded or validated; ``str(err)`` is the reason for the dead letter."""


def _binary_vectors(model: type[BaseModel]) -> bool:
    return model.__name__ == "TrainingExample" and model.SCHEMA_VERSION >= 2  # type: ignore[attr-defined]


def encode(value: BaseModel) -> bytes:
    version = type(value).SCHEMA_VERSION  # type: ignore[attr-defined]
    if _binary_vectors(type(value)):
        return _encode_vectors(value, version)
    return bytes((MAGIC, FORMAT_JSON, version)) + value.__pydantic_serializer__.to_json(value)


def decode(model: type[M], data: bytes | None) -> M:
    if not data:
        raise DecodeError(f"empty message (expected {model.__name__})")
    if len(data) < 3 or data[0] != MAGIC:
        raise DecodeError(f"missing lum format header (first bytes {bytes(data[:8])!r})")
    version = model.SCHEMA_VERSION  # type: ignore[attr-defined]
    if data[1] == FORMAT_VECTORS and _binary_vectors(model):
        if data[2] != version:
            raise DecodeError(f"unknown schema version {data[2]} for {model.__name__} (binary vectors)")
        return _decode_vectors(model, data)
    if data[1] != FORMAT_JSON:
        raise DecodeError(f"format {chr(data[1])!r} is not JSON (expected {model.__name__})")
    # JSON: the current version, or an older one the model declares readable (``READS_VERSIONS``: newer
    # versions only added defaulted fields or changed the encoding).
    if data[2] != version and data[2] not in getattr(model, "READS_VERSIONS", ()):
        raise DecodeError(f"unknown schema version {data[2]} for {model.__name__} "
                          f"(this build reads version {version})")
    try:
        return model.model_validate_json(data[3:])
    except ValidationError as e:
        raise DecodeError(_short(e, model)) from None


def _encode_vectors(value: BaseModel, version: int) -> bytes:
    user, item = value.lum_user, value.lum_item  # type: ignore[attr-defined]
    head = value.__pydantic_serializer__.to_json(value, exclude=_BINARY_FIELDS)
    vecs = [*(user or ()), *([item] if item is not None else ())]
    hist_i, hist_c = value.history_items, value.history_categories  # type: ignore[attr-defined]
    return _vectors_frame(version, head, len(hist_i), array("q", hist_i).tobytes() + array("q", hist_c).tobytes(),
                          None if user is None else [len(v) for v in user], None if item is None else len(item),
                          array("d", [x for v in vecs for x in v]).tobytes())


def _vectors_frame(version: int, head: bytes, n_history: int, history: bytes, user_dims: Sequence[int] | None,
                   item_dim: int | None, vectors: bytes) -> bytes:
    """The binary-vectors layout (module docstring) from its parts: ``head`` the JSON without the binary fields."""
    start = bytes((MAGIC, FORMAT_VECTORS, version))
    if user_dims is None and item_dim is None:
        return b"".join((start, _U32(len(head)), head, _U16(n_history), history))
    extra = b""
    if user_dims is not None:  # placeholders keep the JSON a valid model on its own: one [0.0] per vector
        extra += b',"lum_user":[' + b",".join([b"[0.0]"] * len(user_dims)) + b"]"
    if item_dim is not None:
        extra += b',"lum_item":[0.0]'
    dims = [*(user_dims or ()), *(() if item_dim is None else (item_dim,))]
    return b"".join((start, _U32(len(head) + len(extra)), head[:-1], extra, b"}", _U16(n_history), history,
                     struct.pack(f"<{len(dims)}H", *dims), vectors))


_U32, _U16 = struct.Struct("<I").pack, struct.Struct("<H").pack
EXAMPLE_HEAD_FIELDS: tuple[str, ...] = tuple(f for f in TrainingExample.model_fields if f not in _BINARY_FIELDS)
_EXAMPLE_VERSION = TrainingExample.SCHEMA_VERSION


def encode_training_example(head: dict[str, object], n_history: int, history: bytes,
                            user_dims: Sequence[int] | None, item_dim: int | None, vectors: bytes) -> bytes:
    """``encode(TrainingExample(...))``, byte for byte, from parts already in wire form and without a model object
    (the joiner's hot path; the caller vouches that the values are valid): ``head`` the JSON fields, keys exactly
    ``EXAMPLE_HEAD_FIELDS`` in that order; ``history`` the ``n_history`` item ids then as many category ids,
    int64 little-endian; ``vectors`` float64 little-endian: the user vectors (sizes ``user_dims``; None: no LUM
    features), then the item vector (size ``item_dim``; None: none)."""
    if tuple(head) != EXAMPLE_HEAD_FIELDS:
        raise ValueError(f"TrainingExample head fields {tuple(head)}, expected {EXAMPLE_HEAD_FIELDS}")
    return _vectors_frame(_EXAMPLE_VERSION, to_json(head), n_history, history, user_dims, item_dim, vectors)


def _split(name: str, data: bytes) -> tuple[bytes, int]:
    """(JSON head, offset of the vector part) of a binary-vectors message."""
    if len(data) < 7:
        raise DecodeError(f"truncated {name} (binary vectors)")
    (n,) = struct.unpack_from("<I", data, 3)
    if 7 + n > len(data):
        raise DecodeError(f"truncated {name}: JSON part")
    return data[7:7 + n], 7 + n


def _attach_vectors(ex, data: bytes, at: int):
    """Read the vector part into ``ex`` (validated from its head, with placeholder vectors)."""
    (out,) = _attach_many([(ex, data, at)])
    if isinstance(out, DecodeError):
        raise out
    return out


def _attach_many(items: list[tuple[BaseModel, bytes, int]], lazy: bool = False) -> list:
    """``_attach_vectors`` of many messages, each its model (``lazy``: its ``LazyVectors``) or its
    ``DecodeError``: the layout is walked per message (a few byte reads), the vector values of all of them are
    checked (and converted) in one numpy pass."""
    import numpy as np

    out: list = [None] * len(items)
    raws, spans = [], []  # vector bytes of each well-formed message; (item index, dims)
    for j, (ex, data, at) in enumerate(items):
        size = len(data)
        if size < at + 2:
            out[j] = DecodeError(f"truncated {type(ex).__name__}: history size")
            continue
        nh = data[at] | data[at + 1] << 8  # u16 little-endian
        at += 2
        if nh:
            if nh > MAX_HISTORY or size < at + 16 * nh:
                out[j] = DecodeError(f"invalid {type(ex).__name__}: history of {nh} entries (at most "
                                     f"{MAX_HISTORY}) or truncated")
                continue
            items_, cats = array("q", data[at:at + 8 * nh]), array("q", data[at + 8 * nh:at + 16 * nh])
            if min(items_) < 0 or min(cats) < 0:  # int64: never above MAX_ID
                out[j] = DecodeError(f"invalid {type(ex).__name__}: negative id in history")
                continue
            ex.__dict__["history_items"], ex.__dict__["history_categories"] = items_.tolist(), cats.tolist()
            at += 16 * nh
        user, item = ex.lum_user, ex.lum_item
        nv = (len(user) if user is not None else 0) + (item is not None)
        if nv == 0:
            out[j] = DecodeError(f"invalid {type(ex).__name__}: {size - at} vector bytes, expected 0") \
                if size != at else LazyVectors.of(ex) if lazy else ex
            continue
        if size < at + 2 * nv:
            out[j] = DecodeError(f"truncated {type(ex).__name__}: vector sizes")
            continue
        dims = _sizes(nv).unpack_from(data, at)
        at += 2 * nv
        if min(dims) < 1 or max(dims) > MAX_VECTOR_DIM:
            out[j] = DecodeError(f"invalid {type(ex).__name__}: vector size outside 1..{MAX_VECTOR_DIM}: "
                                 f"{list(dims)}")
            continue
        if size - at != 8 * sum(dims):
            out[j] = DecodeError(f"invalid {type(ex).__name__}: {size - at} vector bytes, expected "
                                 f"{8 * sum(dims)}")
            continue
        raws.append(bytes(data[at:]))
        spans.append((j, dims))
    if not raws:
        return out
    flat = np.frombuffer(b"".join(raws), dtype="<f8")  # float64 little-endian (checked at import)
    sizes = np.fromiter((len(r) // 8 for r in raws), dtype=np.int64, count=len(raws))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    finite = np.logical_and.reduceat(np.isfinite(flat), starts).tolist()
    values = None if lazy else flat.tolist()  # Python floats, one C call for the whole batch
    for (j, dims), raw, s, ok in zip(spans, raws, starts.tolist(), finite):
        ex = items[j][0]
        if not ok:
            out[j] = DecodeError(f"invalid {type(ex).__name__}: non-finite value in a LUM vector")
        elif lazy:
            out[j] = LazyVectors.of(ex, raw, dims)
        else:
            out[j] = _set_vectors(ex, raw, dims, values, s)
    return out


_SIZES: dict[int, struct.Struct] = {}


def _sizes(n: int) -> struct.Struct:
    """The ``n`` u16 vector sizes of the layout."""
    if n not in _SIZES:
        _SIZES[n] = struct.Struct(f"<{n}H")
    return _SIZES[n]


def _set_vectors(ex, raw: bytes, dims: tuple[int, ...], values: list[float], s: int):
    """Put the vectors (``values[s:]``, sizes ``dims``) into ``ex``, which was validated with placeholders."""
    vecs = []
    for d in dims:
        vecs.append(values[s:s + d])
        s += d
    # Sizes and finiteness are checked by the caller as the model declares them; the count of user vectors is the
    # validated placeholders' count. Setting them on the fresh, unshared instance skips re-validating a few
    # hundred floats per message (and a copy).
    if ex.lum_user is not None:
        ex.__dict__["lum_user"] = vecs[:len(ex.lum_user)]
    if ex.lum_item is not None:
        ex.__dict__["lum_item"] = vecs[-1]
    object.__setattr__(ex, "__pydantic_private__", {"_lum_f64": raw})  # see TrainingExample
    return ex


class LazyVectors:
    """A checked binary ``TrainingExample`` whose LUM vectors stay float64 wire bytes until read.

    Fields read like the model's (``ex.user_id``, ``ex.lum_conditions``...); ``lum_user``/``lum_item`` build their
    lists on first read, ``to_model()`` returns the ``TrainingExample`` (validated again), and anything else a
    model has is taken from it. For readers that stack a batch's vectors from the bytes
    (``__pydantic_private__["_lum_f64"]``) themselves, such as the DLRM trainer: building a few hundred Python
    floats is most of a message's decode. Pickles as its fields and bytes (cheap to send to another process).
    """

    def __init__(self, fields: dict, raw: bytes, dims: tuple[int, ...], n_user: int | None, has_item: bool):
        self.__dict__.update(fields)  # the validated fields without the vectors, read as plain attributes
        self._raw, self._dims, self._n_user, self._has_item, self._vecs = raw, dims, n_user, has_item, None

    @classmethod
    def of(cls, head, raw: bytes = b"", dims: tuple[int, ...] = ()) -> LazyVectors:
        """From a model validated with placeholder vectors (``head``) and its vector part."""
        fields = dict(head.__dict__)
        user, item = fields.pop("lum_user"), fields.pop("lum_item")
        return cls(fields, raw, dims, None if user is None else len(user), item is not None)

    def __reduce__(self):
        return (LazyVectors, (self.fields(), self._raw, self._dims, self._n_user, self._has_item))

    def fields(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    @property
    def __pydantic_private__(self) -> dict:
        return {"_lum_f64": self._raw} if self._raw else {}

    def _vectors(self) -> list[list[float]]:
        if self._vecs is None:
            values, s, self._vecs = array("d", self._raw).tolist(), 0, []
            for d in self._dims:
                self._vecs.append(values[s:s + d])
                s += d
        return self._vecs

    @property
    def lum_user(self) -> list[list[float]] | None:
        return None if self._n_user is None else self._vectors()[:self._n_user]

    @property
    def lum_item(self) -> list[float] | None:
        return self._vectors()[-1] if self._has_item else None

    def to_model(self):
        from .events import TrainingExample

        return TrainingExample.model_validate(self.fields() | {"lum_user": self.lum_user, "lum_item": self.lum_item})

    def __getattr__(self, name: str):  # model methods (model_dump...) and anything else
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.to_model(), name)

    def __eq__(self, other: object) -> bool:
        return self.to_model() == (other.to_model() if isinstance(other, LazyVectors) else other)

    __hash__ = None  # like the (frozen, list-holding) model: equal by fields


def _decode_vectors(model: type[M], data: bytes) -> M:
    head, at = _split(model.__name__, data)
    try:
        ex = model.model_validate_json(head)
    except ValidationError as e:
        raise DecodeError(_short(e, model)) from None
    return _attach_vectors(ex, data, at)


def decode_many(model: type[M], datas: list[bytes | None], chunk: int = 64,
                lazy_vectors: bool = False) -> list[M | DecodeError]:
    """``decode`` of many messages: each result is the model or the ``DecodeError`` of that message.

    Binary-vector messages: their JSON heads are validated ``chunk`` at a time in one pydantic call (per-call
    overhead is most of a small message's cost; a bounded call also lets other threads take the GIL soon), a
    chunk that fails is retried one message at a time; the vector parts of all of them are checked and converted
    together (``_attach_many``). Any other message (JSON, a bad header) is decoded on its own. ``lazy_vectors``:
    binary ones come back as ``LazyVectors`` (checked, not converted), the others as models.
    """
    out: list = [None] * len(datas)
    version = getattr(model, "SCHEMA_VERSION", None)
    fast: list[tuple[int, bytes, bytes, int]] = []  # (index, data, JSON head, offset of the vector part)
    binary = _binary_vectors(model)
    todo = enumerate(datas)
    if lazy_vectors and binary and datas:
        todo = _lazy_columns(datas, out)  # what it cannot vouch for takes the per-message path below
    for i, d in todo:
        if binary and d and len(d) >= 7 and d[0] == MAGIC and d[1] == FORMAT_VECTORS and d[2] == version:
            try:
                fast.append((i, d, *_split(model.__name__, d)))
                continue
            except DecodeError as e:
                out[i] = e
                continue
        out[i] = _decode_one(model, d)
    attach = []
    for c in range(0, len(fast), chunk):
        part = fast[c:c + chunk]
        try:
            heads = _list_adapter(model).validate_json(b"[" + b",".join(h for _, _, h, _ in part) + b"]")
        except ValidationError:
            heads = []
            for i, _, h, _ in part:
                try:
                    heads.append(model.model_validate_json(h))
                except ValidationError as e:
                    heads.append(None)
                    out[i] = DecodeError(_short(e, model))
        attach += [(i, ex, d, at) for (i, d, _, at), ex in zip(part, heads) if ex is not None]
    try:
        done = _attach_many([(ex, d, at) for _, ex, d, at in attach], lazy=lazy_vectors)
    except Exception:  # noqa: BLE001  (an unforeseen corruption: find the message, never stop the others)
        done = [_decode_one(model, datas[i]) for i, _, _, _ in attach]
    for (i, *_), r in zip(attach, done):
        out[i] = r
    return out


_HEAD_KEYS = tuple(f for f in TrainingExample.model_fields if f not in _BINARY_FIELDS)  # the encoder's key order
_PLACEHOLDERS = ("lum_user", "lum_item")
_HEAD_GETTER = itemgetter(*_HEAD_KEYS)
_HEAD_KEYS_SET, _HEAD_ALLOWED = set(_HEAD_KEYS), set(_HEAD_KEYS) | {"lum_user", "lum_item"}
_column_adapters: dict = {}


def _column_adapter(name: str):
    """A strict validator of a list of values of the ``TrainingExample`` field ``name``: its own annotation."""
    if name not in _column_adapters:
        from typing import Annotated

        from pydantic import ConfigDict, TypeAdapter

        f = TrainingExample.model_fields[name]
        ann = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        _column_adapters[name] = TypeAdapter(list[ann], config=ConfigDict(strict=True))
    return _column_adapters[name]


def _lazy_columns(datas: list[bytes | None], out: list) -> list[tuple[int, bytes | None]]:
    """Binary ``TrainingExample`` messages as ``LazyVectors`` (into ``out``), checked a column at a time.

    The heads of all messages are parsed in one JSON call; each field's column is checked in one call of a strict
    validator built from the model's own annotation; the headers and the layouts of the binary parts of all
    messages are read and checked together with numpy. A message is accepted here only if every check passes; the
    others are returned as (index, data) for the per-message path, which decodes them exactly as ``decode`` does or
    gives the model's own reason (a head with other keys than the encoder writes sends every message there).
    Checking message by message costs several times as much: this is the trainer's hot path.
    """
    import numpy as np
    from pydantic_core import from_json

    everything = list(enumerate(datas))
    if not all(datas):  # None or empty: the per-message path names it
        return _subset(datas, out, [k for k, d in enumerate(datas) if d])
    n = len(datas)
    ends = np.cumsum(np.fromiter(map(len, datas), dtype=np.int64, count=n))
    starts = ends - np.fromiter(map(len, datas), dtype=np.int64, count=n)
    buf = np.frombuffer(b"".join(datas), dtype=np.uint8)
    top = len(buf) - 7  # reads at clipped positions stay inside (the ``ok`` mask drops those messages anyway)
    if top < 0:
        return everything
    s = np.minimum(starts, top)
    ok = (ends - starts >= 7) & (buf[s] == MAGIC) & (buf[s + 1] == FORMAT_VECTORS) & (buf[s + 2] == _EXAMPLE_VERSION)
    head_len = buf[s + 3].astype(np.int64) | buf[s + 4].astype(np.int64) << 8 | buf[s + 5].astype(np.int64) << 16 \
        | buf[s + 6].astype(np.int64) << 24
    at = starts + 7 + head_len  # the history size
    ok &= at <= ends
    if not ok.all():
        return _subset(datas, out, np.flatnonzero(ok).tolist())
    local_at = (at - starts).tolist()
    heads_json = [d[7:a] for d, a in zip(datas, local_at)]
    try:
        heads = from_json(b"[" + b",".join(heads_json) + b"]", allow_inf_nan=False)
    except ValueError:  # find the messages whose head does not parse; the others go on
        return _subset(datas, out, [k for k, h in enumerate(heads_json) if _parses(h)])
    try:
        rows = list(map(_HEAD_GETTER, heads))  # KeyError: a field missing; TypeError: not an object
    except (KeyError, TypeError):
        return _subset(datas, out, [k for k, h in enumerate(heads) if type(h) is dict and _HEAD_KEYS_SET <= h.keys()])
    user = list(map(dict.get, heads, repeat("lum_user")))
    item = list(map(dict.get, heads, repeat("lum_item")))
    present = sum(map(dict.__contains__, heads, repeat("lum_user"))) + sum(map(dict.__contains__, heads,
                                                                             repeat("lum_item")))
    if sum(map(len, heads)) != len(_HEAD_KEYS) * n + present:  # some head has a key the encoder never writes
        return _subset(datas, out, [k for k, h in enumerate(heads) if h.keys() <= _HEAD_ALLOWED])
    cols = dict(zip(_HEAD_KEYS, map(list, zip(*rows))))
    for name, col in (*cols.items(), ("lum_user", user), ("lum_item", item)):
        where = None
        if name in _PLACEHOLDERS:  # absent or null: no vector; only the others are checked
            where = [k for k, v in enumerate(col) if v is not None]
            col = [col[k] for k in where]
        try:
            _column_adapter(name).validate_python(col, strict=True)
        except ValidationError as e:
            locs = [err["loc"][0] for err in e.errors(include_url=False) if err["loc"]]
            ok[[where[k] for k in locs] if where is not None else locs] = False
    # The model's consistency check: conditions and user vectors both present or absent, one vector each.
    n_user = [-1 if u is None else len(u) for u in user]
    ok &= np.array(n_user) == np.array([-1 if c is None else len(c) for c in cols["lum_conditions"]])
    # The binary part: u16 history size H, H item ids, H category ids, the vector sizes, the vectors.
    at = np.minimum(at, top)
    nh = buf[at].astype(np.int64) | buf[at + 1].astype(np.int64) << 8
    hist = at + 2
    dpos = hist + 16 * nh
    nv = np.maximum(n_user, 0) + np.array([v is not None for v in item])
    vpos = dpos + 2 * nv
    ok &= (nh <= MAX_HISTORY) & (vpos <= ends)
    nv[~ok] = 0
    row = np.repeat(np.arange(n), nv)
    p = np.minimum(np.repeat(dpos, nv) + 2 * (np.arange(len(row)) - np.repeat(np.cumsum(nv) - nv, nv)), top)
    dims = buf[p].astype(np.int64) | buf[p + 1].astype(np.int64) << 8
    ok &= np.bincount(row, (dims < 1) | (dims > MAX_VECTOR_DIM), minlength=n) == 0
    ok &= ends - vpos == 8 * np.bincount(row, dims, minlength=n).astype(np.int64)
    keep = np.flatnonzero(ok)
    if not len(keep):
        return everything
    # History ids and vector values of the messages still accepted, checked together.
    ks = keep.tolist()
    mine = [datas[k] for k in ks] if len(ks) < n else datas
    hist_l, dpos_l, vpos_l = ((x - starts)[keep].tolist() for x in (hist, dpos, vpos))
    ints = np.frombuffer(b"".join([d[a:b] for d, a, b in zip(mine, hist_l, dpos_l)]), dtype="<i8")
    raws = [d[v:] for d, v in zip(mine, vpos_l)]
    flat = np.frombuffer(b"".join(raws), dtype="<f8")
    sizes = (ends - vpos)[keep] // 8
    h_len = nh[keep]
    fine = np.ones(len(ks), dtype=bool)
    if len(flat):
        has = sizes > 0
        fine[has] = np.logical_and.reduceat(np.isfinite(flat), (np.cumsum(sizes) - sizes)[has])
    if len(ints) and ints.min() < 0:  # int64: never above MAX_ID
        fine &= np.bincount(np.repeat(np.arange(len(ks)), 2 * h_len), ints < 0, minlength=len(ks)) == 0
    if not fine.all():
        sel = np.flatnonzero(fine).tolist()
        ks, raws, h_len = [ks[j] for j in sel], [raws[j] for j in sel], h_len[sel]
        ints = np.concatenate([ints[o:o + 2 * h] for o, h in zip((np.cumsum(2 * nh[keep]) - 2 * nh[keep])[sel],
                                                                   h_len)]) if sel else ints[:0]
    if not ks:
        return everything
    # The parsed heads become the LazyVectors' attribute dicts: placeholders out, history and vector part in.
    ids, o_hist = ints.tolist(), (np.cumsum(2 * h_len) - 2 * h_len).tolist()
    h_sel = list(zip(o_hist, h_len.tolist()))
    extra = {"history_items": [ids[o:o + h] for o, h in h_sel],
             "history_categories": [ids[o + h:o + 2 * h] for o, h in h_sel]}
    nv0 = int(nv[0])
    if (nv == nv0).all() and (nv0 == 0 or (dims.reshape(n, nv0) == dims[:nv0]).all()):  # the usual fetch
        extra["_dims"] = repeat(tuple(dims[:nv0].tolist()))
    else:
        d_list, d_off, nv_l = dims.tolist(), (np.cumsum(nv) - nv).tolist(), nv.tolist()
        extra["_dims"] = [tuple(d_list[d_off[k]:d_off[k] + nv_l[k]]) for k in ks]
    extra["_raw"] = raws
    extra["_n_user"] = [None if n_user[k] < 0 else n_user[k] for k in ks]
    extra["_has_item"] = [item[k] is not None for k in ks]
    extra["_vecs"] = repeat(None)
    names = tuple(extra)
    new = LazyVectors.__new__
    for k, values in zip(ks, zip(*extra.values())):
        f = heads[k]
        if len(f) > len(_HEAD_KEYS):
            f.pop("lum_user", None)
            f.pop("lum_item", None)
        f.update(zip(names, values))
        ex = out[k] = new(LazyVectors)
        ex.__dict__ = f
    if len(ks) == n:
        return []
    done = set(ks)
    return [x for x in everything if x[0] not in done]


def _subset(datas: list[bytes], out: list, keep: list[int]) -> list[tuple[int, bytes | None]]:
    """``_lazy_columns`` of the messages ``keep`` only (the others failed a check that spans the whole fetch)."""
    part: list = [None] * len(keep)
    if keep and len(keep) < len(datas):
        _lazy_columns([datas[k] for k in keep], part)
    for k, r in zip(keep, part):
        out[k] = r
    return [(k, d) for k, d in enumerate(datas) if out[k] is None]


def _parses(head: bytes) -> bool:
    from pydantic_core import from_json

    try:
        from_json(head, allow_inf_nan=False)
        return True
    except ValueError:
        return False


def _decode_one(model: type[M], data: bytes | None) -> M | DecodeError:
    try:
        return decode(model, data)
    except Exception as e:  # noqa: BLE001  (one broken message never stops the others)
        return _as_decode_error(e)


def _as_decode_error(e: Exception) -> DecodeError:
    return e if isinstance(e, DecodeError) else DecodeError(f"undecodable: {type(e).__name__}: {e}"[:500])


_adapters: dict = {}


def _list_adapter(model):
    from pydantic import TypeAdapter

    if model not in _adapters:
        _adapters[model] = TypeAdapter(list[model])
    return _adapters[model]


def encode_user_sequence(seq: UserSequence) -> bytes:
    return bytes((MAGIC, FORMAT_SEQUENCE, 1)) + encode_sequence(seq)


def decode_user_sequence(data: bytes | None) -> UserSequence:
    if not data or len(data) < 3 or data[0] != MAGIC or data[1] != FORMAT_SEQUENCE:
        raise DecodeError("not a lum user-sequence record")
    if data[2] != 1:
        raise DecodeError(f"unknown user-sequence codec version {data[2]}")
    try:
        return decode_sequence(data[3:])
    except (ValueError, KeyError) as e:
        raise DecodeError(f"bad user-sequence record: {e}") from None


def _short(err: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem, with the field path: what an operator reads in the dead-letter topic."""
    parts = []
    for e in err.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "<message>"
        parts.append(f"{loc}: {e['msg']}")
    more = f" (+{err.error_count() - 5} more)" if err.error_count() > 5 else ""
    return f"invalid {model.__name__}: " + "; ".join(parts) + more
