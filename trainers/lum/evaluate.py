"""Leave-last-out evaluation with full ranking (no sampled negatives), and the most-popular baseline.

For each evaluated user the model reads the history before the held-out pair (its newest
``cfg.context_pairs``, as in training) and ranks ALL catalog items for the held-out one:
- next-item (unconditional): LUM is asked with the *request* condition, what is known before the user
  acts: scenario and search query. The held-out pair's category and behavior are unset (a query carrying
  the held-out behavior, e.g. "buy", would hint at the answer; the items-only baseline gets no such hint).
  The items-only baseline (``use_conditions=False``) scores with its output at the last item.
- conditional ("next item given a known category"): candidates are restricted to the held-out item's
  category for every model (and most-popular); LUM is also told the category in its query (group query:
  one pass answers both queries). SASRec restricted to the same category is the fair baseline.
``exclude_seen`` removes every item of the user's whole earlier history (not only the truncated prefix).
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
from .packing import Seq, group_query_batch, inference_prefix, make_batch, pack_rows, to_tokens

# Not known before the user acts: which item (so its category) and what the user will do with it.
REQUEST_UNKNOWN = [CONDITION_KINDS.index("category"), CONDITION_KINDS.index("behavior")]
CATEGORY = CONDITION_KINDS.index("category")


def request_conditions(held_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(request, conditional) queries from the held-out pairs' conditions (U, n_kinds): request = what a
    recommender knows before the user acts; conditional = request + the held-out item's category."""
    request = held_out.copy()
    request[:, REQUEST_UNKNOWN] = 0
    conditional = request.copy()
    conditional[:, CATEGORY] = held_out[:, CATEGORY]
    return request, conditional


def catalog_of(seqs: list[Seq]) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct item of the sequences with its (last seen) category, sorted by id."""
    items = np.concatenate([s.items for s in seqs])
    cats = np.concatenate([s.cats for s in seqs])
    uniq, idx = np.unique(items[::-1], return_index=True)
    return uniq, cats[::-1][idx]


def _ranks(scores: torch.Tensor, target: torch.Tensor, seen: list[np.ndarray] | None,
           allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Rank (0 = best) of each row's target among all columns; ties count half; ``seen`` columns excluded;
    ``allowed`` (U, N) bool: only those columns compete (the target always does)."""
    t = scores.gather(1, target[:, None])  # (U, 1)
    scores = scores.clone()
    if seen is not None:
        for u, cols in enumerate(seen):
            scores[u, torch.as_tensor(cols[cols != int(target[u])], dtype=torch.long)] = -math.inf
    if allowed is not None:
        scores[~allowed] = -math.inf
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
    """Next-item HR@k/NDCG@k, category-conditional HR@k (``cond_hr@k``) and most-popular (full ranking).

    ``eval_seqs``: each user's history ending with the held-out pair. ``train_seqs`` gives the popularity
    counts; ``catalog`` (item ids, category ids) is what is ranked (default: every item in both).
    ``exclude_seen`` removes a user's earlier items from the ranking (for data without repeats, e.g. ratings).
    """
    cfg = model.cfg
    if not eval_seqs:
        raise ValueError("no users to evaluate (every user has fewer than 2 pairs)")
    was_training = model.training
    model.eval()
    items, cats = catalog or catalog_of(train_seqs + eval_seqs)
    index = {int(i): n for n, i in enumerate(items)}
    item_vecs = model.item_vectors(torch.as_tensor(items, device=device), torch.as_tensor(cats, device=device))
    pop = np.zeros(len(items))
    for s in train_seqs:
        np.add.at(pop, [index[int(i)] for i in s.items], 1)
    pop_scores = torch.as_tensor(pop, dtype=torch.float32)
    cat_col = torch.as_tensor(cats)

    ranks, cond_ranks, pop_ranks, pop_cond_ranks = [], [], [], []
    for b in range(0, len(eval_seqs), users_per_batch):
        chunk = eval_seqs[b:b + users_per_batch]
        ctx = [inference_prefix(s[:-1], cfg) for s in chunk]
        target = torch.tensor([index[int(s.items[-1])] for s in chunk])
        seen = [np.array([index[int(i)] for i in s.items[:-1]]) for s in chunk] if exclude_seen else None
        same_cat = cat_col[None, :] == torch.as_tensor(np.array([s.cats[-1] for s in chunk]))[:, None]  # (U, N)
        runs = [to_tokens(c, cfg.use_conditions) for c in ctx]
        row_len = max(cfg.row_len, 2 * cfg.max_pairs + 2)
        if cfg.use_conditions:
            request, conditional = request_conditions(np.stack([s.conds[-1] for s in chunk]))
            batch, where = group_query_batch(runs, np.stack([request, conditional], 1), row_len)
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
        cond_ranks.append(_ranks(scores[:, -1], target, seen, same_cat))
        pops = pop_scores.expand(len(chunk), -1)
        pop_ranks.append(_ranks(pops, target, seen))
        pop_cond_ranks.append(_ranks(pops, target, seen, same_cat))
    model.train(was_training)

    out: dict[str, float] = {"users": float(len(eval_seqs)), "items": float(len(items))}
    out[f"hr@{k}"], out[f"ndcg@{k}"] = _hr_ndcg(torch.cat(ranks), k)
    out[f"cond_hr@{k}"], out[f"cond_ndcg@{k}"] = _hr_ndcg(torch.cat(cond_ranks), k)
    out[f"pop_hr@{k}"], out[f"pop_ndcg@{k}"] = _hr_ndcg(torch.cat(pop_ranks), k)
    out[f"pop_cond_hr@{k}"], _ = _hr_ndcg(torch.cat(pop_cond_ranks), k)
    return out


def format_metrics(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) and not float(v).is_integer() else f"{k}={int(v)}"
                    for k, v in m.items())
