"""Event models: the values carried by lum-stream's Kafka topics.

Every model is strict (no type coercion, no unknown fields) and bounded: ids, string lengths, list and
vector sizes and timestamps all have limits, so that one hostile or broken producer cannot blow up a
consumer's memory or poison a model. Each model carries a ``SCHEMA_VERSION``; the codec (``schemas.codec``)
writes it into every message header, and a reader refuses versions it does not know.

Times are integer milliseconds since the Unix epoch (UTC), the unit Kafka uses for record timestamps.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Ids are arbitrary non-negative 64-bit values (signed range, so they fit int64 tensors and Kafka keys).
MAX_ID = 2**63 - 1
Id = Annotated[int, Field(ge=0, le=MAX_ID)]
# 1990-01-01 .. 2100-01-01 (MovieLens starts in 1995): outside is a unit mistake (seconds vs ms) or garbage.
MIN_TIME_MS = 631_152_000_000
MAX_TIME_MS = 4_102_444_800_000
TimeMs = Annotated[int, Field(ge=MIN_TIME_MS, le=MAX_TIME_MS)]
# Scenario names are short identifiers ("home", "search", "detail"); they become condition tokens.
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
Query = Annotated[str, Field(min_length=1, max_length=256)]
EventId = Annotated[str, Field(min_length=1, max_length=128)]
MAX_VECTOR_DIM = 1024
MAX_CONDITIONS = 64
MAX_HISTORY = 256
Vector = Annotated[list[float], Field(min_length=1, max_length=MAX_VECTOR_DIM)]
# Training inputs must be finite: one NaN/Infinity (or 1e400, which parses as inf) poisons the model.
FiniteVector = Annotated[list[Annotated[float, Field(allow_inf_nan=False)]],
                         Field(min_length=1, max_length=MAX_VECTOR_DIM)]

Behavior = Literal["view", "click", "cart", "fav", "buy", "rate"]
BEHAVIORS: tuple[str, ...] = Behavior.__args__  # type: ignore[attr-defined]


class _Event(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    SCHEMA_VERSION: ClassVar[int] = 1


class BehaviorEvent(_Event):
    """One user action on one item (topic ``behaviors``, key = user_id)."""

    event_id: EventId  # unique per action; producer retries reuse it, so consumers deduplicate on it
    user_id: Id
    item_id: Id
    category_id: Id  # the item's category (MovieLens: primary genre; Taobao: category_id)
    behavior: Behavior
    scenario: Name  # where it happened: home feed, search, item detail...
    query: Query | None = None  # search term, when the scenario has one
    rating: float | None = Field(default=None, ge=0, le=10)  # explicit feedback (MovieLens)
    request_id: Annotated[str, Field(max_length=128)] | None = None  # links a click to its impression
    event_time_ms: TimeMs


class ImpressionEvent(_Event):
    """One item shown to a user in one request (topic ``impressions``, key = user_id).

    A request that shows N items produces N impression events with the same request_id and positions
    0..N-1. A click on one of them is a ``BehaviorEvent`` with behavior="click" and that request_id.
    """

    request_id: Annotated[str, Field(min_length=1, max_length=128)]
    user_id: Id
    item_id: Id
    category_id: Id
    position: Annotated[int, Field(ge=0, le=1000)]
    scenario: Name
    query: Query | None = None
    event_time_ms: TimeMs


class ConditionOutput(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    condition: Annotated[str, Field(min_length=1, max_length=128)]  # e.g. "scenario=search"
    vector: Vector
    # Set on the answers to the user's own-category queries (``lum refresh``'s top categories): the category
    # answered. A consumer matches it only against candidates of that category (interest matching, paper 4.3).
    own_category: Id | None = None


# The name under which a TrainingExample carries the candidate's own-category answer (the joiner picks it from
# the user's ``own_category`` outputs); the DLRM matches it against the candidate's item vector.
TARGET_CATEGORY = "target_category"


class LumFeatures(_Event):
    """A user's precomputed LUM outputs, one per query condition (compacted topic ``lum-features``).

    Version 2: conditions may carry ``own_category``; version-1 messages (without it) still decode.
    """

    SCHEMA_VERSION: ClassVar[int] = 2
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (1,)

    user_id: Id
    model_version: Annotated[str, Field(min_length=1, max_length=128)]
    conditions: Annotated[list[ConditionOutput], Field(min_length=1, max_length=MAX_CONDITIONS)]
    computed_at_ms: TimeMs
    # Event time of the newest behavior these outputs have seen. Consumers attach them only to events after
    # it (point in time): an impression must never get features computed from its own click.
    as_of_ms: TimeMs | None = None
    # Event time of the newest behavior the *model* (``model_version``) was trained on. The weights carry
    # those events too: consumers attach these features only to impressions after it.
    trained_until_ms: TimeMs | None = None

    @model_validator(mode="after")
    def _same_dims(self) -> LumFeatures:
        dims = {len(c.vector) for c in self.conditions}
        if len(dims) != 1:
            raise ValueError(f"condition vectors differ in size: {sorted(dims)}")
        return self


class ItemEmbedding(_Event):
    """An item's LUM item-token embedding, for interest matching (compacted topic ``item-embeddings``).

    Version 2: ``item_id`` None is a category's record: the embedding of any item of ``category_id`` that the
    model version never trained on (a model trained with item-id dropout reads such an item as its category
    alone); version-1 messages (every one an item's) still decode.
    """

    SCHEMA_VERSION: ClassVar[int] = 2
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (1,)

    item_id: Id | None
    category_id: Id
    model_version: Annotated[str, Field(min_length=1, max_length=128)]
    vector: Vector
    computed_at_ms: TimeMs


ITEM_VERSIONS = 4  # model versions whose item embeddings are served: kept by the joiner, the scorer and the topic


class ItemVectors:
    """Item embeddings per model version, the ``ITEM_VERSIONS`` newest (by ``computed_at_ms``): a user's features
    are matched with the item vector of the SAME model version, never another one (interest matching across two
    versions is meaningless). One rule for the joiner (training examples) and the scorer (serving).
    ``convert`` turns a message's vector into what ``get`` returns (e.g. a float32 array)."""

    def __init__(self, versions: int = ITEM_VERSIONS, convert=lambda v: v):
        self.keep, self.convert = versions, convert
        self.by_version: dict[str, dict[int, object]] = {}
        self.by_category: dict[str, dict[int, object]] = {}  # version -> category -> its untrained items' vector
        self.newest: dict[str, int] = {}  # version -> newest computed_at_ms seen

    def add(self, emb: ItemEmbedding) -> str | None:
        """Keep ``emb``; returns the version dropped to keep ``versions`` of them, if one was."""
        v = emb.model_version
        if emb.item_id is None:  # a category's record: the vector of its items the version never trained on
            self.by_category.setdefault(v, {})[emb.category_id] = self.convert(emb.vector)
            self.by_version.setdefault(v, {})
        else:
            self.by_version.setdefault(v, {})[emb.item_id] = self.convert(emb.vector)
        self.newest[v] = max(self.newest.get(v, 0), emb.computed_at_ms)
        if len(self.by_version) > self.keep:
            oldest = min(self.newest, key=self.newest.__getitem__)
            del self.by_version[oldest], self.newest[oldest]
            self.by_category.pop(oldest, None)
            return oldest
        return None

    def get(self, item: int, version: str, category: int | None = None):
        """The item's vector under ``version``; for an item that version never trained on, its ``category``'s
        record where the version has one; else None."""
        got = self.by_version.get(version, {}).get(item)
        if got is None and category is not None:
            return self.by_category.get(version, {}).get(category)
        return got

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_version.values()) + sum(len(v) for v in self.by_category.values())


