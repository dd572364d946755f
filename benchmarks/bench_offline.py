"""Offline benchmark on real logs: DLRM alone vs DLRM + LUM (AUC, log loss), and LUM vs SASRec-style retrieval.

    .venv/bin/python benchmarks/bench_offline.py [--datasets ml-100k,taobao] [--ml1m PATH] [--data ../shared/data]
                                                 [--quick] [--out benchmarks/results/offline.md]

The protocol (per-user chronological split, labels, point-in-time LUM features, metrics) is written out in
benchmarks/README.md; in short, for each user, oldest first:
    first 50% of events -> LUM pre-training (Step 1)
    next 30%            -> DLRM training examples; LUM features = group query over the events before them
    last 20%            -> DLRM test examples (never trained on); LUM features = query over events before them
and, separately, leave-last-out next-item retrieval with full ranking for LUM vs a SASRec-style model of the
same width and depth. Seeds are fixed; the table, sizes, seeds and run time go to stdout and ``--out``.
Timings are wall-clock on a shared machine (other processes may use the cores).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

# One intra-op thread: on 2 shared cores, 2 OpenMP threads spin-wait and steps get slower (bench_dlrm.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from schemas.datasets import is_positive, read_movielens, read_taobao  # noqa: E402
from schemas.events import BehaviorEvent, TrainingExample  # noqa: E402
from schemas.tokenize import parse_condition  # noqa: E402
from trainers.dlrm.model import DLRMConfig  # noqa: E402
from trainers.dlrm.train import Trainer  # noqa: E402
from trainers.lum.data import leave_last_out, sequences_from_events, train_batches  # noqa: E402
from trainers.lum.evaluate import catalog_of, evaluate  # noqa: E402
from trainers.lum.model import PRESETS, LumModel  # noqa: E402
from trainers.lum.pretrain import model_version  # noqa: E402
from trainers.lum.pretrain import train as lum_train  # noqa: E402
from trainers.lum.refresh import condition_outputs  # noqa: E402

log = logging.getLogger("bench_offline")
HISTORY = 50  # most recent previous behaviors kept in an example's history
POSITIVE_BEHAVIORS = ("cart", "fav", "buy")  # Taobao: what turns an earlier page view into a positive


@dataclass
class Settings:
    """Everything a run depends on; printed with the results."""

    lum_preset: str = "small"  # LUM width/depth (the SASRec-style baseline uses the same)
    lum_steps: int = 400  # optimizer steps of each transformer (LUM for features, LUM and SASRec for retrieval)
    dlrm_preset: str = "debug"
    max_epochs: int = 4  # DLRM passes over segment 2: 1..max_epochs, chosen on a validation tail of segment 2
    val_share: float = 0.25  # each user's last quarter of segment 2 validates the epoch choice
    dlrm_batch: int = 256
    dlrm_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # DLRM init seeds; each is trained with and without LUM
    seed: int = 0  # LUM init and batch order
    cuts: tuple[float, float] = (0.5, 0.8)  # per-user share of events before the DLRM-train / DLRM-test segments
    max_users: int = 0  # 0: all users (smoke tests take a few)
    retrieval: bool = True
    rating_condition: bool = False  # diagnostic (MovieLens): past ratings enter the LUM as liked/disliked conditions


# ------------------------------------------------------------------------------------------------ data


def load(dataset: str, path: Path) -> list[BehaviorEvent]:
    reader = read_taobao if dataset == "taobao" else read_movielens
    return list(reader(path))


def by_user(events: list[BehaviorEvent], max_users: int = 0) -> dict[int, list[BehaviorEvent]]:
    """Each user's events, oldest first (the readers yield event-time order); the first ``max_users`` users."""
    users: dict[int, list[BehaviorEvent]] = {}
    for e in events:
        if e.user_id in users or not max_users or len(users) < max_users:
            users.setdefault(e.user_id, []).append(e)
    return users


def cut_points(n: int, cuts: tuple[float, float]) -> tuple[int, int]:
    """(a, b): events [0, a) pre-train the LUM, [a, b) are DLRM training, [b, n) DLRM test."""
    return int(n * cuts[0]), int(n * cuts[1])


