"""Streaming AUC from histograms agrees with the exact rank AUC; windows, calibration and state round-trip."""

from __future__ import annotations

import numpy as np

from trainers.dlrm.metrics import StreamingMetrics


def _exact_auc(p, y):
    pos, neg = p[y == 1], p[y == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return greater / (len(pos) * len(neg))


def test_windows_overall_and_roundtrip():
    rng = np.random.default_rng(0)
    n = 4000
    y = (rng.random(n) < 0.3).astype(np.float32)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.2 * y - 1)))
    t = 1_767_225_600_000 + np.sort(rng.integers(0, 3 * 3_600_000, n))
    m = StreamingMetrics(window_ms=3_600_000)
    for i in range(0, n, 500):
        m.update(p[i:i + 500], y[i:i + 500], t[i:i + 500])
    o = m.overall()
    assert o["n"] == n and abs(o["auc"] - _exact_auc(p, y)) < 2e-3
    assert np.isclose(o["calibration"], p.mean() / y.mean())
    assert np.isclose(o["logloss"], -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    ctr = y.mean()  # NE: log loss over the entropy of the base rate
    assert np.isclose(o["ne"], o["logloss"] / -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr)))
    restored = StreamingMetrics.from_state(m.state())
    rows = m.records(step=1)
    assert [r["window_start_ms"] for r in rows[:-1]] == sorted({int(x) // 3_600_000 * 3_600_000 for x in t})
    w0 = t // 3_600_000 * 3_600_000 == rows[0]["window_start_ms"]
    assert abs(rows[0]["auc"] - _exact_auc(p[w0], y[w0])) < 3e-3 and rows[0]["n"] == int(w0.sum())
    assert restored.records(step=1) == rows  # the checkpointed state reproduces the same rows
    assert m.records(step=2)[:-1] == []  # nothing new since


def test_an_empty_update_changes_nothing():
    """A rank whose share of a small global batch is all padding updates with no examples (it crashed the
    2-rank trainer once)."""
    m = StreamingMetrics()
    m.update(np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    assert m.overall()["n"] == 0 and m.records()[:-1] == []


def test_late_examples_count_overall_only():
    m = StreamingMetrics(window_ms=1000, lateness=1)
    m.update(np.array([0.2, 0.8]), np.array([0, 1]), np.array([10_000, 10_001]))
    m.records()
    m.update(np.array([0.5]), np.array([1]), np.array([100]))  # far behind the newest window
    assert m.late == 1 and m.overall()["n"] == 3


def test_ne_is_one_for_the_base_rate_and_below_for_signal():
    rng = np.random.default_rng(1)
    y = (rng.random(5000) < 0.1).astype(np.float32)
    t = np.full(5000, 1_767_225_600_000)
    base = StreamingMetrics()
    base.update(np.full(5000, y.mean()), y, t)
    assert np.isclose(base.overall()["ne"], 1.0)
    good = StreamingMetrics()
    good.update(np.where(y == 1, 0.6, 0.05), y, t)
    assert good.overall()["ne"] < 0.7
    assert good.records()[0]["ne"] == good.overall()["ne"]  # per window too
