"""Label joiner: impressions + clicks -> one ``TrainingExample`` per impressed item, after its window closes.

    lum agents --only joiner [--workers N]           # or: python -m streaming.agents.worker joiner

Inputs (consumer group ``LUM_AGENT_JOINER_GROUP``): ``impressions``, ``behaviors`` and ``lum-features``, all
keyed by user id with the same partition count, so partition p of the three is one task with one state;
``item-embeddings`` (keyed by item) is read whole by every worker (a global table in memory).

Rules (event time; ``W`` = ``LUM_JOIN_WINDOW_MS``, ``L`` = ``LUM_AGENT_ALLOWED_LATENESS_MS``)
    * example_id = ``request_id/item_id``; an impression seen again (retry, replay) is ignored.
    * watermark(p) = event time reached by partition p's streams - L, where "reached" is the max event time
      of the slower of impressions/behaviors while both still have data to read (so a topic read ahead
      cannot close windows whose clicks are unread), and the max of both once they are at their ends
      (high-water mark of the fetch). It never decreases.
    * An impression at t closes when watermark >= t + W; it is then emitted with label 1 if a click with its
      request_id and item_id and event time <= t + W was processed before, else 0. A click may arrive before
      its impression (it waits, bounded by the retention below).
    * A click processed after its example was emitted, or whose event time is past t + W, is late: counted
      (``late_clicks_total``) and copied to ``late-clicks``; the emitted label is never changed.
    * Point in time: ``history_*`` = the user's last ``LUM_AGENT_HISTORY_LEN`` behaviors with event time
      strictly before t (never the click being predicted, nothing after the impression). LUM fields are the
      newest ``LumFeatures`` of the user computed from events strictly before t (``as_of_ms`` < t; the last
      ``FEATURE_VERSIONS`` are kept per user, so a refresh that has already seen the click does not leak it)
      and the latest ``ItemEmbedding`` of the item (a function of the model only); ``None`` when absent.
    * Closed windows are freed at emission; their ids are remembered for ``LUM_AGENT_JOIN_RETENTION_MS``
      of event time (duplicates and late clicks are recognised that long), then forgotten.

State and delivery. Per partition, the state lives in memory and in a RocksDB (``$LUM_DATA_DIR/joiner/
<group>/p<N>``) updated by ONE WriteBatch per batch that also holds the input offsets and an outbox of the
batch's examples. On restart the worker resumes from the offsets in its database, so state changes apply
exactly once; the outbox is re-sent after a crash between the write and the flush, so an example may be
delivered twice only in that window (consumers keep one per ``example_id``). Workers that share a partition
over time must share ``LUM_DATA_DIR`` (one host, or a volume that follows the partition); a worker without
the partition's database starts from the group's committed offset with empty windows.

Why not a Faust agent: see ``streaming.agents.worker`` (table writes at ~0.6 ms each, no exactly-once on
the embedded broker, offsets committed apart from state).
"""

from __future__ import annotations

import bisect
import heapq
import logging
import shutil
from pathlib import Path

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, KafkaError, Message, TopicPartition
from rocksdict import Rdict, WriteBatch

from schemas.codec import DecodeError
from schemas.deadletter import DeadLetters
from schemas.events import ImpressionEvent, LumFeatures, TrainingExample
from schemas.settings import KafkaSettings
from schemas.tokenize import event_key
from schemas.topics import (BEHAVIORS, IMPRESSIONS, ITEM_EMBEDDINGS, LATE_CLICKS, LUM_FEATURES, TRAINING_EXAMPLES,
                            key_of)

from .reading import partitions_of, reader
from .settings import AgentSettings

log = logging.getLogger(__name__)

MAX_TIME_KEY = b"\x00max_time:"  # + topic: max event time seen per input stream
HISTORY_CAP = 2048  # hard bound per user, even if a burst falls inside one window


FEATURE_VERSIONS = 4  # LUM feature versions kept per user, to find the newest one older than an impression


def open_db(path: Path) -> Rdict:
    from rocksdict import Options

    path.mkdir(parents=True, exist_ok=True)
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    return Rdict(str(path), options=opts)


def _i8(n: int) -> bytes:
    return n.to_bytes(8, "big", signed=True)


def _feature_key(user: int, as_of: int) -> bytes:
    return b"f" + user.to_bytes(8, "big") + _i8(as_of)


