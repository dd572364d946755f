"""Message encoding with a format header, so that a reader can tell formats and schema versions apart.

Every value lum-stream writes starts with three bytes: ``b"L"``, a format byte (``b"j"`` JSON, ``b"s"`` the
binary sequence codec of ``schemas.tokenize``, ``b"v"`` JSON scalars + binary vectors) and the schema version
(u8), followed by the payload. A reader refuses what it does not know with a ``DecodeError`` that says why;
consumers send such messages to the dead-letter topic instead of crashing.

JSON goes through pydantic-core (Rust), fast enough for the events (``benchmarks/bench_foundation.py``
measures it). A ``TrainingExample`` carries K+1 LUM vectors, whose JSON dominates its size and decode time,
so from schema version 2 it is written as ``b"L" b"v" 2`` + u32 length + the JSON of every field except the
LUM ones + the LUM part (little-endian)::

    u16 K (0xFFFF: no user vectors), K x (u16 n + n UTF-8 bytes of the condition name), K x u16 dim,
    u16 item dim (0xFFFF: no item vector), then float64 values: the K user vectors, then the item vector

Vectors are float64 on the wire (values round-trip exactly, as in JSON; 8 bytes against ~19 characters) and
must be finite. The decoded example keeps those bytes so that a trainer can stack a batch's vectors with one
``np.frombuffer``. Version-1 JSON still decodes.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from .events import MAX_CONDITIONS, MAX_VECTOR_DIM
from .tokenize import UserSequence, decode_sequence, encode_sequence

MAGIC = 0x4C  # "L"
FORMAT_JSON = 0x6A  # "j"
FORMAT_SEQUENCE = 0x73  # "s"
FORMAT_VECTORS = 0x76  # "v": JSON scalars + float64 vectors (TrainingExample v2)
_NONE = 0xFFFF
assert sys.byteorder == "little" and array("d").itemsize == 8  # the vector layout is native float64 LE
_LUM_FIELDS = {"lum_conditions", "lum_user", "lum_item"}

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
    head = value.__pydantic_serializer__.to_json(value, exclude=_LUM_FIELDS)
    conds, user, item = value.lum_conditions, value.lum_user, value.lum_item  # type: ignore[attr-defined]
    parts = [bytes((MAGIC, FORMAT_VECTORS, version)), struct.pack("<I", len(head)), head]
    if conds is None:
        parts.append(struct.pack("<H", _NONE))
    else:
        parts.append(struct.pack("<H", len(conds)))
        for c in conds:
            b = c.encode()
            parts += [struct.pack("<H", len(b)), b]
        parts.append(struct.pack(f"<{len(user)}H", *(len(v) for v in user)))
    parts.append(struct.pack("<H", _NONE if item is None else len(item)))
    vecs = [*(user or ()), *([item] if item is not None else ())]
    if vecs:
        parts.append(array("d", [x for v in vecs for x in v]).tobytes())
    return b"".join(parts)


def _decode_vectors(model: type[M], data: bytes) -> M:
    name = model.__name__
    try:
        (n,) = struct.unpack_from("<I", data, 3)
        at = 7 + n
        head = data[7:at]
        if len(head) != n:
            raise DecodeError(f"truncated {name}: JSON part")
        (k,) = struct.unpack_from("<H", data, at)
        at += 2
        conds = dims = None
        if k != _NONE:
            if k > MAX_CONDITIONS:
                raise DecodeError(f"invalid {name}: lum_conditions: {k} conditions > {MAX_CONDITIONS}")
            conds = []
            for _ in range(k):
                (m,) = struct.unpack_from("<H", data, at)
                conds.append(bytes(data[at + 2:at + 2 + m]).decode())
                at += 2 + m
            dims = list(struct.unpack_from(f"<{k}H", data, at))
            at += 2 * k
        (d_item,) = struct.unpack_from("<H", data, at)
        at += 2
    except (struct.error, UnicodeDecodeError) as e:
        raise DecodeError(f"truncated or corrupt {name} (binary vectors): {e}") from None
    all_dims = [*(dims or ()), *([d_item] if d_item != _NONE else ())]
    if any(not 1 <= d <= MAX_VECTOR_DIM for d in all_dims):
        raise DecodeError(f"invalid {name}: vector size outside 1..{MAX_VECTOR_DIM}: {all_dims}")
    total = sum(all_dims)
    if len(data) - at != 8 * total:
        raise DecodeError(f"invalid {name}: {len(data) - at} vector bytes, expected {8 * total}")
    raw = bytes(data[at:])
    values = array("d", raw).tolist()  # float64 little-endian (checked at import) -> Python floats
    if not all(map(math.isfinite, values)):
        raise DecodeError(f"invalid {name}: non-finite value in a LUM vector")
    try:
        ex = model.model_validate_json(head)
    except ValidationError as e:
        raise DecodeError(_short(e, model)) from None
    if conds is None and d_item == _NONE:
        return ex
    user, i = None, 0
    if conds is not None:
        user = []
        for d in dims:
            user.append(values[i:i + d])
            i += d
    item = values[i:] if d_item != _NONE else None
    # The LUM fields are checked above exactly as the model declares them (sizes, finiteness, one vector per
    # condition by construction); setting them on the fresh, unshared instance skips re-validating a few
    # hundred floats per message (and a copy).
    ex.__dict__.update(lum_conditions=conds, lum_user=user, lum_item=item)
    ex.__pydantic_fields_set__.update(_LUM_FIELDS)
    object.__setattr__(ex, "__pydantic_private__", {"_lum_f64": raw})  # see TrainingExample
    return ex


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
