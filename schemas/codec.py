"""Message encoding with a format header, so that a reader can tell formats and schema versions apart.

Every value lum-stream writes starts with three bytes: ``b"L"``, a format byte (``b"j"`` JSON, ``b"s"`` the
binary sequence codec of ``schemas.tokenize``, ``b"v"`` JSON scalars + binary vectors, ``b"b"`` all binary) and
the schema version (u8), followed by the payload. A reader refuses what it does not know with a ``DecodeError``
that says why; consumers send such messages to the dead-letter topic instead of crashing.

JSON goes through pydantic-core (Rust): ~440k encodes/s and ~190k strict decodes/s for a ``BehaviorEvent``
on one idle core (``benchmarks/bench_foundation.py``), several times what an agent worker processes (~30k
events/s), so the human-readable format costs the agents little. A ``TrainingExample`` is what the DLRM trainer
reads at its step's pace, so it is binary (little-endian throughout):

- version 4, ``b"L" b"b" 4``: version 3's layout with compact history columns. The flags byte's high bits give
  each history column's width: bits 4-5 the item ids', bits 6-7 the category ids' (code k: 2**k bytes, so 1, 2,
  4 or 8), and the history is H item ids then H category ids, unsigned little-endian at those widths (8 bytes:
  at most 2**63 - 1, as every id). The encoder writes the fewest bytes that hold the column's largest id (0 for
  an empty history); a reader takes any width. An example's history of 50 synthetic ids (items < 2**16, categories
  < 2**8) is 150 bytes instead of 800; 63-bit hashed ids stay 8 bytes. ``decode_columns`` reads a column with one
  numpy gather per width present in the fetch.
- version 3, ``b"L" b"b" 3`` (still read): a fixed 50-byte head ``<qqqqHBBHHHHHHH``: user_id, item_id, category_id,
  event_time_ms (int64), position (u16), label (u8), flags (u8: 1 query, 2 lum_model_version, 4 lum_conditions
  and lum_user, 8 lum_item present; no other bit), history length H, condition count C, then the byte lengths of
  example_id, request_id, scenario, query, lum_model_version (u16 each; 0 for an absent one); then C u16
  condition-name lengths, one u16 size per vector (the C user vectors in order, then the item vector), the five
  strings (UTF-8), the condition names, H int64 item ids, H int64 category ids and the vectors' float64 values,
  and nothing after.
- version 2, ``b"L" b"v" 2`` (still read): u32 length + a JSON head (the model without the history lists, each LUM
  vector replaced by the placeholder ``[0.0]``), then u16 H, H int64 item ids, H int64 category ids, one u16 size
  per vector and their float64 values.
- version 1, ``b"L" b"j" 1`` (still read): the model's JSON.

Vectors are float64 on the wire (values round-trip exactly; 8 bytes against ~19 characters of JSON) and must be
finite. Every bound the model declares (ids, times, string lengths in characters, the scenario's pattern, list
sizes, finiteness) is checked at decode, and a message that breaks one, or the layout, is a ``DecodeError``.
``decode`` gives the model (its LUM vectors' wire bytes kept, so that a trainer can stack a batch with one
``np.frombuffer``). ``decode_columns`` decodes a whole fetch into ``ExampleColumns``, numpy columns with no
per-message object: every check runs a column at a time, and a message it cannot vouch for is decoded on its own
(the model, or the same ``DecodeError`` as ``decode``: the one-message decoder is the reference). The DLRM
trainer featurizes those columns directly.
"""

from __future__ import annotations

import bisect
import re
import struct
import sys
from math import isfinite
from array import array
from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from .events import MAX_CONDITIONS, MAX_HISTORY, MAX_TIME_MS, MAX_VECTOR_DIM, MIN_TIME_MS, TrainingExample
from .tokenize import UserSequence, decode_sequence, encode_sequence

MAGIC = 0x4C  # "L"
FORMAT_JSON = 0x6A  # "j"
FORMAT_SEQUENCE = 0x73  # "s"
FORMAT_VECTORS = 0x76  # "v": JSON scalars + float64 vectors (TrainingExample v2)
FORMAT_BINARY = 0x62  # "b": all binary (TrainingExample v3, v4)
V2 = 2  # the version of the FORMAT_VECTORS layout
assert sys.byteorder == "little" and array("d").itemsize == 8  # the vector layout is native float64 LE
_BINARY_FIELDS = {"lum_user", "lum_item", "history_items", "history_categories"}

M = TypeVar("M", bound=BaseModel)


class DecodeError(ValueError):
    """A message that cannot be decoded or validated; ``str(err)`` is the reason for the dead letter."""


def _is_example(model: type[BaseModel]) -> bool:
    return model is TrainingExample


def encode(value: BaseModel) -> bytes:
    if type(value) is TrainingExample:
        return _encode_v4(value)
    version = type(value).SCHEMA_VERSION  # type: ignore[attr-defined]
    return bytes((MAGIC, FORMAT_JSON, version)) + value.__pydantic_serializer__.to_json(value)


