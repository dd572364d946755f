"""The dead-letter sender every consumer uses: a bad message is recorded and skipped, never fatal.

    dead = DeadLetters(out, settings, consumer="sequences-0")    # out: streaming.kafka.Output
    dead.send_message(msg, error)                                 # then carry on with the next message

A message that cannot be decoded or validated goes to ``dead-letters`` as a bounded ``DeadLetter``
(``schemas.deadletter``: at most ``LUM_KAFKA_DEAD_LETTER_MAX_BYTES`` of the value, plus its size and
SHA-256), so a letter always fits the topic whatever the size of the message it describes. It is sent with
the caller's producer and delivered by the caller's ``flush``, before the source offsets are committed.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Protocol

from schemas import codec
from schemas.deadletter import KEY_MAX_BYTES, dead_letter
from schemas.settings import KafkaSettings
from schemas.topics import DEAD_LETTERS

log = logging.getLogger(__name__)


class _Producer(Protocol):
    def produce(self, topic: str, value: bytes | None = ..., key: bytes | None = ...) -> None: ...


class _Message(Protocol):
    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...


class DeadLetters:
    """Routes bad messages to ``dead-letters``; ``counts`` says how many per source topic."""

    def __init__(self, producer: _Producer, settings: KafkaSettings, consumer: str):
        self.producer, self.consumer = producer, consumer
        self.topic = settings.topic(DEAD_LETTERS)
        self.max_bytes = settings.dead_letter_max_bytes
        self.counts: Counter[str] = Counter()
        self.prefix = settings.topic_prefix
        self.recorder = None  # a schemas.metrics.Recorder: lum_dead_letters_total{topic, reason}

    def send(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
             error: str | BaseException) -> None:
        reason = str(error) or type(error).__name__
        letter = dead_letter(topic, partition, offset, key, value, reason, self.consumer, self.max_bytes)
        self.producer.produce(self.topic, value=codec.encode(letter), key=None if key is None else key[:KEY_MAX_BYTES])
        self.counts[topic] += 1
        if self.recorder is not None:
            self.recorder.dead_letter(topic.removeprefix(self.prefix), error)
        log.warning("dead letter: %s[%d]@%d (%s bytes): %s", topic, partition, offset,
                    "no" if value is None else len(value), reason[:300])

    def send_message(self, msg: _Message, error: str | BaseException) -> None:
        """Same as ``send`` for a confluent-kafka ``Message``."""
        self.send(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
