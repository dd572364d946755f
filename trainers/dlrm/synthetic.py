"""Synthetic TrainingExamples with a known signal, for tests, benchmarks and ``torchrun`` demos.

    from trainers.dlrm.synthetic import synthetic_examples
    exs = synthetic_examples(5000, seed=0, lum_dim=16)

Clicks come from a hidden affinity: each user has a latent interest vector per scenario, each item a latent
vector, and P(click) = sigmoid(scale * <u_s, v> + bias - position penalty). The LUM fields are what a good
LUM would deliver: per condition ``scenario=s`` the user's latent vector, per item its latent vector, both
mapped into ``lum_dim`` dims by one fixed orthonormal map (dot products preserved) plus noise. So an LUM
model can read affinity directly, while a baseline must learn it from id embeddings, one click at a time.
Ids are random 63-bit values, to exercise hashing. Not a stand-in for the real stream (the lead's
``streaming.producers.synthetic`` + joiner): only for checking that the trainer uses the signal.
"""

from __future__ import annotations

import numpy as np

from schemas.events import TrainingExample

SCENARIOS = ("home", "search", "detail")
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00Z


def synthetic_examples(n: int, seed: int = 0, *, users: int = 400, items: int = 1500, categories: int = 20,
                       latent: int = 8, lum_dim: int = 16, lum_noise: float = 0.3, lum_coverage: float = 0.9,
                       per_request: int = 10, span_hours: float = 6.0) -> list[TrainingExample]:
    rng = np.random.default_rng(seed)
    user_ids = rng.integers(1, 2**63 - 1, users)
    item_ids = rng.integers(1, 2**63 - 1, items)
    cat_ids = rng.integers(1, 2**63 - 1, categories)
    item_cat = rng.integers(0, categories, items)
    cat_vec = rng.normal(0, 1, (categories, latent))
    item_vec = (cat_vec[item_cat] + 0.7 * rng.normal(0, 1, (items, latent))) / np.sqrt(latent)  # (I, L)
    user_base = rng.normal(0, 1, (users, latent))
    user_vec = {s: (user_base + 0.8 * rng.normal(0, 1, (users, latent))) / np.sqrt(latent)  # (U, L) per scenario
                for s in SCENARIOS}
    proj = np.linalg.qr(rng.normal(0, 1, (lum_dim, max(latent, lum_dim))))[0][:, :latent]  # (D, L) orthonormal
    conditions = [f"scenario={s}" for s in SCENARIOS]
    history: dict[int, list[int]] = {}
    out: list[TrainingExample] = []
    n_requests = -(-n // per_request)
    times = T0_MS + np.sort(rng.uniform(0, span_hours * 3600e3, n_requests)).astype(np.int64)
    for r in range(n_requests):
        u = int(rng.integers(users))
        s = SCENARIOS[int(rng.integers(len(SCENARIOS)))]
        cands = rng.choice(items, per_request, replace=False)
        has_lum = rng.random() < lum_coverage
        lum_user = None
        if has_lum:
            lum_user = [(proj @ user_vec[c][u] + lum_noise * rng.normal(0, 1, lum_dim) / np.sqrt(lum_dim)).tolist()
                        for c in SCENARIOS]
        hist = history.setdefault(u, [])
        clicked = []
        for pos, i in enumerate(cands.tolist()):
            if len(out) == n:
                break
            logit = 6.0 * float(user_vec[s][u] @ item_vec[i]) - 1.5 - 0.15 * pos
            label = int(rng.random() < 1 / (1 + np.exp(-logit)))
            if label:
                clicked.append(i)
            lum_item = (proj @ item_vec[i] + lum_noise * rng.normal(0, 1, lum_dim) / np.sqrt(lum_dim)).tolist()
            out.append(TrainingExample(
                example_id=f"req-{seed}-{r}/{item_ids[i]}", request_id=f"req-{seed}-{r}", user_id=int(user_ids[u]),
                item_id=int(item_ids[i]), category_id=int(cat_ids[item_cat[i]]), position=pos, scenario=s,
                query="q" if s == "search" else None, event_time_ms=int(times[r]), label=label,
                history_items=[int(item_ids[h]) for h in hist[-50:]],
                history_categories=[int(cat_ids[item_cat[h]]) for h in hist[-50:]],
                lum_model_version="synthetic-v1" if has_lum else None,
                lum_conditions=conditions if has_lum else None, lum_user=lum_user,
                lum_item=lum_item if has_lum else None))
        hist.extend(clicked)  # point in time: this request's clicks enter history only for later requests
    return out
