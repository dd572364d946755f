"""Hashing never fails on any 64-bit id and its measured collision rate matches theory; LUM inputs are
reordered by condition name, and absent/missing/mis-sized parts are zero *with* a 0 flag, and counted."""

from __future__ import annotations

import numpy as np

from schemas.events import MAX_ID
from trainers.dlrm.features import CollisionStats, Featurizer, hash_ids
from trainers.dlrm.model import FEATURE_LAYOUT, SPARSE_FEATURES, DLRMConfig, dense_feature_names
from trainers.dlrm.synthetic import synthetic_examples


def test_hash_covers_extreme_and_unseen_ids():
    ids = np.array([0, 1, 2**31, 2**32 + 7, MAX_ID - 1, MAX_ID], dtype=np.int64)
    rows = hash_ids(ids, 1000, salt=3)
    assert rows.dtype == np.int64 and ((rows >= 0) & (rows < 1000)).all()
    assert len(set(rows.tolist())) == len(ids)  # no pathological clustering of the extremes
    assert (hash_ids(ids, 1000, salt=3) == rows).all()  # stable
    assert (hash_ids(ids, 1000, salt=4) != rows).any()  # salts separate tables


def test_collision_rate_is_measured_and_close_to_uniform_expectation():
    rng = np.random.default_rng(0)
    rows = 4096
    stats = CollisionStats(rows)
    ids = rng.integers(0, MAX_ID, 3000)
    for chunk in np.array_split(np.concatenate([ids, ids[:500]]), 7):  # repeats must not count twice
        stats.update(chunk, hash_ids(chunk, rows, 1))
    r = stats.report()
    assert r["distinct_ids"] == 3000
    # Brute force: share of ids whose row is shared with another distinct id.
    buckets = hash_ids(ids, rows, 1)
    counts = np.bincount(buckets, minlength=rows)
    assert r["collision_rate"] == (counts[buckets] > 1).mean()
    assert abs(r["collision_rate"] - r["expected_rate"]) < 0.05


def _cfg(**kw):
    return DLRMConfig.preset("debug", features="lum", lum_conditions=["scenario=home", "scenario=search"],
                             lum_dim=4, **kw)


def _ex(**kw):
    base = dict(example_id="r/1", request_id="r", user_id=MAX_ID, item_id=12345678901234567, category_id=3,
                position=2, scenario="home", event_time_ms=1_767_225_600_000, label=1,
                history_items=[5, 6, MAX_ID], history_categories=[1, 1, 2])
    from schemas.events import TrainingExample

    return TrainingExample(**(base | kw))


def test_lum_inputs_by_name_with_explicit_flags():
    fz = Featurizer(_cfg())
    names = dense_feature_names(fz.cfg)
    col = {n: i for i, n in enumerate(names)}
    exs = [
        # conditions in another order, plus one the model is not configured for
        _ex(lum_conditions=["scenario=search", "scenario=other", "scenario=home"],
            lum_user=[[0, 1, 0, 0], [9, 9, 9, 9], [1, 0, 0, 0]], lum_item=[2, 0, 0, 0], lum_model_version="v1"),
        _ex(),  # no LUM at all
        _ex(lum_conditions=["scenario=home"], lum_user=[[1, 1, 1]], lum_item=[1, 0, 0, 0, 0], lum_model_version="v"),
    ]
    d = fz(exs).dense.numpy()
    assert d.shape == (3, len(names))
    row = d[0]
    # direct inputs: unit norm / sqrt(D) (D = 4)
    assert row[col["lum_user[scenario=home][0]"]] == 0.5 and row[col["lum_user[scenario=search][1]"]] == 0.5
    assert row[col["lum_user_present[scenario=home]"]] == 1 and row[col["lum_item_present"]] == 1
    assert np.isclose(row[col["cos[scenario=home]"]], 1.0) and np.isclose(row[col["cos[scenario=search]"]], 0.0)
    assert not any(n.startswith("dot[") for n in names)  # cos/sqrt(D) of unit vectors: a redundant input
    assert np.isclose(row[col["cos[scenario]"]], 1.0) and row[col["scenario_condition_present"]] == 1
    lum_cols = [i for n, i in col.items() if not n.startswith(("log1p", "has_query"))]
    assert (d[1, lum_cols] == 0).all()  # absent: zeros, and every flag says so
    assert d[2, col["lum_user_present[scenario=home]"]] == 0 and d[2, col["lum_item_present"]] == 0  # wrong size
    assert fz.lum_stats == {"condition_not_configured": 1, "user_absent": 1, "item_absent": 1,
                            "user_dim_mismatch": 1, "item_dim_mismatch": 1, "condition_missing": 2}  # row 2: home mis-sized, search absent


