"""Trainer integrity (in-process): re-delivered examples are trained once and the dedup state survives a
checkpoint; a non-finite loss skips the step without touching the model and hands the batch to dead letters;
a corrupt newest checkpoint falls back to the older good one; a different saved model config is refused with
the differing fields named."""

from __future__ import annotations

import logging

import pytest
import torch

from trainers.checkpoint import Refuse
from trainers.dlrm.model import DLRMConfig
from trainers.dlrm.synthetic import synthetic_examples
from trainers.dlrm.train import Batch, Trainer, latest_checkpoint

CFG = DLRMConfig.preset("debug", features="lum")


def _weights(t: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in t.model.state_dict().items():
        v = v.local_shards()[0].tensor if hasattr(v, "local_shards") else v
        out[k] = v.detach().clone()
    return out


@pytest.mark.timeout(120)
def test_redelivered_examples_are_trained_once_across_a_restart(tmp_path):
    exs = synthetic_examples(800, seed=7)
    a = Trainer(CFG, tmp_path, record_example_ids=True, dedup_horizon=10_000)
    a.train_batch(exs[:200])
    a.train_batch(exs[150:300] + exs[150:160])  # 50 re-sent from the last batch, 10 repeated inside this one
    assert a.examples == 300 and a.duplicates == 60
    a.checkpoint()
    b = Trainer(CFG, tmp_path, record_example_ids=True, dedup_horizon=10_000)  # restart: dedup state restored
    b.train_batch(exs[100:400])  # a joiner restart re-sends 200 already trained
    b.checkpoint()
    assert b.examples == 400 and b.duplicates == 260
    ids = (tmp_path / "trained_ids-rank0.log").read_text().split()
    assert sorted(ids) == sorted(e.example_id for e in exs[:400])


@pytest.mark.timeout(120)
def test_features_computed_ahead_are_dropped_with_admitted_duplicates(tmp_path, monkeypatch):
    """``fit``'s prefetch thread featurizes a batch before admission drops its re-delivered examples: the step
    trains and counts exactly what it would have featurized itself."""
    import threading

    from trainers.dlrm.features import Featurizer

    ahead = []
    call = Featurizer.__call__
    monkeypatch.setattr(Featurizer, "__call__", lambda self, exs, **kw: ahead.append(
        threading.current_thread().name == "dlrm-prefetch") or call(self, exs, **kw))
    exs = synthetic_examples(900, seed=11)
    later = [exs[150:350] + exs[160:170], exs[350:500], exs[480:700], exs[700:900]]  # 60, 0, 20, 0 re-delivered
    runs = []
    for prefetch in (0, 2):
        torch.manual_seed(0)
        t = Trainer(CFG, tmp_path / str(prefetch), record_example_ids=True, dedup_horizon=10_000)
        t.train_batch(exs[:200])  # the model exists: every later batch can be featurized ahead
        t.fit([Batch(b) for b in later], prefetch=prefetch)
        runs.append(t)
    assert sum(ahead) == 4  # the run with a prefetch thread featurized each batch ahead
    a, b = runs
    assert a.examples == b.examples == 900 and a.duplicates == b.duplicates == 80
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.metrics.overall() == b.metrics.overall()
    assert a.featurizer.lum_versions == b.featurizer.lum_versions  # nothing counted twice or for a dropped one
    assert sum(a.featurizer.lum_versions.values()) == sum(e.lum_model_version is not None for e in exs)


def test_dedup_horizon_is_bounded():
    t = Trainer(CFG, dedup_horizon=100)
    exs = synthetic_examples(600, seed=8)
    for i in range(0, 600, 100):
        t.train_batch(exs[i:i + 100])
    assert 100 <= len(t.seen) < 17 * t.seen.chunk  # memory bound: the last 100 ids (16 chunks of 7, plus one filling)
    t.train_batch(exs[:100])  # older than the horizon: trained again (the stated limit)
    assert t.duplicates == 0 and t.examples == 700


@pytest.mark.timeout(120)
def test_non_finite_loss_skips_the_step_and_dead_letters_the_batch():
    exs = synthetic_examples(400, seed=9)
    bad = []
    t = Trainer(CFG, on_bad_batch=lambda batch, reason: bad.append((len(batch.examples), reason)))
    t.train_batch(exs[:200])
    # A model with a non-finite weight makes the loss non-finite (decoding already refuses NaN inputs).
    with torch.no_grad():
        dict(t.model.named_parameters())["over_arch.model.1.bias"].fill_(float("nan"))
    before = _weights(t)
    t.train_batch(Batch(exs[200:300], {0: 5}))
    after = _weights(t)
    assert t.skipped_batches == 1 and t.step == 1 and t.examples == 200
    assert bad == [(100, bad[0][1])] and "non-finite" in bad[0][1]
    for k in before:  # nothing was updated by the skipped step: no backward, no optimizer step
        assert torch.allclose(after[k], before[k], atol=0, rtol=0, equal_nan=True), k
    assert t.offsets == {0: 5}  # the batch's offsets still advance: its examples are in dead-letters
    assert len(t.seen) == 200  # skipped examples are not remembered as trained


@pytest.mark.timeout(180)
def test_corrupt_newest_checkpoint_falls_back_to_the_older_one(tmp_path, caplog):
    exs = synthetic_examples(600, seed=10)
    a = Trainer(CFG, tmp_path, keep=2)
    a.train_batch(exs[:200])
    older = a.checkpoint()
    a.train_batch(exs[200:400])
    newest = a.checkpoint()
    assert latest_checkpoint(tmp_path) == newest
    for f in newest.glob("*.distcp"):  # tensor data damaged on disk
        f.write_bytes(b"\0" * 64)
    with caplog.at_level(logging.WARNING):
        b = Trainer(CFG, tmp_path)
    assert b.step == 1 and b.examples == 200  # the older checkpoint's state
    assert f"checkpoint {newest.name} is unusable" in caplog.text and older.name in caplog.text
    (tmp_path / "LATEST").write_text("ckpt-garbage")  # LATEST names nothing loadable
    c = Trainer(CFG, tmp_path)
    assert c.step in (1, 2)


def test_different_saved_config_is_refused_naming_the_fields(tmp_path):
    a = Trainer(CFG, tmp_path)
    a.train_batch(synthetic_examples(100, seed=11))
    a.checkpoint()
    with pytest.raises(Refuse, match=r"embedding_dim: saved 16, requested 32.*history_len: saved 50, requested 5"):
        Trainer(CFG.model_copy(update={"embedding_dim": 32, "history_len": 5}), tmp_path)
    Trainer(CFG.model_copy(update={"sharding": "column_wise"}), tmp_path)  # resharding is allowed
