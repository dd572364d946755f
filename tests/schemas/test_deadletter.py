"""Bad messages go to dead-letters with reason and offset; valid messages around them are all processed."""

import json

from confluent_kafka import Consumer, Producer

from schemas import codec
from schemas.deadletter import DeadLetters, original_value
from schemas.events import BehaviorEvent
from schemas.topics import BEHAVIORS, DEAD_LETTERS


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
    producer = Producer(kafka.producer_config())
    name = kafka.topic(BEHAVIORS)
    sent_good = []
    for i, payload in enumerate(bad):
        producer.produce(name, value=codec.encode(_event(i)), key=b"k", partition=0)
        sent_good.append(f"e{i}")
        producer.produce(name, value=payload, key=b"k", partition=0)
    producer.flush(10)

    # A consumer as every lum consumer is written: decode, dead-letter on failure, carry on.
    consumer = Consumer(kafka.consumer_config("dlq-test"))
    consumer.subscribe([name])
    letters = DeadLetters(producer, kafka, "dlq-test")
    processed, seen = [], 0
    while seen < 2 * len(bad):
        for msg in consumer.consume(100, 1.0):
            seen += 1
            try:
                processed.append(BEHAVIORS.decode(msg.value()).event_id)
            except codec.DecodeError as e:
                letters.send_message(msg, e)
    producer.flush(10)
    consumer.close()

    assert processed == sent_good
    assert letters.total == len(bad)
    got = [DEAD_LETTERS.decode(v) for *_, v in read_topic(DEAD_LETTERS, len(bad))]
    assert len(got) == len(bad)
    for letter, (payload, reason) in zip(got, bad.items()):
        assert letter.source_topic == name and letter.partition == 0
        assert reason in letter.error
        assert original_value(letter) == payload
    assert [letter.offset for letter in got] == [2 * i + 1 for i in range(len(bad))]
