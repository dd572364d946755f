"""Producers: stream synthetic or real events into ``behaviors`` and ``impressions``.

    lum produce synthetic --users 1000 --items 5000 --events 100000 [--rate 2000] [--seed 0]
    lum produce movielens ../shared/data/ml-100k [--speedup 3600] [--impressions]
    lum produce taobao ../shared/data/taobao-userbehavior [--speedup 0]

Keys are user ids, so each user's events keep their order within a partition. Record timestamps are
ingest time (the producing moment); the event time is the payload's ``event_time_ms``, so a 1997 replay is
not deleted by a 7-day retention the moment it lands. The producer is idempotent (retries never duplicate)
and batched; ``--rate`` paces events per second of wall time, ``--speedup`` replays
real logs at a multiple of their event-time pace (0: as fast as possible). Progress: a bar with rate and ETA on a
terminal, else a log line every 10 s.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from collections.abc import Iterable, Iterator

from schemas.datasets import is_positive, read_amazon, read_movielens, read_taobao
from schemas.events import BehaviorEvent, ImpressionEvent
from schemas.progress import progress
from schemas.settings import KafkaSettings
from schemas.topics import BEHAVIORS, IMPRESSIONS, key_of

from ..kafka import Output
from .synthetic import SyntheticConfig, SyntheticStream

log = logging.getLogger(__name__)


class EventProducer:
    """Sends events to their topic by type, keyed by user id (record timestamp: ingest time)."""

    def __init__(self, settings: KafkaSettings):
        # A long stream, not batches: the usual 20 ms linger for throughput.
        self.out = Output(settings, **{"linger.ms": 20})
        self.topics = {BehaviorEvent: (settings.topic(BEHAVIORS), BEHAVIORS),
                       ImpressionEvent: (settings.topic(IMPRESSIONS), IMPRESSIONS)}
        self.sent = 0

    def send(self, event: BehaviorEvent | ImpressionEvent) -> None:
        name, topic = self.topics[type(event)]
        self.out.produce(name, topic.encode(event), key_of(event.user_id))
        self.sent += 1
        if self.sent % 1000 == 0:
            self.out.poll(0)  # serve delivery callbacks as we go

    def flush(self, timeout: float = 60) -> None:
        self.out.flush(timeout)


def produce(settings: KafkaSettings, events: Iterable[BehaviorEvent | ImpressionEvent], rate: float = 0,
            speedup: float = 0, progress_every: float = 10.0, total: int | None = None) -> dict[str, float]:
    """Send events, paced by ``rate`` (events/s) or ``speedup`` (event time / wall time); returns stats.
    ``total``: how many events to expect (the progress ETA), when known."""
    out = EventProducer(settings)
    start = time.monotonic()
    first_event_ms: int | None = None
    counts = {"behaviors": 0, "impressions": 0}
    with progress("produce", total=total, unit="events", every_s=progress_every) as bar:
        for event in events:
            if rate:
                ahead = out.sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            elif speedup:
                first_event_ms = first_event_ms or event.event_time_ms
                ahead = (event.event_time_ms - first_event_ms) / 1000 / speedup - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(min(ahead, 60))
            out.send(event)
            counts["behaviors" if isinstance(event, BehaviorEvent) else "impressions"] += 1
            bar.update(1)
        out.flush()
    elapsed = time.monotonic() - start
    stats = {"events": out.sent, **counts, "seconds": elapsed, "events_per_s": out.sent / elapsed if elapsed else 0.0}
    log.info("produced %d events in %.1fs (%.0f/s)", out.sent, elapsed, stats["events_per_s"])
    return stats


def with_impressions(events: Iterable[BehaviorEvent]) -> Iterator[BehaviorEvent | ImpressionEvent]:
    """Real logs have no impressions: derive one per rating / page view, and a click when it was positive.

    MovieLens: each rating is an impression at position 0; rating >= 4 adds a click. Taobao: each page view
    is an impression; a later cart/fav/buy of the same item by the same user adds a click (the log is held
    to look ahead, as the readers already sort it in memory).
    """
    events = list(events)
    later_positive = {(e.user_id, e.item_id) for e in events if e.behavior in ("cart", "fav", "buy")}
    for e in events:
        yield e
        if e.behavior not in ("rate", "view"):
            continue
        rid = f"imp-{e.event_id}"
        yield ImpressionEvent(request_id=rid, user_id=e.user_id, item_id=e.item_id, category_id=e.category_id,
                              position=0, scenario=e.scenario, event_time_ms=e.event_time_ms)
        if is_positive(e) or (e.behavior == "view" and (e.user_id, e.item_id) in later_positive):
            yield BehaviorEvent(event_id=f"{e.event_id}-click", user_id=e.user_id, item_id=e.item_id,
                                category_id=e.category_id, behavior="click", scenario=e.scenario, request_id=rid,
                                event_time_ms=e.event_time_ms + 1)


def main(args: argparse.Namespace, settings: KafkaSettings) -> int:
    if args.source == "synthetic":
        cfg = SyntheticConfig(users=args.users, items=args.items, categories=args.categories,
                              events=args.events + args.skip, seed=args.seed, duplicate_rate=args.duplicate_rate)
        stats = produce(settings, itertools.islice(SyntheticStream(cfg), args.skip, None), rate=args.rate,
                        total=args.events)
    else:
        reader = {"movielens": read_movielens, "taobao": read_taobao, "amazon": read_amazon}[args.source]
        meta = {"meta": args.meta} if getattr(args, "meta", None) else {}
        events: Iterable = reader(args.path, limit=args.limit, **meta)
        if args.impressions:
            events = with_impressions(events)
        stats = produce(settings, events, speedup=args.speedup, total=None if args.impressions else args.limit)
    print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
    return 0