def decode(model: type[M], data: bytes | None) -> M:
    if not data:
        raise DecodeError(f"empty message (expected {model.__name__})")
    if len(data) < 3 or data[0] != MAGIC:
        raise DecodeError(f"missing lum format header (first bytes {bytes(data[:8])!r})")
    version = model.SCHEMA_VERSION  # type: ignore[attr-defined]
    if _is_example(model) and data[1] in (FORMAT_BINARY, FORMAT_VECTORS):
        fmt, v = ((V3, V4), _decode_binary) if data[1] == FORMAT_BINARY else ((V2,), _decode_vectors)
        if data[2] not in fmt:
            raise DecodeError(f"unknown schema version {data[2]} for {model.__name__} (format {chr(data[1])!r} "
                              f"is version {' or '.join(map(str, fmt))})")
        return v(model, data)
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


# ------------------------------------------------------------------------------------ TrainingExample v2 (read)

def _encode_v2(value: BaseModel) -> bytes:
    """The version-2 bytes of ``value`` (no longer written; kept to test that they still decode)."""
    user, item = value.lum_user, value.lum_item  # type: ignore[attr-defined]
    head = value.__pydantic_serializer__.to_json(value, exclude=_BINARY_FIELDS)
    vecs = [*(user or ()), *([item] if item is not None else ())]
    hist_i, hist_c = value.history_items, value.history_categories  # type: ignore[attr-defined]
    return _vectors_frame(head, len(hist_i), array("q", hist_i).tobytes() + array("q", hist_c).tobytes(),
                          None if user is None else [len(v) for v in user], None if item is None else len(item),
                          array("d", [x for v in vecs for x in v]).tobytes())


def _vectors_frame(head: bytes, n_history: int, history: bytes, user_dims: Sequence[int] | None,
                   item_dim: int | None, vectors: bytes) -> bytes:
    """The version-2 layout from its parts: ``head`` the JSON without the binary fields."""
    start = bytes((MAGIC, FORMAT_VECTORS, V2))
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


# ------------------------------------------------------------------------------------ TrainingExample v3, v4

EXAMPLE_HEAD_FIELDS: tuple[str, ...] = tuple(f for f in TrainingExample.model_fields if f not in _BINARY_FIELDS)
V3, V4 = 3, 4  # the versions of the FORMAT_BINARY layout: v4 = v3 with history columns at their width
_START_V4 = bytes((MAGIC, FORMAT_BINARY, V4))
_HEAD = struct.Struct("<qqqqHBBHHHHHHH")
_HEAD_DTYPE = np.dtype([("user_id", "<i8"), ("item_id", "<i8"), ("category_id", "<i8"), ("event_time_ms", "<i8"),
                        ("position", "<u2"), ("label", "u1"), ("flags", "u1"), ("n_history", "<u2"),
                        ("n_cond", "<u2"), ("example_id", "<u2"), ("request_id", "<u2"), ("scenario", "<u2"),
                        ("query", "<u2"), ("lum_model_version", "<u2")])
assert _HEAD_DTYPE.itemsize == _HEAD.size
_AT = 3 + _HEAD.size  # where the u16 sizes start
_FLAGS_AT = _HEAD_DTYPE.fields["flags"][1]  # in the head
F_QUERY, F_VERSION, F_USER, F_ITEM = 1, 2, 4, 8  # flags; v4: bits 4-5 the item, 6-7 the category width code
# The strings in wire order, with the model's bounds in characters (min, max; a query present has at least one).
_BAD = object()  # a distinct value that breaks a bound
_STRINGS = (("example_id", 1, 256), ("request_id", 1, 128), ("scenario", 1, 64), ("query", 0, 256),
            ("lum_model_version", 0, 128))
_CONDITION_CHARS = 128


def history_width(values) -> int:
    """The version-4 width code of a history column: 0, 1, 2, 3 for 1, 2, 4, 8 bytes, the fewest that hold its
    largest value (``values`` non-negative ints; empty: 0)."""
    return bisect.bisect_right(_WIDTH_LIMITS, max(values, default=0))


def history_widths(values: np.ndarray) -> np.ndarray:
    """``history_width`` of each value on its own (int64 array, non-negative), as an int64 array."""
    return np.searchsorted(_WIDTH_LIMITS, values, side="right")


_WIDTH_LIMITS = (1 << 8, 1 << 16, 1 << 32)  # the first value each width code cannot hold (code 3: any id)
# History ids by width code, for reading and writing; 8 bytes read signed: a negative one is refused.
HISTORY_DTYPES = ("u1", "<u2", "<u4", "<i8")
_WIDTH_TYPECODES = ("B", "H", "I", "q")  # the same, as ``array`` typecodes
assert [array(c).itemsize for c in _WIDTH_TYPECODES] == [1, 2, 4, 8]


