"""Regression tests for the LUM defects found against the paper (each fails on the code before its fix)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trainers.lum.evaluate as ev
import trainers.lum.refresh as rf
from schemas.tokenize import CONDITION_KINDS, condition_id
from trainers.lum.data import Sampler, split_users, train_batches
from trainers.lum.model import ITEM, PRESETS, QUERY, LumModel, in_batch_candidates, info_nce, training_outputs
from trainers.lum.packing import Seq, make_batch, pack_rows, to_tokens

CFG = PRESETS["debug"]
K = len(CONDITION_KINDS)
BEHAVIOR, CATEGORY = CONDITION_KINDS.index("behavior"), CONDITION_KINDS.index("category")


def seq(user: int, items, cats=None, behavior: str = "view") -> Seq:
    items = np.asarray(items, np.int64)
    cats = np.asarray(cats if cats is not None else items % 7, np.int64)
    conds = np.zeros((len(items), K), np.int64)
    conds[:, 0] = condition_id("scenario", "home")
    conds[:, BEHAVIOR] = condition_id("behavior", behavior)
    conds[:, CATEGORY] = [condition_id("category", int(c)) for c in cats]
    return Seq(user, conds, items, cats)


@pytest.fixture(scope="module")
def model() -> LumModel:
    torch.manual_seed(0)
    return LumModel(CFG).eval()


def _capture_queries(monkeypatch, module) -> list:
    seen = []
    real = module.group_query_batch

    def spy(prefixes, conditions, row_len):
        batch, where = real(prefixes, conditions, row_len)
        seen.append((batch, np.asarray(conditions)))
        return batch, where

    monkeypatch.setattr(module, "group_query_batch", spy)
    return seen


def _long_histories_and_trained_positions(cfg) -> tuple[list[Seq], set[int]]:
    """Users with histories of 3 training windows, and the positions whose outputs 10 training batches used."""
    rng = np.random.default_rng(0)
    seqs = [seq(u, rng.integers(0, 500, 3 * cfg.max_pairs)) for u in range(8)]
    it = train_batches(seqs, cfg, seed=0)
    trained: set[int] = set()
    for _ in range(10):
        b = next(it)
        trained |= set(b.pos[b.target].tolist())
    return seqs, trained


def test_group_query_position_is_one_training_used(model, monkeypatch):
    # Defect 1: users with long histories were queried at position 2*max_pairs, never trained.
    seqs, trained = _long_histories_and_trained_positions(CFG)
    seen = _capture_queries(monkeypatch, rf)
    rf.condition_outputs(model, seqs, np.zeros((2, K), np.int64))
    seen_eval = _capture_queries(monkeypatch, ev)
    ev.evaluate(model, seqs, seqs)
    for batch, _ in seen + seen_eval:
        used = set(batch.pos[batch.kind == QUERY].tolist())
        assert used and used <= trained, (sorted(used), max(trained))


def test_exclude_seen_covers_the_whole_history(model):
    # Defect 2: only items of the truncated prefix were excluded. The eval user had the 5 most popular items
    # long ago (outside the model's context); excluded, the moderately popular target ranks first.
    background = [seq(100 + u, [1, 2, 3, 4, 5] + ([300] if u < 3 else []) + [1000 + u]) for u in range(20)]
    user = seq(1, [1, 2, 3, 4, 5] + list(range(200, 200 + 2 * CFG.max_pairs)) + [300])
    m = ev.evaluate(model, [user], background + [user[:-1]], k=3, exclude_seen=True)
    assert m["pop_hr@3"] == 1.0
    m = ev.evaluate(model, [user], background + [user[:-1]], k=3, exclude_seen=False)
    assert m["pop_hr@3"] == 0.0


def test_request_query_does_not_carry_the_held_out_behavior(model, monkeypatch):
    # Defect 4: on Taobao the evaluation query carried the held-out event's own behavior (cart/buy).
    users = [seq(u, [10 + u, 20 + u, 30 + u], behavior="buy") for u in range(4)]
    seen = _capture_queries(monkeypatch, ev)
    ev.evaluate(model, users, users)
    (_, conds), = seen
    request, conditional = conds[:, 0], conds[:, 1]
    assert (request[:, BEHAVIOR] == 0).all() and (request[:, CATEGORY] == 0).all()
    assert (conditional[:, BEHAVIOR] == 0).all()
    assert (conditional[:, CATEGORY] == [u.conds[-1, CATEGORY] for u in users]).all()
    assert (request[:, 0] == condition_id("scenario", "home")).all()  # what is known at request time stays


def test_logits_are_fp32_under_bf16_autocast(model):
    # Defect 5a: logits were computed in bf16 under autocast (cosines off by ~1e-2, x 1/temperature).
    rng = np.random.default_rng(1)
    runs = [to_tokens(seq(u, rng.integers(0, 300, 20))) for u in range(6)]
    b = make_batch(runs, pack_rows([len(r) for r in runs], CFG.row_len), CFG.row_len)
    with torch.no_grad():
        u, pos = training_outputs(model, b)
        cand = in_batch_candidates(b, logq=True)
        exact = info_nce(model, u, pos, *cand, CFG.temperature)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = info_nce(model, u, pos, *cand, CFG.temperature)
            vecs = model.user_vectors(model(b))
    assert auto.dtype == torch.float32 and vecs.dtype == torch.float32
    assert abs(float(auto) - float(exact)) < 1e-5


def test_logq_is_the_chance_to_be_a_candidate():
    # Defect 5b: logQ was computed from counts over the batch (a share summing to 1), not from the chance of
    # being among a batch's deduplicated candidates. Check the correction against the sampler's real behavior.
    rng = np.random.default_rng(2)
    n_items = 400
    p = 1.0 / np.arange(1, n_items + 1)
    p /= p.sum()
    seqs = [seq(u, rng.choice(n_items, size=int(rng.integers(5, 30)), p=p)) for u in range(300)]
    cfg = CFG.model_copy(update={"neg_samples": 64})
    all_items = np.concatenate([s.items for s in seqs])
    freq = np.bincount(all_items, minlength=n_items) / len(all_items)
    catalog = len(np.unique(all_items))  # uniform negatives come from the items the data has
    it = train_batches(seqs, cfg, seed=3)
    hits, expected = np.zeros(n_items), np.zeros(n_items)
    for _ in range(400):
        b = next(it)
        m = int((b.kind == ITEM).sum())
        q = 1 - (1 - freq) ** m * (1 - 1 / catalog) ** cfg.neg_samples
        cand = b.cand_item.numpy()
        assert np.array_equal(cand, np.unique(cand))  # distinct, sorted
        assert set(b.label[b.target].tolist()) <= set(cand.tolist())  # positives in
        np.testing.assert_allclose(np.exp(b.cand_logq.numpy()), q[cand], rtol=1e-4)
        hits[cand] += 1
        expected += q
    # The formula matches how often items really are candidates (popular, middle and tail items).
    for lo, hi in ((0, 10), (10, 50), (50, 400)):
        assert hits[lo:hi].sum() == pytest.approx(expected[lo:hi].sum(), rel=0.1), (lo, hi)


def test_sampler_candidates_include_uniform_negatives():
    s = [seq(u, [u, u + 1]) for u in range(50)]
    sampler = Sampler(s, 20, np.random.default_rng(0))
    runs = [to_tokens(x) for x in s[:2]]
    b = make_batch(runs, [[0, 1]], CFG.row_len)
    ids, _, logq = sampler.candidates(b)
    assert {0, 1, 2} <= set(ids.tolist()) and len(ids) > 3 and (logq <= 0).all()


def test_split_users_holds_out_validation_and_test():
    a, b, c = seq(1, [1, 2, 3, 4]), seq(2, [5, 6]), seq(3, [7])
    train, val, test = split_users([a, b, c])
    assert [list(x.items) for x in train] == [[1, 2], [5], [7]]
    assert [list(x.items) for x in val] == [[1, 2, 3]]
    assert [list(x.items) for x in test] == [[1, 2, 3, 4], [5, 6]]


@pytest.mark.parametrize("use_conditions", [True, False])
def test_conditional_retrieval_ranks_only_the_held_out_items_category(use_conditions):
    """"Next item given its category" ranks the held-out item among the items of its category only, for the LUM
    (told the category) and the items-only model and most-popular alike: with 10 items per category every
    conditional HR@10 is 1, while the full ranking over 200 items is not."""
    torch.manual_seed(0)
    model = LumModel(CFG.model_copy(update={"use_conditions": use_conditions})).eval()
    rng = np.random.default_rng(3)
    users = [seq(u, items, items % 20) for u, items in enumerate(rng.integers(0, 200, (40, 12)))]  # 20 categories
    catalog = (np.arange(200), np.arange(200) % 20)
    m = ev.evaluate(model, users, users, k=10, catalog=catalog)
    assert m["cond_hr@10"] == 1.0 and m["pop_cond_hr@10"] == 1.0
    assert m["hr@10"] < 0.5 and m["pop_hr@10"] < 1.0


def test_items_only_inference_reads_its_last_item_at_a_trained_position():
    """Defect 1, items-only (the SASRec-style baseline): its answer is the output at the last item of the history
    evaluation and refresh feed it (``inference_prefix``); that position must be one whose output training used."""
    from trainers.lum.packing import inference_prefix, truncate_prefix

    cfg = CFG.model_copy(update={"use_conditions": False})
    seqs, trained = _long_histories_and_trained_positions(cfg)

    def last(prefix: Seq) -> int:
        return len(to_tokens(prefix, use_conditions=False)) - 1

    assert {last(inference_prefix(s, cfg)) for s in seqs} <= trained
    assert {last(truncate_prefix(s, cfg.window_pairs)) for s in seqs} - trained  # a whole window: never trained
