"""LUM vs a SASRec-style next-item baseline on MovieLens-100K: leave-last-out, full ranking, fixed seeds.

    .venv/bin/python benchmarks/bench_lum_movielens.py [--quick] [--steps N] [--data ../shared/data]

Both models are the same transformer (preset ``small``: width 64, 2 layers, 2 heads, last 100 interactions,
hashed item ids + genre) trained with the same InfoNCE and optimizer for the same number of steps, seeing the
same number of interactions per step:
- LUM: tokens [c1, i1, c2, i2, ...], next-condition-item loss at condition tokens, rows of 256 tokens;
- SASRec-style: tokens [i1, i2, ...], next-item loss at every item, rows of 128 tokens, no condition tokens.
Each user's last rating is held out; all 1,682 movies are ranked; movies the user already rated are excluded
(ratings do not repeat). LUM's next-item query is the held-out pair's condition without its category (what
is known at request time: scenario=movielens, behavior=rate); "cond Recall@10" adds the category (the
movie's genre), i.e. a next-condition-item query. Most-popular counts training ratings.
Timings are wall-clock on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.datasets import read_movielens  # noqa: E402
from trainers.lum.data import leave_last_out, sequences_from_events, train_batches  # noqa: E402
from trainers.lum.evaluate import catalog_of, evaluate  # noqa: E402
from trainers.lum.model import PRESETS, LumModel  # noqa: E402
from trainers.lum.pretrain import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 steps (a smoke run, not a result)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = ap.parse_args()
    steps = 100 if args.quick else args.steps
    seqs = sequences_from_events(read_movielens(Path(args.data) / "ml-100k"))
    tr, te = leave_last_out(seqs)
    catalog = catalog_of(seqs)
    lum_cfg = PRESETS["small"]
    sas_cfg = lum_cfg.model_copy(update={"name": "sasrec", "use_conditions": False, "row_len": lum_cfg.row_len // 2})
    print(f"MovieLens-100K: {len(seqs)} users, {len(catalog[0])} items, {sum(map(len, seqs))} ratings; "
          f"{steps} steps each, seed 0; torch {torch.__version__} CPU, {torch.get_num_threads()} threads")
    rows = []
    for name, cfg in (("LUM", lum_cfg), ("SASRec-style", sas_cfg)):
        torch.manual_seed(0)
        t = time.perf_counter()
        model, _, _, losses = train(cfg, train_batches(tr, cfg, seed=0), steps, model=LumModel(cfg), log_every=10**9)
        train_s = time.perf_counter() - t
        m = evaluate(model, te, tr, k=10, exclude_seen=True, catalog=catalog)
        rows.append((name, model.num_params(), train_s, sum(losses[-50:]) / len(losses[-50:]), m))
        print(f"  {name}: trained in {train_s:.0f}s", flush=True)
    pop = rows[0][4]
    print("\n| model | params | train (s) | final loss | HR@10 | NDCG@10 | cond Recall@10 |\n"
          "|---|---|---|---|---|---|---|")
    for name, n, s, loss, m in rows:
        cond = f"{m['cond_hr@10']:.4f}" if "cond_hr@10" in m else "-"
        print(f"| {name} | {n / 1e6:.2f}M | {s:.0f} | {loss:.3f} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {cond} |")
    print(f"| most popular | - | - | - | {pop['pop_hr@10']:.4f} | {pop['pop_ndcg@10']:.4f} | - |")
    print(f"({int(pop['users'])} users evaluated, full ranking over {int(pop['items'])} items)")
    if args.json:
        Path(args.json).write_text(json.dumps({name: {"params": n, "train_s": s, "final_loss": loss, **m}
                                               for name, n, s, loss, m in rows}, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
