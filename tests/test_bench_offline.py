"""The offline benchmark's protocol pieces (labels, split, point-in-time features) and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from schemas.events import BehaviorEvent

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_offline.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_offline", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_offline"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


T0 = 1_500_000_000_000


def ev(n: int, item: int, behavior: str = "view", user: int = 1, rating: float | None = None) -> BehaviorEvent:
    return BehaviorEvent(event_id=f"e{user}-{n}", user_id=user, item_id=item, category_id=item % 3,
                         behavior=behavior, scenario="taobao" if rating is None else "movielens", rating=rating,
                         event_time_ms=T0 + n * 1000)


def test_taobao_label_looks_ahead_only_to_the_horizon(bench):
    evs = [ev(0, 7, "cart"), ev(1, 7), ev(2, 8), ev(3, 9), ev(4, 8, "buy"), ev(5, 9, "fav"), ev(6, 9)]
    # Item 7 was carted *before* its view: not a positive. Item 8 is bought after the view (index 4).
    assert bench.labels_for(evs, "taobao", horizon=5) == [None, 0, 1, 0, None, None, 0]
    # With the horizon at the end, the fav of item 9 (index 5) makes its earlier view positive.
    assert bench.labels_for(evs, "taobao", horizon=7) == [None, 0, 1, 1, None, None, 0]


def test_movielens_label_is_rating_at_least_4(bench):
    evs = [ev(0, 1, "rate", rating=4.0), ev(1, 2, "rate", rating=3.0), ev(2, 3, "rate", rating=5.0)]
    assert bench.labels_for(evs, "movielens", horizon=3) == [1, 0, 1]


def test_examples_are_point_in_time(bench):
    users = {u: [ev(n, 100 * u + n, "rate", user=u, rating=float(1 + n % 5)) for n in range(10)] for u in (1, 2)}
    view = bench.LumView("v1", ["any"], users={1: [[1.0, 0.0]]}, items={101: [0.5, 0.5]})
    train = bench.examples(users, "movielens", bench.segment_bounds("train", (0.5, 0.8)), view)
    test = bench.examples(users, "movielens", bench.segment_bounds("test", (0.5, 0.8)), view)
    assert sorted(x.event_time_ms for x in train) == [x.event_time_ms for x in train]  # stream order
    for segment, lo, hi in ((train, 5, 8), (test, 8, 10)):
        assert {x.item_id % 100 for x in segment} == set(range(lo, hi))  # event index n has item 100u+n
        for x in segment:
            n = x.item_id % 100
            assert x.history_items == [100 * x.user_id + j for j in range(n)]  # strictly earlier events only
    # User 2 has no LUM vector in this view: absent, not zeros; user 1 has it.
    assert all((x.lum_user is None) == (x.user_id == 2) for x in train)
    assert train[0].lum_model_version == "v1"


def test_segments_partition_each_user(bench):
    for n in (1, 2, 7, 10, 101):
        a, b = bench.cut_points(n, (0.5, 0.8))
        parts = {p: bench.segment_bounds(p, (0.5, 0.8), 0.25)(n) for p in ("train", "test", "fit", "val")}
        assert parts["train"] == (a, b) and parts["test"] == (b, n)
        assert parts["fit"][0] == a and parts["fit"][1] == parts["val"][0] and parts["val"][1] == b
        assert 0 <= a <= b <= n


def test_exact_auc_and_logloss(bench):
    y = np.array([0, 0, 1, 1])
    assert bench.auc(np.array([0.1, 0.4, 0.35, 0.8]), y) == pytest.approx(0.75)
    assert bench.auc(np.array([0.5, 0.5, 0.5, 0.5]), y) == pytest.approx(0.5)  # ties count half
    assert bench.logloss(np.full(4, 0.5), y) == pytest.approx(np.log(2))


def test_tiny_end_to_end_run(bench, data_dir, tmp_path):
    """The whole protocol on 40 MovieLens users with a debug LUM: every figure present and in range."""
    events = bench.load("movielens", data_dir / "ml-100k")
    s = bench.Settings(lum_preset="debug", lum_steps=5, dlrm_seeds=(0,), max_users=40,
                       max_epochs=2)
    r = bench.run_dataset("ml-100k", events, s)
    assert r["users"] == 40 and r["train_n"] > 0 and r["test_n"] > 0
    assert r["train_lum_users"] == 1.0  # every MovieLens user has a pre-training prefix
    for feats in ("baseline", "lum"):
        assert r[feats]["epochs"] in (1, 2) and len(r[feats]["val_auc"]) == 2
        assert 0.0 <= r[feats]["auc"][0] <= 1.0 and r[feats]["logloss"][0] > 0
    assert r["lum"]["lum_inputs"].get("user_absent", 0) == 0  # the LUM inputs reached the DLRM
    assert set(r["raw_lum_auc"]) == set(r["conditions"]) and all(0 <= v <= 1 for v in r["raw_lum_auc"].values())
    assert 0.0 <= r["ret_lum"]["hr@10"] <= 1.0 and 0.0 <= r["ret_sasrec"]["ndcg@10"] <= 1.0
    text = bench.report([r], s, 1.0)
    assert "| ml-100k |" in text and "DLRM+LUM AUC" in text and "LUM HR@10" in text
