"""The dead-letter contract (topic ``dead-letters``): a message a consumer could not process, bounded in size.

A ``DeadLetter`` holds at most ``max_bytes`` of the original value (a prefix, base64) and 1 KiB of the
original key, plus the original sizes and the SHA-256 of the full value, the reason, the source
topic/partition/offset and the consumer's name. So a dead letter for a message of any size fits the
dead-letter topic (``LUM_KAFKA_DEAD_LETTER_MAX_BYTES``, default 64 KiB, at most 512 KiB: base64 of that
plus the rest stays under Kafka's default 1 MB message limit); when the value was cut, ``truncated`` is
true and the reason names the limit. ``original_value`` returns the bytes kept; the hash tells whether they
are the whole message and identifies it when it must be found again in the source topic.

The sending helper (a producer, counting, logging) is ``streaming.kafka.deadletters.DeadLetters``.
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_BYTES = 64 * 1024
MAX_MAX_BYTES = 512 * 1024
KEY_MAX_BYTES = 1024
ERROR_MAX_CHARS = 4096


class DeadLetter(BaseModel):
    """A message a consumer could not process, with why and where it came from (topic ``dead-letters``)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    # 2: values are a bounded prefix with size and hash (1 held the whole value, so could exceed the topic's limit)
    SCHEMA_VERSION: ClassVar[int] = 2
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (1,)  # v1 letters (no size/hash fields) still decode

    source_topic: Annotated[str, Field(max_length=249)]
    partition: Annotated[int, Field(ge=0)]
    offset: Annotated[int, Field(ge=0)]
    key_b64: Annotated[str, Field(max_length=4 * KEY_MAX_BYTES // 3 + 4)] | None  # the key's first 1 KiB
    key_size: Annotated[int, Field(ge=0)] | None = None
    value_b64: Annotated[str, Field(max_length=4 * MAX_MAX_BYTES // 3 + 4)] | None  # the value's first max_bytes
    value_size: Annotated[int, Field(ge=0)] | None = None  # bytes of the ORIGINAL value
    value_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None  # of the ORIGINAL value
    truncated: bool = False  # value_b64 holds a prefix only
    error: Annotated[str, Field(max_length=ERROR_MAX_CHARS)]
    consumer: Annotated[str, Field(max_length=128)]
    failed_at_ms: int


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def dead_letter(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, reason: str,
                consumer: str, max_bytes: int = DEFAULT_MAX_BYTES, now_ms: int | None = None) -> DeadLetter:
    """Build the bounded dead letter for one source message (see the module docstring)."""
    if not 0 <= max_bytes <= MAX_MAX_BYTES:
        raise ValueError(f"max_bytes must be within 0..{MAX_MAX_BYTES} (got {max_bytes})")
    reason = reason or "unknown error"
    cut = value is not None and len(value) > max_bytes
    if cut:
        note = (f" [value truncated to its first {max_bytes} of {len(value)} bytes: "
                f"LUM_KAFKA_DEAD_LETTER_MAX_BYTES={max_bytes}; value_sha256 is of the whole value]")
        reason = reason[:ERROR_MAX_CHARS - len(note)] + note
    return DeadLetter(
        source_topic=topic[:249], partition=max(partition, 0), offset=max(offset, 0),
        key_b64=_b64(None if key is None else key[:KEY_MAX_BYTES]), key_size=None if key is None else len(key),
        value_b64=_b64(None if value is None else value[:max_bytes]),
        value_size=None if value is None else len(value),
        value_sha256=None if value is None else hashlib.sha256(value).hexdigest(), truncated=cut,
        error=reason[:ERROR_MAX_CHARS], consumer=consumer[:128],
        failed_at_ms=int(time.time() * 1000) if now_ms is None else now_ms)


def original_value(letter: DeadLetter) -> bytes | None:
    """The bytes of the source value that the letter kept (all of them unless ``letter.truncated``)."""
    return None if letter.value_b64 is None else base64.b64decode(letter.value_b64)


def original_key(letter: DeadLetter) -> bytes | None:
    """The source key's bytes kept (its first 1 KiB)."""
    return None if letter.key_b64 is None else base64.b64decode(letter.key_b64)
