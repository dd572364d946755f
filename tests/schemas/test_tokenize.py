"""The (condition, item) tokenization is pinned by a golden file and survives tokenizer upgrades."""

import json
import os
from pathlib import Path

import pytest

import schemas.tokenize as tk
from schemas import codec
from schemas.events import BehaviorEvent

GOLDEN_DIR = Path(__file__).parent / "golden"
EVENTS = [
    BehaviorEvent(event_id="a", user_id=1, item_id=10, category_id=5, behavior="view", scenario="home",
                  event_time_ms=1_767_225_600_000),
    BehaviorEvent(event_id="b", user_id=1, item_id=2**62, category_id=0, behavior="buy", scenario="search",
                  query="Red  Shoes ", event_time_ms=1_767_225_601_000),
    BehaviorEvent(event_id="ml-1-2-3", user_id=7, item_id=242, category_id=4, behavior="rate", scenario="movielens",
                  rating=4.0, event_time_ms=881_250_949_000),
]


@pytest.mark.parametrize("version", sorted(tk.KINDS_BY_VERSION))
def test_golden_tokens(version):
    golden = GOLDEN_DIR / f"tokenize_v{version}.json"
    got = [tk.tokenize(e, version)._asdict() for e in EVENTS]
    got = json.loads(json.dumps({"version": version, "kinds": tk.CONDITION_KINDS, "pairs": got}))
    if os.environ.get("LUM_REGEN_GOLDEN") and version == tk.TOKENIZER_VERSION:
        golden.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(golden.read_text()), "tokenization changed: bump TOKENIZER_VERSION (see schemas/tokenize.py)"


def test_v2_behavior_is_the_feedback_level():
    rate = EVENTS[2]
    assert tk.tokenize(rate, 1).conditions[1] == tk.condition_id("behavior", "rate")
    assert tk.tokenize(rate).conditions[1] == tk.parse_condition("behavior=liked")[1]  # rating 4.0
    low = rate.model_copy(update={"rating": 2.0})
    mid = rate.model_copy(update={"rating": 3.0})
    assert tk.tokenize(low).conditions[1] == tk.parse_condition("behavior=disliked")[1]
    assert tk.tokenize(mid).conditions[1] == tk.parse_condition("behavior=neutral")[1]
    assert tk.tokenize(EVENTS[1]).conditions == tk.tokenize(EVENTS[1], 1).conditions  # implicit feedback unchanged
    # A stored v1 sequence still decodes under v2, tokens untouched.
    v1 = tk.UserSequence(7, 1, [tk.tokenize(rate, 1)], tokenizer_version=1)
    back = tk.decode_sequence(tk.encode_sequence(v1))
    assert back.pairs[0].conditions == tk.tokenize(rate, 1).conditions and back.tokenizer_version == 2


def test_query_conditions_match_training_tokens():
    pair = tk.tokenize(EVENTS[1])
    assert tk.parse_condition("scenario=search")[0] == pair.conditions[0]
    assert tk.parse_condition("query=red shoes")[3] == pair.conditions[3]  # normalised like training
    assert tk.parse_condition("any") == (tk.ANY,) * len(tk.CONDITION_KINDS)
    full = tk.parse_condition("scenario=search,behavior=buy,category=0,query=red shoes")
    assert full == pair.conditions
    with pytest.raises(ValueError, match="unknown condition kind"):
        tk.parse_condition("colour=red")
    with pytest.raises(ValueError, match="kind=value"):
        tk.parse_condition("scenario")


def test_sequence_codec_roundtrip_and_old_versions(monkeypatch):
    seq = tk.UserSequence(1, 1_767_225_700_000, [tk.tokenize(e) for e in EVENTS])
    data = codec.encode_user_sequence(seq)
    assert codec.decode_user_sequence(data) == seq
    with pytest.raises(codec.DecodeError):
        codec.decode_user_sequence(data[:-1])
    # A future tokenizer adds a fifth kind: version-1 records decode with the new kind set to ANY.
    monkeypatch.setattr(tk, "CONDITION_KINDS", tk.CONDITION_KINDS + ("device",))
    monkeypatch.setattr(tk, "KINDS_BY_VERSION", {1: 4, 2: 5})
    monkeypatch.setattr(tk, "TOKENIZER_VERSION", 2)
    upgraded = tk.decode_sequence(data[3:])
    assert upgraded.tokenizer_version == 2
    assert [p.conditions for p in upgraded.pairs] == [p.conditions + (tk.ANY,) for p in seq.pairs]


def test_tokenize_rows_equals_tokenize_for_ratings_and_implicit_feedback():
    """The agent's batch tokenizer must give the feedback level (v2) exactly like ``tokenize``."""
    import numpy as np

    from schemas.events import BehaviorEvent
    from schemas.tokenize import tokenize, tokenize_rows

    events = [BehaviorEvent(event_id=f"e{i}", user_id=1, item_id=10 + i, category_id=3, scenario="home",
                            behavior=b, rating=r, event_time_ms=880_000_000_000 + i)
              for i, (b, r) in enumerate([("rate", 5.0), ("rate", 3.0), ("rate", 1.0), ("click", None), ("buy", None)])]
    rows = tokenize_rows(events)
    for row, e in zip(rows, events):
        t = tokenize(e)
        assert row.tolist() == [t.event_time_ms, t.event_key, *t.conditions, t.item_id, t.category_id]
    assert len(set(rows[:3, 3].tolist())) == 3  # liked, neutral, disliked are three behavior conditions
    assert np.all(rows[:, 0] == [e.event_time_ms for e in events])
