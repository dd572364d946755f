"""Plots of offline benchmark results (``bench_offline.py --json``): the tables' figures as PNG.

    .venv/bin/python benchmarks/plot_offline.py results/offline_shared_passes.json --out offline.png
    .venv/bin/python benchmarks/plot_offline.py results/offline_learning_curve.json results/offline.json \\
        --learning-curve --out learning_curve.png

Default: one row per data set and run: test AUC per arm (each seed a dot, mean ± std beside it), HR@10 of
most-popular / SASRec / LUM (unconditional and given the category), and every transformer's validation
NDCG@10 against the step (the mean early stopping follows; a ring at the kept step). ``bench_offline.py`` writes
this plot beside its ``--out`` (same name, ``.png``).

``--learning-curve``: AUC per arm and HR@10 against the number of users, one row per data source. Only runs
whose settings equal the first run's (but for ``--max-users``) are points; the others are listed as left out.

A FILE is one ``bench_offline.py --json`` output (``{"settings", "datasets"}``) or a collection of them under
``"runs"`` (a list, or a mapping of labels to outputs), as in ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainers.plots import draw_validation, pyplot, save  # noqa: E402

ARMS = (("dlrm_auc", "DLRM"), ("dlrm_sasrec_auc", "+SASRec"), ("dlrm_lum_auc", "+LUM"))
RETRIEVAL = (("pop", "most popular"), ("sasrec", "SASRec"), ("lum", "LUM"))
COLORS = {"DLRM": "tab:gray", "+SASRec": "tab:orange", "+LUM": "tab:blue", "most popular": "tab:gray",
          "SASRec": "tab:orange", "LUM": "tab:blue", "sasrec": "tab:orange", "lum": "tab:blue"}


def load_runs(paths: list[str | Path]) -> list[tuple[dict, dict]]:
    """(settings, one data set's result) for every data set of every run in the files, in file order."""
    out = []
    for path in paths:
        doc = json.loads(Path(path).read_text())
        runs = doc["runs"] if "runs" in doc else [doc]
        for run in runs.values() if isinstance(runs, dict) else runs:
            out += [(run.get("settings", {}), r) for r in run["datasets"].values()]
    return out


def _mean_std(xs) -> tuple[float, float]:
    xs = [x for x in xs or [] if x is not None]
    return (float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0) if xs else (np.nan, 0.0)


def plot_results(results: list[dict], out: str | Path) -> Path | None:
    """The default plot of ``results`` (bench_offline's per-data-set dicts); None when all were skipped."""
    rows = [r for r in results if not r.get("skipped")]
    if not rows:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 3.8 * len(rows)), squeeze=False)
    for (auc, hr, val), r in zip(axes, rows):
        for x, (key, label) in enumerate(ARMS):
            ys = r.get(key) or []
            auc.plot([x - 0.08] * len(ys), ys, "o", alpha=0.6, color=COLORS[label])
            m, s = _mean_std(ys)
            auc.errorbar([x + 0.08], [m], yerr=[s], fmt="s", capsize=4, color=COLORS[label])
        auc.set_xticks(range(len(ARMS)), [label for _, label in ARMS])
        auc.set_xlim(-0.5, len(ARMS) - 0.5)
        auc.set_title(f"{r['dataset']}: DLRM test AUC (seeds, mean ± std)", fontsize=9)
        width = 0.27
        for j, (model, label) in enumerate(RETRIEVAL):
            heights, errs = [], []
            for cond in ("", "cond_"):
                seeds = r.get(f"{model}_{cond}hr10_seeds")
                m, s = _mean_std(seeds) if seeds else (r.get(f"{model}_{cond}hr10"), 0.0)
                heights.append(np.nan if m is None else m)
                errs.append(s)
            hr.bar(np.arange(2) + (j - 1) * width, heights, width, yerr=errs, capsize=3, label=label,
                   color=COLORS[label])
        hr.set_xticks(range(2), ["next item", "next item, category known"])
        hr.set_title("retrieval HR@10 (full ranking)", fontsize=9)
        hr.legend(fontsize=8)
        seen = set()
        for run in r.get("runs", []):
            model = run["model"]
            label = None if model in seen else ("LUM" if model == "lum" else "SASRec-style")
            seen.add(model)
            draw_validation(val, run.get("history", []), run.get("best_step"), label, color=COLORS.get(model))
        val.set_title("transformers: validation NDCG@10 per step (ring: kept)", fontsize=9)
        val.set_xlabel("step")
        if seen:
            val.legend(fontsize=8)
        for ax in (auc, hr, val):
            ax.grid(alpha=0.3)
    return save(fig, out, dpi=100)


def plot_learning_curve(runs: list[tuple[dict, dict]], out: str | Path) -> tuple[Path | None, list[str]]:
    """AUC per arm and HR@10 against users, per data source; (the PNG or None, the runs left out and why)."""
    if not runs:
        return None, []
    ref = {k: v for k, v in runs[0][0].items() if k != "max_users"}
    points: dict[str, list[dict]] = {}
    left_out = []
    for settings, r in runs:
        other = {k: v for k, v in settings.items() if k != "max_users"}
        if r.get("skipped"):
            left_out.append(f"{r['dataset']}: skipped ({r['skipped']})")
        elif other != ref:
            diff = sorted(k for k in set(other) | set(ref) if other.get(k) != ref.get(k))
            left_out.append(f"{r['dataset']} ({r.get('users')} users): other settings ({', '.join(diff)})")
        else:
            points.setdefault(r.get("source_kind", r["dataset"]), []).append(r)
    if not points:
        return None, left_out
    plt = pyplot()
    fig, axes = plt.subplots(len(points), 2, figsize=(11, 3.8 * len(points)), squeeze=False)
    for (auc, hr), (kind, rs) in zip(axes, points.items()):
        rs = sorted(rs, key=lambda r: r["users"])
        users = [r["users"] for r in rs]
        for key, label in ARMS:
            ms = [_mean_std(r.get(key)) for r in rs]
            auc.errorbar(users, [m for m, _ in ms], yerr=[s for _, s in ms], fmt="-o", capsize=3, label=label,
                         color=COLORS[label])
        for model, label in RETRIEVAL:
            hr.plot(users, [r.get(f"{model}_hr10") for r in rs], "-o", label=label, color=COLORS[label])
        auc.set_title(f"{kind}: DLRM test AUC (mean ± std over seeds)", fontsize=9)
        hr.set_title(f"{kind}: retrieval HR@10", fontsize=9)
        for ax in (auc, hr):
            ax.set_xscale("log", base=2)
            ax.set_xticks(users, [str(u) for u in users])
            ax.set_xlabel("users")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return save(fig, out, dpi=100), left_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", metavar="FILE", help="bench_offline.py --json outputs or collections")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--learning-curve", action="store_true", help="AUC and HR@10 against the number of users")
    args = ap.parse_args(argv)
    try:
        runs = load_runs(args.files)
    except (OSError, ValueError, KeyError, TypeError) as e:
        ap.error(f"cannot read the results: {e!r}")
    if args.learning_curve:
        png, left_out = plot_learning_curve(runs, args.out)
        for why in left_out:
            print(f"left out: {why}")
    else:
        png = plot_results([r for _, r in runs], args.out)
    if png is None:
        print("nothing to plot: no data set was scored", file=sys.stderr)
        return 1
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
