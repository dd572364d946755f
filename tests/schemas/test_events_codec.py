"""Event models are strict and bounded; the codec's header tells formats and versions apart."""

import pytest

from schemas import codec
from schemas.codec import DecodeError
from schemas.events import BehaviorEvent, ItemEmbedding, LumFeatures, TrainingExample
from schemas.topics import ALL_TOPICS, BEHAVIORS, BY_NAME

GOOD = dict(event_id="e1", user_id=1, item_id=2, category_id=3, behavior="click", scenario="home",
            event_time_ms=1_767_225_600_000)


def test_roundtrip_every_json_topic():
    e = BehaviorEvent(**GOOD, query="red shoes", request_id="r1")
    assert BEHAVIORS.decode(BEHAVIORS.encode(e)) == e
    assert {t.name for t in ALL_TOPICS} == set(BY_NAME)


@pytest.mark.parametrize("change, field", [
    ({"user_id": -1}, "user_id"),
    ({"user_id": 2**63}, "user_id"),
    ({"user_id": "1"}, "user_id"),  # strict: no coercion from strings
    ({"event_id": "x" * 129}, "event_id"),
    ({"scenario": "has space"}, "scenario"),
    ({"behavior": "teleport"}, "behavior"),
    ({"event_time_ms": 1_700_000_000}, "event_time_ms"),  # seconds instead of ms
    ({"query": "q" * 257}, "query"),
    ({"extra": 1}, "extra"),
])
def test_invalid_fields_are_refused_with_the_field_named(change, field):
    data = codec.encode(BehaviorEvent(**GOOD))
    import json
    obj = json.loads(data[3:]) | change
    with pytest.raises(DecodeError, match=field):
        BEHAVIORS.decode(data[:3] + json.dumps(obj).encode())


def test_header_errors_are_explicit():
    data = BEHAVIORS.encode(BehaviorEvent(**GOOD))
    with pytest.raises(DecodeError, match="unknown schema version 9"):
        BEHAVIORS.decode(data[:2] + bytes([9]) + data[3:])
    with pytest.raises(DecodeError, match="header"):
        BEHAVIORS.decode(data[3:])
    with pytest.raises(DecodeError, match="empty"):
        BEHAVIORS.decode(b"")
    with pytest.raises(DecodeError, match="invalid BehaviorEvent"):
        BEHAVIORS.decode(data[:3] + b"{not json")


def test_vectors_and_lists_are_bounded():
    with pytest.raises(ValueError):
        LumFeatures(user_id=1, model_version="v", computed_at_ms=GOOD["event_time_ms"],
                    conditions=[{"condition": "any", "vector": [0.0] * 1025}])
    with pytest.raises(ValueError, match="differ in size"):
        LumFeatures(user_id=1, model_version="v", computed_at_ms=GOOD["event_time_ms"],
                    conditions=[{"condition": "a", "vector": [0.0]}, {"condition": "b", "vector": [0.0, 1.0]}])
    base = dict(example_id="r/2", request_id="r", user_id=1, item_id=2, category_id=3, position=0, scenario="home",
                event_time_ms=GOOD["event_time_ms"], label=1)
    with pytest.raises(ValueError, match="both present"):
        TrainingExample(**base, lum_user=[[0.1]])
    with pytest.raises(ValueError):
        TrainingExample(**base, history_items=list(range(257)), history_categories=list(range(257)))
    assert TrainingExample(**base, lum_conditions=["any"], lum_user=[[0.1]], lum_item=[0.2]).label == 1


def test_item_embeddings_v1_still_decode_and_v2_carry_category_records():
    v1 = b'Lj\x01{"item_id":7,"category_id":4,"model_version":"v","vector":[0.5],"computed_at_ms":1767225600000}'
    assert codec.decode(ItemEmbedding, v1).item_id == 7
    cat = ItemEmbedding(item_id=None, category_id=4, model_version="v", vector=[0.5], computed_at_ms=1767225600000)
    wire = codec.encode(cat)
    assert wire[:3] == b"Lj\x02" and codec.decode(ItemEmbedding, wire) == cat
    with pytest.raises(DecodeError):  # a record must say which it is: the item id is required, null or not
        codec.decode(ItemEmbedding, b'Lj\x02{"category_id":4,"model_version":"v","vector":[0.5],'
                                    b'"computed_at_ms":1767225600000}')


def test_lum_features_v1_still_decode_and_v2_carry_own_category():
    v1 = (b"Lj\x01" b'{"user_id":1,"model_version":"v","computed_at_ms":1767225600000,'
          b'"conditions":[{"condition":"behavior=buy,category=4","vector":[0.5]}]}')
    f = codec.decode(LumFeatures, v1)
    assert f.conditions[0].own_category is None  # a v1 category condition is a shared (configured) one
    own = f.model_copy(update={"conditions": [f.conditions[0].model_copy(update={"own_category": 4})]})
    wire = codec.encode(own)
    assert wire[:3] == b"Lj\x02" and codec.decode(LumFeatures, wire).conditions[0].own_category == 4


def test_item_vectors_keep_the_newest_versions_and_never_mix_them():
    """The joiner's and the scorer's rule: the ITEM_VERSIONS newest model versions (by computed_at_ms, not arrival
    order), an item's vector of the asked version only, its category's record of that version as the fallback."""
    from schemas.events import ITEM_VERSIONS, ItemVectors
    from schemas.topics import item_key, item_key_version

    items = ItemVectors()
    t = 1_767_225_600_000
    order = [3, 0, 4, 1, 2]  # versions v0..v4 arrive out of computed_at order
    dropped = [items.add(ItemEmbedding(item_id=7, category_id=2, model_version=f"v{k}", vector=[float(k)],
                                       computed_at_ms=t + k)) for k in order]
    assert ITEM_VERSIONS == 4 and dropped == [None, None, None, None, "v0"]
    assert sorted(items.by_version) == ["v1", "v2", "v3", "v4"] and items.get(7, "v0") is None
    assert items.get(7, "v3") == [3.0]
    items.add(ItemEmbedding(item_id=None, category_id=2, model_version="v4", vector=[9.0], computed_at_ms=t + 4))
    assert items.get(8, "v4", category=2) == [9.0] and items.get(8, "v3", category=2) is None
    assert items.get(7, "v4", category=2) == [4.0]  # an item's own vector wins over its category's
    # Keys name the version, so that compaction keeps one record per item and version.
    assert item_key("v3", 7) == b"v3/7" and item_key("v3", None, 2) == b"v3/category=2"
    assert item_key_version(item_key("small-300-ab/x", 7)) == "small-300-ab/x" and item_key_version(b"7") is None
