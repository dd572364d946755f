"""The Kafka adapter of the DLRM trainer: mini-batches of TrainingExamples from ``training-examples``.

    src = KafkaExamples(settings, group_id="lum-dlrm-lum", batch_size=512, start_offsets=trainer.offsets,
                        until_caught_up=True)
    trainer.fit(src, on_durable=src.commit)      # offsets are committed only once a checkpoint covers them
    src.close()

Where to start: the checkpoint's offsets are the truth (the model state matches them); partitions the
checkpoint does not know start at the group's committed offset, else at the earliest. Committed offsets
therefore never run ahead of the durable model; they exist for lag monitoring and as a fallback.

Each fetch (up to a batch of messages) is decoded in one call (``schemas.codec.decode_columns``: every check a
column at a time, no per-message object), in the trainer's prefetch thread, or in a child process
(``trainers.dlrm.decoder``; by default where 2 or more CPUs are available) while this side takes the previous
fetch and fetches the next. A batch is ``schemas.codec.ExampleColumns`` (column slices of its fetches, joined),
which the featurizer reads directly; the fetch's partitions, offsets and values are columns too (C-level maps),
and the dedup keys are computed with the decoding (``decoder.decode_fetch``), so the step's thread only looks them
up. Once the trainer's model exists it hands its config over (``featurize_with``) and the decoder process also
featurizes each fetch (``features.FeatureColumns``, cut and joined with the columns): batches then arrive with
their features, and the step's process only trains.

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
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import NamedTuple

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, Message, TopicPartition

from schemas.codec import ExampleColumns, LazyVectors
from schemas.settings import KafkaSettings
from schemas.topics import TRAINING_EXAMPLES, key_of
from streaming.kafka import DeadLetters, Output, group_consumer

from .decoder import DecoderProcess, decode_fetch
from .features import FeatureColumns
from .train import Batch

log = logging.getLogger(__name__)
DECODE_AHEAD = 1  # fetches the decoder process may hold beyond the one being taken


class _Fetch(NamedTuple):
    msgs: list[Message]
    parts: list[int]
    offsets: list[int]
    nexts: list[int]  # offset + 1
    values: list[bytes | None]


class KafkaExamples:
    def __init__(self, settings: KafkaSettings, group_id: str, batch_size: int = 512, *,
                 start_offsets: dict[int, int] | None = None, until_caught_up: bool = False,
                 max_wait_s: float = 1.0, idle_timeout_s: float = 10.0, stop=None, recorder=None,
                 decoder_process: bool | None = None):
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
        self.fetched_to: dict[int, int] = {}  # partition -> next offset to fetch (ahead while decoding)
        self.targets: dict[int, int] = {}  # partition -> high-water mark at first fetch (until_caught_up)
        self.revoked = self.closing = False
        self.consumed = 0
        # None: a child process wherever there is a second core. Decoding in the reading thread holds the GIL
        # against the step's Python; on 2 cores (broker included) the child's ~0.25 core of decoding and pickling
        # costs less than that (measured: end to end 0.86-0.96 of featurize + step against 0.71-0.76).
        self.decoder_process = len(os.sched_getaffinity(0)) >= 2 if decoder_process is None else decoder_process
        self.decoder: DecoderProcess | None = None

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
        self.decoder = DecoderProcess() if self.decoder_process else None
        fetched: deque = deque()  # fetches submitted to the decoder process, oldest first
        last_msg_t = self._batch_t0 = time.monotonic()
        self._parts, self._n, self._sources, self._keys, self._features = [], 0, [], [], []
        try:
            while not self.stop() and not self.revoked:
                want = self._left()  # at the end of the topic, no waiting for a batch that cannot fill
                msgs = self.consumer.consume(num_messages=max(want, 1), timeout=0.2 if want else 0.01)
                now = time.monotonic()
                fetch = self._columns(msgs)
                if fetch is not None:
                    last_msg_t = now
                    if self.decoder is None:
                        yield from self._take(fetch, decode_fetch(fetch.values))
                    else:  # the child decodes this fetch while we take the previous one and fetch the next
                        self.decoder.submit(fetch.values)
                        fetched.append(fetch)
                while fetched and (len(fetched) > DECODE_AHEAD or fetch is None):
                    yield from self._take(fetched.popleft(), self.decoder.result())
                at_end = self.until_caught_up and self._caught_up()  # records each end as soon as a fetch shows it
                caught_up = self.until_caught_up and not fetched and bool(
                    at_end or (self.assigned and now - last_msg_t >= self.idle_timeout_s))
                if caught_up or now - self._batch_t0 >= self.max_wait_s:
                    # A partial or empty batch too: the trainer's time-based checkpoint must not wait for data.
                    yield self._batch()
                if caught_up:
                    log.info("caught up with the topic as it stood at start: %s (%d messages, %d dead letters)",
                             self.targets or "idle timeout", self.consumed, self.dead.total)
                    return
        finally:
            if self.decoder is not None:
                self.decoder.close()

    def _left(self) -> int:
        """Messages to ask for: a batch, or (``until_caught_up``, every end known) fewer if fewer are left."""
        if not self.until_caught_up or not self.assigned or not self.assigned <= set(self.targets):
            return self.batch_size
        return min(self.batch_size, sum(max(self.targets[p] - self.fetched_to.get(p, self.positions[p]), 0)
                                        for p in self.assigned))

    def _columns(self, msgs: list) -> _Fetch | None:
        """A fetch's data messages as columns (C-level maps, no per-message Python); errors are logged."""
        if not msgs:
            return None
        errors = list(map(Message.error, msgs))
        if errors.count(None) != len(msgs):
            for e in errors:
                if e is not None and e.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", e)
            msgs = [m for m, e in zip(msgs, errors) if e is None]
            if not msgs:
                return None
        parts, offsets = list(map(Message.partition, msgs)), list(map(Message.offset, msgs))
        nexts = [o + 1 for o in offsets]
        self.fetched_to.update(zip(parts, nexts))
        return _Fetch(msgs, parts, offsets, nexts, list(map(Message.value, msgs)))

    def featurize_with(self, cfg) -> None:
        """The trainer's model config, once it exists: the decoder process (if any) featurizes from now on, so
        that batches arrive with their ``features``. Called from the thread that iterates this reader."""
        if self.decoder is not None:
            self.decoder.featurize_with(cfg)

    def _take(self, fetch: _Fetch, decoded: tuple) -> Iterator[Batch]:
        """Account a decoded fetch in order: examples to the batch (column slices), bad messages to dead-letters;
        a full batch is yielded at once, so its offsets cover exactly the messages taken so far."""
        cols, errors, keys, features = decoded
        n, parts, offsets = len(fetch.values), fetch.parts, fetch.offsets
        self.consumed += n
        where = range(n) if not errors else [k for k in range(n) if k not in errors]  # each row's message
        done = i = 0
        while i < len(cols):
            j = min(len(cols), i + self.batch_size - self._n)
            end = where[j - 1] + 1
            self._account(fetch, errors, done, end)
            whole = j - i == len(cols)
            self._parts.append(cols if whole else cols[i:j])
            self._features.append(features if whole or features is None else features.cut(i, j))
            self._n += j - i
            self._keys += keys[i:j]
            if not errors:
                self._sources += zip(parts[i:j], offsets[i:j])
            else:
                self._sources += [(parts[k], offsets[k]) for k in where[i:j]]
            done, i = end, j
            if self._n >= self.batch_size:
                yield self._batch()
        self._account(fetch, errors, done, n)
        if self.rec is not None:
            self._record(parts)

    def _account(self, fetch: _Fetch, errors: dict, a: int, b: int) -> None:
        """Messages ``a..b-1`` of ``fetch`` are taken: the bad ones to dead-letters, the positions past them."""
        for k in sorted(errors) if errors else ():
            if a <= k < b:
                self.dead.send_message(fetch.msgs[k], errors[k])
        self.positions.update(zip(fetch.parts[a:b], fetch.nexts[a:b]))  # in fetch order: the last per partition

    def _batch(self) -> Batch:
        examples = ExampleColumns.concat(self._parts) if self._parts else ExampleColumns.empty()
        features = (FeatureColumns.concat(self._features).batch()
                    if self._features and all(f is not None for f in self._features) else None)
        b = Batch(examples, dict(self.positions), self._sources, keys=self._keys, features=features)
        self._parts, self._n, self._sources, self._keys, self._features = [], 0, [], [], []
        self._batch_t0 = time.monotonic()
        return b

    def _record(self, parts: list[int]) -> None:
        for p, n in Counter(parts).items():
            self.rec.consumed(TRAINING_EXAMPLES.name, p, n)
        for p in self.assigned & set(self.positions):  # cached: the high-water mark the last fetch carried
            hi = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)[1]
            if hi >= 0:
                self.rec.lag(TRAINING_EXAMPLES.name, p, max(hi - self.positions[p], 0))

    def dead_letter_batch(self, batch: Batch, reason: str) -> None:
        """Every example of ``batch`` to dead-letters (re-encoded; the source offset names the original)."""
        for ex, (p, o) in zip(batch.examples, batch.sources or [(0, 0)] * len(batch.examples)):
            model = ex.to_model() if isinstance(ex, LazyVectors) else ex
            self.dead.send(self.topic, p, o, key_of(ex.user_id), TRAINING_EXAMPLES.encode(model), reason)

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit what a durable checkpoint covers (dead letters are flushed first: at least once)."""
        self.producer.flush(30)
        parts = [TopicPartition(self.topic, p, o) for p, o in offsets.items() if p in self.assigned]
        if parts:
            self.consumer.commit(offsets=parts, asynchronous=False)

    def close(self) -> None:
        self.closing = True
        if self.decoder is not None:  # the iteration's own finally closes it too; this covers one never closed
            self.decoder.close()
        self.producer.flush(30)
        self.consumer.close()