class PartitionState:
    """One partition's windows, history and features; ``dirty`` holds the RocksDB puts (None: delete)."""

    def __init__(self, db: Rdict):
        self.db = db
        self.max_time: dict[str, int] = {}  # input topic -> max event time seen in this partition
        self.hold: tuple[str, ...] = ()  # streams not caught up: the watermark waits for them
        self.next_offset: dict[str, int] = {}  # per input topic
        self.wm = 0  # watermark (event time), never decreases
        self.pending: dict[str, tuple[ImpressionEvent, bytes, bool]] = {}  # id -> (impression, raw, clicked)
        self.closing: list[tuple[int, str]] = []  # heap of (deadline, example id)
        self.emitted: dict[str, int] = {}  # id -> deadline, for duplicates and late clicks
        self.forget: list[tuple[int, str, str]] = []  # heap of (time, kind, id): emitted ids / early clicks
        self.early: dict[str, int] = {}  # clicks seen before their impression: id -> click time
        self.history: dict[int, list[tuple[int, int, int, int]]] = {}  # user -> sorted (time, key, item, cat)
        self.features: dict[int, list[tuple[int, LumFeatures]]] = {}  # user -> [(as_of, features)], by as_of
        self.outbox: list[bytes] = []
        self.dirty: dict[bytes, bytes | None] = {}

    def load(self) -> None:
        for key, value in self.db.items():
            kind, rest = key[:1], key[1:]
            if kind == b"p":
                imp = IMPRESSIONS.decode(value[1:])
                eid = rest.decode()
                self.pending[eid] = (imp, value[1:], value[:1] == b"\x01")
            elif kind == b"e":
                self.emitted[rest.decode()] = int.from_bytes(value, "big", signed=True)
            elif kind == b"c":
                self.early[rest.decode()] = int.from_bytes(value, "big", signed=True)
            elif kind == b"h":
                arr = np.frombuffer(value, dtype=">i8").reshape(-1, 4)
                self.history[int.from_bytes(rest, "big")] = [tuple(int(x) for x in r) for r in arr]
            elif kind == b"f":
                self.add_features(LUM_FEATURES.decode(value), value)
            elif key.startswith(MAX_TIME_KEY):
                self.max_time[key[len(MAX_TIME_KEY):].decode()] = int.from_bytes(value, "big", signed=True)

    def put(self, key: bytes, value: bytes | None) -> None:
        self.dirty[key] = value

    def add_features(self, f: LumFeatures, raw: bytes) -> None:
        """Keep ``f`` among the user's newest FEATURE_VERSIONS (a republish with the same as_of replaces)."""
        as_of = -1 if f.as_of_ms is None else f.as_of_ms  # unknown: usable for any impression
        versions = self.features.setdefault(f.user_id, [])
        i = bisect.bisect_left(versions, as_of, key=lambda v: v[0])
        if i < len(versions) and versions[i][0] == as_of:
            versions[i] = (as_of, f)
        else:
            versions.insert(i, (as_of, f))
        self.put(_feature_key(f.user_id, as_of), raw)
        while len(versions) > FEATURE_VERSIONS:
            self.put(_feature_key(f.user_id, versions.pop(0)[0]), None)

    def features_before(self, user: int, t: int) -> LumFeatures | None:
        return next((f for as_of, f in reversed(self.features.get(user, ())) if as_of < t), None)

    def put_history(self, user: int) -> None:
        h = self.history[user]
        self.put(b"h" + user.to_bytes(8, "big"), np.array(h, dtype=">i8").tobytes())


