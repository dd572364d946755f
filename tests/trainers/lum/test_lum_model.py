"""LUM model mechanics: packing equivalence, group-query equivalence, no leakage across time or users."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas.tokenize import CONDITION_KINDS, parse_condition
from trainers.lum.model import COND, PRESETS, LumModel, hash_ids, in_batch_candidates, info_nce, training_outputs
from trainers.lum.packing import Seq, Tokens, concat, make_batch, pack_rows, padded_batch, to_tokens
from trainers.lum.refresh import condition_outputs

CFG = PRESETS["debug"]
K = len(CONDITION_KINDS)


def random_seqs(n: int, seed: int, lo: int = 2, hi: int = 20) -> list[Seq]:
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n):
        L = int(rng.integers(lo, hi + 1))
        conds = rng.integers(1, 2**62, size=(L, K))
        conds[rng.random((L, K)) < 0.3] = 0
        items = rng.integers(0, 2**62, size=L)
        items[: L // 2] = rng.integers(0, 30, size=L // 2)  # repeats, so duplicates occur in the batch
        out.append(Seq(u, conds, items, rng.integers(0, 50, size=L)))
    return out


@pytest.fixture(scope="module")
def model() -> LumModel:
    torch.manual_seed(0)
    return LumModel(CFG).eval()


def test_hash_is_stable_and_in_range():
    ids = torch.tensor([0, 1, 2**62 + 12345, 2**63 - 1])
    h = hash_ids(ids, 4099)
    assert ((h >= 0) & (h < 4099)).all()
    assert torch.equal(h, hash_ids(ids.clone(), 4099))
    assert not torch.equal(hash_ids(ids, 4099, 0), hash_ids(ids, 4099, 1))


def test_packed_loss_equals_one_by_one(model):
    seqs = random_seqs(12, seed=1)
    runs = [to_tokens(s) for s in seqs]
    rows = pack_rows([len(r) for r in runs], CFG.row_len)
    assert len(rows) < len(runs)  # several users really share rows
    packed = make_batch(runs, rows, CFG.row_len)
    cand = in_batch_candidates(packed, logq=True)
    with torch.no_grad():
        u, pos = training_outputs(model, packed)
        loss_packed = info_nce(model, u, pos, *cand, CFG.temperature)
        singles = [training_outputs(model, padded_batch([r])) for r in runs]  # plain causal kernel, no mask
        u1, pos1 = torch.cat([s[0] for s in singles]), torch.cat([s[1] for s in singles])
        loss_single = info_nce(model, u1, pos1, *cand, CFG.temperature)
    assert len(u) == sum(len(s) for s in seqs)  # every condition token trained, nothing else
    assert torch.equal(pos.sort().values, pos1.sort().values)
    assert abs(float(loss_packed) - float(loss_single)) < 1e-5
    # Stronger than the loss: the same per-position outputs (order: by user within rows).
    order = [i for r in rows for i in r]
    per_user = [singles[i][0] for i in order]
    assert torch.allclose(u, torch.cat(per_user), atol=1e-5)


def test_packed_loss_gradients_flow_and_logq_changes_loss(model):
    seqs = random_seqs(6, seed=2)
    runs = [to_tokens(s) for s in seqs]
    b = make_batch(runs, pack_rows([len(r) for r in runs], CFG.row_len), CFG.row_len)
    u, pos = training_outputs(model, b)
    plain = info_nce(model, u, pos, *in_batch_candidates(b, logq=False), CFG.temperature)
    corrected = info_nce(model, u, pos, *in_batch_candidates(b, logq=True), CFG.temperature)
    assert torch.isfinite(plain) and float(plain.detach()) != float(corrected.detach())
    plain.backward()
    assert model.tokens.item.weight.grad is not None and model.tokens.cond.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_group_query_equals_separate_passes(model):
    seqs = random_seqs(5, seed=3, lo=1, hi=CFG.context_pairs)  # whole histories fit the context
    names = ["scenario=home", "scenario=search", "category=17,behavior=buy", "any", "query=red shoes",
             "behavior=view", "scenario=detail", "category=3"]
    conds = np.array([parse_condition(n) for n in names])
    grouped = condition_outputs(model, seqs, conds, users_per_batch=3)  # (U, K, D), users packed together
    assert grouped.shape == (5, len(names), CFG.d_model)
    for u, s in enumerate(seqs):
        for k in range(len(names)):
            # Separate pass: the condition as an ordinary last token, plain causal attention.
            q = Tokens(np.array([COND], np.int8), conds[k:k + 1], np.zeros(1, np.int64), np.zeros(1, np.int64))
            with torch.no_grad():
                h = model(padded_batch([concat(to_tokens(s), q)]))
                alone = model.user_vectors(h[0, -1])
            assert torch.allclose(grouped[u, k], alone, atol=1e-5), (u, k)
    assert not torch.allclose(grouped[0, 0], grouped[0, 1], atol=1e-3)  # conditions do matter


def test_no_leakage_from_future_tokens_or_other_users(model):
    a, b = random_seqs(2, seed=4, lo=10, hi=10)
    runs = [to_tokens(a), to_tokens(b)]
    batch = make_batch(runs, [[0, 1]], CFG.row_len)
    with torch.no_grad():
        base = model(batch)
        # Change user a's item at pair 6 (token 13): tokens 0..12 must not move, later ones must.
        fut = make_batch([to_tokens(Seq(a.user_id, a.conds, np.where(np.arange(10) == 6, 999_999, a.items), a.cats)),
                          runs[1]], [[0, 1]], CFG.row_len)
        h = model(fut)
        assert torch.allclose(h[0, :13], base[0, :13], atol=1e-6)
        assert not torch.allclose(h[0, 13:20], base[0, 13:20], atol=1e-4)
        assert torch.allclose(h[0, 20:40], base[0, 20:40], atol=1e-6)  # user b (packed after a) unaffected
        # Change everything of user b: user a unaffected; b changes.
        b2 = random_seqs(2, seed=5, lo=10, hi=10)[1]
        other = model(make_batch([runs[0], to_tokens(b2)], [[0, 1]], CFG.row_len))
        assert torch.allclose(other[0, :20], base[0, :20], atol=1e-6)
        assert not torch.allclose(other[0, 20:40], base[0, 20:40], atol=1e-4)


def test_condition_drop_only_unsets_condition_kinds():
    s = random_seqs(1, seed=6, lo=200, hi=200)[0]
    t = to_tokens(s, drop=0.5, rng=np.random.default_rng(0))
    kept = t.cond[0::2]
    assert ((kept == s.conds) | (kept == 0)).all()
    dropped = (kept == 0) & (s.conds != 0)
    assert 0.4 < dropped.sum() / (s.conds != 0).sum() < 0.6
    assert np.array_equal(t.item[1::2], s.items)


def test_pack_rows_fits_and_keeps_everything():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 64, size=200).tolist()
    rows = pack_rows(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert sum(lengths) / (64 * len(rows)) > 0.9
    with pytest.raises(ValueError):
        pack_rows([65], 64)
