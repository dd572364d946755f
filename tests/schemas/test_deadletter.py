"""Bad messages go to dead-letters with reason and offset; valid messages around them are all processed.
A dead letter is bounded: a prefix of the value plus its size and SHA-256, whatever the message's size."""

import hashlib
import json
import os

import pytest

from schemas import codec
from schemas.deadletter import DeadLetter, dead_letter, original_value
from schemas.events import BehaviorEvent
from schemas.topics import BEHAVIORS, DEAD_LETTERS
from streaming.kafka import DeadLetters, Output, group_consumer


def _event(i: int) -> BehaviorEvent:
    return BehaviorEvent(event_id=f"e{i}", user_id=i, item_id=i, category_id=1, behavior="view", scenario="home",
                         event_time_ms=1_767_225_600_000 + i)


def test_bad_messages_are_dead_lettered_and_processing_continues(kafka, read_topic):
    good = codec.encode(_event(0))
    obj = json.loads(good[3:])
    bad = {
        b"{this is not json": "header",
        good[:3] + b"{this is not json": "invalid BehaviorEvent",
        good[:3] + json.dumps(obj | {"user_id": "7"}).encode(): "user_id",
        good[:3] + json.dumps(obj | {"item_id": -5}).encode(): "item_id",
        good[:3] + json.dumps(obj | {"user_id": 2**64}).encode(): "user_id",
        good[:3] + json.dumps(obj | {"scenario": "x" * 10_000}).encode(): "scenario",
        good[:2] + bytes([42]) + good[3:]: "unknown schema version 42",
    }
    out = Output(kafka)
    name = kafka.topic(BEHAVIORS)
    sent_good = []
    for i, payload in enumerate(bad):
        out.produce(name, value=codec.encode(_event(i)), key=b"k", partition=0)
        sent_good.append(f"e{i}")
        out.produce(name, value=payload, key=b"k", partition=0)
    out.flush(10)

    # A consumer as every lum consumer is written: decode, dead-letter on failure, carry on.
    consumer = group_consumer(kafka, kafka.topic_prefix + "dlq-test")
    consumer.subscribe([name])
    letters = DeadLetters(out, kafka, "dlq-test")
    processed, seen = [], 0
    while seen < 2 * len(bad):
        for msg in consumer.consume(100, 1.0):
            seen += 1
            try:
                processed.append(BEHAVIORS.decode(msg.value()).event_id)
            except codec.DecodeError as e:
                letters.send_message(msg, e)
    out.flush(10)
    consumer.close()

    assert processed == sent_good
    assert letters.total == len(bad)
    got = [DEAD_LETTERS.decode(v) for *_, v in read_topic(DEAD_LETTERS, len(bad))]
    assert len(got) == len(bad)
    for letter, (payload, reason) in zip(got, bad.items()):
        assert letter.source_topic == name and letter.partition == 0
        assert reason in letter.error
        assert original_value(letter) == payload and not letter.truncated
        assert letter.value_size == len(payload) and letter.value_sha256 == hashlib.sha256(payload).hexdigest()
    assert [letter.offset for letter in got] == [2 * i + 1 for i in range(len(bad))]


def test_dead_letter_of_an_oversized_message_is_a_bounded_prefix_with_size_and_hash():
    value = os.urandom(3_000_000)
    letter = dead_letter("behaviors", 0, 7, b"k" * 5000, value, "missing lum format header", "t", max_bytes=1000)
    assert letter.truncated and letter.value_size == len(value) and letter.key_size == 5000
    assert original_value(letter) == value[:1000]
    assert letter.value_sha256 == hashlib.sha256(value).hexdigest()
    assert "missing lum format header" in letter.error and "1000" in letter.error
    assert "LUM_KAFKA_DEAD_LETTER_MAX_BYTES" in letter.error
    assert len(codec.encode(letter)) < 10_000
    assert DEAD_LETTERS.decode(codec.encode(letter)) == letter
    assert DeadLetter.SCHEMA_VERSION == 2


def test_oversized_bad_message_dead_letter_fits_the_topic(kafka, read_topic, monkeypatch):
    """A 2 MB bad message (over the producer's 1 MB limit) still yields a delivered dead letter."""
    value = b"\x00garbage" * 250_000  # 2 MB
    out = Output(kafka)
    letters = DeadLetters(out, kafka, "big-test")
    letters.send(kafka.topic(BEHAVIORS), 0, 3, b"42", value, "missing lum format header")
    out.flush(30)  # raises DeliveryError if the letter did not fit
    (_, _, key, raw), = read_topic(DEAD_LETTERS)
    letter = DEAD_LETTERS.decode(raw)
    assert key == b"42" and letter.offset == 3 and letter.truncated
    assert letter.value_size == len(value) and letter.value_sha256 == hashlib.sha256(value).hexdigest()
    assert original_value(letter) == value[:kafka.dead_letter_max_bytes] and kafka.dead_letter_max_bytes == 65536
    assert "65536" in letter.error


def test_version_1_dead_letters_still_decode():
    """Letters written before the bounded layout (schema version 1: no size, hash or truncated fields) stay
    readable after an upgrade; an unknown version is still refused."""
    v1 = {"source_topic": "behaviors", "partition": 2, "offset": 17, "key_b64": "MQ==", "value_b64": "eHl6",
          "error": "not JSON", "consumer": "sequences", "failed_at_ms": 1_700_000_000_000}
    body = json.dumps(v1).encode()
    letter = codec.decode(DeadLetter, bytes((0x4C, 0x6A, 1)) + body)
    assert (letter.offset, original_value(letter), letter.value_size, letter.truncated) == (17, b"xyz", None, False)
    with pytest.raises(codec.DecodeError, match="unknown schema version 9"):
        codec.decode(DeadLetter, bytes((0x4C, 0x6A, 9)) + body)
