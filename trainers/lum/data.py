"""Where LUM's sequences come from, and how they become training batches.

Sources: behavior events (``schemas.datasets.read_movielens/read_taobao`` or any iterable of BehaviorEvent,
tokenized with ``schemas.tokenize.tokenize``), or the sequence export on Kafka (every user's full sequence,
read with its one reader ``streaming.kafka.sequences.snapshot``). ``train_batches`` shuffles, chunks and packs
them into ``Batch``es forever (an iterable for ``pretrain.train``).

    seqs = sequences_from_events(read_movielens("ml-100k"))
    seqs, offsets = load_source("kafka", kafka_settings)
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable, Iterator
from itertools import chain

import numpy as np
import torch

from schemas.events import BehaviorEvent
from schemas.progress import progress
from schemas.settings import KafkaSettings
from schemas.tokenize import tokenize

from .model import LumConfig
from .model import ITEM
from .packing import Batch, Seq, chunk, make_batch, pack_rows, to_tokens

log = logging.getLogger(__name__)


def sequences_from_events(events: Iterable[BehaviorEvent], span: dict | None = None) -> list[Seq]:
    """Per-user sequences in event-time order (events must come time-ordered); replayed events counted once.
    Users in order of their first event. Pairs are gathered as int64 columns (~140 bytes a pair at the peak,
    48 kept, where a tuple per pair and a set of event keys took ~300), with a progress line every 10 s: the
    20M MovieLens is read here in one process.

    ``span``: when given, filled with the event-time range read (``trained_from_ms``/``trained_until_ms``)."""
    flat = array("q")  # per event: user, event key, conditions..., item, category
    lo, hi = None, None
    events = iter(events)
    first = next(events, None)  # a file reader sorts its whole file first: the rate counts from here
    with progress("read events", unit="events") as bar:
        n = 0
        for e in chain([first] if first is not None else [], events):
            p = tokenize(e)
            flat.extend((e.user_id, p.event_key, *p.conditions, p.item_id, p.category_id))
            lo = e.event_time_ms if lo is None else min(lo, e.event_time_ms)
            hi = e.event_time_ms if hi is None else max(hi, e.event_time_ms)
            n += 1
            if n % 10_000 == 0:
                bar.update(10_000)
        bar.update(n % 10_000)
    if span is not None:
        span.update(trained_from_ms=lo, trained_until_ms=hi)
    if not n:
        return []
    a = np.frombuffer(flat, dtype=np.int64).reshape(n, -1)
    keep = np.unique(a[:, 1], return_index=True)[1]  # the first of each event key: replays counted once
    keep.sort()
    order = keep[np.argsort(a[keep, 0], kind="stable")]  # by user; each user's pairs in input (time) order
    user, conds, items, cats = a[order, 0], a[order, 2:-2], a[order, -2], a[order, -1]
    del a, flat, keep  # the gathered columns go; the sequences keep 48 bytes a pair
    users, starts, counts = np.unique(user, return_index=True, return_counts=True)
    out = [Seq(u, conds[s:s + c], items[s:s + c], cats[s:s + c])
           for u, s, c in zip(users.tolist(), starts.tolist(), counts.tolist())]
    return [out[i] for i in np.argsort(order[starts], kind="stable")]  # users in order of their first event


SOURCES = ("kafka", "movielens", "taobao", "amazon")


def load_source(source: str, settings: KafkaSettings | None = None, idle_timeout_s: float = 5.0,
                span: dict | None = None) -> tuple[list[Seq], dict[str, int] | None]:
    """``kafka`` | ``movielens:PATH`` | ``taobao:PATH`` | ``amazon:PATH`` -> (sequences, Kafka offsets covered
    or None). ``span`` (optional) receives the event-time range read: ``trained_from_ms``/``trained_until_ms``."""
    kind, _, path = source.partition(":")
    if kind == "kafka":
        from streaming.kafka.sequences import snapshot  # the export's one reader (snapshot + deltas, folded)

        seqs, offsets = snapshot(settings or KafkaSettings(), idle_timeout_s=idle_timeout_s)
        times = [p.event_time_ms for s in seqs.values() for p in s.pairs]
        if span is not None:
            span.update(trained_from_ms=min(times, default=None), trained_until_ms=max(times, default=None))
        return [Seq.from_user_sequence(s) for s in seqs.values() if s.pairs], offsets
    from schemas import datasets

    readers = {"movielens": datasets.read_movielens, "taobao": datasets.read_taobao, "amazon": datasets.read_amazon}
    if kind not in readers or not path:
        raise ValueError(f"--source {source!r}: expected kafka, movielens:PATH, taobao:PATH or amazon:PATH")
    return sequences_from_events(readers[kind](path), span), None


def leave_last_out(seqs: list[Seq]) -> tuple[list[Seq], list[Seq]]:
    """(training sequences, evaluation sequences): users with >= 2 pairs lose their last pair in training."""
    train = [s[:-1] if len(s) >= 2 else s for s in seqs]
    return train, [s for s in seqs if len(s) >= 2]


def split_users(seqs: list[Seq]) -> tuple[list[Seq], list[Seq], list[Seq]]:
    """(train, validation, test) by position in each user's history (the SASRec protocol).

    Validation asks for each user's second-to-last pair (users with >= 3 pairs), test for the last (>= 2 pairs);
    training sees neither: users with >= 3 pairs lose their last two, users with 2 lose their last one.
    The final model for serving may be retrained on everything; these splits only choose when to stop.
    """
    train = [s[:-2] if len(s) >= 3 else s[:-1] if len(s) == 2 else s for s in seqs]
    val = [s[:-1] for s in seqs if len(s) >= 3]
    test = [s for s in seqs if len(s) >= 2]
    return train, val, test


def repeat_share(seqs: list[Seq]) -> float:
    """Share of pairs whose item the user already had: ~0 for ratings (no repeats), large for click logs."""
    n = sum(len(s) for s in seqs)
    rep = sum(len(s) - len(np.unique(s.items)) for s in seqs)
    return rep / n if n else 0.0


class Sampler:
    """Loss candidates of a batch: its distinct item tokens plus ``n`` items drawn uniformly from the catalog.

    The chance that item i is a candidate is q_i = 1 - (1 - p_i)^M (1 - 1/N)^n, where p_i is i's share of
    the item tokens the batches are cut from, M the batch's item tokens and N the catalog size; the loss
    subtracts log q_i (logQ correction, Yi et al. 2019 "mixed negative sampling").
    """

    def __init__(self, seqs: list[Seq], n: int, rng: np.random.Generator):
        items = np.concatenate([s.items for s in seqs]) if seqs else np.zeros(0, np.int64)
        cats = np.concatenate([s.cats for s in seqs]) if seqs else np.zeros(0, np.int64)
        self.ids, first, counts = np.unique(items, return_index=True, return_counts=True)
        self.cats = cats[first]
        self.p = counts / max(1, counts.sum())
        self.n, self.rng = n, rng

    def candidates(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m = int((batch.kind == ITEM).sum())
        in_batch = np.unique(batch.item[batch.kind == ITEM].numpy())
        drawn = self.rng.integers(0, len(self.ids), self.n) if self.n else np.zeros(0, np.int64)
        idx = np.union1d(np.searchsorted(self.ids, in_batch), drawn)
        log_miss = m * np.log1p(-np.minimum(self.p[idx], 1 - 1e-12)) + self.n * np.log1p(-1.0 / len(self.ids))
        logq = np.log(np.maximum(-np.expm1(log_miss), 1e-30))
        return self.ids[idx], self.cats[idx], logq.astype(np.float32)


def train_batches(seqs: list[Seq], cfg: LumConfig, seed: int = 0, pool_rows: int = 64,
                  rank: int = 0, world: int = 1) -> Iterator[Batch]:
    """Endless packed batches: each epoch shuffles, re-drops conditions, chunks and packs pools of sequences.

    Each batch carries its loss candidates (in-batch items + ``cfg.neg_samples`` uniform ones, with log Q).
    ``rank``/``world``: data parallel; every rank draws the same global batches and keeps rows
    rank, rank + world, ... of each, so the global batch is ``cfg.rows_per_batch`` whatever the world size.
    """
    rng = np.random.default_rng(seed)
    windows = [w for s in seqs for w in chunk(s, cfg.window_pairs)]
    windows = [w for w in windows if len(w) >= (1 if cfg.use_conditions else 2)]  # at least one target
    if not windows:
        raise ValueError("no sequences to train on")
    sampler = Sampler(windows, cfg.neg_samples, np.random.default_rng(seed + 7919))
    while True:
        order = rng.permutation(len(windows))
        runs = [to_tokens(windows[i], cfg.use_conditions, cfg.cond_drop, rng, cfg.query_tokens) for i in order]
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
                glob = rows[b:b + cfg.rows_per_batch]
                full = make_batch(pool, glob, cfg.row_len)
                ids, cats, logq = sampler.candidates(full)
                mine = glob[rank::world] or glob[:1]  # a rank never gets an empty batch (a tiny last batch)
                batch = full if world == 1 else make_batch(pool, mine, cfg.row_len)
                batch.cand_item, batch.cand_cat = torch.from_numpy(ids), torch.from_numpy(cats)
                batch.cand_logq = torch.from_numpy(logq)
                yield batch
            start = end
