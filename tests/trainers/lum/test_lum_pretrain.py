"""LUM pre-training learns (synthetic stream with real structure), checkpoints rebuild it, the CLI runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
from trainers.lum.pretrain import (PretrainSettings, auto_preset, load_checkpoint, parallel_mode, save_checkpoint,
                                  train)

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


# Validation NDCG@10 per validation: one lucky spike (0.10 at the 3rd), then steady improvement to 0.11.
SCRIPTED_NDCG = [0.05, 0.06, 0.10, 0.07, 0.075, 0.08, 0.085, 0.09, 0.095, 0.10, 0.105, 0.11] + [0.11] * 20


@pytest.mark.parametrize("smooth, stop, best", [(1, 8, 3), (3, 19, 14)])
def test_early_stopping_follows_the_mean_of_recent_validations(synthetic, monkeypatch, smooth, stop, best):
    """Alone, the spike is kept as the best model and ends training 5 validations later; averaged over the last 3
    validations, training goes on and keeps the weights of the best average."""
    import trainers.lum.evaluate as ev
    from trainers.lum.pretrain import fit

    scores = iter(SCRIPTED_NDCG)
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: {"ndcg@10": next(scores), "hr@10": 0.0})
    improved = []
    tr, _ = synthetic
    model, _, step, best_step, history = fit(
        CFG, tr, tr[:5], max_steps=len(SCRIPTED_NDCG), eval_every=1, patience=5, smooth_evals=smooth,
        on_improve=lambda s, m, o, h: improved.append((s, {k: v.clone() for k, v in m.state_dict().items()})))
    assert (step, best_step, improved[-1][0]) == (stop, best, best)
    assert history[best - 1]["smoothed_ndcg@10"] == pytest.approx(np.mean(SCRIPTED_NDCG[max(0, best - smooth):best]))
    kept = improved[-1][1]
    assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())  # the best average's weights


# A lucky first validation, then a slow climb to 0.085 and a fall.
LUCKY_FIRST = [0.08, 0.05, 0.06, 0.065, 0.07, 0.075, 0.078, 0.08, 0.082, 0.084, 0.085] + [0.06] * 10


def test_a_first_validation_alone_is_not_compared_with_means(synthetic, monkeypatch):
    """The mean of one validation is not a mean of 3: compared with the later means, the lucky first one was
    kept as the best and ended training 5 validations later (step 6, weights of step 1)."""
    import trainers.lum.evaluate as ev
    from trainers.lum.pretrain import fit

    scores = iter(LUCKY_FIRST)
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: {"ndcg@10": next(scores), "hr@10": 0.0})
    tr, _ = synthetic
    _, _, step, best_step, history = fit(CFG, tr, tr[:5], max_steps=len(LUCKY_FIRST), eval_every=1, patience=5,
                                         smooth_evals=3)
    assert (step, best_step) == (16, 11)
    assert history[10]["smoothed_ndcg@10"] == pytest.approx(np.mean([0.082, 0.084, 0.085]))


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
    assert f"validation curves: {tmp_path / 'validation.png'}" in out
    assert (tmp_path / "validation.png").stat().st_size > 10_000
    # --resume continues the newest checkpoint (step, optimizer) instead of starting over.
    assert lum(["pretrain", "--source", f"movielens:{data_dir / 'ml-100k'}", "--out", str(tmp_path),
                "--max-steps", "25", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "final eval @25 (debug" in out
    # What it says it trains is the checkpoint's config, not the preset the data would get (small).
    assert "preset: debug (the checkpoint resumed:" in out and "preset: small" not in out
    model, opt, meta2 = load_checkpoint(tmp_path)
    assert meta2["step"] == 25 and meta2["model_version"] != meta["model_version"]
    assert opt.state_dict()["state"][0]["step"] == 25


def test_auto_preset_is_sized_to_the_data():
    sizes = (500, 19_999, 20_000, 5_000_000)
    assert [auto_preset(n, cuda=False) for n in sizes] == ["debug", "debug", "small", "small"]
    assert [auto_preset(n, cuda=True) for n in (19_999, 999_999, 1_000_000)] == ["debug", "small", "base"]


@pytest.mark.parametrize("repeats", [False, True])
def test_pretrain_without_flags_picks_preset_and_seen_filter_from_the_data_and_says_so(tmp_path, capsys, repeats):
    """No --preset, no --exclude-seen: a preset sized to the data, and seen items filtered on data without
    repeats (ratings) but not on data where users come back to items (clicks); each choice is printed."""
    rng = np.random.default_rng(0)
    if repeats:  # Taobao layout: users view the same items again
        rows = [f"{u},{int(rng.integers(1, 30))},{int(rng.integers(1, 5))},pv,{1_600_000_000 + 60 * t}"
                for u in range(1, 41) for t in range(25)]
        (tmp_path / "UserBehavior.csv").write_text("\n".join(rows) + "\n")
        source = f"taobao:{tmp_path}"
    else:  # MovieLens "latest" layout: each user rates an item once
        rows = [f"{u},{i},{1 + (u * i) % 5}.0,{1_600_000_000 + 60 * k}" for u in range(1, 41)
                for k, i in enumerate(rng.permutation(200)[:25].tolist())]
        (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "\n".join(rows) + "\n")
        (tmp_path / "movies.csv").write_text("movieId,title,genres\n" + "".join(
            f"{i},m{i},{'Comedy' if i % 2 else 'Drama'}\n" for i in range(200)))
        source = f"movielens:{tmp_path}"
    assert lum(["pretrain", "--source", source, "--out", str(tmp_path / "out"), "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "preset: debug (chosen for 1000 pairs; --preset to override)" in out
    want = "exclude_seen: False (automatic: items repeat)" if repeats else \
        "exclude_seen: True (automatic: no repeats in the data)"
    assert want in out
    meta = json.loads((tmp_path / "out" / (tmp_path / "out" / "latest").read_text() / "meta.json").read_text())
    assert meta["exclude_seen"] is (not repeats)


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


def _ratings(path: Path, varied: bool = False) -> str:
    """60 users x 12 ratings of 80 items as an amazon:PATH source; ``varied``: 4 to 20 ratings per user (ranks'
    rows then hold different numbers of targets)."""
    rng = np.random.default_rng(0)
    rows = [f"u{u},i{int(rng.integers(0, 80))},{int(rng.integers(1, 6))},{1_400_000_000 + 100 * u + t}"
            for u in range(60) for t in range(4 + u % 17 if varied else 12)]
    path.write_text("\n".join(rows) + "\n")
    return f"amazon:{path}"


@pytest.mark.slow
def test_pretrain_under_torchrun_and_checkpoint_loads_in_one_process(tmp_path):
    source = _ratings(tmp_path / "ratings.csv")
    out = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LUM_PRETRAIN_EVAL_EVERY": "4", "LUM_PRETRAIN_LOG_EVERY": "2"}
    r = subprocess.run([str(Path(sys.executable).parent / "lum"), "pretrain", "--nproc", "2", "--preset", "debug",
                        "--source", source, "--out", str(out), "--max-steps", "8"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2, ddp" in r.stderr and r.stdout.count("final eval @") == 1  # rank 0 reports
    model, opt, meta = load_checkpoint(out)  # written at 2 ranks, loaded in one process
    # The newest event the run read (held-out pairs included: they chose the stopping step).
    assert meta["world_size"] == 2 and meta["trained_until_ms"] == (1_400_000_000 + 100 * 59 + 11) * 1000
    assert (Path(meta["path"]) / "items.npz").exists()
    from trainers.lum.data import load_source, split_users

    seqs, _ = load_source(source)
    tr, _, te = split_users(seqs)
    m = evaluate(model, te, tr)
    assert 0 <= m["hr@10"] <= 1 and m["users"] == 60


_STEP = re.compile(r"step (\d+)/(\d+) loss (\d+\.\d+)")


def _losses(lines) -> dict[tuple[int, int], float]:
    """(step, max steps) -> the loss a progress line reports; every rank must report the same."""
    seen: dict[tuple[int, int], set[float]] = {}
    for m in _STEP.finditer("\n".join(lines)):
        seen.setdefault((int(m[1]), int(m[2])), set()).add(float(m[3]))
    assert all(len(v) == 1 for v in seen.values()), seen  # the loss of the global batch, equal on every rank
    return {k: v.pop() for k, v in seen.items()}


def _close_checkpoints(a: Path, b: Path, step: int) -> None:
    """Same weights and optimizer state (moments and step) within float tolerance."""
    m1, o1, meta1 = load_checkpoint(a)
    m2, o2, meta2 = load_checkpoint(b)
    assert meta1["step"] == meta2["step"] == step
    d = m1.cfg.d_model
    for (k, x), y in zip(m1.state_dict().items(), m2.state_dict().values()):
        if k.endswith("qkv.bias"):  # attention ignores the key bias: its gradient is rounding noise, which
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])  # Adam scales up to +-lr steps
        torch.testing.assert_close(x, y, rtol=1e-3, atol=2e-5, msg=k)
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"] and s1["state"].keys() == s2["state"].keys()
    for i, st in s1["state"].items():
        assert float(st["step"]) == float(s2["state"][i]["step"]) == step
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(st[k], s2["state"][i][k], rtol=1e-3, atol=1e-6, msg=f"{i} {k}")


@pytest.mark.slow
def test_fsdp_at_two_ranks_equals_one_process_and_checkpoints_move_between_world_sizes(tmp_path, monkeypatch,
                                                                                      caplog):
    """FSDP (2 CPU ranks, gloo) trains the same global batches as one process: the same losses step by step.
    Its checkpoint resumes in one process, a one-process checkpoint resumes under FSDP, and both continue alike
    with step and optimizer moments carried."""
    source = _ratings(tmp_path / "ratings.csv", varied=True)
    one, two = tmp_path / "one", tmp_path / "two"
    for k, v in {"LUM_PRETRAIN_EVAL_EVERY": "0", "LUM_PRETRAIN_LOG_EVERY": "1"}.items():
        monkeypatch.setenv(k, v)
    caplog.set_level("INFO", logger="trainers.lum.pretrain")
    assert lum(["pretrain", "--preset", "debug", "--source", source, "--out", str(one), "--max-steps", "6"]) == 0
    # One torchrun launch, two jobs: FSDP from scratch into `two`, then the one-process checkpoint resumed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LUM_PRETRAIN_PARALLEL": "fsdp", "LUM_PRETRAIN_THREADS": "1"}
    jobs = [["debug", str(two), 6, False], [None, str(one), 9, True]]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(Path(__file__).with_name("pretrain_ranks.py")), source, json.dumps(jobs)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("world size 2, fsdp") == 4  # two ranks, two jobs
    assert lum(["pretrain", "--source", source, "--out", str(two), "--max-steps", "9", "--resume"]) == 0
    ranks = _losses(r.stderr.splitlines())
    single = _losses(rec.getMessage() for rec in caplog.records)
    fresh = [(s, 6) for s in range(1, 7)]
    resumed = [(s, 9) for s in range(7, 10)]
    assert sorted(ranks) == sorted(single) == fresh + resumed
    # Same global batch at 1 and 2 ranks: the printed (4-decimal) losses agree.
    assert [ranks[k] for k in fresh] == pytest.approx([single[k] for k in fresh], abs=2e-4)
    loss6 = [json.loads((d / "step-00000006" / "meta.json").read_text())["validation_history"][-1]["loss"]
             for d in (one, two)]  # at full precision: each rank's loss counts by its share of the targets
    assert loss6[1] == pytest.approx(loss6[0], rel=1e-5, abs=0)  # unweighted: 1e-3 apart
    # The checkpoint gathered from FSDP's shards holds what one process holds, in the same one-file format.
    assert json.loads((two / "step-00000006" / "meta.json").read_text())["parallel"] == "fsdp"
    _close_checkpoints(one / "step-00000006", two / "step-00000006", 6)
    # 1 -> 2 (FSDP, in `one`) and 2 -> 1 (in `two`) continue alike from step 6 with their optimizer moments.
    assert [ranks[k] for k in resumed] == pytest.approx([single[k] for k in resumed], abs=2e-4)
    _close_checkpoints(one, two, 9)
    assert load_checkpoint(one)[2]["world_size"] == 2 and load_checkpoint(two)[2]["world_size"] == 1


@pytest.mark.gpu
def test_fsdp_on_gpu_with_bf16_blocks_tracks_one_process(tmp_path, monkeypatch, caplog):
    """The CUDA path: FSDP with bf16 block parameters and fp32 reduction (1 or 2 GPUs) follows one process under
    bf16 autocast within bf16 rounding, and its gathered checkpoint loads on the CPU."""
    source = _ratings(tmp_path / "ratings.csv", varied=True)
    one, two = tmp_path / "one", tmp_path / "two"
    for k, v in {"LUM_PRETRAIN_EVAL_EVERY": "0", "LUM_PRETRAIN_LOG_EVERY": "1", "LUM_PRETRAIN_DEVICE": "cuda"}.items():
        monkeypatch.setenv(k, v)
    caplog.set_level("INFO", logger="trainers.lum.pretrain")
    assert lum(["pretrain", "--preset", "debug", "--source", source, "--out", str(one), "--max-steps", "6"]) == 0
    n = min(2, torch.cuda.device_count())
    env = {**os.environ, "LUM_PRETRAIN_PARALLEL": "fsdp"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                        str(Path(__file__).with_name("pretrain_ranks.py")), source,
                        json.dumps([["debug", str(two), 6, False]])],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"on cuda:0, world size {n}, fsdp" in r.stderr
    ranks, single = _losses(r.stderr.splitlines()), _losses(rec.getMessage() for rec in caplog.records)
    assert sorted(ranks) == sorted(single) == [(s, 6) for s in range(1, 7)]
    assert list(ranks.values()) == pytest.approx(list(single.values()), rel=2e-2)
    model, opt, meta = load_checkpoint(two)  # on the CPU, in fp32
    assert meta["parallel"] == "fsdp" and meta["step"] == 6 and float(opt.state_dict()["state"][0]["step"]) == 6
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())


def test_parallel_mode_setting(monkeypatch):
    debug, base = PRESETS["debug"], PRESETS["base"]
    assert parallel_mode("auto", base, "cuda:0", 8, True) == "fsdp"  # large presets on GPU shard
    assert parallel_mode("auto", base, "cpu", 2, True) == "ddp"
    assert parallel_mode("auto", debug, "cuda:0", 2, True) == "ddp"
    assert parallel_mode("fsdp", debug, "cpu", 2, True) == "fsdp"
    assert parallel_mode("fsdp", debug, "cpu", 1, True) == "fsdp"  # FSDP's path (and precision) at world size 1
    assert parallel_mode("ddp", debug, "cpu", 1, True) == "none"
    assert parallel_mode("fsdp", debug, "cpu", 1, False) == "none"  # no process group: one plain process
    from schemas.settings import SettingsError, load

    monkeypatch.setenv("LUM_PRETRAIN_PARALLEL", "zero3")
    with pytest.raises(SettingsError, match="LUM_PRETRAIN_PARALLEL"):
        load(PretrainSettings)