def segment_bounds(part: str, cuts: tuple[float, float], val_share: float = 0.25) -> Callable[[int], tuple[int, int]]:
    """n -> [lo, hi) event indices of a user's ``part``: "train" (segment 2), "test" (segment 3), or, to choose
    DLRM epochs, "fit" and "val" (segment 2 without / with only its last ``val_share``)."""
    def bounds(n: int) -> tuple[int, int]:
        a, b = cut_points(n, cuts)
        v = b - int((b - a) * val_share)
        return {"train": (a, b), "test": (b, n), "fit": (a, v), "val": (v, b)}[part]
    return bounds


def labels_for(events: list[BehaviorEvent], dataset: str, horizon: int) -> list[int | None]:
    """Per event: its ranking label, or None when it is not an example.

    MovieLens: every rating, positive when rating >= 4. Taobao: every page view, positive when the same user
    carts/favs/buys that item at or after the view, looking ahead only up to event index ``horizon`` (the
    end of the segment the label is used in: a training label must be known when training happens).
    """
    if dataset != "taobao":
        return [int(is_positive(e)) if e.behavior == "rate" else None for e in events]
    last_positive: dict[int, int] = {}  # item -> time of the latest positive behavior before the horizon
    for e in events[:horizon]:
        if e.behavior in POSITIVE_BEHAVIORS:
            last_positive[e.item_id] = max(last_positive.get(e.item_id, 0), e.event_time_ms)
    return [int(last_positive.get(e.item_id, -1) >= e.event_time_ms) if e.behavior == "view" else None
            for e in events]


@dataclass
class LumView:
    """What the refresh job would have published at one moment: per-user condition vectors + item vectors."""

    version: str
    conditions: list[str]
    users: dict[int, list[list[float]]]  # user -> K vectors (users without any prior event are absent)
    items: dict[int, list[float]] = field(default_factory=dict)


def lum_view(model: LumModel, version: str, prefixes: dict[int, list[BehaviorEvent]], conditions: list[str],
             targets: set[tuple[int, int]]) -> LumView:
    """Group query over each user's prefix (Step 2) and the item-token embedding of every target item."""
    seqs = sequences_from_events(e for p in prefixes.values() for e in p)  # per user, prefix order kept
    conds = np.array([parse_condition(c) for c in conditions], dtype=np.int64)
    vecs = condition_outputs(model, seqs, conds) if seqs else torch.zeros(0)
    users = {s.user_id: v for s, v in zip(seqs, vecs.tolist())}
    pairs = sorted(targets)
    ids = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    cats = torch.tensor([c for _, c in pairs], dtype=torch.long)
    with torch.no_grad():
        ivecs = model.item_vectors(ids, cats).tolist() if pairs else []
    return LumView(version, conditions, users, {i: v for (i, _), v in zip(pairs, ivecs)})


def examples(users: dict[int, list[BehaviorEvent]], dataset: str, bounds: Callable[[int], tuple[int, int]],
             view: LumView) -> list[TrainingExample]:
    """TrainingExamples of the events [lo, hi) = ``bounds(n)`` of each user, sorted by event time as a stream is.

    Labels look ahead at most to ``hi``: a label is what was known when its segment ended."""
    out = []
    for u, evs in users.items():
        lo, hi = bounds(len(evs))
        labels = labels_for(evs, dataset, hi)
        user_vecs = view.users.get(u)
        for j in range(lo, hi):
            if labels[j] is None:
                continue
            e, past = evs[j], evs[max(0, j - HISTORY):j]  # strictly earlier behaviors of this user
            out.append(TrainingExample(
                example_id=e.event_id, request_id=e.event_id, user_id=u, item_id=e.item_id,
                category_id=e.category_id, position=0, scenario=e.scenario, event_time_ms=e.event_time_ms,
                label=labels[j], history_items=[p.item_id for p in past],
                history_categories=[p.category_id for p in past], lum_model_version=view.version,
                lum_conditions=list(view.conditions) if user_vecs else None, lum_user=user_vecs,
                lum_item=view.items.get(e.item_id)))
    out.sort(key=lambda x: (x.event_time_ms, x.user_id))
    return out


def with_rating_condition(e: BehaviorEvent) -> BehaviorEvent:
    """Diagnostic: a past rating as a condition the LUM can be queried with (query "liked" / "disliked").

    Only the LUM's sequences (pre-training and the refresh prefixes, all strictly before the examples they
    serve) carry it; the DLRM examples themselves never do, so no example sees its own rating."""
    return e.model_copy(update={"query": "liked" if is_positive(e) else "disliked"}) if e.behavior == "rate" else e


