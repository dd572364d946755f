"""The trainer's memory of recently trained example ids, in a fixed amount of memory.

    seen = RecentIds(horizon=1_000_000)
    known = seen.contains_many([RecentIds.key(ex.example_id) for ex in examples])   # one bool per key
    seen.add(k)                                  # after the example trained
    np.save(f, seen.to_array()); RecentIds.from_array(horizon, np.load(f))         # in the checkpoint

A Python set of a million 8-byte hashes costs ~80 bytes an id and grows with every example until the horizon
is reached (a slow climb of the trainer's memory over the first million examples). Here the ids live in one
preallocated ring of 8-byte slots, cut into ``CHUNKS`` + 1 chunks: the chunk being filled is also kept in a
small set (exact lookups while it fills); a full chunk is sorted in place and searched with ``searchsorted``.
Eviction is a chunk at a time, the oldest first, so the last ``horizon`` ids are always remembered (up to one
chunk more, the horizon rounded up to whole chunks). Memory is fixed from the start: the ring plus one chunk's set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

CHUNKS = 16  # sealed chunks that hold the horizon: lookups cost one searchsorted per chunk per batch


class RecentIds:
    """At least the last ``horizon`` admitted example ids (8-byte BLAKE2b of the id), oldest evicted first."""

    def __init__(self, horizon: int):
        self.horizon = horizon
        self.chunk = -(-horizon // CHUNKS)
        self.ring = np.full((CHUNKS + 1) * self.chunk, 0, dtype=np.uint64)  # written now: the memory is resident
        self.sealed: list[int] = []  # sorted chunk indexes in the ring, oldest first (at most CHUNKS)
        self.cur = 0  # the chunk being filled
        self.fill = 0  # ids in it
        self.cur_set: set[int] = set()

    @staticmethod
    def key(example_id: str) -> int:
        return RecentIds.keys([example_id])[0]

    @staticmethod
    def keys(example_ids: Iterable[str]) -> list[int]:
        """``key`` of each id (the digests of a batch become ints in one numpy call)."""
        blake2b = hashlib.blake2b
        digests = b"".join([blake2b(i.encode(), digest_size=8).digest() for i in example_ids])
        return np.frombuffer(digests, dtype="<u8").tolist()

    def _chunk(self, c: int) -> np.ndarray:
        return self.ring[c * self.chunk:(c + 1) * self.chunk]

    def add(self, k: int) -> None:
        self.add_many([k])

    def add_many(self, keys: Iterable[int]) -> None:
        """Append ``keys`` in order, a slice of the chunk being filled at a time (no Python work per key)."""
        keys = keys if isinstance(keys, list) else list(keys)
        i = 0
        while i < len(keys):
            part = keys[i:i + self.chunk - self.fill]
            start = self.cur * self.chunk + self.fill
            self.ring[start:start + len(part)] = part
            self.cur_set.update(part)
            self.fill += len(part)
            i += len(part)
            if self.fill == self.chunk:  # seal: sort it for searchsorted, start the oldest chunk over
                self._chunk(self.cur).sort()
                self.sealed.append(self.cur)
                self.cur = (self.cur + 1) % (CHUNKS + 1)
                if len(self.sealed) > CHUNKS:
                    self.sealed.pop(0)  # the chunk about to be overwritten: its ids are forgotten
                self.fill = 0
                self.cur_set = set()

    def contains_many(self, keys: Sequence[int]) -> np.ndarray:
        """One bool per key: remembered or not."""
        q = np.fromiter(keys, dtype=np.uint64, count=len(keys))
        found = np.fromiter((k in self.cur_set for k in keys), dtype=bool, count=len(keys))
        for c in self.sealed:
            chunk = self._chunk(c)
            i = np.minimum(np.searchsorted(chunk, q), len(chunk) - 1)
            found |= chunk[i] == q
        return found

    def __contains__(self, k: int) -> bool:
        return bool(self.contains_many([k])[0])

    def __len__(self) -> int:
        return len(self.sealed) * self.chunk + self.fill

    def to_array(self) -> np.ndarray:
        """The remembered ids, oldest chunk first (a sealed chunk is in sorted order)."""
        return np.concatenate([self._chunk(c) for c in self.sealed]
                              + [self.ring[self.cur * self.chunk:self.cur * self.chunk + self.fill]])

    @classmethod
    def from_array(cls, horizon: int, a: np.ndarray) -> RecentIds:
        r = cls(horizon)
        # to_array's output fits whole (its chunks stay chunks); an array saved with a larger horizon keeps its newest
        r.add_many(a[-(CHUNKS + 1) * r.chunk + 1:].tolist())
        return r
