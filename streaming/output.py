"""The producer every streaming process writes with: retries on a full local queue, and a flush that fails loudly.

Delivery errors are counted by a callback; ``flush`` raises if any message was lost, so a caller never
commits input offsets (or reports success) past output that did not arrive.
"""

from __future__ import annotations

from confluent_kafka import Producer

from schemas.settings import KafkaSettings


class Output:
    def __init__(self, settings: KafkaSettings, **overrides: object):
        # Small linger by default: callers flush once per batch anyway.
        self.producer = Producer(settings.producer_config(**({"linger.ms": 5} | overrides)))
        self.failed = 0
        self.errors: list[str] = []

    def _delivered(self, err, _msg) -> None:
        if err is not None:
            self.failed += 1
            self.errors = (self.errors + [str(err)])[-5:]

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, **kw: object) -> None:
        """Send one message (``kw``: partition, timestamp, headers), waiting while the local queue is full."""
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=self._delivered, **kw)
                return
            except BufferError:  # local queue full: let librdkafka drain it
                self.producer.poll(0.05)

    def flush(self, timeout: float = 60) -> None:
        left = self.producer.flush(timeout)
        if left or self.failed:
            raise RuntimeError(f"output delivery failed ({self.failed} errors, {left} unsent): {self.errors}")
