"""Where LUM's sequences come from, and how they become training batches.

Sources: behavior events (``schemas.datasets.read_movielens/read_taobao`` or any iterable of BehaviorEvent,
tokenized with ``schemas.tokenize.tokenize``), or the compacted ``user-sequences`` topic (latest value per
key; read with ``read_user_sequences``, which stops at the high-water mark carried by fetched data, or after
an idle timeout, because Tansu reports a wrong latest offset). ``train_batches`` shuffles, chunks and packs
them into ``Batch``es forever (an iterable for ``pretrain.train``).

    seqs = sequences_from_events(read_movielens("ml-100k"))
    seqs, offsets = load_source("kafka", kafka_settings)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

import numpy as np

from schemas.events import BehaviorEvent
from schemas.settings import KafkaSettings
from schemas.tokenize import UserSequence, tokenize
from schemas.topics import USER_SEQUENCES

from .model import LumConfig
from .packing import Batch, Seq, chunk, make_batch, pack_rows, to_tokens

log = logging.getLogger(__name__)


def sequences_from_events(events: Iterable[BehaviorEvent]) -> list[Seq]:
    """Per-user sequences in event-time order (events must come time-ordered); replayed events counted once."""
    seen: set[int] = set()
    rows: dict[int, list[tuple]] = {}
    for e in events:
        p = tokenize(e)
        if p.event_key in seen:
            continue
        seen.add(p.event_key)
        rows.setdefault(e.user_id, []).append((*p.conditions, p.item_id, p.category_id))
    out = []
    for user, r in rows.items():
        a = np.asarray(r, dtype=np.int64)
        out.append(Seq(user, a[:, :-2], a[:, -2], a[:, -1]))
    return out


def read_user_sequences(settings: KafkaSettings, start: dict[int, int] | None = None, idle_timeout_s: float = 5.0,
                        group: str = "lum-trainer",
                        dead_letters=None) -> tuple[dict[int, UserSequence], dict[int, int]]:
    """Latest sequence per user in ``user-sequences`` after offsets ``start`` (default: the beginning).

    Returns the sequences and the next offset per partition (what a later call passes as ``start``).
    Undecodable records go to ``dead_letters`` (a ``streaming.kafka.DeadLetters``) when given, else are
    logged and skipped.
    """
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    from streaming.kafka import group_consumer

    topic = settings.topic(USER_SEQUENCES)
    consumer = group_consumer(settings, group, **{"enable.partition.eof": True})
    try:
        md = consumer.list_topics(topic, timeout=30).topics[topic]
        if md.error is not None:
            raise RuntimeError(f"topic {topic}: {md.error}")
        parts = sorted(md.partitions)
        start = dict(start or {})
        nxt = {p: start.get(p, 0) for p in parts}
        consumer.assign([TopicPartition(topic, p, start[p] if p in start else OFFSET_BEGINNING) for p in parts])
        latest: dict[int, UserSequence] = {}
        pending, last_data, n, bad = set(parts), time.monotonic(), 0, 0
        while pending and time.monotonic() - last_data < idle_timeout_s:
            for msg in consumer.consume(2000, timeout=0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(msg.partition())
                    else:
                        log.warning("user-sequences consume error: %s", err)
                    continue
                last_data = time.monotonic()
                nxt[msg.partition()] = msg.offset() + 1
                n += 1
                try:
                    seq = USER_SEQUENCES.decode(msg.value())
                except ValueError as e:
                    bad += 1
                    if dead_letters is not None:
                        dead_letters.send_message(msg, e)
                    else:
                        log.warning("skipping bad user-sequence record at %d@%d: %s", msg.partition(), msg.offset(), e)
                    continue
                latest[seq.user_id] = seq
            # The high-water mark carried by fetched data is right on Tansu too (the listed latest is not).
            for p in list(pending):
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)
                if high >= 0 and nxt[p] >= high:
                    pending.discard(p)
        if pending:
            log.info("user-sequences: idle for %.1fs, treating partitions %s as caught up", idle_timeout_s,
                     sorted(pending))
        log.info("read %d user-sequence records (%d bad) -> %d users", n, bad, len(latest))
        return latest, nxt
    finally:
        consumer.close()


def load_source(source: str, settings: KafkaSettings | None = None,
                idle_timeout_s: float = 5.0) -> tuple[list[Seq], dict[int, int] | None]:
    """``kafka`` | ``movielens:PATH`` | ``taobao:PATH`` -> (sequences, Kafka offsets covered or None)."""
    kind, _, path = source.partition(":")
    if kind == "kafka":
        seqs, offsets = read_user_sequences(settings or KafkaSettings(), idle_timeout_s=idle_timeout_s)
        return [Seq.from_user_sequence(s) for s in seqs.values() if s.pairs], offsets
    from schemas import datasets

    readers = {"movielens": datasets.read_movielens, "taobao": datasets.read_taobao}
    if kind not in readers or not path:
        raise ValueError(f"--source {source!r}: expected kafka, movielens:PATH or taobao:PATH")
    return sequences_from_events(readers[kind](path)), None


def leave_last_out(seqs: list[Seq]) -> tuple[list[Seq], list[Seq]]:
    """(training sequences, evaluation sequences): users with >= 2 pairs lose their last pair in training."""
    train = [s[:-1] if len(s) >= 2 else s for s in seqs]
    return train, [s for s in seqs if len(s) >= 2]


def train_batches(seqs: list[Seq], cfg: LumConfig, seed: int = 0, pool_rows: int = 64) -> Iterator[Batch]:
    """Endless packed batches: each epoch shuffles, re-drops conditions, chunks and packs pools of sequences."""
    rng = np.random.default_rng(seed)
    pairs_per_row = cfg.row_len // (2 if cfg.use_conditions else 1)
    windows = [w for s in seqs for w in chunk(s, min(cfg.max_pairs, pairs_per_row))]
    windows = [w for w in windows if len(w) >= (1 if cfg.use_conditions else 2)]  # at least one target
    if not windows:
        raise ValueError("no sequences to train on")
    while True:
        order = rng.permutation(len(windows))
        runs = [to_tokens(windows[i], cfg.use_conditions, cfg.cond_drop, rng) for i in order]
        # Pack a pool at a time: large enough to fill rows tightly, small enough to keep batches mixed.
        pool_tokens = pool_rows * cfg.row_len
        start = 0
        while start < len(runs):
            end, tokens = start, 0
            while end < len(runs) and tokens < pool_tokens:
                tokens += len(runs[end])
                end += 1
            pool = runs[start:end]
            rows = pack_rows([len(r) for r in pool], cfg.row_len)
            rng.shuffle(rows)
            for b in range(0, len(rows), cfg.rows_per_batch):
                yield make_batch(pool, rows[b:b + cfg.rows_per_batch], cfg.row_len)
            start = end
