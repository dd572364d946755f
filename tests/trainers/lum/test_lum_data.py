"""Sequences from behavior events: order, replays, memory and progress on large logs."""

from __future__ import annotations

import logging
import tracemalloc

from schemas.events import BehaviorEvent
from schemas.tokenize import tokenize
from trainers.lum.data import sequences_from_events

T0 = 1_500_000_000_000


def ev(n: int, user: int, item: int) -> BehaviorEvent:
    return BehaviorEvent(event_id=f"e{n}", user_id=user, item_id=item, category_id=item % 7, behavior="view",
                         scenario="home", event_time_ms=T0 + n)


def test_users_in_order_of_first_event_pairs_in_time_order_replays_once():
    events = [ev(0, 9, 1), ev(1, 3, 2), ev(2, 9, 3), ev(1, 3, 2), ev(3, 5, 4), ev(4, 3, 5), ev(2, 9, 3)]
    span: dict = {}
    seqs = sequences_from_events(events, span)
    assert [s.user_id for s in seqs] == [9, 3, 5]
    assert [s.items.tolist() for s in seqs] == [[1, 3], [2, 5], [4]]
    assert seqs[0].cats.tolist() == [1, 3] and seqs[0].conds.tolist() == [list(tokenize(ev(0, 9, 1)).conditions),
                                                                         list(tokenize(ev(2, 9, 3)).conditions)]
    assert span == {"trained_from_ms": T0, "trained_until_ms": T0 + 4}
    assert sequences_from_events([]) == []


def test_large_logs_are_gathered_as_columns_with_progress(caplog, monkeypatch):
    """~140 bytes a pair at the peak where a tuple per pair and a set of event keys took ~300: the 20M MovieLens
    in one process. A progress line says how far the read is."""
    import schemas.progress

    times = iter([0.0] + [100.0] * 10**6)  # every progress check finds the interval passed
    monkeypatch.setattr(schemas.progress.time, "monotonic", lambda: next(times))
    n = 60_000
    events = (ev(k, k % 5_000, k % 3_000) for k in range(n))
    with caplog.at_level(logging.INFO, logger="lum.progress"):
        tracemalloc.start()
        try:
            seqs = sequences_from_events(events)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert sum(len(s) for s in seqs) == n and len(seqs) == 5_000
    assert peak / n < 200, f"{peak / n:.0f} bytes a pair"
    assert "read events: 10,000 events" in caplog.text and "read events: 60,000 events" in caplog.text
