"""Group query in training: the history keeps every condition, hidden query tokens carry the dropped ones."""

from __future__ import annotations

import numpy as np
import torch

from schemas.tokenize import CONDITION_KINDS, condition_id
from trainers.lum.data import train_batches
from trainers.lum.model import COND, ITEM, PRESETS, QUERY, LumModel
from trainers.lum.packing import Seq, make_batch, to_tokens

CFG = PRESETS["debug"].model_copy(update={"cond_drop": 0.75})
KINDS = [CONDITION_KINDS.index(k) for k in ("scenario", "behavior", "category")]


def seqs(n: int = 12, seed: int = 0) -> list[Seq]:
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n):
        items = rng.integers(1, 300, int(rng.integers(3, 40)))
        conds = np.zeros((len(items), len(CONDITION_KINDS)), np.int64)
        conds[:, KINDS[0]] = condition_id("scenario", "home")
        conds[:, KINDS[1]] = [condition_id("behavior", b) for b in rng.choice(["liked", "disliked"], len(items))]
        conds[:, KINDS[2]] = [condition_id("category", int(i % 5)) for i in items]
        out.append(Seq(u, conds, items, items % 5))
    return out


def test_training_history_keeps_conditions_and_queries_are_the_trained_positions():
    it = train_batches(seqs(), CFG, seed=0)
    dropped = total = 0
    for _ in range(5):
        b = next(it)
        cond, query = b.kind == COND, b.kind == QUERY
        # History condition tokens carry every condition, as at inference (dropping them there lost them).
        assert (b.cond[cond][:, KINDS] != 0).all()
        # Each query sits just before its condition token, at the same position, and predicts the item after it.
        r, c = query.nonzero(as_tuple=True)
        assert (b.kind[r, c + 1] == COND).all() and (b.kind[r, c + 2] == ITEM).all()
        assert torch.equal(b.pos[r, c], b.pos[r, c + 1])
        assert torch.equal(b.label[r, c], b.item[r, c + 2])
        assert torch.equal(b.target, query)  # only queries are trained
        q = b.cond[r, c][:, KINDS]
        assert ((q == 0) | (q == b.cond[r, c + 1][:, KINDS])).all()  # a query only unsets kinds
        dropped, total = dropped + int((q == 0).sum()), total + q.numel()
    assert 0.65 < dropped / total < 0.85


def test_training_queries_are_invisible_to_the_history():
    torch.manual_seed(0)
    model = LumModel(CFG).eval()
    s = seqs(1, seed=3)[0][:CFG.row_len // 3]
    a = to_tokens(s, drop=0.0, queries=True)
    b = to_tokens(s, drop=1.0, queries=True, rng=np.random.default_rng(1))  # same history, other queries
    with torch.no_grad():
        ha, hb = (model(make_batch([t], [[0]], CFG.row_len)) for t in (a, b))
    real = torch.from_numpy(a.kind != QUERY)
    n = len(a)
    assert torch.allclose(ha[0, :n][real], hb[0, :n][real], atol=1e-5)
    assert not torch.allclose(ha[0, :n][~real], hb[0, :n][~real], atol=1e-3)


def test_checkpoint_from_before_query_tokens_keeps_its_context(tmp_path):
    import json

    from trainers.lum.pretrain import load_checkpoint, save_checkpoint

    old = PRESETS["debug"].model_copy(update={"query_tokens": False})
    d = save_checkpoint(tmp_path, LumModel(old), None, 1)
    meta = json.loads((d / "meta.json").read_text())
    del meta["config"]["query_tokens"]  # written before the field existed
    (d / "meta.json").write_text(json.dumps(meta))
    model, _, _ = load_checkpoint(tmp_path)
    assert not model.cfg.query_tokens and model.cfg.context_pairs == old.context_pairs == 31
