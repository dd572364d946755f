"""The trainer in-process: LUM inputs that carry signal beat the baseline on progressive AUC; a restored
checkpoint continues exactly like the uninterrupted run; `lum report` tables and plots both runs; the scorer
serves the same probabilities from the live model and from the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from schemas.events import ItemEmbedding, LumFeatures
from trainers.dlrm.model import DLRMConfig
from trainers.dlrm.report import report
from trainers.dlrm.score import LumStore, Scorer
from trainers.dlrm.synthetic import synthetic_examples
from trainers.dlrm.train import Trainer, train

B = 128


def _batches(exs, b=B):
    return [exs[i:i + b] for i in range(0, len(exs), b)]


@pytest.mark.timeout(180)
def test_lum_beats_baseline_and_report(tmp_path):
    exs = synthetic_examples(12_000, seed=0)
    runs = {}
    for features in ("baseline", "lum"):
        runs[features] = train(DLRMConfig.preset("debug", features=features), _batches(exs),
                               tmp_path / features, every_batches=10)
    auc = {f: t.metrics.overall()["auc"] for f, t in runs.items()}
    assert auc["lum"] - auc["baseline"] > 0.05, auc
    assert runs["lum"].cfg.lum_conditions == ["scenario=home", "scenario=search", "scenario=detail"]
    assert runs["lum"].cfg.lum_dim == 16

    table = report([tmp_path / "baseline", tmp_path / "lum"], tmp_path / "out" / "cmp.png")
    assert (tmp_path / "out" / "cmp.png").stat().st_size > 5000
    assert f"{auc['lum'] - auc['baseline']:+.4f}" in table and "| lum |" in table
    assert "| NE |" in table and f"{runs['lum'].metrics.overall()['ne']:.4f}" in table
    rows = [json.loads(line) for line in (tmp_path / "lum" / "metrics.jsonl").read_text().splitlines()]
    windows = {r["window_start_ms"] for r in rows if r["kind"] == "window"}
    assert len(windows) == 6 and rows[-1]["n"] == len(exs)  # 6 hours of event time, every example once
    assert rows[-1]["collisions"]["item"]["distinct_ids"] > 0

    # Serving: the live model and the checkpoint give the same scores; LUM knowledge moves them.
    live = Scorer.from_trainer(runs["lum"])
    stored = Scorer.from_checkpoint(tmp_path / "lum")
    ex = exs[-1]
    cands = [(e.item_id, e.category_id) for e in exs[-100:]]
    store = LumStore()
    store.put_user(LumFeatures(user_id=ex.user_id, model_version="v", computed_at_ms=ex.event_time_ms,
                               conditions=[{"condition": c, "vector": v}
                                           for c, v in zip(ex.lum_conditions, ex.lum_user)]))
    for e in exs[-100:]:
        store.put_item(ItemEmbedding(item_id=e.item_id, category_id=e.category_id, model_version="v",
                                     vector=e.lum_item, computed_at_ms=e.event_time_ms))
    kw = dict(store=store, history_items=ex.history_items, history_categories=ex.history_categories)
    p_live = live.score(ex.user_id, ex.scenario, cands, **kw)
    p_stored = stored.score(ex.user_id, ex.scenario, cands, **kw)
    assert p_live.shape == (100,) and np.allclose(p_live, p_stored, atol=1e-5)
    p_without = live.score(ex.user_id, ex.scenario, cands)  # no LUM features stored: flags say absent
    assert not np.allclose(p_live, p_without, atol=1e-3)


@pytest.mark.timeout(120)
def test_restored_checkpoint_continues_like_uninterrupted_run(tmp_path):
    exs = synthetic_examples(2400, seed=5)
    first, rest, probe = _batches(exs[:1200], 128), _batches(exs[1200:2000], 128), exs[2000:2100]
    cfg = DLRMConfig.preset("debug", features="lum")
    a = Trainer(cfg, tmp_path / "a", every_batches=1000)
    for b in first:
        a.train_batch(b)
    a.checkpoint()
    b_ = Trainer(cfg, tmp_path / "a")  # a second trainer resumes from the checkpoint
    assert (b_.step, b_.examples) == (a.step, a.examples)
    for t in (a, b_):
        for b in rest:
            t.train_batch(b)
    cands = [(e.item_id, e.category_id) for e in probe]
    pa = Scorer.from_trainer(a).score(probe[0].user_id, "home", cands)
    pb = Scorer.from_trainer(b_).score(probe[0].user_id, "home", cands)
    assert np.allclose(pa, pb, atol=1e-6)  # weights, Adam and fused Adagrad states all carried over
    assert a.metrics.overall() == b_.metrics.overall()
