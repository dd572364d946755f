"""LUM pre-training learns (synthetic stream with real structure), checkpoints rebuild it, the CLI runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deploy.cli import main as lum
from schemas.events import BehaviorEvent
from schemas.tokenize import TOKENIZER_VERSION
from streaming.producers.synthetic import SyntheticConfig, SyntheticStream
from trainers.lum.data import leave_last_out, sequences_from_events, train_batches
from trainers.lum.evaluate import evaluate
from trainers.lum.model import PRESETS, lum_loss
from trainers.lum.pretrain import load_checkpoint, save_checkpoint, train

CFG = PRESETS["debug"]


@pytest.fixture(scope="module")
def synthetic():
    cfg = SyntheticConfig(users=150, items=300, categories=20, events=15_000, seed=3, impression_share=0.0)
    seqs = sequences_from_events(e for e in SyntheticStream(cfg) if isinstance(e, BehaviorEvent))
    return leave_last_out(seqs)


def test_loss_falls_and_beats_most_popular(synthetic):
    tr, te = synthetic
    torch.manual_seed(0)
    model, _, step, losses = train(CFG, train_batches(tr, CFG, seed=0), max_steps=250, log_every=50)
    assert step == 250
    first, last = np.mean(losses[:25]), np.mean(losses[-25:])
    assert last < first - 0.5, (first, last)
    m = evaluate(model, te, tr, k=10)
    assert m["users"] == len(te) == 150
    assert m["hr@10"] > m["pop_hr@10"] + 0.05, m
    assert m["cond_hr@10"] >= m["hr@10"] - 0.02, m  # knowing the category never hurts much


def test_training_reports_progress_with_its_total(synthetic, caplog):
    caplog.set_level("INFO", logger="lum.progress")
    train(CFG, train_batches(synthetic[0], CFG, seed=0), max_steps=4)
    last = [r.getMessage() for r in caplog.records if r.name == "lum.progress"][-1]
    assert last.startswith("pretrain: 4/4 steps (100.0%)") and "loss " in last, last


def test_checkpoint_rebuilds_model_optimizer_and_offsets(synthetic, tmp_path):
    tr, _ = synthetic
    batches = train_batches(tr, CFG, seed=1)
    model, opt, step, _ = train(CFG, batches, max_steps=5)
    save_checkpoint(tmp_path, model, opt, step, offsets={0: 12, 3: 7})
    model2, opt2, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 5 and meta["tokenizer_version"] == TOKENIZER_VERSION
    assert meta["kafka_offsets"] == {"0": 12, "3": 7}
    assert meta["model_version"].startswith("debug-5-")
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    # Training resumes from the restored state identically to continuing the original.
    batch = next(batches)
    model.eval(), model2.eval()
    assert float(lum_loss(model, batch).detach()) == pytest.approx(float(lum_loss(model2, batch).detach()), abs=1e-6)
    # The newest checkpoint wins; old ones beyond `keep` are removed.
    for s in (6, 7, 8):
        save_checkpoint(tmp_path, model, opt, s, keep=2)
    assert load_checkpoint(tmp_path)[2]["step"] == 8
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000007", "step-00000008"]


def test_cli_pretrain_on_movielens_and_resume(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LUM_PRETRAIN_EVAL_USERS", "200")
    monkeypatch.setenv("LUM_PRETRAIN_LOG_EVERY", "10")
    rc = lum(["pretrain", "--preset", "debug", "--source", f"movielens:{data_dir / 'ml-100k'}", "--out",
              str(tmp_path), "--max-steps", "20", "--exclude-seen"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "final eval @20" in out and "hr@10=" in out and "pop_hr@10=" in out
    meta = json.loads((tmp_path / (tmp_path / "latest").read_text() / "meta.json").read_text())
    assert meta["step"] == 20 and meta["eval"]["users"] == 200 and meta["eval"]["items"] == 1682
    # --resume continues the newest checkpoint (step, optimizer) instead of starting over.
    assert lum(["pretrain", "--source", f"movielens:{data_dir / 'ml-100k'}", "--out", str(tmp_path),
                "--max-steps", "25", "--resume"]) == 0
    assert "final eval @25 (debug" in capsys.readouterr().out
    model, opt, meta2 = load_checkpoint(tmp_path)
    assert meta2["step"] == 25 and meta2["model_version"] != meta["model_version"]
    assert opt.state_dict()["state"][0]["step"] == 25


def test_bad_source_is_refused():
    with pytest.raises(SystemExit):
        lum(["pretrain", "--source", "nowhere:/x", "--out", "/tmp/never"])


def test_rank_batches_make_up_the_global_batch(synthetic):
    tr, _ = synthetic
    whole = next(train_batches(tr, CFG, seed=4))
    parts = [next(train_batches(tr, CFG, seed=4, rank=r, world=2)) for r in range(2)]
    assert sum(p.kind.shape[0] for p in parts) == whole.kind.shape[0]  # same global batch at any world size
    assert sorted(whole.item[whole.kind == 2].tolist()) == sorted(
        sum((p.item[p.kind == 2].tolist() for p in parts), []))
    assert all(torch.equal(p.cand_item, whole.cand_item) for p in parts)  # one candidate set for all ranks


@pytest.mark.slow
def test_pretrain_under_torchrun_and_checkpoint_loads_in_one_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    rng = np.random.default_rng(0)
    rows = [f"u{u},i{int(rng.integers(0, 80))},{int(rng.integers(1, 6))},{1_400_000_000 + 100 * u + t}"
            for u in range(60) for t in range(12)]
    (tmp_path / "ratings.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LUM_PRETRAIN_EVAL_EVERY": "4", "LUM_PRETRAIN_LOG_EVERY": "2"}
    r = subprocess.run([str(Path(sys.executable).parent / "lum"), "pretrain", "--nproc", "2", "--preset", "debug",
                        "--source", f"amazon:{tmp_path / 'ratings.csv'}", "--out", str(out), "--max-steps", "8"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2" in r.stderr and r.stdout.count("final eval @") == 1  # rank 0 reports
    model, opt, meta = load_checkpoint(out)  # written at 2 ranks, loaded in one process
    # The newest event the run read (held-out pairs included: they chose the stopping step).
    assert meta["world_size"] == 2 and meta["trained_until_ms"] == (1_400_000_000 + 100 * 59 + 11) * 1000
    assert (Path(meta["path"]) / "items.npz").exists()
    from trainers.lum.data import load_source, split_users

    seqs, _ = load_source(f"amazon:{tmp_path / 'ratings.csv'}")
    tr, _, te = split_users(seqs)
    m = evaluate(model, te, tr)
    assert 0 <= m["hr@10"] <= 1 and m["users"] == 60