class TrainingExample(_Event):
    """One impressed item with its label and point-in-time features (topic ``training-examples``).

    Emitted by the joiner once the impression's attribution window has closed. ``history_*`` is the
    user's behavior before the impression time only (no leakage). LUM fields are ``None`` when no LUM
    features existed for the user or item at join time: absent, never silently zero; vectors are finite.

    Version 4: the codec writes it all binary (fixed-width head, length-prefixed strings, each history column at
    the fewest bytes per id that hold it, float64 vectors), see ``schemas.codec``; version-3 (the same with int64
    history), version-2 (JSON head + binary vectors) and version-1 (JSON) messages still decode.
    """

    SCHEMA_VERSION: ClassVar[int] = 4
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (1, 2, 3)  # the codec tells them apart by the header

    example_id: Annotated[str, Field(min_length=1, max_length=256)]  # request_id/item_id: the dedup key
    request_id: Annotated[str, Field(min_length=1, max_length=128)]
    user_id: Id
    item_id: Id
    category_id: Id
    position: Annotated[int, Field(ge=0, le=1000)]
    scenario: Name
    query: Query | None = None
    event_time_ms: TimeMs
    label: Literal[0, 1]
    # default_factory, not "= []": pydantic deep-copies a mutable default on every validation
    history_items: Annotated[list[Id], Field(default_factory=list, max_length=MAX_HISTORY)]  # most recent last
    history_categories: Annotated[list[Id], Field(default_factory=list, max_length=MAX_HISTORY)]
    lum_model_version: Annotated[str, Field(max_length=128)] | None = None
    lum_conditions: Annotated[list[Annotated[str, Field(max_length=128)]],  # names bounded as ConditionOutput's
                              Field(max_length=MAX_CONDITIONS)] | None = None
    lum_user: Annotated[list[FiniteVector], Field(max_length=MAX_CONDITIONS)] | None = None  # per condition
    lum_item: FiniteVector | None = None
    # The binary decoder also leaves the LUM vectors' wire bytes (float64 little-endian, user vectors in order,
    # then the item vector) in ``__pydantic_private__["_lum_f64"]``, so that a trainer can stack a batch with
    # one np.frombuffer. Not a declared PrivateAttr: declaring one costs every validation an init call.

    def __eq__(self, other: object) -> bool:  # the fields only: a cache of the wire bytes is not a difference
        if not isinstance(other, TrainingExample):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = _Event.__hash__

    @model_validator(mode="after")
    def _consistent(self) -> TrainingExample:
        if len(self.history_items) != len(self.history_categories):
            raise ValueError("history_items and history_categories differ in length")
        if (self.lum_user is None) != (self.lum_conditions is None):
            raise ValueError("lum_user and lum_conditions must be both present or both absent")
        if self.lum_user is not None and len(self.lum_user) != len(self.lum_conditions or []):
            raise ValueError("lum_user needs one vector per lum_conditions entry")
        return self


# The dead-letter contract lives in schemas.deadletter (bounded size); re-exported here for old imports.
from .deadletter import DeadLetter  # noqa: E402,F401