class JoinerAgent:
    name = "joiner"
    topics = (IMPRESSIONS, BEHAVIORS, LUM_FEATURES)

    def __init__(self, kafka: KafkaSettings, cfg: AgentSettings, out, dead: DeadLetters):
        self.kafka, self.cfg, self.out, self.dead = kafka, cfg, out, dead
        self.group = cfg.joiner_group
        self.t_imp, self.t_beh, self.t_feat = (kafka.topic(t) for t in self.topics)
        self.t_out, self.t_late = kafka.topic(TRAINING_EXAMPLES), kafka.topic(LATE_CLICKS)
        # Its own databases, apart from the worker's per-partition stores (data_dir/joiner/...), until the
        # joiner keeps its state in the store it is given.
        self.root = Path(cfg.data_dir) / "joiner-own" / (kafka.topic_prefix + self.group)
        self.parts: dict[int, PartitionState] = {}
        self.items: dict[int, tuple[str, list[float]]] = {}  # item -> (model version, vector)
        self.counts = {"examples_total": 0, "positives_total": 0, "late_clicks_total": 0,
                       "duplicate_impressions_total": 0, "orphan_clicks_total": 0, "lum_features_too_new_total": 0}
        # End of each input partition as the worker's consumer last saw it (set by the worker; -1: unknown,
        # which holds the watermark back until a fetch has told).
        self.high_water = lambda topic, partition: -1
        self._items_consumer = reader(kafka)
        self._start_items()

    # --- item embeddings: a global table, every worker reads every partition ------------------------------
    def _start_items(self) -> None:
        topic = self.kafka.topic(ITEM_EMBEDDINGS)
        parts = partitions_of(self._items_consumer, topic)
        self._items_consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        done: set[int] = set()
        for _ in range(600):  # catch up before joining (bounded: ~60 s of empty polls)
            if len(done) == len(parts):
                break
            done |= self._poll_items(0.1)
        log.info("joiner: %d item embeddings loaded", len(self.items))

    def _poll_items(self, timeout: float) -> set[int]:
        eof = set()
        for m in self._items_consumer.consume(5000, timeout):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    eof.add(m.partition())
                continue
            try:
                emb = ITEM_EMBEDDINGS.decode(m.value())
            except DecodeError as e:
                self.dead.send_message(m, e)
                continue
            self.items[emb.item_id] = (emb.model_version, emb.vector)
        return eof

    def poll_side_inputs(self) -> None:
        self._poll_items(0)

    # --- partition lifecycle -----------------------------------------------------------------------------
    def open(self, partition: int, committed: dict[str, int | None]) -> dict[str, int]:
        db = open_db(self.root / f"p{partition}")
        local = {t: db.get(b"\x00off" + t.encode()) for t in (self.t_imp, self.t_beh, self.t_feat)}
        st = PartitionState(db)
        behind = any(v is not None and committed.get(t) is not None and int.from_bytes(v, "big") < committed[t]
                     for t, v in local.items())
        if behind:  # another worker (other data dir) advanced this partition: this copy is stale
            log.warning("joiner partition %d: local state is behind the group's offsets; starting empty", partition)
            db.close()
            shutil.rmtree(self.root / f"p{partition}")
            db = open_db(self.root / f"p{partition}")
            st = PartitionState(db)
            local = {t: None for t in local}
        st.load()
        st.closing = [(imp.event_time_ms + self.cfg.join_window_ms, eid) for eid, (imp, _, _) in st.pending.items()]
        heapq.heapify(st.closing)
        keep = self.cfg.join_retention_ms
        st.forget = [(d + keep, "e", eid) for eid, d in st.emitted.items()] + \
                    [(t + keep, "c", eid) for eid, t in st.early.items()]
        heapq.heapify(st.forget)
        resent = 0
        for key, value in db.items(from_key=b"o"):  # outbox of a batch whose flush may not have completed
            if key[:1] != b"o":
                break
            self.out.produce(self.t_out, value=value, key=key_of(int.from_bytes(key[1:9], "big")))
            st.outbox.append(key)
            resent += 1
        self.parts[partition] = st
        starts = {t: int.from_bytes(v, "big") if v is not None else (committed.get(t) or 0) for t, v in local.items()}
        st.next_offset = dict(starts)
        log.info("joiner partition %d: %d open windows, %d remembered, resume at %s%s", partition, len(st.pending),
                 len(st.emitted), starts, f", re-sent {resent} examples" if resent else "")
        return starts

    def close(self, partition: int) -> None:
        st = self.parts.pop(partition, None)
        if st is not None:
            st.db.close()

    # --- processing --------------------------------------------------------------------------------------
    def process(self, partition: int, msgs: list[Message]) -> None:
        st = self.parts[partition]
        ends: dict[str, int] = {}
        for m in msgs:
            ends[m.topic()] = m.offset() + 1
        # Watermark = min over the event streams that still have data to read (impressions, behaviors) of
        # their max event time, minus the lateness: a stream read ahead of the other cannot close windows
        # whose clicks are still unread. A stream at its end (high-water mark of the fetch) holds nothing.
        st.hold = tuple(t for t in (self.t_imp, self.t_beh)
                        if ends.get(t, st.next_offset.get(t, 0)) < self.high_water(t, partition))
        st.next_offset |= ends
        self._watermark(st)
        offsets: dict[str, int] = {}
        touched_history: set[int] = set()
        for m in msgs:
            topic = m.topic()
            offsets[topic] = m.offset() + 1
            try:
                if topic == self.t_imp:
                    self._impression(st, m.value())
                elif topic == self.t_beh:
                    self._behavior(st, m.value(), touched_history)
                else:
                    st.add_features(LUM_FEATURES.decode(m.value()), m.value())
            except DecodeError as e:
                self.dead.send_message(m, e)
                continue
            self._close_windows(st)
        for user in touched_history:
            if user in st.history:
                st.put_history(user)
        wb = WriteBatch(raw_mode=True)
        for key, value in st.dirty.items():
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        for topic, off in offsets.items():
            wb.put(b"\x00off" + topic.encode(), off.to_bytes(8, "big"))
        for topic, t in st.max_time.items():
            wb.put(MAX_TIME_KEY + topic.encode(), _i8(t))
        st.db.write(wb)
        st.dirty.clear()

    def flushed(self) -> None:
        for st in self.parts.values():
            if st.outbox:
                wb = WriteBatch(raw_mode=True)
                for key in st.outbox:
                    wb.delete(key)
                st.db.write(wb)
                st.outbox.clear()

    def _see(self, st: PartitionState, topic: str, t: int) -> None:
        if t > st.max_time.get(topic, 0):
            st.max_time[topic] = t
            self._watermark(st)

    def _watermark(self, st: PartitionState) -> None:
        if st.hold:
            t = min(st.max_time.get(x, 0) for x in st.hold)
        else:
            t = max(st.max_time.values(), default=0)
        st.wm = max(st.wm, t - self.cfg.allowed_lateness_ms)  # never moves back

    def _impression(self, st: PartitionState, raw: bytes) -> None:
        imp = IMPRESSIONS.decode(raw)
        self._see(st, self.t_imp, imp.event_time_ms)
        eid = f"{imp.request_id}/{imp.item_id}"
        if eid in st.pending or eid in st.emitted:
            self.counts["duplicate_impressions_total"] += 1
            return
        deadline = imp.event_time_ms + self.cfg.join_window_ms
        clicked = False
        if eid in st.early:
            clicked = st.early.pop(eid) <= deadline
            st.put(b"c" + eid.encode(), None)
        st.pending[eid] = (imp, raw, clicked)
        st.put(b"p" + eid.encode(), (b"\x01" if clicked else b"\x00") + raw)
        heapq.heappush(st.closing, (deadline, eid))

    def _behavior(self, st: PartitionState, raw: bytes, touched: set[int]) -> None:
        ev = BEHAVIORS.decode(raw)
        self._see(st, self.t_beh, ev.event_time_ms)
        h = st.history.setdefault(ev.user_id, [])
        row = (ev.event_time_ms, event_key(ev.event_id), ev.item_id, ev.category_id)
        i = bisect.bisect_left(h, row)
        if i == len(h) or h[i] != row:  # a retried event is history once
            h.insert(i, row)
            self._trim_history(st, h)
            touched.add(ev.user_id)
        if ev.behavior != "click" or not ev.request_id:
            return
        eid = f"{ev.request_id}/{ev.item_id}"
        if eid in st.pending:
            imp, imp_raw, clicked = st.pending[eid]
            if ev.event_time_ms <= imp.event_time_ms + self.cfg.join_window_ms:
                if not clicked:
                    st.pending[eid] = (imp, imp_raw, True)
                    st.put(b"p" + eid.encode(), b"\x01" + imp_raw)
                return
        elif eid not in st.emitted:  # impression not seen yet: remember the click until it comes
            if eid not in st.early or ev.event_time_ms < st.early[eid]:
                st.early[eid] = ev.event_time_ms
                st.put(b"c" + eid.encode(), _i8(ev.event_time_ms))
                heapq.heappush(st.forget, (ev.event_time_ms + self.cfg.join_retention_ms, "c", eid))
            return
        self.counts["late_clicks_total"] += 1
        self.out.produce(self.t_late, value=raw, key=key_of(ev.user_id))

    def _trim_history(self, st: PartitionState, h: list) -> None:
        # Keep everything a still-open window may need (time >= watermark - W) plus history_len before it.
        cutoff = st.wm - self.cfg.join_window_ms
        i = bisect.bisect_left(h, (cutoff,))
        drop = max(i - self.cfg.history_len, len(h) - HISTORY_CAP, 0)
        if drop:
            del h[:drop]

    def _close_windows(self, st: PartitionState) -> None:
        wm = st.wm
        while st.closing and st.closing[0][0] <= wm:
            deadline, eid = heapq.heappop(st.closing)
            if eid in st.pending:
                self._emit(st, eid, deadline)
        while st.forget and st.forget[0][0] <= wm:
            _, kind, eid = heapq.heappop(st.forget)
            if kind == "e" and st.emitted.pop(eid, None) is not None:
                st.put(b"e" + eid.encode(), None)
            elif kind == "c" and st.early.pop(eid, None) is not None:
                st.put(b"c" + eid.encode(), None)
                self.counts["orphan_clicks_total"] += 1

    def _emit(self, st: PartitionState, eid: str, deadline: int) -> None:
        imp, _raw, clicked = st.pending.pop(eid)
        t = imp.event_time_ms
        h = st.history.get(imp.user_id, [])
        before = h[max(0, bisect.bisect_left(h, (t,)) - self.cfg.history_len):bisect.bisect_left(h, (t,))]
        lum = dict(lum_model_version=None, lum_conditions=None, lum_user=None, lum_item=None)
        f = st.features_before(imp.user_id, t)
        if f is None and imp.user_id in st.features:
            self.counts["lum_features_too_new_total"] += 1  # only features that have seen the future
        if f is not None:
            lum |= dict(lum_model_version=f.model_version, lum_conditions=[c.condition for c in f.conditions],
                        lum_user=[c.vector for c in f.conditions])
        item = self.items.get(imp.item_id)
        if item is not None:
            lum["lum_item"] = item[1]
            lum["lum_model_version"] = lum["lum_model_version"] or item[0]
        ex = TrainingExample(example_id=eid, request_id=imp.request_id, user_id=imp.user_id, item_id=imp.item_id,
                             category_id=imp.category_id, position=imp.position, scenario=imp.scenario,
                             query=imp.query, event_time_ms=t, label=1 if clicked else 0,
                             history_items=[r[2] for r in before], history_categories=[r[3] for r in before], **lum)
        value = TRAINING_EXAMPLES.encode(ex)
        self.out.produce(self.t_out, value=value, key=key_of(imp.user_id))
        okey = b"o" + imp.user_id.to_bytes(8, "big") + eid.encode()
        st.put(okey, value)
        st.outbox.append(okey)
        st.put(b"p" + eid.encode(), None)
        st.emitted[eid] = deadline
        st.put(b"e" + eid.encode(), _i8(deadline))
        heapq.heappush(st.forget, (deadline + self.cfg.join_retention_ms, "e", eid))
        self.counts["examples_total"] += 1
        self.counts["positives_total"] += clicked

    def shutdown(self) -> None:
        for p in list(self.parts):
            self.close(p)
        self._items_consumer.close()

    def gauges(self) -> dict[str, float]:
        g: dict[str, float] = dict(self.counts)
        g["open_windows"] = sum(len(s.pending) for s in self.parts.values())
        g["item_embeddings"] = len(self.items)
        return g


