"""Message encoding with a format header, so that a reader can tell formats and schema versions apart.

Every value lum-stream writes starts with three bytes: ``b"L"``, a format byte (``b"j"`` JSON, ``b"s"`` the
binary sequence codec of ``schemas.tokenize``) and the schema version (u8), followed by the payload. A reader
refuses what it does not know with a ``DecodeError`` that says why; consumers send such messages to the
dead-letter topic instead of crashing.

JSON goes through pydantic-core (Rust): ~440k encodes/s and ~190k strict decodes/s for a ``BehaviorEvent``
on one idle core (``benchmarks/bench_foundation.py``), several times what an agent worker processes (~30k
events/s), so the human-readable format costs the agents little.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from .tokenize import UserSequence, decode_sequence, encode_sequence

MAGIC = 0x4C  # "L"
FORMAT_JSON = 0x6A  # "j"
FORMAT_SEQUENCE = 0x73  # "s"

M = TypeVar("M", bound=BaseModel)


class DecodeError(ValueError):
    """A message that cannot be decoded or validated; ``str(err)`` is the reason for the dead letter."""


def encode(value: BaseModel) -> bytes:
    version = type(value).SCHEMA_VERSION  # type: ignore[attr-defined]
    return bytes((MAGIC, FORMAT_JSON, version)) + value.__pydantic_serializer__.to_json(value)


def decode(model: type[M], data: bytes | None) -> M:
    if not data:
        raise DecodeError(f"empty message (expected {model.__name__})")
    if len(data) < 3 or data[0] != MAGIC:
        raise DecodeError(f"missing lum format header (first bytes {bytes(data[:8])!r})")
    if data[1] != FORMAT_JSON:
        raise DecodeError(f"format {chr(data[1])!r} is not JSON (expected {model.__name__})")
    if data[2] != model.SCHEMA_VERSION:  # type: ignore[attr-defined]
        raise DecodeError(f"unknown schema version {data[2]} for {model.__name__} "
                          f"(this build reads version {model.SCHEMA_VERSION})")  # type: ignore[attr-defined]
    try:
        return model.model_validate_json(data[3:])
    except ValidationError as e:
        raise DecodeError(_short(e, model)) from None


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
