"""The runtime-neutral contract between agent logic and the runtime that hosts it: state store, records, emit.

Agent logic (``streaming.agents.sequences``, ``streaming.agents.joiner``) sees only the types below: no
Kafka client, no RocksDB, no Faust. A runtime (the batch worker ``streaming.agents.worker``, or Faust)
consumes, decodes each message into a ``Record``, owns one ``Store`` per input partition and an ``Emit``
that writes to Kafka, and drives the logic in this order:

    assign    store = RocksStore(path, identity)     # identity mismatch -> state discarded (logged)
              starts = logic.assign(p, store, committed, emit, read)
                                                     # committed: the consumer group's next offset per input
                                                     # topic (None: none yet); the logic may rebuild the
                                                     # store (store.reset(), read(changelog, p)) and returns
                                                     # where to resume per input topic
    per batch logic.process(p, records, emit)        # reads/stages writes in store; emit.send / dead_letter
              store.commit(positions)                # ONE atomic write: staged writes + next offsets, synced
              emit flush                             # every output of the batch delivered, or raise
              consumer-group commit(positions)       # only now: offsets advance only for completed work
    revoke    logic.revoke(p); store.close()         # nothing is committed here that was not completed
    failure   store.discard(); stop (non-zero exit)  # nothing of the failed batch is committed anywhere;
                                                     # a restart replays it from the group's offsets

Rules for the logic. ``process`` must be deterministic and idempotent per record (a crash between the
state commit and the group commit replays records the store has already applied: the store's
``positions()`` tell which). It must not raise for bad input: a record it cannot decode or accept goes to
``emit.dead_letter(record, reason)``; an exception means a bug or an infrastructure fault and stops the
runtime without committing. It may read its own staged writes (``get``/``get_many`` see them), while
``scan`` streams the committed state only, in key order, so rebuilds and reloads never hold a whole
partition in memory.

Optional hooks a logic may define (the worker calls them when present): ``poll_side_inputs()`` before each
batch (global tables such as item embeddings), ``delivered()`` after a batch's outputs were delivered,
``shutdown()`` at exit, and a settable ``high_water(physical_topic, partition) -> int`` (end of an input
partition per the last fetch, -1 while unknown).

Keys and values are bytes; topics are ``schemas.topics.Topic`` objects; record topics are their logical
names (``"behaviors"``), never the physical (prefixed) names, which are the runtime's business.

Store implementations:
    ``RocksStore``  one RocksDB (rocksdict, raw mode) per partition; ``commit`` is one WriteBatch, synced;
                    it records an identity (cluster id, physical topic and its id, partition) and discards
                    state written for another identity (another cluster, a recreated topic, another prefix).
    ``MemoryStore`` a dict, same semantics, for unit tests of the logic.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from schemas.topics import Topic

log = logging.getLogger(__name__)


class Record(NamedTuple):
    """One consumed message, decoded from the runtime's client type (the value is still the raw bytes)."""

    topic: str  # logical registry name, e.g. "behaviors"
    partition: int
    offset: int
    timestamp_ms: int  # the record's Kafka timestamp (ingest time); event time lives in the value
    key: bytes | None
    value: bytes | None


class Emit(Protocol):
    """Where the logic's outputs go. Sends are buffered; the runtime flushes them before committing offsets."""

    def send(self, topic: Topic, value: bytes | None, key: bytes | None = None, partition: int | None = None) -> None:
        """Send ``value`` (already encoded, e.g. ``topic.encode(model)``; None is a tombstone) to ``topic``."""

    def dead_letter(self, record: Record, reason: str | BaseException) -> None:
        """Record ``record`` in the dead-letter topic with ``reason`` and move on."""


# read(topic, partition) -> the partition's records from its beginning to its current end (for rebuilds).
Reader = Callable[[Topic, int], Iterable[Record]]


class Logic(Protocol):
    """What a runtime hosts: one agent's pure logic over records, a store per partition and an emit."""

    name: str  # agent name ("sequences"): state directory, log lines, dead-letter consumer name
    inputs: tuple[Topic, ...]  # co-partitioned input topics: partition p of each is one task with one store

    def assign(self, partition: int, store: Store, committed: Mapping[str, int | None], emit: Emit,
               read: Reader) -> dict[str, int]:
        """Take partition ``partition`` with its store; return the offset to resume from per input topic."""

    def process(self, partition: int, records: Sequence[Record], emit: Emit) -> None:
        """Apply one batch of the partition's records (offset order per topic); stage writes in its store."""

    def revoke(self, partition: int) -> None:
        """Forget the partition (the runtime closes its store)."""

    def gauges(self) -> dict[str, float]:
        """Counters for logs and metrics."""