def conditions_for(dataset: str, pretrain: list[BehaviorEvent]) -> list[str]:
    """The query conditions of Step 2: general ones plus, for MovieLens, the 3 most rated genres (pre-train part)."""
    if dataset == "taobao":
        return ["any", "scenario=taobao", "behavior=view", "behavior=cart", "behavior=buy"]
    top = [c for c, _ in Counter(e.category_id for e in pretrain).most_common(3)]
    return ["any", "scenario=movielens", *[f"category={c}" for c in top]]


# ------------------------------------------------------------------------------------------------ metrics


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney, ties count half)."""
    y = labels.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    r = avg_rank[inverse]
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def raw_lum_auc(exs: list[TrainingExample], conditions: list[str]) -> dict[str, float]:
    """AUC of each condition's raw cosine(user vector, item vector) on its own, no model: does LUM knowledge carry
    label signal at all? (Examples without LUM vectors score 0.)"""
    y = np.array([x.label for x in exs])
    out = {}
    for k, c in enumerate(conditions):
        cos = np.array([float(np.dot(x.lum_user[k], x.lum_item)) if x.lum_user and x.lum_item else 0.0
                        for x in exs])  # both are unit vectors
        out[c] = auc(cos, y)
    return out


def logloss(p: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p)))


# ------------------------------------------------------------------------------------------------ steps


def pretrain_lum(seqs, cfg, steps: int, seed: int, what: str) -> tuple[LumModel, float, float]:
    """(model, seconds, mean loss of the last 50 steps)."""
    torch.manual_seed(seed)
    t = time.perf_counter()
    model, _, step, losses = lum_train(cfg, train_batches(seqs, cfg, seed=seed), steps, model=LumModel(cfg),
                                       log_every=max(1, steps // 4), seed=seed)
    secs = time.perf_counter() - t
    tail = losses[-50:]
    log.info("%s: %d steps in %.0fs, final loss %.3f", what, step, secs, sum(tail) / len(tail))
    return model.eval(), secs, sum(tail) / len(tail)


def dlrm_run(features: str, train: list[TrainingExample], evals: dict[str, list[TrainingExample]], s: Settings,
             seed: int, epochs: int, each_epoch: bool = False) -> dict:
    """Train a DLRM on ``train`` (no checkpoints) for ``epochs`` passes, then (``each_epoch``: after every pass)
    score each ``evals`` set with the model in eval mode through the trainer's own featurizer, never training
    on them. Returns {eval name: [metrics per scored pass]}, train_s, progressive_auc, lum_inputs."""
    cfg = DLRMConfig.preset(s.dlrm_preset, features=features, seed=seed)
    trainer = Trainer(cfg, None)
    out: dict = {name: [] for name in evals} | {"train_s": 0.0}
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        for i in range(0, len(train), s.dlrm_batch):
            trainer.train_batch(train[i:i + s.dlrm_batch])
        out["train_s"] += time.perf_counter() - t
        if epoch == 1:
            out["progressive_auc"] = trainer.metrics.overall()["auc"]  # first pass: scored before training
        for name, exs in evals.items() if each_epoch or epoch == epochs else ():
            probs, labels = [], []
            trainer.model.eval()
            with torch.no_grad():
                for i in range(0, len(exs), 4096):
                    fb = trainer.featurizer(exs[i:i + 4096])
                    probs.append(torch.sigmoid(trainer.model(fb.dense, fb.sparse).squeeze(-1)).numpy())
                    labels.append(fb.labels.numpy())
            p, y = np.concatenate(probs), np.concatenate(labels)
            out[name].append({"auc": auc(p, y), "logloss": logloss(p, y)})
            log.info("DLRM %-8s seed %d epoch %d: %s AUC %.4f logloss %.4f", features, seed, epoch, name,
                     out[name][-1]["auc"], out[name][-1]["logloss"])
    out["lum_inputs"] = dict(trainer.featurizer.lum_stats)
    return out


def run_dataset(dataset: str, events: list[BehaviorEvent], s: Settings) -> dict:
    """The whole protocol on one data set; returns every figure the tables need."""
    t0 = time.perf_counter()
    users = by_user(events, s.max_users)
    events = [e for evs in users.values() for e in evs]
    res: dict = {"dataset": dataset, "users": len(users), "events": len(events),
                 "items": len({e.item_id for e in events})}
    lum_cfg = PRESETS[s.lum_preset]

    # Step 1: LUM pre-trained on each user's first segment only.
    lum_users = {u: [with_rating_condition(e) for e in evs] for u, evs in users.items()} if s.rating_condition \
        else users
    prefix1 = {u: evs[:cut_points(len(evs), s.cuts)[0]] for u, evs in lum_users.items()}
    prefix2 = {u: evs[:cut_points(len(evs), s.cuts)[1]] for u, evs in lum_users.items()}
    pre_events = sorted((e for p in prefix1.values() for e in p), key=lambda e: e.event_time_ms)
    pre_seqs = sequences_from_events(pre_events)
    res["pretrain_pairs"] = len(pre_events)
    log.info("%s: %d users, %d events, %d items; LUM pre-training on %d events (first %.0f%% per user)", dataset,
             len(users), len(events), res["items"], len(pre_events), 100 * s.cuts[0])
    lum, res["lum_train_s"], res["lum_loss"] = pretrain_lum(pre_seqs, lum_cfg, s.lum_steps, s.seed,
                                                            f"{dataset} LUM (features)")
    version = model_version(lum, s.lum_steps)

    # Step 2: two refreshes, at the start of the DLRM-train and of the DLRM-test segment of each user.
    conditions = conditions_for(dataset, pre_events)
    if s.rating_condition:
        # Category left open, as at request time; scenario and behavior set, the way training most often saw it.
        conditions += [f"scenario=movielens,behavior=rate,query={q}" for q in ("liked", "disliked")]
    targets = {(e.item_id, e.category_id) for e in events}
    t = time.perf_counter()
    view1 = lum_view(lum, version, prefix1, conditions, targets)
    view2 = lum_view(lum, version, prefix2, conditions, targets)
    train = examples(users, dataset, segment_bounds("train", s.cuts), view1)
    test = examples(users, dataset, segment_bounds("test", s.cuts), view2)
    res.update(conditions=conditions, lum_version=version, refresh_and_examples_s=time.perf_counter() - t,
               train_n=len(train), test_n=len(test),
               train_pos=float(np.mean([x.label for x in train])) if train else float("nan"),
               test_pos=float(np.mean([x.label for x in test])) if test else float("nan"),
               train_lum_users=sum(x.lum_user is not None for x in train) / max(1, len(train)))
    log.info("%s: %d train examples (positive rate %.3f), %d test examples (positive rate %.3f), LUM conditions %s, "
             "built in %.0fs", dataset, len(train), res["train_pos"], len(test), res["test_pos"], conditions,
             res["refresh_and_examples_s"])

    # Step 3: DLRM alone vs DLRM + LUM, same examples, same seeds, same preset. The number of epochs of each is
    # chosen on a validation tail of segment 2 (first seed), never on the test segment.
    fit = examples(users, dataset, segment_bounds("fit", s.cuts, s.val_share), view1)
    val = examples(users, dataset, segment_bounds("val", s.cuts, s.val_share), view1)
    for features in ("baseline", "lum"):
        sel = dlrm_run(features, fit, {"val": val}, s, s.dlrm_seeds[0], s.max_epochs, each_epoch=True)
        epochs = 1 + int(np.nanargmax([m["auc"] for m in sel["val"]]))
        log.info("%s DLRM %s: %d epoch(s) chosen on validation (%d fit / %d validation examples)", dataset,
                 features, epochs, len(fit), len(val))
        runs = [dlrm_run(features, train, {"test": test}, s, seed, epochs) for seed in s.dlrm_seeds]
        res[features] = {"epochs": epochs, "val_auc": [m["auc"] for m in sel["val"]],
                         "auc": [r["test"][-1]["auc"] for r in runs],
                         "logloss": [r["test"][-1]["logloss"] for r in runs],
                         "train_s": [r["train_s"] for r in runs],
                         "progressive_auc": [r["progressive_auc"] for r in runs], "lum_inputs": runs[-1]["lum_inputs"]}
    res["raw_lum_auc"] = raw_lum_auc(test, conditions)
    log.info("%s: test AUC of the raw LUM cosine per condition: %s", dataset,
             ", ".join(f"{c} {a:.4f}" for c, a in res["raw_lum_auc"].items()))
    # Base-rate reference: predicting the training positive rate for every test example.
    res["base_rate_logloss"] = logloss(np.full(len(test), res["train_pos"]), np.array([x.label for x in test]))

    # Retrieval: LUM vs SASRec-style, leave-last-out over each user's whole sequence, full ranking.
    if s.retrieval:
        seqs = sequences_from_events(events)
        tr, te = leave_last_out(seqs)
        catalog = catalog_of(seqs)
        sas_cfg = lum_cfg.model_copy(update={"name": f"{lum_cfg.name}-sasrec", "use_conditions": False,
                                             "row_len": lum_cfg.row_len // 2})  # same pairs per row
        exclude_seen = dataset != "taobao"  # ratings never repeat; Taobao users re-view items
        for name, cfg in (("lum", lum_cfg), ("sasrec", sas_cfg)):
            model, secs, _ = pretrain_lum(tr, cfg, s.lum_steps, s.seed, f"{dataset} {name} (retrieval)")
            m = evaluate(model, te, tr, k=10, exclude_seen=exclude_seen, catalog=catalog)
            res[f"ret_{name}"] = m | {"train_s": secs}
            log.info("%s %s: HR@10 %.4f NDCG@10 %.4f (most popular HR@10 %.4f) over %d users, %d items", dataset,
                     name, m["hr@10"], m["ndcg@10"], m["pop_hr@10"], int(m["users"]), int(m["items"]))
    res["seconds"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------------------------------ report


def _ms(xs: Sequence[float]) -> str:
    a = np.asarray(xs, dtype=float)
    return f"{a.mean():.4f}" if len(a) == 1 else f"{a.mean():.4f} ± {a.std(ddof=1):.4f}"


def report(results: list[dict], s: Settings, total_s: float) -> str:
    n = len(s.dlrm_seeds)
    lines = ["# Offline benchmark: DLRM vs DLRM + LUM, LUM vs SASRec-style", "",
             f"Protocol: benchmarks/README.md. Per-user chronological split {s.cuts[0]:.0%} / "
             f"{s.cuts[1] - s.cuts[0]:.0%} / {1 - s.cuts[1]:.0%} (LUM pre-training / DLRM train / DLRM test).", "",
             f"## Ranking (paper Tables 2 and 4 style): test AUC and log loss, mean ± std over {n} DLRM seed(s)", "",
             "| dataset | train / test examples | positive rate train / test | DLRM AUC | DLRM+LUM AUC | Δ AUC "
             "| DLRM logloss | DLRM+LUM logloss | Δ logloss | base-rate logloss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b, lm = r["baseline"], r["lum"]
        d_auc = np.asarray(lm["auc"]) - np.asarray(b["auc"])  # paired by seed
        d_ll = np.asarray(lm["logloss"]) - np.asarray(b["logloss"])
        lines.append(f"| {r['dataset']} | {r['train_n']:,} / {r['test_n']:,} | {r['train_pos']:.3f} / "
                     f"{r['test_pos']:.3f} | {_ms(b['auc'])} | {_ms(lm['auc'])} | {d_auc.mean():+.4f} | "
                     f"{_ms(b['logloss'])} | {_ms(lm['logloss'])} | {d_ll.mean():+.4f} | "
                     f"{r['base_rate_logloss']:.4f} |")
    if any(r.get("ret_lum") for r in results):
        lines += ["", "## Retrieval (leave-last-out, full ranking over every item of the data set)", "",
                  "| dataset | users | items ranked | SASRec-style HR@10 | LUM HR@10 | SASRec-style NDCG@10 "
                  "| LUM NDCG@10 | LUM cond. Recall@10 | most popular HR@10 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            if not r.get("ret_lum"):
                continue
            lo, sa = r["ret_lum"], r["ret_sasrec"]
            lines.append(f"| {r['dataset']} | {int(lo['users']):,} | {int(lo['items']):,} | {sa['hr@10']:.4f} | "
                         f"{lo['hr@10']:.4f} | {sa['ndcg@10']:.4f} | {lo['ndcg@10']:.4f} | "
                         f"{lo['cond_recall@10']:.4f} | {lo['pop_hr@10']:.4f} |")
    lines += ["", "## Sizes, settings, time", ""]
    for r in results:
        raw = ", ".join(f"`{c}` {a:.4f}" for c, a in r["raw_lum_auc"].items())
        lines.append(f"- {r['dataset']}: {r['users']:,} users, {r['events']:,} events, {r['items']:,} items; LUM "
                     f"pre-trained on {r['pretrain_pairs']:,} events in {r['lum_train_s']:.0f}s (final loss "
                     f"{r['lum_loss']:.3f}), version {r['lum_version']}; conditions {r['conditions']}; "
                     f"{r['train_lum_users']:.1%} of training examples have LUM user vectors; DLRM training "
                     f"{np.mean(r['baseline']['train_s']):.0f}s (alone) / {np.mean(r['lum']['train_s']):.0f}s (+LUM) "
                     f"per seed; test AUC of the raw LUM cosine(user, item) alone, no model: {raw}; first-pass "
                     f"progressive train AUC {_ms(r['baseline']['progressive_auc'])} (alone) / "
                     f"{_ms(r['lum']['progressive_auc'])} (+LUM); data set total {r['seconds']:.0f}s.")
    diag = "; MovieLens past ratings enter the LUM as liked/disliked conditions (diagnostic)" if s.rating_condition \
        else ""
    lines.append(f"- LUM preset `{s.lum_preset}` ({PRESETS[s.lum_preset].d_model} wide, "
                 f"{PRESETS[s.lum_preset].n_layers} layers, last {PRESETS[s.lum_preset].max_pairs} pairs), "
                 f"{s.lum_steps} steps per transformer, seed {s.seed}; SASRec-style: the same transformer, items "
                 f"only{diag}. DLRM preset `{s.dlrm_preset}`, batch {s.dlrm_batch}, seeds {list(s.dlrm_seeds)}; epochs "
                 f"(1..{s.max_epochs}) chosen on the last {s.val_share:.0%} of each user's segment 2 with seed "
                 f"{s.dlrm_seeds[0]}: " + "; ".join(f"{r['dataset']} {r['baseline']['epochs']} (alone) / "
                                                    f"{r['lum']['epochs']} (+LUM)" for r in results) + ".")
    lines.append(f"- Total run time {total_s / 60:.1f} min on {platform.machine()} CPU, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} intra-op thread(s), {os.cpu_count()} cores shared with other "
                 f"processes (timings are noisy).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="ml-100k,taobao", help="comma list of ml-100k, taobao")
    ap.add_argument("--ml1m", default=None, help="folder of MovieLens-1M (ratings.dat, movies.dat): adds ml-1m")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"),
                    help="folder holding ml-100k/, taobao-userbehavior/")
    ap.add_argument("--quick", action="store_true",
                    help="60 LUM steps, 1 DLRM seed, 2 epochs at most: a smoke run, not a result")
    ap.add_argument("--lum-steps", type=int, default=None)
    ap.add_argument("--seeds", default=None, help="DLRM seeds, comma list (default 0,1,2,3,4)")
    ap.add_argument("--max-epochs", type=int, default=None, help="most DLRM epochs the validation may choose (4)")
    ap.add_argument("--no-retrieval", action="store_true", help="skip LUM vs SASRec-style retrieval")
    ap.add_argument("--rating-condition", action="store_true",
                    help="diagnostic, MovieLens: past ratings enter the LUM as liked/disliked conditions")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "offline.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("trainers.dlrm.train").setLevel(logging.WARNING)  # one "DLRM built" line per model

    s = Settings()
    if args.quick:
        s = replace(s, lum_steps=60, dlrm_seeds=(0,), max_epochs=2)
    s = replace(s, lum_steps=args.lum_steps or s.lum_steps, retrieval=not args.no_retrieval,
                rating_condition=args.rating_condition,
                max_epochs=args.max_epochs or s.max_epochs,
                dlrm_seeds=tuple(int(x) for x in args.seeds.split(",")) if args.seeds else s.dlrm_seeds)
    paths = {"ml-100k": Path(args.data) / "ml-100k", "taobao": Path(args.data) / "taobao-userbehavior"}
    wanted = [d.strip() for d in args.datasets.split(",") if d.strip()]
    for d in wanted:
        if d not in paths:
            ap.error(f"unknown data set {d!r}; known: {', '.join(paths)} (and ml-1m via --ml1m)")
    if args.ml1m:
        paths["ml-1m"] = Path(args.ml1m)
        wanted.append("ml-1m")
    missing = [d for d in wanted if not paths[d].exists()]
    if missing:
        print(f"data not found: {', '.join(str(paths[d]) for d in missing)} (see --data / --ml1m)", file=sys.stderr)
        return 0 if args.data == ap.get_default("data") and not args.ml1m else 2  # `make bench` without data

    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    results = []
    for d in wanted:
        t = time.perf_counter()
        events = load("taobao" if d == "taobao" else "movielens", paths[d])
        log.info("%s: read %d events in %.1fs", d, len(events), time.perf_counter() - t)
        results.append(run_dataset(d, events, s))
    text = report(results, s, time.perf_counter() - t0)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
