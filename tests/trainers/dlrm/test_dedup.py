"""The trainer's recent-id memory (``trainers.dlrm.dedup``): exact for the last ``horizon`` ids, fixed memory."""

from __future__ import annotations

import numpy as np

from trainers.dlrm.dedup import CHUNKS, RecentIds


def test_the_last_horizon_ids_are_remembered_and_older_ones_forgotten():
    r = RecentIds(1000)
    for k in range(1, 10_001):
        r.add(k)
        if k % 997 == 0:  # at any point: exactly the last len(r) are known, at least `horizon`, at most a chunk more
            known = r.contains_many(list(range(1, k + 1)))
            assert (known == (np.arange(1, k + 1) > k - len(r))).all()
            assert min(k, 1000) <= len(r) < CHUNKS * r.chunk + r.chunk
    assert 20_000 not in r and 10_000 in r and 9_001 in r and 8_000 not in r


def test_memory_is_fixed_from_the_start():
    """A bounded structure stays bounded: the ring is allocated (and written) once, the set of the chunk being
    filled never exceeds a chunk, and nothing else grows with the ids seen."""
    r = RecentIds(10_000)
    ring, nbytes = r.ring, r.ring.nbytes
    assert nbytes == (CHUNKS + 1) * r.chunk * 8
    for k in range(1, 100_001):  # 10x the horizon
        r.add(k * 7919)
        assert len(r.cur_set) < r.chunk
    assert r.ring is ring and r.ring.nbytes == nbytes and len(r.sealed) <= CHUNKS
    assert 10_000 <= len(r) <= 10_000 + r.chunk


def test_checkpoint_round_trip_and_an_old_insertion_order_array():
    r = RecentIds(500)
    keys = np.random.default_rng(1).integers(1, 2**63, size=2_000, dtype=np.int64).astype(np.uint64)
    r.add_many(keys.tolist())
    back = RecentIds.from_array(500, r.to_array())
    assert (back.contains_many(keys.tolist()) == r.contains_many(keys.tolist())).all()
    old = RecentIds.from_array(500, keys[-500:])  # the format before chunks: the last `horizon` ids, in order
    assert old.contains_many(keys[-500:].tolist()).all() and not old.contains_many(keys[:1000].tolist()).any()