def encode_training_example(head: dict[str, object], n_history: int, history: bytes,
                            user_dims: Sequence[int] | None, item_dim: int | None, vectors: bytes, *,
                            widths: tuple[int, int]) -> bytes:
    """``encode(TrainingExample(...))``, byte for byte, from parts already in wire form and without a model object
    (the joiner's hot path; the caller vouches that the values are valid): ``head`` the other fields, keys exactly
    ``EXAMPLE_HEAD_FIELDS`` in that order; ``history`` the ``n_history`` item ids then as many category ids,
    unsigned little-endian at ``widths`` (the item and the category column's width codes, ``history_width``:
    the fewest bytes that hold the column); ``vectors`` float64 little-endian: the user vectors (sizes
    ``user_dims``, one per ``lum_conditions`` entry; None: no LUM features), then the item vector (size
    ``item_dim``; None: none)."""
    wi, wc = widths
    if (wi | wc) & -4:  # outside 0..3
        raise ValueError(f"TrainingExample history width codes {widths}: each 0..3")
    if tuple(head) != EXAMPLE_HEAD_FIELDS:
        raise ValueError(f"TrainingExample head fields {tuple(head)}, expected {EXAMPLE_HEAD_FIELDS}")
    conds, q, mv = head["lum_conditions"], head["query"], head["lum_model_version"]
    if (conds is None) != (user_dims is None) or conds is not None and len(conds) != len(user_dims):
        raise ValueError("TrainingExample: one user vector size per lum_conditions entry, both or neither")
    strs = [head["example_id"].encode(), head["request_id"].encode(), head["scenario"].encode(),
            b"" if q is None else q.encode(), b"" if mv is None else mv.encode()]
    names = [c.encode() for c in conds or ()]
    dims = [*(user_dims or ()), *(() if item_dim is None else (item_dim,))]
    flags = ((q is not None) | (mv is not None) << 1 | (conds is not None) << 2 | (item_dim is not None) << 3
             | wi << 4 | wc << 6)
    try:
        fixed = _HEAD.pack(head["user_id"], head["item_id"], head["category_id"], head["event_time_ms"],
                           head["position"], head["label"], flags, n_history, len(names), *map(len, strs))
        sizes = struct.pack(f"<{len(names) + len(dims)}H", *map(len, names), *dims)
    except struct.error as e:  # a value outside the model's bounds
        raise ValueError(f"TrainingExample does not fit the binary layout: {e}") from None
    return b"".join((_START_V4, fixed, sizes, *strs, *names, history, vectors))


def _model_parts(ex: TrainingExample) -> tuple[dict, list[int] | None, int | None, bytes]:
    """(head, user_dims, item_dim, vector bytes) of a model, as ``encode_training_example`` takes them."""
    user, item = ex.lum_user, ex.lum_item
    raw = (ex.__pydantic_private__ or {}).get("_lum_f64")  # the decoded bytes: the same values
    if raw is None:
        raw = array("d", [x for v in [*(user or ()), *(() if item is None else (item,))] for x in v]).tobytes()
    return ({f: getattr(ex, f) for f in EXAMPLE_HEAD_FIELDS}, None if user is None else [len(v) for v in user],
            None if item is None else len(item), raw)


def _encode_v4(ex: TrainingExample) -> bytes:
    head, user_dims, item_dim, raw = _model_parts(ex)
    wi, wc = history_width(ex.history_items), history_width(ex.history_categories)
    history = (array(_WIDTH_TYPECODES[wi], ex.history_items).tobytes()
               + array(_WIDTH_TYPECODES[wc], ex.history_categories).tobytes())
    return encode_training_example(head, len(ex.history_items), history, user_dims, item_dim, raw, widths=(wi, wc))


def _encode_v3(ex: TrainingExample) -> bytes:
    """The version-3 bytes of ``ex`` (no longer written; kept to test that they still decode): version 4's with
    both history columns 8 bytes wide, without the width bits."""
    head, user_dims, item_dim, raw = _model_parts(ex)
    history = array("q", ex.history_items).tobytes() + array("q", ex.history_categories).tobytes()
    data = bytearray(encode_training_example(head, len(ex.history_items), history, user_dims, item_dim, raw,
                                             widths=(3, 3)))
    data[2], data[3 + _FLAGS_AT] = V3, data[3 + _FLAGS_AT] & 15
    return bytes(data)


