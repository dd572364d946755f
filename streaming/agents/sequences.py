"""Sequence agent: each user's rolling (condition, item) sequence, in RocksDB and in the ``user-sequences`` topic.

    lum agents --only sequences [--workers N]        # or: python -m streaming.agents.worker sequences

State. One RocksDB (rocksdict) per ``behaviors`` partition under ``$LUM_DATA_DIR/sequences/<group>/p<N>``;
key = user id (8 bytes big endian), value = the user's sequence in the exact bytes of the export topic
(``USER_SEQUENCES.encode``: a header and an int64 array of pairs ``[event_time, event_key, 4 condition ids,
item_id, category_id]``, tokenized by ``schemas.tokenize``). Special key ``\\x00offset`` = next ``behaviors``
offset the database covers, written in the same WriteBatch as the sequences.

Semantics. A user's sequence is the ``LUM_AGENT_MAX_PAIRS`` (default 1,024) latest distinct events in
(event_time, event_key) order, events deduplicated by ``event_key`` (hash of event_id): a pure function of
the SET of events seen. So duplicates (producer retries) and replays after a crash change nothing, a late
event lands in its event-time place (or falls off the old end if the cap is full), and users interleaving
across partitions do not matter. ``updated_at_ms`` is the newest pair's event time (deterministic).

Throughput. Events are taken in batches (``LUM_AGENT_BATCH_SIZE``, 2,000); per batch the rows are grouped
by user, the touched users' values are fetched with one multi-get, merged with numpy (isin / lexsort on an
(n, 8) int64 view of the stored bytes; no per-pair Python objects) and written with one WriteBatch.

Export: the ``user-sequences`` topic (compacted, binary ``UserSequence``; the trainers' contract)
    * key = user id as decimal text; value = the user's FULL current sequence (never a delta), decoded with
      ``schemas.topics.USER_SEQUENCES.decode`` (no Faust, no RocksDB needed); partition = the user's
      ``behaviors`` partition (so partition p holds exactly the users of behaviors partition p).
    * One message per changed user per batch, flushed before the batch's offsets are committed.
    * Full snapshot: read every partition from the beginning to its end (high-water mark of the fetch),
      keep the last value per key. Apache Kafka's compaction keeps this cheap; the embedded broker never
      compacts, so the read grows with history (``snapshot()`` below does exactly this).
    * Incremental: remember the end offset of each partition after a read; later, read from there: the keys
      seen are the users changed since, their values are their complete new sequences.

Recovery. The export topic doubles as the changelog. On assignment of partition p the agent resumes from
the group's committed offset C. If the local database covers at least C it is used as is (events in
[C, local offset) were applied but maybe not published: they are re-applied, change nothing, and their
users are republished). If it is missing or behind (the partition was processed elsewhere, another host),
it is rebuilt from partition p of ``user-sequences`` (latest value per key), which holds everything up to C
because outputs are flushed before commits. Rebalances between workers on one host reuse the local files.
"""

from __future__ import annotations

import logging
import shutil
import struct
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from confluent_kafka import Message
from rocksdict import Options, Rdict, WriteBatch

from schemas.codec import DecodeError
from schemas.settings import KafkaSettings
from schemas.tokenize import CONDITION_KINDS, SEQ_HEADER_SIZE, TOKENIZER_VERSION, UserSequence, tokenize
from schemas.topics import BEHAVIORS, USER_SEQUENCES, key_of

from ..kafka import DeadLetters, read_to_end, reader
from .settings import AgentSettings

log = logging.getLogger(__name__)

ROW = 4 + len(CONDITION_KINDS)  # int64 columns of one pair, the codec's layout
OFFSET_KEY = b"\x00offset"
_PAYLOAD = 3 + SEQ_HEADER_SIZE  # codec format header (3 bytes) + sequence header


def user_key(user_id: int) -> bytes:
    return user_id.to_bytes(8, "big")


def open_db(path: Path) -> Rdict:
    path.mkdir(parents=True, exist_ok=True)
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    return Rdict(str(path), options=opts)