def test_sparse_batch_shapes_and_history_truncation():
    cfg = DLRMConfig.preset("debug", history_len=2)
    fb = Featurizer(cfg)(synthetic_examples(3000, seed=1)[-40:])  # late: users have history
    kjt = fb.sparse
    assert kjt.keys() == list(SPARSE_FEATURES) and kjt.stride() == 40
    lengths = kjt.to_dict()["history_items"].lengths()
    assert int(lengths.max()) <= 2 and int(lengths.sum()) > 0
    for f, jt in kjt.to_dict().items():
        assert int(jt.values().min()) >= 0 and int(jt.values().max()) < cfg.table_rows[
            {"history_items": "item", "history_categories": "category", "user_id": "user", "item_id": "item",
             "category_id": "category", "scenario": "scenario", "position": "position"}[f]]


def test_own_category_match_from_a_per_candidate_vector_or_a_condition_naming_the_category():
    """Interest matching with the target's own category (paper 4.3): an example's ``target_category`` vector
    (per-candidate group query) wins; else its condition naming the target's category, configured or not."""
    fz = Featurizer(DLRMConfig.preset("debug", features="lum", lum_dim=4,
                                      lum_conditions=["behavior=buy", "behavior=buy,category=3"]))
    col = {n: i for i, n in enumerate(dense_feature_names(fz.cfg))}
    item = [1, 0, 0, 0]
    exs = [
        _ex(lum_conditions=["behavior=buy", "behavior=buy,category=3", "target_category"],
            lum_user=[[0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]], lum_item=item, lum_model_version="v"),
        _ex(lum_conditions=["behavior=buy", "behavior=buy,category=3"],  # the configured list (fast path too)
            lum_user=[[0, 1, 0, 0], [1, 0, 0, 0]], lum_item=item, lum_model_version="v"),
        _ex(category_id=9, lum_conditions=["behavior=buy", "behavior=buy,category=3", "category=9"],
            lum_user=[[0, 1, 0, 0], [1, 0, 0, 0], [-1, 0, 0, 0]], lum_item=item, lum_model_version="v"),
        _ex(category_id=5, lum_conditions=["behavior=buy", "behavior=buy,category=3"],
            lum_user=[[0, 1, 0, 0], [1, 0, 0, 0]], lum_item=item, lum_model_version="v"),
    ]
    d = fz(exs).dense.numpy()
    cos, flag = d[:, col["cos[category]"]], d[:, col["category_condition_present"]]
    assert np.allclose(cos, [np.sqrt(0.5), 1.0, -1.0, 0.0], atol=1e-6) and (flag == [1, 1, 1, 0]).all()
    assert np.allclose(d[0, [col[f"lum_user[category][{j}]"] for j in range(4)]], np.array([1, 1, 0, 0]) / 8 ** 0.5)
    assert fz.lum_stats["condition_not_configured"] == 0  # the own-category vectors are used, not dropped


def test_a_model_of_another_feature_layout_is_refused_with_the_reason():
    import pytest

    old = DLRMConfig.from_saved(_cfg().model_dump(exclude={"feature_layout"}))  # written before layouts existed
    assert old.feature_layout == 1
    with pytest.raises(ValueError, match="layout 1.*retrain"):
        Featurizer(old)
    with pytest.raises(ValueError, match="target_category"):
        DLRMConfig.preset("debug", features="lum", lum_dim=4, lum_conditions=["any", "target_category"])


