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
``np.frombuffer``. Version-1 JSON still decodes.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Sequence
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
    # JSON: the current version, or version 1 of a model whose newer versions changed only the encoding.
    if data[2] != version and not (data[2] == 1 and _binary_vectors(model)):
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
    name = type(ex).__name__
    try:
        (nh,) = struct.unpack_from("<H", data, at)
    except struct.error:
        raise DecodeError(f"truncated {name}: history size") from None
    at += 2
    if nh > MAX_HISTORY or len(data) < at + 16 * nh:
        raise DecodeError(f"invalid {name}: history of {nh} entries (at most {MAX_HISTORY}) or truncated")
    if nh:
        items, cats = array("q", data[at:at + 8 * nh]), array("q", data[at + 8 * nh:at + 16 * nh])
        if min(items) < 0 or min(cats) < 0:  # int64: never above MAX_ID
            raise DecodeError(f"invalid {name}: negative id in history")
        ex.__dict__["history_items"], ex.__dict__["history_categories"] = items.tolist(), cats.tolist()
    at += 16 * nh
    user, item = ex.lum_user, ex.lum_item
    nv = (len(user) if user is not None else 0) + (item is not None)
    if nv == 0:
        if len(data) != at:
            raise DecodeError(f"invalid {name}: {len(data) - at} vector bytes, expected 0")
        return ex
    try:
        dims = struct.unpack_from(f"<{nv}H", data, at)
    except struct.error:
        raise DecodeError(f"truncated {name}: vector sizes") from None
    at += 2 * nv
    if not all(1 <= d <= MAX_VECTOR_DIM for d in dims):
        raise DecodeError(f"invalid {name}: vector size outside 1..{MAX_VECTOR_DIM}: {list(dims)}")
    total = sum(dims)
    if len(data) - at != 8 * total:
        raise DecodeError(f"invalid {name}: {len(data) - at} vector bytes, expected {8 * total}")
    raw = bytes(data[at:])
    values = array("d", raw).tolist()  # float64 little-endian (checked at import) -> Python floats
    if not all(map(math.isfinite, values)):
        raise DecodeError(f"invalid {name}: non-finite value in a LUM vector")
    vecs, i = [], 0
    for d in dims:
        vecs.append(values[i:i + d])
        i += d
    # Sizes and finiteness are checked above as the model declares them; the count of user vectors is the
    # validated placeholders' count. Setting them on the fresh, unshared instance skips re-validating a few
    # hundred floats per message (and a copy).
    if user is not None:
        ex.__dict__["lum_user"] = vecs[:len(user)]
    if item is not None:
        ex.__dict__["lum_item"] = vecs[-1]
    object.__setattr__(ex, "__pydantic_private__", {"_lum_f64": raw})  # see TrainingExample
    return ex


def _decode_vectors(model: type[M], data: bytes) -> M:
    head, at = _split(model.__name__, data)
    try:
        ex = model.model_validate_json(head)
    except ValidationError as e:
        raise DecodeError(_short(e, model)) from None
    return _attach_vectors(ex, data, at)


def decode_many(model: type[M], datas: list[bytes | None]) -> list[M | DecodeError]:
    """``decode`` of many messages: each result is the model or the ``DecodeError`` of that message.

    For binary-vector messages the JSON heads are validated in one pydantic call (per-call overhead is most of
    a small message's cost); any failure in that call falls back to one message at a time.
    """
    version = getattr(model, "SCHEMA_VERSION", None)
    if _binary_vectors(model) and datas and all(
            d and len(d) >= 7 and d[0] == MAGIC and d[1] == FORMAT_VECTORS and d[2] == version for d in datas):
        try:
            parts = [_split(model.__name__, d) for d in datas]
            heads = _list_adapter(model).validate_json(b"[" + b",".join(h for h, _ in parts) + b"]")
        except (DecodeError, ValidationError):
            pass
        else:
            out: list = []
            for ex, d, (_, at) in zip(heads, datas, parts):
                try:
                    out.append(_attach_vectors(ex, d, at))
                except Exception as e:  # noqa: BLE001  (one broken message never stops the others)
                    out.append(_as_decode_error(e))
            return out
    out = []
    for d in datas:
        try:
            out.append(decode(model, d))
        except Exception as e:  # noqa: BLE001
            out.append(_as_decode_error(e))
    return out


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
