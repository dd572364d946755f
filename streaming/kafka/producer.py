"""The one producer every lum-stream process writes with: retries on a full local queue, fails loudly.

    out = Output(settings)                      # idempotent, lz4, linger 5 ms (callers flush once per batch)
    out.produce(topic, value, key, partition=p) # DeliveryError at once if librdkafka refuses the message
    out.produce_many(topic, values, keys, p)    # the same for many messages, in order
    out.flush()                                 # DeliveryError if anything since the last flush was lost

Record timestamps are left to the producer (``CreateTime`` = the producing moment, i.e. ingest time): event
time lives in the payload, so Apache Kafka's time-based retention counts from when a record arrived, not
from when (in 1997, say) the event happened. ``timestamp=`` is accepted only to copy a record unchanged.

Delivery failures are counted by a callback, set once for the producer and called for failures only (a
callback per message and a report per delivered one cost more than the produce call itself); ``flush``
raises if any message since the previous flush was not acknowledged, so a caller never commits input
offsets (or reports success) past output that did not arrive. A message librdkafka refuses before queueing it (larger than ``message.max.bytes``, an unknown
partition, a fatal producer state) raises the same ``DeliveryError`` from ``produce``, naming topic and size.
"""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import KafkaException, Producer

from schemas.settings import KafkaSettings


class DeliveryError(RuntimeError):
    """Output was refused or not acknowledged: whatever produced it must not be treated as done."""


class Output:
    def __init__(self, settings: KafkaSettings, **overrides: object):
        self.failed = 0
        self.errors: list[str] = []
        # Small linger by default: callers flush once per batch anyway.
        self.producer = Producer(settings.producer_config(**({"linger.ms": 5} | overrides)) | {
            "on_delivery": self._delivered, "delivery.report.only.error": True})

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self.failed += 1
            self.errors = (self.errors + [f"{msg.topic()}: {err}"])[-5:]

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, **kw: object) -> None:
        """Send one message (``kw``: partition, headers), waiting while the local queue is full."""
        while True:
            try:
                self.producer.produce(topic, value, key, **kw)
                return
            except BufferError:  # local queue full: let librdkafka drain it
                self.producer.poll(0.05)
            except KafkaException as e:  # refused before queueing (MSG_SIZE_TOO_LARGE, unknown partition, ...)
                size = len(value or b"") + len(key or b"")
                raise DeliveryError(f"{topic}: producer refused a message of {size} bytes "
                                    f"(key {len(key or b'')} + value {len(value or b'')}): {e.args[0]}") from None

    def produce_many(self, topic: str, values: Sequence[bytes | None], keys: Sequence[bytes | None],
                     partition: int | None = None) -> None:
        """``produce`` of each (value, key) in order, to ``partition`` (None: by key); one Python call per
        message less. A message the fast path cannot queue goes through ``produce`` (waits, or raises)."""
        produce = self.producer.produce
        if partition is None:
            for value, key in zip(values, keys):
                try:
                    produce(topic, value, key)
                except (BufferError, KafkaException):
                    self.produce(topic, value, key)
        else:
            for value, key in zip(values, keys):
                try:
                    produce(topic, value, key, partition)
                except (BufferError, KafkaException):
                    self.produce(topic, value, key, partition=partition)

    def poll(self, timeout: float = 0) -> None:
        """Serve delivery callbacks (call now and then between flushes on long streams)."""
        self.producer.poll(timeout)

    def flush(self, timeout: float = 60) -> None:
        """Wait for every queued message; raises ``DeliveryError`` if any since the last flush was lost."""
        left = self.producer.flush(timeout)
        if left or self.failed:
            failed, errors = self.failed, self.errors
            self.failed, self.errors = 0, []
            raise DeliveryError(f"output delivery failed: {failed} messages not acknowledged, {left} still unsent "
                                f"after {timeout:.0f}s; last errors: {errors}")