def encode_rows(user_id: int, rows: np.ndarray) -> bytes:
    """A sequence's export/storage bytes from its (n, ROW) int64 rows, oldest first."""
    head = USER_SEQUENCES.encode(UserSequence(user_id, int(rows[-1, 0]) if len(rows) else 0, []))
    # The codec's header ends with n_pairs (u32); the pairs are the rows as little-endian int64.
    return head[:-4] + struct.pack("<I", len(rows)) + rows.astype("<i8", copy=False).tobytes()


def decode_rows(value: bytes) -> np.ndarray:
    """(n, ROW) int64 rows of stored bytes; other tokenizer versions go through the schemas decoder."""
    if value[3 + 5] == TOKENIZER_VERSION and value[3 + 6] == len(CONDITION_KINDS):
        return np.frombuffer(value, dtype="<i8", offset=_PAYLOAD).reshape(-1, ROW)
    seq = USER_SEQUENCES.decode(value)
    return np.array([(p.event_time_ms, p.event_key, *p.conditions, p.item_id, p.category_id) for p in seq.pairs],
                    dtype=np.int64).reshape(-1, ROW)


def merge(cur: np.ndarray | None, new: np.ndarray, cap: int) -> np.ndarray | None:
    """The cap latest distinct (by event_key) rows of cur + new in (time, key) order; None if unchanged."""
    if cur is not None and len(cur):
        if len(new) == 1:  # the common case with many users: one event per user per batch
            if (cur[:, 1] == new[0, 1]).any():
                return None
            if (new[0, 0], new[0, 1]) > (cur[-1, 0], cur[-1, 1]):  # in order: append, no sort
                return np.concatenate((cur[len(cur) + 1 - cap:] if len(cur) >= cap else cur, new))
        else:
            new = new[~np.isin(new[:, 1], cur[:, 1])]
            if not len(new):
                return None
        rows = np.concatenate((cur, new))
    elif len(new) == 1:
        return new
    else:
        rows = new
    _, first = np.unique(rows[:, 1], return_index=True)  # duplicates within the batch: keep the first
    if len(first) != len(rows):
        rows = rows[np.sort(first)]
    rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))][-cap:]
    if cur is not None and len(rows) == len(cur) and np.array_equal(rows, cur):
        return None  # only events older than the capped window arrived
    return rows


def pair_rows(event) -> tuple[int, ...]:
    t = tokenize(event)
    return (t.event_time_ms, t.event_key, *t.conditions, t.item_id, t.category_id)


