"""The featurizer reads decoded columns (``schemas.codec.ExampleColumns``, what the Kafka source hands over)
exactly as it reads the same examples one by one, odd LUM inputs included."""

from __future__ import annotations

import pytest
import torch

from schemas.codec import decode_columns
from schemas.topics import TRAINING_EXAMPLES
from trainers.dlrm.features import Featurizer, resolve_lum_dims
from trainers.dlrm.model import TARGET_CATEGORY, DLRMConfig, dense_feature_names
from trainers.dlrm.synthetic import synthetic_examples


def test_columns_featurize_like_the_examples_they_hold(monkeypatch):
    exs = synthetic_examples(300, seed=4, lum_dim=8)
    odd = {  # every way a row leaves the batch's fast path
        3: {"lum_conditions": ["scenario=search", "scenario=home", TARGET_CATEGORY],
            "lum_user": [[0.5] * 8, [1.5] * 8, [2.5] * 8]},
        5: {"lum_item": None},
        7: {"lum_user": None, "lum_conditions": None},
        9: {"lum_item": [1.0] * 7},  # wrong size: absent
        11: {"lum_conditions": ["scenario=home", "x", "y"]},
        13: {"history_items": list(range(40)), "history_categories": [1] * 40, "query": "q"},
    }
    for i, upd in odd.items():
        exs[i] = exs[i].model_copy(update=upd)
    cols, errors = decode_columns([TRAINING_EXAMPLES.encode(e) for e in exs])
    assert not errors
    models = [TRAINING_EXAMPLES.decode(TRAINING_EXAMPLES.encode(e)) for e in exs]
    cfg = resolve_lum_dims(DLRMConfig.preset("debug", features="lum", history_len=16), models)
    a, fa = Featurizer(cfg)(models), Featurizer(cfg)
    monkeypatch.setattr(type(cols), "row", lambda *_: pytest.fail("a row object built: not read as columns"))
    b = fa(cols)
    assert torch.equal(a.dense, b.dense) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(), b.sparse.lengths())
    assert a.example_ids == b.example_ids and (a.event_time_ms == b.event_time_ms).all()
    assert fa.lum_stats["item_absent"] >= 1 and fa.lum_stats["condition_not_configured"] >= 2
    assert sum(fa.lum_versions.values()) == sum(e.lum_model_version is not None for e in exs)
    # A batch cut from a fetch and joined with another (as the Kafka source builds them) featurizes the same.
    c = Featurizer(cfg)(type(cols).concat([cols[:100], cols[100:]]))
    assert torch.equal(a.dense, c.dense) and torch.equal(a.sparse.values(), c.sparse.values())


def test_examples_with_their_own_category_answer_take_the_fast_paths(monkeypatch):
    """The joiner's layout (configured conditions, then ``TARGET_CATEGORY``) is read at batch speed from the
    wire, as columns and as decoded examples alike, and equals the per-example path."""
    import numpy as np

    rng = np.random.default_rng(0)
    exs = [e for e in synthetic_examples(300, seed=6, lum_dim=8) if e.lum_user is not None and e.lum_item is not None]
    exs = [e.model_copy(update={"lum_conditions": [*e.lum_conditions, TARGET_CATEGORY],
                                "lum_user": [*e.lum_user, rng.normal(size=8).tolist()]}) if i % 3 else e
           for i, e in enumerate(exs)]  # both layouts in one batch
    cfg = resolve_lum_dims(DLRMConfig.preset("debug", features="lum"), exs)
    slow = Featurizer(cfg)(exs)  # model objects built in Python: the per-example path
    wire = [TRAINING_EXAMPLES.encode(e) for e in exs]
    cols, errors = decode_columns(wire)
    assert not errors
    decoded = [TRAINING_EXAMPLES.decode(w) for w in wire]
    monkeypatch.setattr(Featurizer, "_lum_slow", lambda *_: pytest.fail("a row left the fast path"))
    for fast in (Featurizer(cfg)(decoded), Featurizer(cfg)(cols)):
        assert torch.equal(slow.dense, fast.dense)
    present = slow.dense[:, dense_feature_names(cfg).index("category_condition_present")]
    assert present.tolist() == [float(i % 3 != 0) for i in range(len(exs))]
