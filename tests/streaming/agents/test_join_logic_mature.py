"""The joiner on mature state: per-batch work stays flat once windows close, ids are forgotten and users evicted
(issue 9's soak: the joiner fell behind once its 24 h retention started)."""

from __future__ import annotations

from streaming.agents.join_logic import JoinKeys
from streaming.agents.store import MemoryStore

from test_join_logic import HOUR, W, Harness, beh, click, imp


class LsmStore(MemoryStore):
    """A MemoryStore that behaves like an LSM tree without compaction: a deleted key leaves a tombstone that a
    scan passing over it must step over (``stepped`` counts them), as RocksDB does until a compaction."""

    def __init__(self) -> None:
        super().__init__()
        self.tombstones: set[bytes] = set()
        self.stepped = 0

    def _write(self, writes, positions, sync=True):
        for k, v in writes.items():
            (self.tombstones.add if v is None else self.tombstones.discard)(k)
        super()._write(writes, positions, sync)

    def scan(self, prefix=b"", start=None, end=None):
        lo = max(prefix, start or b"")
        for k in sorted(k for k in self.data.keys() | self.tombstones if k.startswith(prefix) and k >= lo):
            if end is not None and k >= end:
                return
            if k in self.tombstones:
                self.stepped += 1
                continue
            yield k, self.data[k]


def test_index_scans_do_not_step_over_earlier_batches_deletions():
    """Windows close, emitted ids are forgotten, idle users are evicted every batch: the tombstones those
    deletions leave must not be read again by later batches' scans (the cost would grow with the state)."""
    store = LsmStore()
    h = Harness(store=store, retention_ms=3 * W, state_horizon_ms=16 * W, max_watermark_step_ms=100 * W)
    per_batch = []
    for b in range(120):
        t = b * W // 2
        evs = [imp(f"r{b}-{i}", b * 10 + i, 11, t + i) for i in range(10)]
        evs += [beh(b * 10 + i, b * 10 + i, t + i) for i in range(10)]  # each user active once: evicted later
        evs += [click(5000 + b, b * 10, t + 5, f"r{b}-0", 11)]
        before = store.stepped
        h.batch(*evs)
        per_batch.append(store.stepped - before)
    labels = h.labels()
    assert len(labels) > 1000 and sum(labels.values()) > 100  # windows closed, with clicks
    assert h.logic.gauges()["evicted_users_total"] > 500  # eviction ran
    assert store.get(JoinKeys.emitted("r0-0")) is None  # forgotten
    assert max(per_batch[20:]) <= 2 * max(per_batch[:20]) + 5, per_batch  # flat, not growing with the batches


def test_an_activity_older_than_the_eviction_cursor_is_still_evicted():
    """A late behavior writes an activity entry before where the eviction scan has reached: it is seen."""
    h = Harness(state_horizon_ms=10 * HOUR, max_watermark_step_ms=100 * HOUR, lateness_ms=0)
    h.batch(beh(1, 1, 100))
    h.tick(12 * HOUR, user=3)  # user 1 evicted; the eviction scan has reached the 12 h - 10 h bucket
    assert h.store.get(JoinKeys.history(1)) is None
    # user 2: a behavior at 1 h (11 h late: accepted into history, its activity entry far behind the scan)
    h.batch(beh(2, 2, HOUR))
    assert h.store.get(JoinKeys.history(2)) is not None
    h.tick(13 * HOUR, user=3)
    h.tick(14 * HOUR, user=3)
    assert h.store.get(JoinKeys.history(2)) is None
    assert h.logic.gauges()["evicted_users_total"] == 2


def test_cursors_start_over_after_a_reassignment():
    """A new logic on the same (committed) store scans its indexes from their start: nothing due is missed."""
    h = Harness(max_watermark_step_ms=100 * W)
    h.batch(imp("r1", 1, 11, 1000))
    h.tick(500)
    again = Harness(store=h.store)
    again.tick(1000 + W)
    assert again.labels() == {"r1/11": 0}