class SequenceAgent:
    name = "sequences"
    topics = (BEHAVIORS,)

    def __init__(self, kafka: KafkaSettings, cfg: AgentSettings, out, dead: DeadLetters):
        self.kafka, self.cfg, self.out, self.dead = kafka, cfg, out, dead
        self.group = cfg.sequences_group
        self.src, self.dst = kafka.topic(BEHAVIORS), kafka.topic(USER_SEQUENCES)
        self.root = Path(cfg.data_dir) / "sequences" / (kafka.topic_prefix + self.group)
        self.dbs: dict[int, Rdict] = {}
        self.republish_below: dict[int, int] = {}
        self.published = self.rebuilt_users = 0

    # --- partition lifecycle -----------------------------------------------------------------------------
    def open(self, partition: int, committed: dict[str, int | None]) -> dict[str, int]:
        start = committed.get(self.src) or 0
        path = self.root / f"p{partition}"
        db = open_db(path)
        raw = db.get(OFFSET_KEY)
        local = None if raw is None else int.from_bytes(raw, "big")
        if local is None or local < start:
            db.close()
            shutil.rmtree(path)
            db = open_db(path)
            n = self.rebuild(db, partition, start)
            log.info("partition %d: local state %s, rebuilt %d users from %s (resume at %d)", partition,
                     "missing" if local is None else f"behind ({local} < {start})", n, self.dst, start)
            local = start
        else:
            log.info("partition %d: local state at offset %d, committed %d", partition, local, start)
        self.dbs[partition] = db
        self.republish_below[partition] = local
        return {self.src: start}

    def rebuild(self, db: Rdict, partition: int, start: int) -> int:
        """Fill an empty database from partition p of user-sequences (latest value per key wins)."""
        latest: dict[bytes, bytes] = {}
        consumer = reader(self.kafka)
        try:
            for m in read_to_end(consumer, self.dst, {partition: 0}):
                latest[m.key()] = m.value()
        finally:
            consumer.close()
        wb = WriteBatch(raw_mode=True)
        for key, value in latest.items():
            if value:  # a tombstone (backfill) deletes the user
                try:
                    wb.put(user_key(int(key)), value)
                except ValueError:
                    log.warning("skipping %s record with key %r", self.dst, key)
        wb.put(OFFSET_KEY, start.to_bytes(8, "big"))
        db.write(wb)
        self.rebuilt_users += len(latest)
        return len(latest)

    def close(self, partition: int) -> None:
        db = self.dbs.pop(partition, None)
        if db is not None:
            db.close()

    # --- processing --------------------------------------------------------------------------------------
    def process(self, partition: int, msgs: list[Message]) -> None:
        rows: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        forced: set[int] = set()
        republish_below = self.republish_below.get(partition, 0)
        for m in msgs:
            try:
                event = BEHAVIORS.decode(m.value())
            except DecodeError as e:
                self.dead.send_message(m, e)
                continue
            rows[event.user_id].append(pair_rows(event))
            if m.offset() < republish_below:
                forced.add(event.user_id)
        db = self.dbs[partition]
        users = list(rows)
        olds = db.get([user_key(u) for u in users]) if users else []
        wb = WriteBatch(raw_mode=True)
        publish: list[tuple[int, bytes]] = []
        for user, old in zip(users, olds):
            merged = merge(None if old is None else decode_rows(old), np.array(rows[user], dtype=np.int64),
                           self.cfg.max_pairs)
            if merged is not None:
                value = encode_rows(user, merged)
                wb.put(user_key(user), value)
                publish.append((user, value))
            elif user in forced and old is not None:
                publish.append((user, old))
        wb.put(OFFSET_KEY, (msgs[-1].offset() + 1).to_bytes(8, "big"))
        db.write(wb)
        for user, value in publish:
            self.out.produce(self.dst, value=value, key=key_of(user), partition=partition)
        self.published += len(publish)

    def flushed(self) -> None:
        pass

    def poll_side_inputs(self) -> None:
        pass

    def shutdown(self) -> None:
        for p in list(self.dbs):
            self.close(p)

    def gauges(self) -> dict[str, float]:
        return {"sequences_published_total": self.published, "sequences_rebuilt_users_total": self.rebuilt_users}


def expected_sequences(events, cap: int = 1024) -> dict[int, UserSequence]:
    """Sequences computed directly from events (the definition above), for tests and backfill checks."""
    by_user: dict[int, dict[int, tuple[int, ...]]] = defaultdict(dict)
    for e in events:
        r = pair_rows(e)
        by_user[e.user_id].setdefault(r[1], r)
    out = {}
    for user, rows in by_user.items():
        kept = sorted(rows.values(), key=lambda r: (r[0], r[1]))[-cap:]
        out[user] = USER_SEQUENCES.decode(encode_rows(user, np.array(kept, dtype=np.int64)))
    return out


def snapshot(kafka: KafkaSettings, starts: dict[int, int] | None = None) -> tuple[dict[int, UserSequence], dict[int, int]]:
    """Latest sequence per user in ``user-sequences`` (from ``starts``, default the beginning) and the end
    offsets reached: the full-snapshot and incremental reads of the export contract."""
    topic = kafka.topic(USER_SEQUENCES)
    latest: dict[bytes, bytes | None] = {}
    ends: dict[int, int] = dict(starts or {})
    consumer = reader(kafka)
    t0 = time.monotonic()
    try:
        for m in read_to_end(consumer, topic, starts):
            latest[m.key()] = m.value()
            ends[m.partition()] = m.offset() + 1
    finally:
        consumer.close()
    log.debug("snapshot of %s: %d users in %.1fs", topic, len(latest), time.monotonic() - t0)
    return {int(k): USER_SEQUENCES.decode(v) for k, v in latest.items() if v}, ends
