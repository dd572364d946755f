"""``lum report DIR [DIR ...]``: the trainers' progressive metrics side by side (markdown table + PNG).

    lum report ckpt/baseline ckpt/lum --out report.png     # prints the table, writes report.png and report.md

Each DIR holds the ``metrics.jsonl`` a trainer appends at every checkpoint. A later row for the same window
supersedes an earlier one (a trainer restarted from an older checkpoint rewrites rows), and the last
``overall`` row is the run's total. AUC deltas are against the first DIR.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path


def load_metrics(checkpoint_dir: str | Path) -> tuple[dict | None, list[dict]]:
    """(last overall row, windows sorted by start: the last row written for each)."""
    path = Path(checkpoint_dir) / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} not found: is {checkpoint_dir} a trainer checkpoint dir?")
    overall, windows = None, {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
        if row.get("kind") == "overall":
            overall = row
        elif row.get("kind") == "window":
            windows[row["window_start_ms"]] = row
    return overall, [windows[w] for w in sorted(windows)]


def _f(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def report(dirs: list[str], out: str | Path = "lum-report.png") -> str:
    short = [Path(d).name for d in dirs]
    names = short if len(set(short)) == len(short) else [str(d) for d in dirs]  # dir names, unless ambiguous
    runs = [(n, *load_metrics(d)) for n, d in zip(names, dirs)]
    base_auc = runs[0][1]["auc"] if runs[0][1] else None
    lines = ["| run | features | examples | AUC | dAUC vs first | log loss | NE | calibration | windows |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, overall, windows in runs:
        o = overall or {}
        delta = o["auc"] - base_auc if o.get("auc") is not None and base_auc is not None else None
        lines.append(f"| {name} | {o.get('features', '-')} | {o.get('n', 0)} | {_f(o.get('auc'))} | "
                     f"{_f(delta, '+.4f')} | {_f(o.get('logloss'))} | {_f(o.get('ne'))} | {_f(o.get('calibration'), '.3f')} | "
                     f"{len(windows)} |")
    # Per-window AUC side by side (windows of the first run that have data in any run).
    starts = sorted({w["window_start_ms"] for _, _, ws in runs for w in ws})
    if starts:
        lines += ["", "| window (UTC) | " + " | ".join(f"AUC / NE {n}" for n, _, _ in runs) + " |",
                  "|---|" + "---|" * len(runs)]
        by_run = [{w["window_start_ms"]: w for w in ws} for _, _, ws in runs]
        for s in starts:
            cells = [f"{_f(r[s]['auc'])} / {_f(r[s].get('ne'))} (n={r[s]['n']})" if s in r else "-" for r in by_run]
            lines.append(f"| {_utc(s)} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _plot(runs, out)
    out.with_suffix(".md").write_text(table + "\n")
    return table + f"\n\nplot: {out}\ntable: {out.with_suffix('.md')}"


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def _plot(runs, out: Path) -> None:
    from trainers.plots import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, overall, windows in runs:
        pts = [(datetime.fromtimestamp(w["window_start_ms"] / 1000, tz=timezone.utc), w["auc"]) for w in windows
               if w.get("auc") is not None]
        if pts:
            label = f"{(overall or {}).get('features', '?')}: {name} (overall {_f((overall or {}).get('auc'))})"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
    ax.set_xlabel("event time (window start, UTC)")
    ax.set_ylabel("progressive AUC")
    ax.set_title("Progressive validation AUC per event-time window")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    save(fig, out)