class Store:
    """One partition's key-value state with staged writes and one atomic commit (see module docstring)."""

    def __init__(self) -> None:
        self._staged: dict[bytes, bytes | None] = {}  # None: delete

    # --- reads: staged writes first, then committed state -------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        if key in self._staged:
            return self._staged[key]
        return self._read_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        values = self._read_many(keys)
        if self._staged:
            staged = self._staged
            values = [staged[k] if k in staged else v for k, v in zip(keys, values)]
        return values

    def scan(self, prefix: bytes = b"", start: bytes | None = None,
             end: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Committed (key, value) pairs whose key starts with ``prefix``, in key order, streamed; with ``start``
        only keys >= it, with ``end`` only keys < it (a seek and a bound: deleted keys outside are never read)."""
        raise NotImplementedError

    def positions(self) -> dict[str, int]:
        """Committed next offset per input topic (logical name), as given to the last ``commit``s."""
        raise NotImplementedError

    # --- writes: staged until commit ----------------------------------------------------------------------
    def put(self, key: bytes, value: bytes) -> None:
        self._staged[key] = value

    def delete(self, key: bytes) -> None:
        self._staged[key] = None

    def update(self, writes: Mapping[bytes, bytes | None]) -> None:
        """``put`` (or ``delete``, for None) each of ``writes``, in order."""
        self._staged.update(writes)

    @property
    def staged(self) -> int:
        return len(self._staged)

    def commit(self, positions: Mapping[str, int], sync: bool = True) -> None:
        """Apply the staged writes and set ``positions`` (others kept) in one atomic, durable write
        (``sync=False``: atomic but not synced, for writes whose loss an OS crash may cost, e.g. a clean-up)."""
        if sync:
            self._write(self._staged, positions)
        else:
            self._write(self._staged, positions, sync=False)
        self._staged = {}

    def discard(self) -> None:
        """Forget the staged writes (a failed batch)."""
        self._staged = {}

    def reset(self) -> None:
        """Delete all committed state and positions (before a rebuild)."""
        self._staged = {}
        self._clear()

    def close(self) -> None:
        self._staged = {}

    # --- what an implementation provides ------------------------------------------------------------------
    def _read_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        raise NotImplementedError

    def _write(self, writes: Mapping[bytes, bytes | None], positions: Mapping[str, int], sync: bool = True) -> None:
        raise NotImplementedError

    def _clear(self) -> None:
        raise NotImplementedError


class MemoryStore(Store):
    """A dict-backed store with the same semantics (for unit tests; not durable)."""

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[bytes, bytes] = {}
        self._positions: dict[str, int] = {}
        self.commits = 0

    def _read_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.data.get(k) for k in keys]

    def scan(self, prefix: bytes = b"", start: bytes | None = None,
             end: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        lo, hi = max(prefix, start or b""), end
        for k in sorted(k for k in self.data if k.startswith(prefix) and k >= lo and (hi is None or k < hi)):
            if k in self.data:
                yield k, self.data[k]

    def positions(self) -> dict[str, int]:
        return dict(self._positions)

    def _write(self, writes: Mapping[bytes, bytes | None], positions: Mapping[str, int], sync: bool = True) -> None:
        for k, v in writes.items():
            if v is None:
                self.data.pop(k, None)
            else:
                self.data[k] = v
        self._positions.update(positions)
        self.commits += 1

    def _clear(self) -> None:
        self.data.clear()
        self._positions.clear()


# RocksDB key space: one byte of namespace so that user keys never meet bookkeeping keys.
_DATA, _POS, _IDENTITY = b"d", b"p", b"\x00identity"


# Bounded memory. A worker holds one store per partition; RocksDB's defaults (64 MB memtables, two per store,
# a block cache per store, index and filter blocks held outside any cache) let a worker's memory climb for many
# minutes, and a per-store bound multiplies by the partitions. So every store of a process shares ONE budget:
# an LRU block cache of $LUM_AGENT_ROCKSDB_MEMORY_MB that holds the data blocks, the index and filter blocks
# (charged to it instead of growing with the SST files) and, through a write-buffer manager, the memtables,
# which all the stores together keep near $LUM_AGENT_ROCKSDB_WRITE_BUFFER_MB: reaching it triggers a flush, and a
# store holds at most two memtables of half of it (the hard bound: the budget per store). It is a soft limit on
# purpose: with stalling on, a write to a store whose memtable is empty, while the other stores'
# memtables hold the budget, waits for memory that only their (never coming) writes would flush: the worker hung
# for good in benchmarks/soak.py. The budget fills within the first minutes of streaming (deleted and compacted blocks count until
# evicted), after which RocksDB's share of the worker's memory stays flat.
_shared: dict[tuple[int, int], tuple] = {}  # (memory, write buffers) in bytes -> (Cache, WriteBufferManager)


def rocks_options(memory_mb: int | None = None, write_buffer_mb: int | None = None):
    """RocksDB options of every agent store: raw keys and the process's one memory budget (see above).

    The sizes default to ``AgentSettings.rocksdb_memory_mb`` / ``rocksdb_write_buffer_mb`` (environment)."""
    from rocksdict import BlockBasedOptions, Cache, Options, WriteBufferManager

    if memory_mb is None or write_buffer_mb is None:
        from schemas.settings import load

        from .settings import AgentSettings

        cfg = load(AgentSettings)
        memory_mb = cfg.rocksdb_memory_mb if memory_mb is None else memory_mb
        write_buffer_mb = cfg.rocksdb_write_buffer_mb if write_buffer_mb is None else write_buffer_mb
    budget = (memory_mb << 20, write_buffer_mb << 20)
    if budget not in _shared:
        cache = Cache(budget[0])
        _shared[budget] = cache, WriteBufferManager.new_write_buffer_manager_with_cache(budget[1], False, cache)
    cache, wbm = _shared[budget]
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_write_buffer_manager(wbm)
    opts.set_write_buffer_size(budget[1] // 2)  # one store alone flushes at half the budget: two fit
    opts.set_max_write_buffer_number(2)
    # Compaction. Every batch writes keys across the whole key space (histories, ids, indexes), so each
    # compaction from L0 rewrites the whole last level, i.e. the state, once per level0_file_num_compaction_trigger
    # flushes; with these small memtables (a flush is ~1 MB when four stores share the budget) and RocksDB's
    # trigger of 4, that rewrite grew with the state into the joiner's largest CPU cost after a day of event time
    # (benchmarks/bench_join_mature.py: ~50 us/event in RocksDB's threads, ~110 MB compacted per 100k events).
    # 16 flushes per rewrite: ~45 MB, ~25 us/event; gets and scans see more L0 files (their filters are pinned).
    opts.set_level_zero_file_num_compaction_trigger(16)
    opts.set_level_zero_slowdown_writes_trigger(40)
    opts.set_level_zero_stop_writes_trigger(60)
    # No memtable bloom filter: its arena comes out of the same write budget, and with it the sequence agent at
    # 10^6 users x 1,024 pairs fell from 12.8k to 9.9k events per CPU-second (bench_scale.py), the joiner unchanged.
    table = BlockBasedOptions()
    table.set_block_cache(cache)
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)  # the hot L0 files' filters are not evicted
    table.set_bloom_filter(10, False)  # ~1% false positives: a get of an absent key (a new user) skips the SSTs
    opts.set_block_based_table_factory(table)
    return opts


def rocks_memory(stores: Iterable[RocksStore]) -> dict[str, int]:
    """RocksDB memory of ``stores`` in bytes: ``memtables`` (active and unflushed), ``table_readers`` (held
    outside the cache), and ``cache`` (usage of the shared block cache, which includes the memtables' charge)."""
    out = {"memtables": 0, "table_readers": 0}
    for s in stores:
        out["memtables"] += s.db.property_int_value("rocksdb.cur-size-all-mem-tables") or 0
        out["table_readers"] += s.db.property_int_value("rocksdb.estimate-table-readers-mem") or 0
    out["cache"] = sum(c.get_usage() for c, _ in _shared.values())
    return out


class RocksStore(Store):
    """One partition's state in its own RocksDB directory (rocksdict, raw mode).

    ``identity`` (e.g. ``{"cluster": ..., "topics": ..., "partition": ...}``) is stored with the state; a
    database holding another identity, or none (an older layout), is deleted and started empty, with a
    warning, so that the logic rebuilds it rather than trusting state from another cluster or topic.
    ``sync=True`` makes every commit durable against an OS crash (one fsync per batch). ``memory_mb`` and
    ``write_buffer_mb`` pick the process's shared RocksDB budget (default: from the environment).
    """

    def __init__(self, path: Path | str, identity: Mapping[str, object] | None = None, sync: bool = True,
                 memory_mb: int | None = None, write_buffer_mb: int | None = None):
        super().__init__()
        self._budget = (memory_mb, write_buffer_mb)  # None: from the environment (``rocks_options``)
        from rocksdict import WriteOptions

        self.path = Path(path)
        self.identity = json.dumps(dict(identity or {}), sort_keys=True, default=str).encode()
        self._wo = WriteOptions()
        self._wo.sync = sync
        self._wo_nosync = WriteOptions()
        self.db = self._open()
        found = self.db.get(_IDENTITY)
        self.discarded_on_open = False  # True when state of another identity was found and deleted
        if found != self.identity:
            if found is not None or self._has_any():
                log.warning("state in %s belongs to %s, not %s: discarding it (it will be rebuilt)", self.path,
                            found.decode(errors="replace") if found else "an unknown identity (older layout)",
                            self.identity.decode())
                self._clear()
                self.discarded_on_open = True
            else:
                self.db.put(_IDENTITY, self.identity, write_opt=self._wo)

    def _open(self):
        from rocksdict import Rdict

        self.path.mkdir(parents=True, exist_ok=True)
        return Rdict(str(self.path), options=rocks_options(*self._budget))

    def _has_any(self) -> bool:
        return next(iter(self.db.keys()), None) is not None

    def _read_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return self.db.get([_DATA + k for k in keys])

    def scan(self, prefix: bytes = b"", start: bytes | None = None,
             end: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        from rocksdict import ReadOptions

        first = _DATA + prefix
        ro = ReadOptions()  # bounds are raw bytes in a raw-mode database
        if end is not None:  # the iterator stops there: it never reads on into (deleted) keys past the range
            ro.set_iterate_upper_bound(_DATA + end)
        for k, v in self.db.items(from_key=max(first, _DATA + start) if start else first, read_opt=ro):
            if not k.startswith(first):
                return
            yield k[1:], v

    def positions(self) -> dict[str, int]:
        out = {}
        for k, v in self.db.items(from_key=_POS):
            if not k.startswith(_POS):
                break
            out[k[1:].decode()] = int.from_bytes(v, "big")
        return out

    def _write(self, writes: Mapping[bytes, bytes | None], positions: Mapping[str, int], sync: bool = True) -> None:
        from rocksdict import WriteBatch

        wb = WriteBatch(raw_mode=True)
        for k, v in writes.items():
            if v is None:
                wb.delete(_DATA + k)
            else:
                wb.put(_DATA + k, v)
        for topic, off in positions.items():
            wb.put(_POS + topic.encode(), int(off).to_bytes(8, "big"))
        self.db.write(wb, write_opt=self._wo if sync else self._wo_nosync)

    def _clear(self) -> None:
        self.db.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self.db = self._open()
        self.db.put(_IDENTITY, self.identity, write_opt=self._wo)

    def close(self) -> None:
        super().close()
        self.db.close()


class MemoryEmit:
    """An ``Emit`` that keeps what it is given (for unit tests of the logic): ``sent`` holds
    (topic name, key, value, partition), ``dead`` holds (record, reason)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, int | None]] = []
        self.dead: list[tuple[Record, str]] = []

    def send(self, topic: Topic, value: bytes | None, key: bytes | None = None, partition: int | None = None) -> None:
        self.sent.append((topic.name, key, value, partition))

    def dead_letter(self, record: Record, reason: str | BaseException) -> None:
        self.dead.append((record, str(reason) or type(reason).__name__))


def read_state(path: Path | str) -> Iterator[tuple[bytes, bytes]]:
    """The committed (key, value) pairs of a ``RocksStore`` directory, whatever its identity (tools, tests)."""
    from rocksdict import AccessType, Options, Rdict

    db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only())
    try:
        for k, v in db.items(from_key=_DATA):
            if not k.startswith(_DATA):
                break
            yield k[1:], v
    finally:
        db.close()
