"""Managed collisions (ids="mch"): TorchRec's MCH modules give distinct ids their own rows, evict (LRU) when a
table is full and keep training (on CPU, which needs the Python row reset of ``reset_evicted_rows_on_cpu``), and
the remapping state is in the checkpoint: a restored trainer and the checkpoint scorer score like the live model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainers.dlrm.model import DLRMConfig
from trainers.dlrm.score import Scorer
from trainers.dlrm.synthetic import synthetic_examples
from trainers.dlrm.train import Trainer

ROWS = {"user": 512, "item": 256, "category": 64, "scenario": 16, "position": 64}


def _mch_buffers(t: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in t.model.state_dict().items():
        if "_mch_" in k:
            out[k] = (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v).clone()
    return out


@pytest.mark.timeout(180)
def test_mch_trains_evicts_and_checkpoints_its_remapping(tmp_path):
    cfg = DLRMConfig.preset("debug", features="lum", ids="mch", table_rows=ROWS, mch_eviction_interval=2)
    exs = synthetic_examples(3000, seed=12, items=1000)  # more distinct items than the 256 item rows
    a = Trainer(cfg, tmp_path, every_batches=1000)
    for i in range(0, 2000, 200):
        a.train_batch(exs[i:i + 200])
    assert a.featurizer.collisions is None  # rows come from the model, not from hashing
    bufs = _mch_buffers(a)
    item_ids = next(v for k, v in bufs.items() if "t_item._mch_sorted_raw_ids" in k)
    admitted = int((item_ids < torch.iinfo(torch.int64).max).sum())
    assert admitted >= 200  # the item table filled up with admitted ids (then LRU evicts)
    a.checkpoint()
    b = Trainer(cfg, tmp_path)
    for k, v in _mch_buffers(b).items():
        assert torch.equal(v, bufs[k]), k  # the remapping state came back with the model
    probe = exs[2000:2100]
    cands = [(e.item_id, e.category_id) for e in probe]
    p_live = Scorer.from_trainer(a).score(probe[0].user_id, "home", cands)
    assert np.allclose(p_live, Scorer.from_trainer(b).score(probe[0].user_id, "home", cands), atol=1e-6)
    assert np.allclose(p_live, Scorer.from_checkpoint(tmp_path).score(probe[0].user_id, "home", cands), atol=1e-5)
    # Training goes on past more admissions and evictions. (Not bit-identical to the uninterrupted run: the ids
    # seen since the last admission live in a history buffer that TorchRec keeps out of the state_dict.)
    for i in range(2000, 3000, 200):
        b.train_batch(exs[i:i + 200])
    after = next(v for k, v in _mch_buffers(b).items() if "t_item._mch_sorted_raw_ids" in k)
    assert not torch.equal(after, item_ids) and b.metrics.overall()["n"] == 3000
