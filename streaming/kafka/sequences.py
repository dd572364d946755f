"""The one reader (and snapshot writer) of the sequence export: ``user-sequences`` snapshots + ``sequence-deltas``.

    lum sequences snapshot [--every HOURS]    # fold new deltas into the compacted snapshot (once, or periodically)
    lum sequences stats                       # users, pairs and offsets of the folded export

Contract (layouts and fold: ``schemas.seqexport``; offsets are ``FoldState.flat()``: the next offset per
partition of both topics and the markers seen, e.g. ``{"user-sequences/0": 12, "sequence-deltas/0": 40}``):
    * ``snapshot(kafka)``: every user's full sequence, and the offsets it covers (what a later incremental
      read passes). Reads the compacted snapshot topic, then the deltas from each partition's marker offset,
      and folds. Used by ``lum pretrain --source kafka`` (its checkpoint records the offsets).
    * ``changed_since(kafka, offsets, view_dir)``: the users whose sequences changed since ``offsets``, with
      their FULL sequences. Full sequences need a base, so the caller keeps a local view (one RocksDB of
      folded sequences in the compact layout + the offsets it covers): an incremental read then costs only
      what was written since the view's offsets, never a re-read of the snapshot. ``offsets=None`` returns
      everyone. Used by ``lum refresh`` (view in ``sequence-view/`` next to its state file).
    * ``fold_partition(kafka, p)``: one partition's users (tools; the agent rebuilds a moved partition with
      ``schemas.seqexport.fold_partition_records`` over its runtime's reader, into its store, in chunks).
    * ``export_users`` / ``publish_reset``: what ``lum backfill sequences`` replaces, and the new base it
      writes (full sequences, tombstones, then markers past every older delta).
    * ``write_snapshot(kafka)``: the periodic compaction: per partition, fold the deltas since the marker into
      the changed users' snapshot records, flush, then move the marker. A crash in between leaves a marker
      that is too low, which the fold tolerates (re-applying a delta changes nothing). Run it more often than
      the deltas' retention (7 days), e.g. daily: its bytes are the changed users' full sequences.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from schemas import seqexport as sx
from schemas.codec import DecodeError
from schemas.settings import KafkaSettings
from schemas.tokenize import UserSequence
from schemas.topics import SEQUENCE_DELTAS, USER_SEQUENCES, key_of

from .reader import partitions_of, read_to_end, reader

log = logging.getLogger(__name__)

STATE_KEY = b"\x00fold-state"


def _reader_fn(kafka: KafkaSettings, idle_timeout_s: float = 30.0):
    """``read(logical topic, {partition: start})`` over Kafka, as ``schemas.seqexport.catch_up`` wants it;
    a partition that neither yields data nor reaches its end for ``idle_timeout_s`` raises TimeoutError."""
    names = {USER_SEQUENCES.name: USER_SEQUENCES, SEQUENCE_DELTAS.name: SEQUENCE_DELTAS}

    def read(topic: str, starts: dict[int, int]):
        consumer = reader(kafka)
        try:
            for m in read_to_end(consumer, kafka.topic(names[topic]), dict(starts), idle_timeout_s=idle_timeout_s):
                yield m.partition(), m.offset(), m.key(), m.value()
        finally:
            consumer.close()

    return read


def _partitions(kafka: KafkaSettings) -> list[int]:
    consumer = reader(kafka)
    try:
        return partitions_of(consumer, kafka.topic(USER_SEQUENCES))
    finally:
        consumer.close()


def _report_bad(kafka: KafkaSettings, bad: list, dead_letters) -> None:
    for topic, p, off, key, value, err in bad:
        if dead_letters is not None:
            dead_letters.send(topic=kafka.topic(USER_SEQUENCES if topic == USER_SEQUENCES.name else SEQUENCE_DELTAS),
                              partition=p, offset=off, key=key, value=value, error=err)
        else:
            log.warning("skipping bad %s record at %d@%d: %s", topic, p, off, err)


class MemoryView:
    """A fold held in memory (full snapshots, the agent's rebuild)."""

    def __init__(self):
        self.rows: dict[int, np.ndarray] = {}
        self.state = sx.FoldState.empty()

    def get(self, users) -> dict[int, np.ndarray]:
        return {u: self.rows[u] for u in users if u in self.rows}

    def put(self, rows: dict[int, np.ndarray | None]) -> None:
        for u, r in rows.items():
            if r is None:
                self.rows.pop(u, None)
            else:
                self.rows[u] = r

    def set_state(self, state: sx.FoldState) -> None:
        self.state = state

    def users(self):
        return iter(self.rows)

    def close(self) -> None:
        pass


class View:
    """A local, persistent fold of the export (RocksDB: user -> compact snapshot bytes, plus the fold state),
    so that incremental reads cost only what was written since, never a re-read of the whole snapshot."""

    def __init__(self, path: str | Path):
        from rocksdict import Options, Rdict

        Path(path).mkdir(parents=True, exist_ok=True)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self.db = Rdict(str(path), options=opts)
        raw = self.db.get(STATE_KEY)
        self.state = sx.FoldState.from_flat(None if raw is None else json.loads(raw))

    @staticmethod
    def _k(user: int) -> bytes:
        return user.to_bytes(8, "big", signed=True)

    def get(self, users) -> dict[int, np.ndarray]:
        users = list(users)
        vals = self.db.get([self._k(u) for u in users]) if users else []
        return {u: sx.decode(v)[1] for u, v in zip(users, vals) if v is not None}

    def put(self, rows: dict[int, np.ndarray | None]) -> None:
        from rocksdict import WriteBatch

        wb = WriteBatch(raw_mode=True)
        for u, r in rows.items():
            if r is None:
                wb.delete(self._k(u))
            else:
                wb.put(self._k(u), sx.encode_snapshot(u, r))
        self.db.write(wb)

    def set_state(self, state: sx.FoldState) -> None:
        # Written after every chunk of rows: a run interrupted before this repeats from the old state.
        self.db.put(STATE_KEY, json.dumps(state.flat()).encode())
        self.state = state

    def users(self):
        for k in self.db.keys():
            if k != STATE_KEY:
                yield int.from_bytes(k, "big", signed=True)

    def close(self) -> None:
        self.db.close()


def _catch_up(kafka: KafkaSettings, view, since: sx.FoldState | None, partitions: list[int] | None, dead_letters,
              idle_timeout_s: float = 30.0) -> set[int]:
    parts = partitions if partitions is not None else _partitions(kafka)
    changed, state, bad = sx.catch_up(view.state, parts, _reader_fn(kafka, idle_timeout_s), view.get, view.put, since)
    view.set_state(state)
    _report_bad(kafka, bad, dead_letters)
    return changed


def snapshot(kafka: KafkaSettings, dead_letters=None, idle_timeout_s: float = 30.0
             ) -> tuple[dict[int, UserSequence], dict[str, int]]:
    """Every user's full sequence, and the offsets covered (pass them to ``changed_since`` later)."""
    t0 = time.monotonic()
    view = MemoryView()
    _catch_up(kafka, view, None, None, dead_letters, idle_timeout_s)
    log.info("sequence export: %d users in %.1fs", len(view.rows), time.monotonic() - t0)
    return {u: sx.to_sequence(u, r) for u, r in view.rows.items()}, view.state.flat()


def fold_partition(kafka: KafkaSettings, partition: int, dead_letters=None) -> dict[int, np.ndarray]:
    """Every user (rows) of one partition: what the sequence agent rebuilds a moved partition from."""
    view = MemoryView()
    _catch_up(kafka, view, None, [partition], dead_letters)
    return view.rows


def changed_since(kafka: KafkaSettings, offsets: dict[str, int] | None, view_dir: str | Path, dead_letters=None,
                  idle_timeout_s: float = 30.0) -> tuple[dict[int, UserSequence], dict[str, int]]:
    """Users whose sequences changed since ``offsets`` (as returned by an earlier call or ``snapshot``; None:
    every user), with their full sequences, and the offsets to pass next time. ``view_dir`` holds the
    caller's local fold (built on first use from the whole export)."""
    view = View(view_dir)
    try:
        since = None if offsets is None else sx.FoldState.from_flat(offsets)
        changed = _catch_up(kafka, view, since, None, dead_letters, idle_timeout_s)
        users = changed if offsets is not None else list(view.users())
        got = view.get(users)
        log.info("sequence export: %d users changed since the given offsets", len(got))
        return {u: sx.to_sequence(u, r) for u, r in got.items()}, view.state.flat()
    finally:
        view.close()


def write_snapshot(kafka: KafkaSettings, out=None) -> dict[str, int]:
    """Fold every partition's deltas since its marker into ``user-sequences`` (see module docstring)."""
    from .producer import Output

    out = out or Output(kafka)
    topic = kafka.topic(USER_SEQUENCES)
    users = nbytes = 0
    for p in _partitions(kafka):  # one partition at a time bounds the memory to one partition's users
        view = MemoryView()
        _catch_up(kafka, view, None, [p], None)
        before = view.state.markers.get(p, 0)
        # Users with deltas since the marker: their records are stale. A second read of the deltas is cheap
        # (they are what the job folds anyway); the fold above already holds every user's rows.
        dirty: set[int] = set()
        for _p, _off, _k, value in _reader_fn(kafka)(SEQUENCE_DELTAS.name, {p: before}):
            try:
                dirty.add(SEQUENCE_DELTAS.decode(value).user_id)
            except DecodeError:
                continue
        for u in sorted(dirty):
            rows = view.rows.get(u)
            value = None if rows is None else sx.encode_snapshot(u, rows)
            out.produce(topic, value=value, key=key_of(u), partition=p)
            users += 1
            nbytes += len(value or b"")
        out.flush()  # the users first: a marker never runs ahead of the snapshot records it vouches for
        end = view.state.deltas.get(p, 0)
        out.produce(topic, value=sx.encode_marker(p, end), key=sx.marker_key(p), partition=p)
        out.flush()
        log.info("snapshot partition %d: %d users rewritten, deltas covered up to %d", p, len(dirty), end)
    return {"users": users, "bytes": nbytes}


def export_users(kafka: KafkaSettings) -> tuple[dict[int, int], dict[int, int]]:
    """{user: partition} of every user with a sequence in the export now, and the ``sequence-deltas`` end
    offsets read (what ``publish_reset`` puts in its markers)."""
    users: dict[int, int] = {}
    ends: dict[int, int] = {}
    for p in _partitions(kafka):
        view = MemoryView()
        _catch_up(kafka, view, None, [p], None)
        users |= {u: p for u in view.rows}
        ends[p] = view.state.deltas.get(p, 0)
    return users, ends


def publish_reset(kafka: KafkaSettings, out, partition: int, rows, gone, delta_end: int) -> int:
    """A new base for one partition (``lum backfill``): every user's full sequence (``rows``: (user, rows)),
    tombstones for ``gone`` users, then the marker ``delta_end`` (deltas before it are superseded). Returns
    the number of records written."""
    topic = kafka.topic(USER_SEQUENCES)
    n = 0
    for u, r in rows:
        out.produce(topic, value=sx.encode_snapshot(u, r), key=key_of(u), partition=partition)
        n += 1
    for u in gone:
        out.produce(topic, value=None, key=key_of(u), partition=partition)
        n += 1
    out.flush()
    out.produce(topic, value=sx.encode_marker(partition, delta_end), key=sx.marker_key(partition), partition=partition)
    out.flush()
    return n


# --- the backfill's mark: readers refuse a half-rebuilt export -------------------------------------------
# ``lum backfill sequences`` rewrites the export in place (deltas while it replays, then a new snapshot base):
# a reader in between sees some users rebuilt and others not. It marks its run in the committed offsets of
# consumer group BACKFILL_GROUP (durable, and no record that export readers must skip; Kafka's offset
# metadata would be the natural place, but the embedded broker drops it): partition 0 of ``user-sequences``
# holds the start time (ms) of the latest backfill started, partition 0 of ``sequence-deltas`` that of the
# latest one finished. Started later than finished: one is running, or was interrupted (then its rerun clears
# the mark: the export stays half-rebuilt until then).
BACKFILL_GROUP = "lum-backfill-sequences"


class BackfillRunning(RuntimeError):
    """The sequence export is being rebuilt by ``lum backfill sequences``."""


def _backfill_partitions(kafka: KafkaSettings):
    from confluent_kafka import TopicPartition

    return [TopicPartition(kafka.topic(USER_SEQUENCES), 0), TopicPartition(kafka.topic(SEQUENCE_DELTAS), 0)]


def backfill_state(kafka: KafkaSettings) -> tuple[int, int]:
    """(start ms of the latest backfill started, of the latest finished); 0 where none."""
    from .reader import group_consumer

    c = group_consumer(kafka, kafka.topic_prefix + BACKFILL_GROUP)
    try:
        got = c.committed(_backfill_partitions(kafka), timeout=30)
    finally:
        c.close()
    return tuple(max(0, tp.offset) if tp.error is None else 0 for tp in got)  # type: ignore[return-value]


def mark_backfill(kafka: KafkaSettings, started_ms: int, finished: bool) -> None:
    """Record that the backfill started at ``started_ms`` began (``finished=False``) or completed."""
    from confluent_kafka import TopicPartition

    from .reader import group_consumer

    tp = _backfill_partitions(kafka)[1 if finished else 0]
    c = group_consumer(kafka, kafka.topic_prefix + BACKFILL_GROUP)
    try:
        c.commit(offsets=[TopicPartition(tp.topic, 0, started_ms)], asynchronous=False)
    finally:
        c.close()


def check_no_backfill(kafka: KafkaSettings, before: tuple[int, int] | None = None) -> tuple[int, int]:
    """Raise ``BackfillRunning`` (saying what to do) if a backfill is rebuilding the export now, or, given the
    ``before`` state of an earlier call, if one started since; returns the state."""
    state = backfill_state(kafka)
    started, finished = state
    group = kafka.topic_prefix + BACKFILL_GROUP
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started / 1000))
    if started > finished:
        raise BackfillRunning(
            f"`lum backfill sequences` has been rebuilding the sequence export since {when} (consumer group "
            f"{group}): refusing to read a half-rebuilt export. Wait until it finishes; if it was interrupted, "
            "run it again (the export stays half-rebuilt until a backfill completes).")
    if before is not None and state != before:
        raise BackfillRunning(f"`lum backfill sequences` (started {when}, consumer group {group}) rebuilt the "
                              "sequence export while it was being read: nothing was used; run again.")
    return state
