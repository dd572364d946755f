"""Label joiner: impressions + clicks -> one ``TrainingExample`` per impressed item, after its window closes.

    lum agents --only joiner [--workers N]           # or: python -m streaming.agents.worker joiner

The logic is ``streaming.agents.join_logic.JoinLogic`` (pure: records and a state store in, outputs out);
this module is its adapter for the batch worker (``JoinerLogic``: item embeddings read from Kafka, the
worker's physical topic names). Inputs (consumer group ``LUM_AGENT_JOINER_GROUP``): ``impressions``,
``behaviors`` and ``lum-features``, all keyed by user id with the same partition count, so partition p of
the three is one task with one store; ``item-embeddings`` (keyed by model version and item) is read whole by
every worker, skipping the tombstones of retired versions.

Rules (event time; ``W`` = ``LUM_JOIN_WINDOW_MS``, ``L`` = ``LUM_AGENT_ALLOWED_LATENESS_MS``)
    * example_id = ``request_id/item_id``; an impression seen again (retry, replay) is ignored.
    * An event later than the wall clock + ``LUM_AGENT_MAX_FUTURE_SKEW_MS`` (default 1 h) is dead-lettered:
      it would move the watermark, close every open window and pin features in the future.
    * Reached time of a stream: follows its events' times upwards while they are dense; an isolated jump
      moves it by at most ``LUM_AGENT_MAX_WATERMARK_STEP_MS`` per batch (a replay of the past keeps working,
      a stray event from years ahead does not close windows).
    * watermark(p) = reached time of the slower of impressions/behaviors while either still has data to
      read, and of the faster once both are at their ends; minus L. A stream whose end (high-water mark of
      the fetch) is unknown (-1, -1001) holds the watermark: it is never taken as "at the end". The
      watermark never decreases. Windows close at the end of a batch, so a click in the same batch counts.
    * An impression at t closes when watermark >= t + W; it is then emitted with label 1 if a click with its
      request_id and item_id and event time <= t + W was processed before, else 0. A click may arrive
      before its impression (it waits, bounded by the retention below).
    * A click processed after its example was emitted with label 0, or whose event time is past t + W, is
      late: counted (``late_clicks_total``) and copied to ``late-clicks``; a label is never changed. The
      same click again for an example already labelled 1 is a duplicate, not late.
    * Point in time: ``history_*`` = the user's last ``LUM_AGENT_HISTORY_LEN`` behaviors with event time
      strictly before t. LUM fields come from the newest ``LumFeatures`` of the user with ``as_of_ms`` < t
      AND ``trained_until_ms`` < t (the model itself never saw the labelled events); the last 4 versions
      are kept per user. The item vector is the item's embedding of the SAME model version (embeddings of
      the 4 newest versions are kept, ``schemas.events.ItemVectors``); absent there, it is None rather than
      another version's. Of the user's own-category answers (``own_category`` set) an example carries only
      its candidate's category's, named ``target_category``; the shared conditions it carries all.
    * Closed windows' ids are remembered for ``LUM_AGENT_JOIN_RETENTION_MS`` of event time (duplicates and
      late clicks are recognised that long); a user idle for ``LUM_AGENT_JOIN_STATE_HORIZON_MS`` of event
      time loses its history and features (bounded state).

State and delivery. The worker gives each partition a RocksDB store; every batch is one atomic, synced
commit of the state, the consumed positions and an outbox of the batch's examples, then its outputs are
flushed, then the group's offsets are committed. A crash between the commit and the flush re-sends the
outbox on restart, so an example can be delivered twice only there (consumers keep one per
``example_id``). A batch that fails commits nothing and is redone.

Relocation: a changelog topic, not rewinding. Each batch's state changes (and the positions they reach)
are also written to the compacted ``joiner-changelog`` topic, partition p, as part of the batch's outputs,
so they are delivered before the offsets are committed: values only (the indexes of windows to close, ids
to forget and users to evict are derived again by a rebuild) and the batch's examples as one outbox record
(chunked under 256 KB). A worker that gets partition p without the data
(another host, a lost disk, state of another cluster) rebuilds the store from it, streaming, and resumes
where the state ends; if the changelog ends before the group's offsets, it re-reads the inputs from there.
Rewinding the inputs instead would need them kept for the retention plus the longest history a user
keeps (days to weeks, beyond the inputs' 7-day retention), would replay everything through the join on
every move, and would re-send examples that were already emitted; the changelog holds exactly the state,
is compacted to its size, and is what Faust's tables do too. ``LUM_AGENT_JOINER_CHANGELOG=false`` turns it
off (then a moved partition starts from the group's offsets with empty windows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from schemas.settings import KafkaSettings
from schemas.topics import ITEM_EMBEDDINGS

from ..kafka import DeadLetters, partitions_of, reader
from .join_logic import JoinConfig, JoinKeys, JoinLogic
from .settings import AgentSettings
from .store import Record

__all__ = ["JoinerLogic", "JoinKeys", "JoinLogic", "JoinConfig"]

log = logging.getLogger(__name__)


class JoinerLogic(JoinLogic):
    """``JoinLogic`` on the batch worker: item embeddings from Kafka, high-water marks by physical name."""

    def __init__(self, kafka: KafkaSettings, cfg: AgentSettings, out=None, dead: DeadLetters | None = None):
        self._prefix = kafka.topic_prefix
        super().__init__(JoinConfig.from_settings(cfg))
        self.kafka, self.dead = kafka, dead
        self._items_consumer = reader(kafka)
        self._start_items()

    # The worker's high_water takes physical topic names; the logic asks with logical ones.
    @property
    def high_water(self) -> Callable[[str, int], int | None]:
        return self._high_water

    @high_water.setter
    def high_water(self, fn: Callable[[str, int], int | None]) -> None:
        self._high_water = lambda topic, partition: fn(self._prefix + topic, partition)

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
            self.side(Record(ITEM_EMBEDDINGS.name, m.partition(), m.offset(), m.timestamp()[1], m.key(), m.value()),
                      self)
        return eof

    def dead_letter(self, record: Record, reason) -> None:  # the side input's Emit (dead letters only)
        if self.dead is not None:
            self.dead.send(self._prefix + record.topic, record.partition, record.offset, record.key, record.value,
                           reason)

    def poll_side_inputs(self) -> None:
        self._poll_items(0)

    def shutdown(self) -> None:
        self._items_consumer.close()