def _decode_binary(model: type[M], data: bytes) -> M:
    """One version-3 or version-4 message (the header says which): the layout read here, every value checked by
    the model itself (the reference that ``decode_columns`` agrees with)."""
    name, size = model.__name__, len(data)
    if size < _AT:
        raise DecodeError(f"truncated {name}: fixed head ({size} bytes)")
    uid, iid, cid, t, pos, label, flags, nh, nc, *lens = _HEAD.unpack_from(data, 3)
    if data[2] == V3:
        if flags >= 16:
            raise DecodeError(f"invalid {name}: unknown flags {flags:#04x}")
        wi = wc = 3
    else:
        wi, wc, flags = flags >> 4 & 3, flags >> 6, flags & 15
    user, item = flags & F_USER, flags & F_ITEM
    if nc and not user:
        raise DecodeError(f"invalid {name}: {nc} lum_conditions without lum_user")
    if lens[3] and not flags & F_QUERY or lens[4] and not flags & F_VERSION:
        raise DecodeError(f"invalid {name}: bytes for an absent query or lum_model_version")
    if nh > MAX_HISTORY or nc > MAX_CONDITIONS:
        raise DecodeError(f"invalid {name}: history of {nh} entries (at most {MAX_HISTORY}) or {nc} conditions "
                          f"(at most {MAX_CONDITIONS})")
    nv = (nc if user else 0) + (1 if item else 0)
    at = _AT + 2 * (nc + nv)
    if size < at:
        raise DecodeError(f"truncated {name}: sizes")
    sizes = struct.unpack_from(f"<{nc + nv}H", data, _AT)
    clens, dims = sizes[:nc], sizes[nc:]
    if dims and (min(dims) < 1 or max(dims) > MAX_VECTOR_DIM):
        raise DecodeError(f"invalid {name}: vector size outside 1..{MAX_VECTOR_DIM}: {list(dims)}")
    hi, hc = nh << wi, nh << wc  # the history columns' bytes
    need = at + sum(lens) + sum(clens) + hi + hc + 8 * sum(dims)
    if size != need:
        raise DecodeError(f"invalid {name}: {size} bytes, the layout says {need}")
    strs = []
    for (field, _, _), n in zip((*_STRINGS, *repeat(("lum_conditions", 0, 0), nc)), (*lens, *clens)):
        try:
            strs.append(bytes(data[at:at + n]).decode())
        except UnicodeDecodeError:
            raise DecodeError(f"invalid {name}: {field}: not UTF-8") from None
        at += n
    hist_i = array(_WIDTH_TYPECODES[wi], data[at:at + hi]).tolist()
    hist_c = array(_WIDTH_TYPECODES[wc], data[at + hi:at + hi + hc]).tolist()
    raw = bytes(data[at + hi + hc:])
    values, vecs, s = array("d", raw).tolist(), [], 0
    if not all(map(isfinite, values)):
        raise DecodeError(f"invalid {name}: non-finite value in a LUM vector")
    for d in dims:
        vecs.append(values[s:s + d])
        s += d
    fields = {"example_id": strs[0], "request_id": strs[1], "user_id": uid, "item_id": iid, "category_id": cid,
              "position": pos, "scenario": strs[2], "query": strs[3] if flags & F_QUERY else None,
              "event_time_ms": t, "label": label, "history_items": hist_i,
              "history_categories": hist_c,
              "lum_model_version": strs[4] if flags & F_VERSION else None,
              "lum_conditions": strs[5:] if user else None, "lum_user": vecs[:nc] if user else None,
              "lum_item": vecs[-1] if item else None}
    try:
        ex = model.model_validate(fields)
    except ValidationError as e:
        raise DecodeError(_short(e, model)) from None
    if raw:
        object.__setattr__(ex, "__pydantic_private__", {"_lum_f64": raw})  # see TrainingExample
    return ex


