"""Topic registry: every Kafka topic lum-stream uses, with its key, value model and configuration.

This is the only place topic names are written. Code asks ``settings.topic(BEHAVIORS)`` for the physical
name, which adds ``LUM_KAFKA_TOPIC_PREFIX`` (empty by default; tests and side-by-side deployments use it to
share one cluster). ``lum topics create`` applies this registry to a cluster, idempotently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from . import codec, seqexport
from .events import (ITEM_VERSIONS, BehaviorEvent, DeadLetter, ImpressionEvent, ItemEmbedding, LumFeatures,
                     TrainingExample)
from .seqexport import Delta
from .tokenize import UserSequence

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Topic:
    name: str
    key: str  # what the key is (always UTF-8 decimal text of the id, so tools can read it)
    value: type[BaseModel] | type[UserSequence] | type[Delta]
    partitions: int
    compacted: bool
    retention_ms: int | None  # None: keep forever (compacted topics keep the latest value per key)
    doc: str
    config: dict[str, str] = field(default_factory=dict)

    def kafka_config(self) -> dict[str, str]:
        cfg = {"cleanup.policy": "compact" if self.compacted else "delete"}
        cfg["retention.ms"] = str(self.retention_ms if self.retention_ms is not None else -1)
        return cfg | self.config

    def encode(self, value) -> bytes:
        if self.value is Delta:
            return seqexport.encode_delta(value.user_id, value.rows, value.cap)
        return codec.encode_user_sequence(value) if self.value is UserSequence else codec.encode(value)

    def decode(self, data: bytes | None):
        """The value model, or ``codec.DecodeError`` with the reason (for the dead-letter topic)."""
        if self.value is Delta:
            return seqexport.decode_delta(data)
        # Both snapshot layouts (v1 fixed int64, v2 compact): see schemas.seqexport.
        return seqexport.decode_user_sequence(data) if self.value is UserSequence else codec.decode(self.value, data)


def key_of(entity_id: int) -> bytes:
    return str(entity_id).encode()


def item_key(model_version: str, item_id: int | None, category_id: int = 0) -> bytes:
    """The ``item-embeddings`` key of an item's record under ``model_version`` (``<version>/<item id>``), or of a
    category's (``item_id`` None: ``<version>/category=<id>``). One key per version, so that compaction keeps
    every served version's vectors (user features of an older version are matched with that version's only);
    the refresh job tombstones the keys of versions past the ``ITEM_VERSIONS`` newest."""
    tail = key_of(item_id) if item_id is not None else b"category=" + key_of(category_id)
    return model_version.encode() + b"/" + tail


def item_key_version(key: bytes | None) -> str | None:
    """The model version an ``item-embeddings`` key names (None: a key without one, written before keys had it)."""
    version, sep, _ = (key or b"").rpartition(b"/")
    return version.decode(errors="replace") if sep else None


BEHAVIORS = Topic("behaviors", "user_id", BehaviorEvent, 4, False, 7 * DAY_MS,
                  "user actions (views, clicks, carts, buys, ratings): the source of sequences and labels")
IMPRESSIONS = Topic("impressions", "user_id", ImpressionEvent, 4, False, 7 * DAY_MS,
                    "items shown to users, one event per (request, item)")
TRAINING_EXAMPLES = Topic("training-examples", "user_id", TrainingExample, 4, False, 7 * DAY_MS,
                          "labelled impressions with point-in-time features, written by the joiner")
USER_SEQUENCES = Topic("user-sequences", "user_id", UserSequence, 4, True, None,
                       "each user's full (condition, item) sequence: the compacted snapshot (snapshot job, "
                       "backfill) that readers fold the deltas onto")
SEQUENCE_DELTAS = Topic("sequence-deltas", "user_id", Delta, 4, False, 7 * DAY_MS,
                        "the pairs each sequence-agent batch added per user (schemas.seqexport), folded by readers")
LUM_FEATURES = Topic("lum-features", "user_id", LumFeatures, 4, True, None,
                     "each user's latest LUM condition outputs, written by the refresh job")
ITEM_EMBEDDINGS = Topic("item-embeddings", "model_version/item_id", ItemEmbedding, 4, True, None,
                        "each item's LUM item-token embedding per served model version (and each category's, for items "
                        "the model never saw), written by the refresh job")
LATE_CLICKS = Topic("late-clicks", "user_id", BehaviorEvent, 1, False, 7 * DAY_MS,
                    "clicks that arrived after their impression's attribution window closed")
JOINER_CHANGELOG = Topic("joiner-changelog", "joiner state key (bytes)", bytes, 4, True, None,  # type: ignore[arg-type]
                         "the label joiner's state changes per input partition (raw store values), to rebuild it")
DEAD_LETTERS = Topic("dead-letters", "source key", DeadLetter, 1, False, 30 * DAY_MS,
                     "messages a consumer could not decode or validate, with the reason and source offset")

ALL_TOPICS: tuple[Topic, ...] = (BEHAVIORS, IMPRESSIONS, TRAINING_EXAMPLES, USER_SEQUENCES, SEQUENCE_DELTAS,
                                 LUM_FEATURES, ITEM_EMBEDDINGS, LATE_CLICKS, JOINER_CHANGELOG, DEAD_LETTERS)
BY_NAME: dict[str, Topic] = {t.name: t for t in ALL_TOPICS}