def test_target_in_history_inputs():
    """Pooled history bags cannot say whether the target is among them: two dense inputs do."""
    fz = Featurizer(DLRMConfig.preset("debug"))
    col = {n: i for i, n in enumerate(dense_feature_names(fz.cfg))}
    exs = [_ex(item_id=5, category_id=1), _ex(item_id=7, category_id=9, history_items=[], history_categories=[]),
           _ex(item_id=6, category_id=2, history_items=[6, 6, 5, 6], history_categories=[2, 2, 1, 3])]
    d = fz(exs).dense.numpy()
    assert np.allclose(d[:, col["log1p_target_in_history"]], np.log1p([1, 0, 3]))
    assert np.allclose(d[:, col["target_category_share"]], [2 / 3, 0, 2 / 4])


def test_untrained_model_predicts_the_base_rate_of_the_first_batch():
    """On 3% positives a model starting at p=0.5 pays log loss that a pass or two never wins back: the output
    bias starts at the logit of ``prior_ctr``, taken from the first batch when unset."""
    import torch

    from trainers.dlrm.features import resolve_lum_dims
    from trainers.dlrm.model import build_model

    exs = synthetic_examples(2000, seed=3)
    rng = np.random.default_rng(0)
    exs = [ex.model_copy(update={"label": int(rng.random() < 0.03)}) for ex in exs]
    cfg = resolve_lum_dims(DLRMConfig.preset("debug"), exs)
    rate = np.mean([ex.label for ex in exs])
    assert cfg.prior_ctr == rate
    assert resolve_lum_dims(DLRMConfig.preset("debug"), exs[:1]).prior_ctr in (0.5,)  # one example: kept off 0/1
    fz = Featurizer(cfg)
    fb = fz(exs)
    with torch.no_grad():
        p = torch.sigmoid(build_model(cfg)(fb.dense, fb.sparse)).squeeze(-1).numpy()
    assert abs(p.mean() - rate) < 0.01 and p.max() < 0.1
    y = fb.labels.numpy()
    const = -np.mean(y * np.log(rate) + (1 - y) * np.log(1 - rate))
    assert -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)) < const + 0.01