class _Msg:
    """confluent-kafka's Message interface over a ``Record`` (physical topic name), for the code above."""

    __slots__ = ("r", "t")

    def __init__(self, record, topic: str):
        self.r, self.t = record, topic

    def topic(self) -> str:
        return self.t

    def partition(self) -> int:
        return self.r.partition

    def offset(self) -> int:
        return self.r.offset

    def key(self) -> bytes | None:
        return self.r.key

    def value(self) -> bytes | None:
        return self.r.value

    def timestamp(self) -> tuple[int, int]:
        return (1, self.r.timestamp_ms)


class JoinerLogic:
    """The joiner on the worker's logic contract (``streaming.agents.store``), keeping its own RocksDB,
    offsets and outbox (the store it is given stays unused) until it becomes pure logic."""

    name = "joiner"
    inputs = JoinerAgent.topics

    def __init__(self, kafka: KafkaSettings, cfg: AgentSettings, out, dead: DeadLetters):
        self.agent = JoinerAgent(kafka, cfg, out, dead)
        self.prefix = kafka.topic_prefix

    @property
    def high_water(self):
        return self.agent.high_water

    @high_water.setter
    def high_water(self, fn) -> None:
        self.agent.high_water = fn

    def assign(self, partition, store, committed, emit, read) -> dict[str, int]:
        starts = self.agent.open(partition, {self.prefix + t: off for t, off in committed.items()})
        return {t[len(self.prefix):]: off for t, off in starts.items()}

    def process(self, partition, records, emit) -> None:
        self.agent.process(partition, [_Msg(r, self.prefix + r.topic) for r in records])

    def revoke(self, partition: int) -> None:
        self.agent.close(partition)

    def delivered(self) -> None:
        self.agent.flushed()

    def poll_side_inputs(self) -> None:
        self.agent.poll_side_inputs()

    def shutdown(self) -> None:
        self.agent.shutdown()

    def gauges(self) -> dict[str, float]:
        return self.agent.gauges()
