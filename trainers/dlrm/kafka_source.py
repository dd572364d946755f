"""The Kafka adapter of the DLRM trainer: mini-batches of TrainingExamples from ``training-examples``.

    src = KafkaExamples(settings, group_id="lum-dlrm-lum", batch_size=512, start_offsets=trainer.offsets,
                        until_caught_up=True)
    trainer.fit(src, on_durable=src.commit)      # offsets are committed only once a checkpoint covers them
    src.close()

Where to start: the checkpoint's offsets are the truth (the model state matches them); partitions the
checkpoint does not know start at the group's committed offset, else at the earliest. Committed offsets
therefore never run ahead of the durable model; they exist for lag monitoring and as a fallback.

Undecodable or invalid messages (non-finite vectors included) go to dead-letters and are skipped; their
offsets still advance with the batch they were found in. ``dead_letter_batch`` sends a whole batch (the trainer
skips a batch whose loss is not finite). Each batch carries every example's (partition, offset).

At world size > 1 only rank 0 builds this reader (``Trainer.fit`` scatters the batches), so its offsets, and
the checkpoint's, cover every example any rank trains. One trainer per consumer group: a rebalance that moves partitions to another
trainer would split one model's stream, so the trainer refuses it (revocation stops the iteration).

``until_caught_up``: the end of the topic "as it stood at start" is the high-water mark carried by the
first fetched data of each partition (``get_watermark_offsets(cached=True)``; the embedded broker reports
wrong latest offsets otherwise, README, Limits). A partition with no new data never returns
a fetch we can read that from, so ``idle_timeout_s`` without any message also ends the run.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, TopicPartition

from schemas.codec import decode_many
from schemas.events import TrainingExample
from schemas.settings import KafkaSettings
from schemas.topics import TRAINING_EXAMPLES, key_of
from streaming.kafka import DeadLetters, Output, group_consumer

from .train import Batch

log = logging.getLogger(__name__)


class KafkaExamples:
    def __init__(self, settings: KafkaSettings, group_id: str, batch_size: int = 512, *,
                 start_offsets: dict[int, int] | None = None, until_caught_up: bool = False,
                 max_wait_s: float = 1.0, idle_timeout_s: float = 10.0, stop=None, recorder=None):
        self.settings, self.group_id, self.batch_size = settings, group_id, batch_size
        self.start_offsets = dict(start_offsets or {})
        self.until_caught_up, self.max_wait_s, self.idle_timeout_s = until_caught_up, max_wait_s, idle_timeout_s
        self.stop = stop or (lambda: False)
        self.topic = settings.topic(TRAINING_EXAMPLES)
        self.consumer = group_consumer(settings, group_id, **{"enable.partition.eof": False})
        self.producer = Output(settings)  # dead letters; its flush raises if one was not delivered
        self.dead = DeadLetters(self.producer, settings, consumer=f"dlrm-trainer:{group_id}")
        self.rec = self.dead.recorder = recorder  # schemas.metrics.Recorder: events consumed, lag, dead letters
        self.assigned: set[int] = set()
        self.positions: dict[int, int] = {}  # partition -> next offset to read
        self.targets: dict[int, int] = {}  # partition -> high-water mark at first fetch (until_caught_up)
        self.revoked = self.closing = False
        self.consumed = 0

    # -------------------------------------------------------------------------------- group membership

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        committed = {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=30)}
        for tp in parts:
            if tp.partition in self.start_offsets:
                tp.offset = self.start_offsets[tp.partition]
            elif committed.get(tp.partition, OFFSET_INVALID) >= 0:
                tp.offset = committed[tp.partition]
            if tp.offset >= 0:
                self.positions[tp.partition] = tp.offset
            self.assigned.add(tp.partition)
        consumer.assign(parts)
        log.info("assigned %s: starting at %s", sorted(self.assigned),
                 {tp.partition: tp.offset for tp in parts})

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        if parts and not self.closing:
            log.error("partitions %s revoked: another trainer joined group %s; stopping (one trainer per group)",
                      [tp.partition for tp in parts], self.group_id)
            self.revoked = True

    # -------------------------------------------------------------------------------- batches

    def _caught_up(self) -> bool:
        if not self.assigned:
            return False
        for p in self.assigned - set(self.targets):  # record each partition's end as soon as a fetch shows it
            lo, hi = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)
            if hi >= 0:
                self.targets[p] = hi
                self.positions.setdefault(p, max(lo, 0))  # nothing read yet: we stand at the log start
                log.info("partition %d: end of topic at start = %d", p, hi)
        return all(p in self.targets and self.positions[p] >= self.targets[p] for p in self.assigned)

    def __iter__(self) -> Iterator[Batch]:
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        last_msg_t = time.monotonic()
        examples, sources, batch_t0 = [], [], time.monotonic()
        while not self.stop() and not self.revoked:
            msgs = self.consumer.consume(num_messages=self.batch_size - len(examples), timeout=0.2)
            now = time.monotonic()
            good = []
            for msg in msgs:
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", msg.error())
                    continue
                good.append(msg)
            # One decode call for the fetched messages (their JSON heads validate together); a bad one yields
            # its own DecodeError and goes to dead-letters.
            for msg, ex in zip(good, decode_many(TrainingExample, [m.value() for m in good])):
                self.positions[msg.partition()] = msg.offset() + 1
                self.consumed += 1
                if isinstance(ex, Exception):
                    self.dead.send_message(msg, ex)
                else:
                    examples.append(ex)
                    sources.append((msg.partition(), msg.offset()))
                last_msg_t = now
            caught_up = self.until_caught_up and bool(
                self._caught_up() or (self.assigned and now - last_msg_t >= self.idle_timeout_s))
            if self.rec is not None and good:
                self._record(good)
            if len(examples) >= self.batch_size or caught_up or now - batch_t0 >= self.max_wait_s:
                # A partial or empty batch too: the trainer's time-based checkpoint must not wait for data.
                yield Batch(examples, dict(self.positions), sources)
                examples, sources, batch_t0 = [], [], now
            if caught_up:
                log.info("caught up with the topic as it stood at start: %s (%d messages, %d dead letters)",
                         self.targets or "idle timeout", self.consumed, self.dead.total)
                return

    def _record(self, msgs) -> None:
        for p, n in Counter(m.partition() for m in msgs).items():
            self.rec.consumed(TRAINING_EXAMPLES.name, p, n)
        for p in self.assigned & set(self.positions):  # cached: the high-water mark the last fetch carried
            hi = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)[1]
            if hi >= 0:
                self.rec.lag(TRAINING_EXAMPLES.name, p, max(hi - self.positions[p], 0))

    def dead_letter_batch(self, batch: Batch, reason: str) -> None:
        """Every example of ``batch`` to dead-letters (re-encoded; the source offset names the original)."""
        for ex, (p, o) in zip(batch.examples, batch.sources or [(0, 0)] * len(batch.examples)):
            self.dead.send(self.topic, p, o, key_of(ex.user_id), TRAINING_EXAMPLES.encode(ex), reason)

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit what a durable checkpoint covers (dead letters are flushed first: at least once)."""
        self.producer.flush(30)
        parts = [TopicPartition(self.topic, p, o) for p, o in offsets.items() if p in self.assigned]
        if parts:
            self.consumer.commit(offsets=parts, asynchronous=False)

    def close(self) -> None:
        self.closing = True
        self.producer.flush(30)
        self.consumer.close()
