"""The dead-letter helper every consumer uses: a bad message is recorded and skipped, never fatal.

A message that cannot be decoded or validated goes to the ``dead-letters`` topic as a ``DeadLetter`` holding
the original key and value bytes, the reason, the source topic/partition/offset and the consumer's name;
the consumer counts it and carries on. The producer is any object with confluent-kafka's
``produce(topic, value=, key=)`` signature, so this module needs no Kafka client of its own.
"""

from __future__ import annotations

import base64
import logging
import time
from collections import Counter
from typing import Protocol

from . import codec
from .events import DeadLetter
from .settings import KafkaSettings
from .topics import DEAD_LETTERS

log = logging.getLogger(__name__)


class _Producer(Protocol):
    def produce(self, topic: str, value: bytes | None = ..., key: bytes | None = ...) -> None: ...


class _Message(Protocol):
    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


class DeadLetters:
    """Routes bad messages to ``dead-letters``; ``counts`` says how many per source topic."""

    def __init__(self, producer: _Producer, settings: KafkaSettings, consumer: str):
        self.producer, self.consumer = producer, consumer
        self.topic = settings.topic(DEAD_LETTERS)
        self.counts: Counter[str] = Counter()

    def send(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
             error: str | BaseException) -> None:
        reason = str(error) or type(error).__name__
        letter = DeadLetter(source_topic=topic, partition=partition, offset=offset, key_b64=_b64(key),
                            value_b64=_b64(value), error=reason[:4096], consumer=self.consumer[:128],
                            failed_at_ms=int(time.time() * 1000))
        self.producer.produce(self.topic, value=codec.encode(letter), key=key)
        self.counts[topic] += 1
        log.warning("dead letter: %s[%d]@%d: %s", topic, partition, offset, reason[:300])

    def send_message(self, msg: _Message, error: str | BaseException) -> None:
        """Same as ``send`` for a confluent-kafka ``Message``."""
        self.send(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def original_value(letter: DeadLetter) -> bytes | None:
    """The bytes the source message carried, for inspection or re-driving."""
    return None if letter.value_b64 is None else base64.b64decode(letter.value_b64)
