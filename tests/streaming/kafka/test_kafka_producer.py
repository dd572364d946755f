"""The one producer: a message librdkafka refuses raises DeliveryError at once (never a raw KafkaException),
and flush raises DeliveryError when anything was not delivered."""

import pytest

from schemas.settings import KafkaSettings
from schemas.topics import BEHAVIORS
from streaming.broker import free_port
from streaming.kafka import DeliveryError, Output


def test_oversized_message_is_refused_with_delivery_error_naming_topic_and_size(kafka, read_topic):
    out = Output(kafka)
    topic = kafka.topic(BEHAVIORS)
    with pytest.raises(DeliveryError) as e:
        out.produce(topic, value=b"x" * 2_000_000, key=b"1")
    assert topic in str(e.value) and "2000001 bytes" in str(e.value) and "MSG_SIZE_TOO_LARGE" in str(e.value)
    out.produce(topic, value=b"fine", key=b"1")  # the producer is still usable
    out.flush(30)
    assert [v for *_, v in read_topic(BEHAVIORS)] == [b"fine"]


def test_unknown_partition_is_refused_with_delivery_error(kafka):
    out = Output(kafka)
    out.produce(kafka.topic(BEHAVIORS), value=b"warm", key=b"1")  # metadata known
    out.flush(30)
    with pytest.raises(DeliveryError, match="behaviors"):
        out.produce(kafka.topic(BEHAVIORS), value=b"x", key=b"1", partition=99)


def test_flush_raises_when_messages_were_not_delivered():
    nobody = KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}")  # no broker listens there
    out = Output(nobody, **{"message.timeout.ms": 1500})
    out.produce("anything", value=b"lost", key=b"1")
    with pytest.raises(DeliveryError, match="1 messages not acknowledged"):
        out.flush(20)
    out.flush(1)  # reported once: a later flush with nothing pending passes
