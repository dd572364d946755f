"""DMP over 2 CPU processes (torchrun, gloo) trains and checkpoints; that world-size-2 checkpoint, written
with column-wise sharded tables, loads into a world-size-1 table-wise trainer with identical weights and
keeps training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.dlrm.model import TABLES, DLRMConfig
from trainers.dlrm.synthetic import synthetic_examples
from trainers.dlrm.train import Trainer, latest_checkpoint, read_meta

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.timeout(240)
def test_two_ranks_train_checkpoint_and_load_at_world_size_one(tmp_path):
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "trainers.dlrm.train", "--demo", str(ckpt), "--batches", "6", "--sharding", "column_wise"]
    run = subprocess.run(cmd, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads([l for l in run.stdout.splitlines() if l.startswith("{")][-1])
    assert summary["world_size"] == 2 and summary["step"] == 6
    meta = read_meta(ckpt)
    assert meta["world_size"] == 2 and meta["step"] == 6 and meta["config"]["sharding"] == "column_wise"
    assert summary["overall"]["n"] > 0 and summary["overall"]["auc"] is not None

    # The saved tables, gathered into full tensors straight from the checkpoint files.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(latest_checkpoint(ckpt)), str(tmp_path / "full.pt"))
    saved = torch.load(tmp_path / "full.pt", weights_only=False)["model"]

    cfg = DLRMConfig.preset("debug", features="lum", sharding="table_wise")
    trainer = Trainer(cfg, ckpt)  # world size 1 (a private gloo group in this process)
    assert trainer.world == 1 and trainer.step == 6 and trainer.cfg.features == "lum"
    state = trainer.model.state_dict()
    for t in TABLES:
        key = f"sparse_arch.embedding_bag_collection.embedding_bags.t_{t}.weight"
        local = state[key].local_shards()[0].tensor  # table-wise at ws=1: the whole table on this rank
        assert torch.equal(local, saved[key]), t
    for key, value in saved.items():
        if key.startswith(("dense_arch", "over_arch")):
            assert torch.equal(state[key], value), key
    before = trainer.step
    trainer.train_batch(synthetic_examples(64, seed=9))
    assert trainer.step == before + 1


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_with_managed_collisions(tmp_path):
    """MCH tables sharded row-wise over 2 CPU ranks (one bucket per rank), small tables so that ids get
    admitted and evicted during the run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "trainers.dlrm.train", "--demo", str(tmp_path / "ckpt"), "--batches", "8", "--ids", "mch"]
    run = subprocess.run(cmd, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads([l for l in run.stdout.splitlines() if l.startswith("{")][-1])
    assert summary["world_size"] == 2 and summary["step"] == 8 and summary["examples"] == 8 * 64 * 2
    meta = read_meta(tmp_path / "ckpt")
    assert meta["config"]["ids"] == "mch" and meta["world_size"] == 2