def test_a_checkpoint_of_the_old_feature_layout_is_refused_on_resume(tmp_path):
    """A checkpoint written before layout 2 (its config has no ``feature_layout``) holds a model over other
    dense inputs: resuming it is refused, naming the field, instead of failing on tensor shapes."""
    import json

    import pytest

    from trainers.checkpoint import Refuse
    from trainers.dlrm.train import Trainer, latest_checkpoint

    cfg = DLRMConfig.preset("debug", features="lum")
    t = Trainer(cfg, tmp_path)
    t.train_batch(synthetic_examples(100, seed=11))
    t.checkpoint()
    meta_path = latest_checkpoint(tmp_path) / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["config"]["feature_layout"] == FEATURE_LAYOUT and meta["config"]["prior_ctr"] is not None
    del meta["config"]["feature_layout"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(Refuse, match=f"feature_layout: saved 1, requested {FEATURE_LAYOUT}"):
        Trainer(cfg, tmp_path)


def test_match_only_lum_inputs_keep_similarities_and_flags():
    full, match = (Featurizer(_cfg(lum_inputs=k)) for k in ("full", "match"))
    ex = _ex(lum_conditions=["scenario=home", "scenario=search"], lum_user=[[1, 0, 0, 0], [0, 1, 0, 0]],
             lum_item=[1, 1, 0, 0], lum_model_version="v")
    a, b = full([ex]).dense.numpy()[0], match([ex]).dense.numpy()[0]
    na, nb = dense_feature_names(full.cfg), dense_feature_names(match.cfg)
    assert len(nb) == len(b) and not any(n.startswith(("lum_user[", "lum_item[")) for n in nb)
    assert {n: b[i] for i, n in enumerate(nb)} == {n: a[na.index(n)] for n in nb}  # the same values, fewer


def test_each_direct_lum_vector_weighs_like_one_dense_feature_whatever_its_size():
    """Adam moves each first-layer weight by ~lr whatever its input: raw unit vectors (L1 ~0.8 sqrt(D) each)
    swamped the five baseline inputs (Taobao sample: -0.07 test AUC with the vectors); scaled, a vector's D
    inputs have L1 <= 1, for any D and any norm the producer used."""
    rng = np.random.default_rng(0)
    for dim in (16, 256):
        fz = Featurizer(DLRMConfig.preset("debug", features="lum", lum_dim=dim, lum_conditions=["any"]))
        col = {n: i for i, n in enumerate(dense_feature_names(fz.cfg))}
        v = rng.normal(size=(2, dim)) * [[1.0], [7.0]]  # one unit-ish, one large
        exs = [_ex(lum_conditions=["any"], lum_user=[list(x)], lum_item=list(x), lum_model_version="v") for x in v]
        d = fz(exs).dense.numpy()
        for name in ("lum_user[any]", "lum_item"):
            block = d[:, [col[f"{name}[{j}]"] for j in range(dim)]]
            l1 = np.abs(block).sum(axis=1)
            assert ((0.5 < l1) & (l1 <= 1.0)).all(), (dim, name, l1)
            assert np.allclose(np.linalg.norm(block, axis=1), 1 / np.sqrt(dim), rtol=1e-4)
        assert np.allclose(d[:, col["cos[any]"]], 1.0, atol=1e-5)  # similarities unchanged


def test_contrast_columns_give_each_condition_what_it_adds_at_unit_scale():
    """contrast[c] = sqrt(D) cos(u_c - mean of the present condition vectors, item), any condition names: the
    liked/disliked difference reaches the DLRM at unit scale even when the answers differ by ~1e-3."""
    conds = ["any", "behavior=liked", "behavior=disliked"]
    assert not [n for n in dense_feature_names(DLRMConfig.preset("debug", features="lum", lum_dim=4,
                                                                 lum_conditions=conds)) if "contrast" in n]
    fz = Featurizer(DLRMConfig.preset("debug", features="lum", lum_dim=4, lum_conditions=conds, lum_contrast=True))
    col = {n: i for i, n in enumerate(dense_feature_names(fz.cfg))}
    assert [n for n in col if n.startswith("contrast[")] == [f"contrast[{c}]" for c in conds] + ["contrast[category]"]
    near = np.array([1.0, 1e-3, 0, 0]) / np.linalg.norm([1.0, 1e-3, 0, 0])  # "liked" barely moves the answer
    exs = [
        _ex(lum_conditions=[*conds, "target_category"],  # vectors at any norm: only directions count
            lum_user=[[5, 0, 0, 0], [0.6, 0.8, 0, 0], [3, -4, 0, 0], [0, 1, 1, 0]], lum_item=[0, 2, 0, 0],
            lum_model_version="v"),
        _ex(lum_conditions=["any", "behavior=liked"], lum_user=[[1, 0, 0, 0], list(near)],
            lum_item=[0, 1, 0, 0], lum_model_version="v"),
        _ex(lum_conditions=["behavior=liked"], lum_user=[[0, 1, 0, 0]], lum_item=[0, 1, 0, 0],
            lum_model_version="v"),  # one condition: nothing to contrast with
        _ex(lum_conditions=conds, lum_user=[[1, 0, 0, 0]] * 3, lum_item=[0, 1, 0, 0],
            lum_model_version="v"),  # identical answers: no direction, not noise
    ]
    d = fz(exs).dense.numpy()
    con = d[:, [col[f"contrast[{c}]"] for c in conds]]
    mean = np.array([1 + 0.6 + 0.6, 0, 0, 0]) / 3
    diff = np.array([[1, 0, 0, 0], [0.6, 0.8, 0, 0], [0.6, -0.8, 0, 0]]) - mean
    want = 2 * diff[:, 1] / np.linalg.norm(diff, axis=1)  # sqrt(D) cos(diff, e2)
    assert np.allclose(con[0], want, atol=1e-5) and con[0, 1] > 1.9 and con[0, 0] == 0
    cat_diff = np.array([0, 1, 1, 0]) / np.sqrt(2) - mean
    assert np.isclose(d[0, col["contrast[category]"]], 2 * cat_diff[1] / np.linalg.norm(cat_diff), atol=1e-5)
    # raw cosines 1e-3 apart, contrasts +-2 (sqrt(D)): the difference is visible to an MLP
    assert abs(d[1, col["cos[behavior=liked]"]] - d[1, col["cos[any]"]]) < 2e-3
    assert np.allclose(con[1], [-2, 2, 0], atol=1e-3)
    assert (con[2] == 0).all() and d[2, col["contrast[category]"]] == 0
    assert (con[3] == 0).all()