def _offsets(lens: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out


def _ranges(pos: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The indices ``pos[i] .. pos[i] + lens[i] - 1`` of every row, concatenated."""
    off = _offsets(lens)
    return np.repeat(pos - off[:-1], lens) + np.arange(off[-1])


class ExampleColumns(Sequence):
    """Many ``TrainingExample``s as columns: what ``decode_columns`` returns, and what the DLRM featurizes.

    Integer fields are int64 arrays; strings are sequences (lists, or for ``request_id``/``query`` a ``_Text``
    decoding each on read; ``query``/``lum_model_version`` None where absent, see ``present``; ``lum_conditions``
    a list per row or None: read-only, rows may share one); the histories are flat int64 arrays
    cut by ``hist_off``; the LUM vectors are one flat float64 array cut per row by ``vec_off`` into the sizes
    ``dims`` (cut by ``dims_off``: the ``n_user`` user vectors, -1 for None, then the item vector where
    ``has_item``). Indexing gives a row as ``LazyVectors`` (built on demand, for the rare reader that wants one), a
    slice gives columns; ``take``, ``concat`` and ``from_examples`` build new ones. Pickles as its arrays.
    """

    INTS = ("user_id", "item_id", "category_id", "position", "event_time_ms", "label")
    LISTS = ("example_id", "request_id", "scenario", "query", "lum_model_version", "lum_conditions")
    RAGGED = (("hist_off", ("history_items", "history_categories")), ("dims_off", ("dims",)),
              ("vec_off", ("vectors",)))
    ROWS = ("n_user", "has_item")

    def __init__(self, **cols):
        self.__dict__.update(cols)

    def __len__(self) -> int:
        return len(self.example_id)

    @classmethod
    def empty(cls) -> ExampleColumns:
        z = np.zeros(0, dtype=np.int64)
        return cls(**{c: z for c in cls.INTS}, **{c: [] for c in cls.LISTS}, n_user=z, has_item=z.astype(bool),
                   **{o: np.zeros(1, dtype=np.int64) for o, _ in cls.RAGGED}, history_items=z, history_categories=z,
                   dims=z, vectors=z.astype(np.float64))

    def __getitem__(self, i):
        if isinstance(i, slice):
            a, b, step = i.indices(len(self))
            if step != 1 or b <= a:
                return self.take(np.arange(a, b, step, dtype=np.int64))
            out = {c: getattr(self, c)[a:b] for c in (*self.INTS, *self.LISTS, *self.ROWS)}
            for off_name, names in self.RAGGED:
                off = getattr(self, off_name)
                out[off_name] = off[a:b + 1] - off[a]
                out.update({v: getattr(self, v)[off[a]:off[b]] for v in names})
            return ExampleColumns(**out)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self.row(i % n)

    def __iter__(self) -> Iterator[LazyVectors]:
        return map(self.row, range(len(self)))

    def __add__(self, other):  # padding at world size > 1 appends rows
        other = other if isinstance(other, ExampleColumns) else ExampleColumns.from_examples(list(other))
        return ExampleColumns.concat([self, other])

    def take(self, idx) -> ExampleColumns:
        idx = np.asarray(idx, dtype=np.int64)
        il = idx.tolist()
        out = {c: getattr(self, c)[idx] for c in (*self.INTS, *self.ROWS)}
        out.update({c: [getattr(self, c)[k] for k in il] for c in self.LISTS})
        for off_name, names in self.RAGGED:
            off = getattr(self, off_name)
            lens = (off[1:] - off[:-1])[idx]
            out[off_name] = _offsets(lens)
            src = _ranges(off[:-1][idx], lens)
            out.update({v: getattr(self, v)[src] for v in names})
        return ExampleColumns(**out)

    @classmethod
    def concat(cls, parts: list[ExampleColumns]) -> ExampleColumns:
        parts = [p for p in parts if len(p)] or parts[:1]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.empty()
        out = {c: np.concatenate([getattr(p, c) for p in parts]) for c in (*cls.INTS, *cls.ROWS)}
        for c in cls.LISTS:
            cs = [getattr(p, c) for p in parts]
            out[c] = _Text.concat(cs) if all(isinstance(x, _Text) for x in cs) else [x for y in cs for x in y]
        for off_name, names in cls.RAGGED:
            offs = [getattr(p, off_name) for p in parts]
            shift = np.cumsum([0] + [o[-1] for o in offs[:-1]])
            out[off_name] = np.concatenate([offs[0][:1]] + [o[1:] + s for o, s in zip(offs, shift)])
            out.update({v: np.concatenate([getattr(p, v) for p in parts]) for v in names})
        return cls(**out)

    @classmethod
    def from_examples(cls, exs: list) -> ExampleColumns:
        """From models or ``LazyVectors`` (the slow path: examples decoded from older versions, padding rows)."""
        n = len(exs)
        out = {c: np.fromiter((getattr(e, c) for e in exs), dtype=np.int64, count=n) for c in cls.INTS}
        out.update({c: [getattr(e, c) for e in exs] for c in cls.LISTS})
        out["lum_conditions"] = [None if c is None else list(c) for c in out["lum_conditions"]]
        hist_i, hist_c = [e.history_items for e in exs], [e.history_categories for e in exs]
        out["hist_off"] = _offsets(np.fromiter(map(len, hist_i), dtype=np.int64, count=n))
        out["history_items"] = np.array([x for h in hist_i for x in h], dtype=np.int64)
        out["history_categories"] = np.array([x for h in hist_c for x in h], dtype=np.int64)
        raws, dims, n_user, has_item = [], [], [], []
        for e in exs:
            if isinstance(e, LazyVectors):
                raws.append(e._raw)
                dims.append(e._dims)
                n_user.append(-1 if e._n_user is None else e._n_user)
                has_item.append(e._has_item)
                continue
            vecs = [*(e.lum_user or ()), *(() if e.lum_item is None else (e.lum_item,))]
            raws.append(array("d", [x for v in vecs for x in v]).tobytes())
            dims.append(tuple(map(len, vecs)))
            n_user.append(-1 if e.lum_user is None else len(e.lum_user))
            has_item.append(e.lum_item is not None)
        out["dims_off"] = _offsets(np.fromiter(map(len, dims), dtype=np.int64, count=n))
        out["dims"] = np.array([d for ds in dims for d in ds], dtype=np.int64)
        out["vectors"] = np.frombuffer(b"".join(raws), dtype="<f8")
        out["vec_off"] = _offsets(np.fromiter((len(r) // 8 for r in raws), dtype=np.int64, count=n))
        out["n_user"], out["has_item"] = np.array(n_user, dtype=np.int64), np.array(has_item, dtype=bool)
        return cls(**out)

    def row(self, i: int) -> LazyVectors:
        h0, h1 = int(self.hist_off[i]), int(self.hist_off[i + 1])
        fields = {c: getattr(self, c)[i] for c in self.LISTS}
        fields.update({c: int(getattr(self, c)[i]) for c in self.INTS})
        if fields["lum_conditions"] is not None:
            fields["lum_conditions"] = list(fields["lum_conditions"])
        fields["history_items"] = self.history_items[h0:h1].tolist()
        fields["history_categories"] = self.history_categories[h0:h1].tolist()
        fields = {f: fields[f] for f in TrainingExample.model_fields if f in fields}  # the model's order
        n_user = int(self.n_user[i])
        return LazyVectors(fields, self.vectors[self.vec_off[i]:self.vec_off[i + 1]].tobytes(),
                           tuple(self.dims[self.dims_off[i]:self.dims_off[i + 1]].tolist()),
                           None if n_user < 0 else n_user, bool(self.has_item[i]))

    def present(self, column: str) -> np.ndarray:
        """Where ``column`` (a string field) is not None, as a bool array."""
        col = getattr(self, column)
        if isinstance(col, _Text):
            return col.is_present()
        return np.fromiter((x is not None for x in col), dtype=bool, count=len(col))

    def to_models(self) -> list[TrainingExample]:
        return [r.to_model() for r in self]


def decode_columns(datas: list[bytes | None]) -> tuple[ExampleColumns, dict[int, DecodeError]]:
    """The messages of a fetch: (the examples among them, in order, as columns; {index: DecodeError} of the others).

    Version-3 and -4 messages are checked and converted a column at a time (``_binary_columns``); a pass that finds
    messages it cannot vouch for runs again without them, and those, with any other message (older versions, a bad
    header), are decoded one at a time: the model (added to the columns in its place) or the ``DecodeError`` of
    ``decode``.
    """
    idx = list(range(len(datas))) if all(datas) else [i for i, d in enumerate(datas) if d]  # headers: in the pass
    cols = None
    while idx:
        try:
            r = _binary_columns([datas[i] for i in idx])
        except Exception:  # noqa: BLE001  (an unforeseen corruption: message by message, never a crash)
            r = np.zeros(len(idx), dtype=bool)
        if isinstance(r, ExampleColumns):
            cols = r
            break
        idx = [i for i, k in zip(idx, r.tolist()) if k] if not r.all() else []
    if len(idx) == len(datas):
        return cols if cols is not None else ExampleColumns.empty(), {}
    done, errors, objs, where = set(idx), {}, [], []
    for i, d in enumerate(datas):
        if i not in done:
            x = _decode_one(TrainingExample, d)
            if isinstance(x, DecodeError):
                errors[i] = x
            else:
                objs.append(x)
                where.append(i)
    if objs:
        more = ExampleColumns.from_examples(objs)
        if cols is None:
            cols = more
        else:
            cols = ExampleColumns.concat([cols, more]).take(np.argsort(np.array(idx + where), kind="stable"))
    return cols if cols is not None else ExampleColumns.empty(), errors


def _binary_columns(datas: list[bytes]) -> ExampleColumns | np.ndarray:
    """Version-3 and -4 messages as columns if every check passes for every one; else a mask of those not yet
    refused (the caller runs again on those). The checks are ``_decode_binary``'s and the model's, a column at a
    time; v3's history is v4's at width code 3 (8 bytes) for both columns."""
    n = len(datas)
    lens = np.fromiter(map(len, datas), dtype=np.int64, count=n)
    ends = np.cumsum(lens)
    starts = ends - lens
    joined = b"".join(datas)
    buf = np.frombuffer(joined, dtype=np.uint8)
    ok = lens >= _AT
    if not ok.all():
        return ok
    raw_head = buf[starts[:, None] + np.arange(_AT)]
    v4 = raw_head[:, 2] == V4
    ok &= (raw_head[:, 0] == MAGIC) & (raw_head[:, 1] == FORMAT_BINARY) & (v4 | (raw_head[:, 2] == V3))
    head = np.ascontiguousarray(raw_head[:, 3:]).view(_HEAD_DTYPE)[:, 0]
    flags = head["flags"]
    ok &= v4 | (flags < 16)  # v3 has no width bits: its history is int64
    wi = np.where(v4, flags >> 4 & 3, 3).astype(np.int64)  # width codes
    wc = np.where(v4, flags >> 6, 3).astype(np.int64)
    flags = flags & 15
    nh, nc = head["n_history"].astype(np.int64), head["n_cond"].astype(np.int64)
    user, item, has_q, has_mv = ((flags & f) != 0 for f in (F_USER, F_ITEM, F_QUERY, F_VERSION))
    sl = {f: head[f].astype(np.int64) for f, _, _ in _STRINGS}
    t = head["event_time_ms"]
    ok &= ((head["user_id"] >= 0) & (head["item_id"] >= 0) & (head["category_id"] >= 0) & (t >= MIN_TIME_MS)
           & (t <= MAX_TIME_MS) & (head["position"] <= 1000) & (head["label"] <= 1)
           & (nh <= MAX_HISTORY) & (nc <= MAX_CONDITIONS) & (user | (nc == 0)) & (has_q | (sl["query"] == 0))
           & (has_mv | (sl["lum_model_version"] == 0)) & (~has_q | (sl["query"] > 0)))
    for f, lo, hi in _STRINGS:  # in bytes: at least lo characters, at most 4 bytes each (the count comes later)
        ok &= (sl[f] >= lo) & (sl[f] <= 4 * hi)
    nv = np.where(user, nc, 0) + item
    ns = nc + nv
    s_pos = starts + _AT + 2 * ns
    ok &= s_pos <= ends
    if not ok.all():
        return ok
    # The u16 sizes: C condition-name lengths, then the vector sizes.
    s_row = np.repeat(np.arange(n), ns)
    k = np.arange(len(s_row)) - np.repeat(_offsets(ns)[:-1], ns)
    p = np.repeat(starts + _AT, ns) + 2 * k
    sizes = buf[p].astype(np.int64) | buf[p + 1].astype(np.int64) << 8
    is_name = k < nc[s_row]
    clen, dims = sizes[is_name], sizes[~is_name]
    d_row = s_row[~is_name]
    name_bytes = np.bincount(s_row[is_name], clen, minlength=n).astype(np.int64)
    ok &= np.bincount(d_row, (dims < 1) | (dims > MAX_VECTOR_DIM), minlength=n) == 0
    ok &= (clen <= 4 * _CONDITION_CHARS).all() or np.bincount(s_row[is_name], clen > 4 * _CONDITION_CHARS,
                                                                  minlength=n) == 0
    p_names = s_pos + sum(sl.values())
    p_hist = p_names + name_bytes
    p_cat = p_hist + (nh << wi)
    p_vec = p_cat + (nh << wc)
    ok &= p_vec + 8 * np.bincount(d_row, dims, minlength=n).astype(np.int64) == ends
    if not ok.all():
        return ok
    # Strings. Example ids (one per example) as one UTF-8 text cut per row; the others repeat (scenarios, model
    # versions, condition lists, requests and queries shared by examples), so each distinct value is checked and
    # decoded once, found by its key: the field's length (and presence flag) and bytes.
    cols: dict = {}
    ids, chars = _strings(buf, s_pos, sl["example_id"], ok)
    if ids is None:
        return ok
    ok &= (chars >= 1) & (chars <= 256)
    cols["example_id"] = ids
    at = s_pos + sl["example_id"]
    for f, lo, hi in _STRINGS[1:]:
        if f in ("request_id", "query"):  # mostly distinct, never read by the trainer: checked, kept as bytes
            text, chars = _strings(buf, at, sl[f], ok, lazy=True)
            if text is None:
                return ok
            ok &= (chars >= lo) & (chars <= hi)
            if f == "query":
                text.present = has_q
            cols[f] = text
            at = at + sl[f]
            continue
        cols[f] = _distinct(joined, [(at, at + sl[f])], _TEXT_PARSERS[f], ok,
                            has_mv if f == "lum_model_version" else None)
        at = at + sl[f]
    cols["lum_conditions"] = _distinct(joined, [(starts + _AT, starts + _AT + 2 * nc), (p_names, p_hist)],
                                       _parse_conditions, ok, user)
    # History ids (unsigned at their width; 8 bytes: non-negative int64) and vector values (finite).
    h_off = _offsets(nh)
    hist_i, hist_c = _history_column(buf, p_hist, nh, wi, h_off), _history_column(buf, p_cat, nh, wc, h_off)
    for ints in (hist_i, hist_c):
        if len(ints) and ints.min() < 0:
            ok &= np.bincount(np.repeat(np.arange(n), nh), ints < 0, minlength=n) == 0
    mem = memoryview(joined)
    vectors = np.frombuffer(b"".join([mem[a:b] for a, b in zip(p_vec.tolist(), ends.tolist())]), dtype="<f8")
    vec_len = (ends - p_vec) // 8
    vec_off = _offsets(vec_len)
    fin = np.isfinite(vectors)
    if not fin.all():
        ok &= np.bincount(np.repeat(np.arange(n), vec_len), ~fin, minlength=n) == 0
    if not ok.all():
        return ok
    # Accepted: the columns.
    out = {f: head[f].astype(np.int64) for f in ExampleColumns.INTS}
    out.update(cols)
    d_off = _offsets(nv)
    return ExampleColumns(**out, hist_off=h_off, history_items=hist_i, history_categories=hist_c,
                          n_user=np.where(user, nc, -1), has_item=item, dims_off=d_off, dims=dims,
                          vec_off=vec_off, vectors=vectors)




def _history_column(buf: np.ndarray, pos: np.ndarray, nh: np.ndarray, code: np.ndarray,
                    off: np.ndarray) -> np.ndarray:
    """One history column of every row (``nh`` ids at ``pos``, ``1 << code`` bytes each) as one int64 array cut by
    ``off``: one gather per width present (a fetch from one joiner mostly has one)."""
    present = np.unique(code[nh > 0]).tolist() if len(nh) else []
    if len(present) <= 1:
        c = present[0] if present else 3
        return buf[_ranges(pos, nh << c)].view(HISTORY_DTYPES[c]).astype(np.int64, copy=False)
    out = np.empty(int(off[-1]), dtype=np.int64)
    for c in present:
        rows = np.flatnonzero((code == c) & (nh > 0))
        out[_ranges(off[rows], nh[rows])] = buf[_ranges(pos[rows], nh[rows] << c)].view(HISTORY_DTYPES[c])
    return out


def _distinct(joined: bytes, segs: list, parse, ok: np.ndarray, present: np.ndarray | None = None) -> list:
    """Per row, ``parse(*key)``, the key being the bytes of the row's segments (``segs``: (starts, ends) arrays),
    parsed once per distinct key (C-level maps over the rows); None where ``present`` is False. Rows whose value is
    ``_BAD`` are cleared in ``ok``."""
    cols = [list(map(joined.__getitem__, map(slice, a.tolist(), b.tolist()))) for a, b in segs]
    keys = cols[0] if len(cols) == 1 else list(zip(*cols))
    table = dict.fromkeys(keys)
    for k in table:
        table[k] = parse(k) if len(cols) == 1 else parse(*k)
    values = list(map(table.__getitem__, keys))
    if present is not None and not present.all():
        values = [v if p else None for v, p in zip(values, present.tolist())]
    if any(v is _BAD for v in table.values()):
        ok &= np.fromiter((v is not _BAD for v in values), dtype=bool, count=len(values))
    return values


def _text_parser(lo: int, hi: int, pattern=None):
    """UTF-8 bytes -> the string, or ``_BAD`` if not UTF-8 or out of bounds."""
    def parse(data: bytes):
        try:
            s = data.decode()
        except UnicodeDecodeError:
            return _BAD
        return s if lo <= len(s) <= hi and (pattern is None or pattern(s)) else _BAD
    return parse


_TEXT_PARSERS = {f: _text_parser(lo, hi, re.compile(r"[A-Za-z0-9_.:-]+").fullmatch if f == "scenario" else None)
                 for f, lo, hi in _STRINGS}


def _parse_conditions(sizes: bytes, names: bytes):
    """The u16 name lengths and the names -> the condition list, or ``_BAD``."""
    out, at = [], 0
    for ln in struct.unpack(f"<{len(sizes) // 2}H", sizes):
        try:
            s = names[at:at + ln].decode()
        except UnicodeDecodeError:
            return _BAD
        if len(s) > _CONDITION_CHARS:
            return _BAD
        out.append(s)
        at += ln
    return out


def _strings(buf: np.ndarray, pos: np.ndarray, lens: np.ndarray, ok: np.ndarray, lazy: bool = False):
    """The UTF-8 strings at ``[pos, pos + lens)``: (strings, characters of each); ``lazy``: the strings as a
    ``_Text`` (checked, decoded when read). Not UTF-8: (None, a mask of the strings that are), with those also
    cleared in ``ok`` where ``ok`` has one entry per string."""
    n = len(pos)
    off = _offsets(lens)
    if off[-1] == 0:
        return (_Text(b"", off) if lazy else [""] * n), lens
    raw = buf[_ranges(pos, lens)]
    if raw.max() < 0x80:
        if lazy:
            return _Text(raw.tobytes(), off), lens
        text, coff, chars = raw.tobytes().decode("ascii"), off.tolist(), lens
    else:
        lead = (raw & 0xC0) != 0x80
        # A string may not start inside a character; then the concatenation is UTF-8 if and only if each one is.
        good = (lens == 0) | lead[np.minimum(off[:-1], len(raw) - 1)]
        text = None
        if good.all():
            try:
                text = raw.tobytes().decode("utf-8")
            except UnicodeDecodeError:
                pass
        if text is None:
            good &= np.array([_utf8(raw[a:b].tobytes()) for a, b in zip(off[:-1].tolist(), off[1:].tolist())],
                             dtype=bool)
            ok &= good
            return None, good
        chars = np.bincount(np.repeat(np.arange(n), lens), lead, minlength=n).astype(np.int64)
        if lazy:
            return _Text(raw.tobytes(), off), chars
        coff = _offsets(chars).tolist()
    return [text[a:b] for a, b in zip(coff, coff[1:])], chars


class _Text(Sequence):
    """A column of strings kept as their (checked) UTF-8 bytes, each decoded when read: for fields the trainer
    never reads (request ids, queries: only whether one is present). ``present``: False where the value is None."""

    def __init__(self, data: bytes, off: np.ndarray, present: np.ndarray | None = None):
        self.data, self.off, self.present = data, off, present

    def __len__(self) -> int:
        return len(self.off) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            a, b, step = i.indices(len(self))
            if step != 1 or b < a:
                return [self[k] for k in range(a, b, step)]
            return _Text(self.data, self.off[a:b + 1], None if self.present is None else self.present[a:b])
        if self.present is not None and not self.present[i]:
            return None
        return self.data[self.off[i]:self.off[i + 1]].decode()

    def __iter__(self):
        return iter([self[i] for i in range(len(self))])

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def is_present(self) -> np.ndarray:
        return np.ones(len(self), dtype=bool) if self.present is None else self.present

    @classmethod
    def concat(cls, parts: list[_Text]) -> _Text:
        offs = [p.off - p.off[0] for p in parts]
        shift = np.cumsum([0] + [o[-1] for o in offs[:-1]])
        return cls(b"".join([p.data[p.off[0]:p.off[-1]] for p in parts]),
                   np.concatenate([offs[0][:1]] + [o[1:] + s for o, s in zip(offs, shift)]),
                   None if all(p.present is None for p in parts) else np.concatenate([p.is_present() for p in parts]))

    def __reduce__(self):  # only this column's bytes
        a, b = int(self.off[0]), int(self.off[-1])
        return _Text, (self.data[a:b], self.off - a, self.present)


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ------------------------------------------------------------------------------------ many messages

def decode_many(model: type[M], datas: list[bytes | None], chunk: int = 64,
                lazy_vectors: bool = False) -> list[M | DecodeError]:
    """``decode`` of many messages: each result is the model or the ``DecodeError`` of that message.

    ``TrainingExample`` versions 3 and 4 with ``lazy_vectors``: ``decode_columns``'s rows (``LazyVectors``). Version 2:
    the JSON heads validated ``chunk`` at a time in one pydantic call (a chunk that fails is retried one message at
    a time), the vector parts of all of them checked together (``_attach_many``); ``lazy_vectors``: as
    ``LazyVectors``. Anything else is decoded on its own.
    """
    out: list = [None] * len(datas)
    example = _is_example(model)
    v2: list[tuple[int, bytes, bytes, int]] = []  # (index, data, JSON head, offset of the vector part)
    binary: list[int] = []
    for i, d in enumerate(datas):
        if example and d and len(d) >= 3 and d[0] == MAGIC:
            if lazy_vectors and d[1] == FORMAT_BINARY and d[2] in (V3, V4):
                binary.append(i)
                continue
            if d[1] == FORMAT_VECTORS and d[2] == V2:
                try:
                    v2.append((i, d, *_split(model.__name__, d)))
                except DecodeError as e:
                    out[i] = e
                continue
        out[i] = _decode_one(model, d)
    if binary:
        cols, errors = decode_columns([datas[i] for i in binary])
        rows = iter(cols)
        for j, i in enumerate(binary):
            out[i] = errors[j] if j in errors else next(rows)
    attach = []
    for c in range(0, len(v2), chunk):
        part = v2[c:c + chunk]
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
