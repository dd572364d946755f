"""benchmarks/plot_offline.py: both file layouts read, the learning curve keeps only comparable runs."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def plot(load_benchmark):
    return load_benchmark("plot_offline")


def result(name: str, users: int, lift: float = 0.0, skipped: str | None = None) -> dict:
    history = [{"step": s, "loss": 5.0, "ndcg@10": 0.05 + s / 1e4, "hr@10": 0.1, "smoothed_ndcg@10": 0.05 + s / 1e4}
               for s in (100, 200, 300)]
    return {"dataset": name, "source_kind": "movielens", "users": users, "skipped": skipped,
            "dlrm_auc": [0.75, 0.76], "dlrm_sasrec_auc": [0.75, 0.75], "dlrm_lum_auc": [0.75 + lift, 0.76 + lift],
            "pop_hr10": 0.08, "sasrec_hr10": 0.2, "lum_hr10": 0.21, "pop_cond_hr10": 0.35, "sasrec_cond_hr10": 0.56,
            "lum_cond_hr10": 0.57, "lum_hr10_seeds": [0.2, 0.22], "sasrec_hr10_seeds": [0.19, 0.21],
            "runs": [{"seed": 0, "model": m, "best_step": 200, "history": history} for m in ("lum", "sasrec")]}


def bench_json(settings: dict, *results: dict) -> dict:
    return {"settings": settings, "datasets": {r["dataset"]: r for r in results}, "seconds": 1.0}


def test_results_plot_from_a_bench_output_and_a_collection(plot, tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(bench_json({"seeds": [0, 1]}, result("ml", 943), result("tb", 815, skipped="no"))))
    many = tmp_path / "many.json"
    many.write_text(json.dumps({"runs": {"a": bench_json({}, result("ml", 943)), "b": bench_json({}, result("x", 9))}}))
    runs = plot.load_runs([one, many])
    assert [r["dataset"] for _, r in runs] == ["ml", "tb", "ml", "x"]
    assert plot.main([str(one), str(many), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 20_000
    assert plot.plot_results([result("tb", 815, skipped="one label class")], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_learning_curve_leaves_out_runs_with_other_settings(plot, tmp_path, capsys):
    base = {"seeds": [0, 1], "max_users": 0, "lum_contrast": True}
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps({"runs": [bench_json(base | {"max_users": n}, result("ml", n)) for n in (236, 471)]}))
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"runs": [bench_json(base, result("ml", 943, lift=0.01)),
                                         bench_json(base | {"lum_contrast": False}, result("ml", 943))]}))
    png, left_out = plot.plot_learning_curve(plot.load_runs([curve, full]), tmp_path / "lc.png")
    assert png.stat().st_size > 20_000
    assert left_out == ["ml (943 users): other settings (lum_contrast)"]
    assert plot.main([str(curve), str(full), "--learning-curve", "--out", str(tmp_path / "lc2.png")]) == 0
    assert "left out: ml (943 users): other settings (lum_contrast)" in capsys.readouterr().out


def test_unreadable_results_fail_naming_the_problem(plot, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"something": 1}))
    with pytest.raises(SystemExit):
        plot.main([str(bad), "--out", str(tmp_path / "x.png")])
    assert "cannot read the results" in capsys.readouterr().err
