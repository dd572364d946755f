"""Leave-last-out evaluation with full ranking (no sampled negatives), and the most-popular baseline.

For each user with >= 2 pairs, the model sees every pair but the last and ranks ALL catalog items for the
held-out one. LUM is asked with two query conditions in one group-query pass:
- the *request* condition: the held-out pair's condition with its category unset (what a recommender knows
  at request time: scenario, behavior, search query) -> next-item HR@K / NDCG@K;
- the *full* condition, category included -> Recall@K of next-condition-item queries (one held-out item, so
  Recall@K is the share of users whose item is in the top K given the full condition).
The items-only baseline (``use_conditions=False``) scores with its output at the last item.
Ties count half (so a constant scorer is not credited with every tie).

    from trainers.lum.evaluate import evaluate
    metrics = evaluate(model, eval_seqs, train_seqs, k=10)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from schemas.tokenize import CONDITION_KINDS

from .model import LumModel
from .packing import Seq, group_query_batch, make_batch, pack_rows, to_tokens, truncate_prefix

REQUEST_UNKNOWN = CONDITION_KINDS.index("category")  # not known before the item is chosen


def catalog_of(seqs: list[Seq]) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct item of the sequences with its (last seen) category, sorted by id."""
    items = np.concatenate([s.items for s in seqs])
    cats = np.concatenate([s.cats for s in seqs])
    uniq, idx = np.unique(items[::-1], return_index=True)
    return uniq, cats[::-1][idx]


def _ranks(scores: torch.Tensor, target: torch.Tensor, seen: list[np.ndarray] | None) -> torch.Tensor:
    """Rank (0 = best) of each row's target among all columns; ties count half; ``seen`` columns excluded."""
    t = scores.gather(1, target[:, None])  # (U, 1)
    if seen is not None:
        scores = scores.clone()
        for u, cols in enumerate(seen):
            scores[u, torch.as_tensor(cols[cols != int(target[u])], dtype=torch.long)] = -math.inf
    greater = (scores > t).sum(1).float()
    ties = (scores == t).sum(1).float() - 1
    return greater + ties / 2


def _hr_ndcg(ranks: torch.Tensor, k: int) -> tuple[float, float]:
    hit = ranks < k
    ndcg = torch.where(hit, 1.0 / torch.log2(ranks + 2), torch.zeros_like(ranks))
    return float(hit.float().mean()), float(ndcg.mean())


@torch.no_grad()
def evaluate(model: LumModel, eval_seqs: list[Seq], train_seqs: list[Seq], k: int = 10,
             exclude_seen: bool = False, users_per_batch: int = 128, device: str = "cpu",
             catalog: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """Next-item HR@k/NDCG@k, next-condition-item Recall@k and the most-popular baseline (full ranking).

    ``train_seqs`` gives the popularity counts; ``catalog`` (item ids, category ids) is what is ranked
    (default: every item in ``train_seqs`` and ``eval_seqs``).
    ``exclude_seen`` removes a user's earlier items from the ranking (for data without repeats, e.g. ratings).
    """
    cfg = model.cfg
    was_training = model.training
    model.eval()
    items, cats = catalog or catalog_of(train_seqs + eval_seqs)
    index = {int(i): n for n, i in enumerate(items)}
    item_vecs = model.item_vectors(torch.as_tensor(items, device=device), torch.as_tensor(cats, device=device))
    pop = np.zeros(len(items))
    for s in train_seqs:
        np.add.at(pop, [index[int(i)] for i in s.items], 1)
    pop_scores = torch.as_tensor(pop, dtype=torch.float32)

    ranks, cond_ranks, pop_ranks = [], [], []
    for b in range(0, len(eval_seqs), users_per_batch):
        chunk = eval_seqs[b:b + users_per_batch]
        ctx = [truncate_prefix(s[:-1], cfg.max_pairs) for s in chunk]
        target = torch.tensor([index[int(s.items[-1])] for s in chunk])
        seen = [np.array([index[int(i)] for i in c.items]) for c in ctx] if exclude_seen else None
        runs = [to_tokens(c, cfg.use_conditions) for c in ctx]
        row_len = max(cfg.row_len, 2 * cfg.max_pairs + 2)
        if cfg.use_conditions:
            full = np.stack([s.conds[-1] for s in chunk])  # (U, n_kinds)
            request = full.copy()
            request[:, REQUEST_UNKNOWN] = 0
            batch, where = group_query_batch(runs, np.stack([request, full], 1), row_len)
        else:
            rows = pack_rows([len(r) for r in runs], row_len)
            batch = make_batch(runs, rows, row_len)
            where = torch.zeros(len(runs), 1, 2, dtype=torch.long)
            for r, members in enumerate(rows):
                t = 0
                for i in members:
                    t += len(runs[i])
                    where[i, 0] = torch.tensor([r, t - 1])
        h = model(batch.to(device))  # (B, T, D)
        user = model.user_vectors(h[where[..., 0], where[..., 1]])  # (U, K, D)
        scores = (user @ item_vecs.T).float().cpu()  # (U, K, N): full ranking
        ranks.append(_ranks(scores[:, 0], target, seen))
        if cfg.use_conditions:
            cond_ranks.append(_ranks(scores[:, 1], target, seen))
        pop_ranks.append(_ranks(pop_scores.expand(len(chunk), -1), target, seen))
    model.train(was_training)

    out: dict[str, float] = {"users": float(len(eval_seqs)), "items": float(len(items))}
    out[f"hr@{k}"], out[f"ndcg@{k}"] = _hr_ndcg(torch.cat(ranks), k)
    if cond_ranks:
        out[f"cond_recall@{k}"], _ = _hr_ndcg(torch.cat(cond_ranks), k)
    out[f"pop_hr@{k}"], out[f"pop_ndcg@{k}"] = _hr_ndcg(torch.cat(pop_ranks), k)
    return out


def format_metrics(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) and not float(v).is_integer() else f"{k}={int(v)}"
                    for k, v in m.items())
