"""Streaming (progressive-validation) metrics: AUC, log loss, NE and calibration per event-time window and overall.

    m = StreamingMetrics(window_ms=3_600_000)
    m.update(probs, labels, event_time_ms)      # numpy arrays, scored *before* the model trained on them
    m.overall()        # {"n", "positives", "auc", "logloss", "ne", "mean_pred", "ctr", "calibration"}
    m.records(step=..., features=...)           # JSONL-ready rows: updated windows + overall

AUC is computed from per-window histograms of the predicted logit (0.001-wide bins over [-10, 10], ties inside a
bin counted as half), so memory is bounded and the state fits in a checkpoint; its error is bounded by the
pairs that share a bin. Windows older than ``lateness`` windows behind the newest are closed and dropped
from the state (a straggler for a closed window still counts in ``overall``; it is counted as ``late``).
Calibration is mean prediction / observed CTR (1.0 is perfect). NE (normalized entropy) is the log loss divided
by the entropy of the window's base rate (the log loss of always predicting the observed CTR): below 1 means
better than knowing the base rate. It is TorchRec's own definition (``torchrec.metrics.ne.compute_ne``) applied
to the window's sums. TorchRec's ``RecMetricModule``/torchmetrics states are not used as the state: their windows
count examples or batches (not event time), hold tensors reduced across ranks on every compute, and have no
lateness rule; the state here is a few sums + a sparse histogram per event-time window, bounded and JSON in
the checkpoint.
"""

from __future__ import annotations

import numpy as np

BINS = 20_000  # 0.001 logit wide: an early model's predictions can span only ~0.01 logit
LO, HI = -10.0, 10.0


def _bin(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    logit = np.log(p) - np.log1p(-p)
    return np.clip(((logit - LO) / (HI - LO) * BINS).astype(np.int64), 0, BINS - 1)


def _ne(ce_sum: float, n: int, n_pos: int) -> float:
    from torchrec.metrics.ne import compute_ne  # TorchRec's NE definition (imported lazily: `lum report` needs no torch)
    import torch

    t = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
    # TorchRec sums cross entropy in bits (log2); ours is in nats.
    return float(compute_ne(t(ce_sum / np.log(2)), t(n), t(n_pos), t(n - n_pos), eta=1e-12))


class Acc:
    """Sufficient statistics of one window (or of everything)."""

    def __init__(self):
        self.pos = np.zeros(BINS, dtype=np.int64)
        self.neg = np.zeros(BINS, dtype=np.int64)
        self.logloss_sum = 0.0
        self.pred_sum = 0.0

    def update(self, probs: np.ndarray, labels: np.ndarray) -> None:
        bins = _bin(probs)
        y = labels.astype(bool)
        self.pos += np.bincount(bins[y], minlength=BINS)
        self.neg += np.bincount(bins[~y], minlength=BINS)
        p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
        self.logloss_sum += float(-(y * np.log(p) + (~y) * np.log1p(-p)).sum())
        self.pred_sum += float(p.sum())

    def summary(self) -> dict:
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        n = n_pos + n_neg
        if n_pos and n_neg:
            # P(score_pos > score_neg) + 0.5 P(tie): negatives below each positive bin, plus half the same bin.
            neg_below = np.cumsum(self.neg) - self.neg
            auc = float((self.pos * (neg_below + 0.5 * self.neg)).sum() / (n_pos * n_neg))
        else:
            auc = None  # undefined with one class only
        ctr = n_pos / n if n else None
        mean_pred = self.pred_sum / n if n else None
        return {"n": n, "positives": n_pos, "auc": auc, "logloss": self.logloss_sum / n if n else None,
                "ne": _ne(self.logloss_sum, n, n_pos) if n_pos and n_neg else None, "mean_pred": mean_pred, "ctr": ctr,
                "calibration": mean_pred / ctr if n and n_pos else None}

    def state(self) -> dict:
        nz = np.flatnonzero(self.pos + self.neg)  # sparse: most bins are empty
        return {"bins": nz.tolist(), "pos": self.pos[nz].tolist(), "neg": self.neg[nz].tolist(),
                "logloss_sum": self.logloss_sum, "pred_sum": self.pred_sum}

    @classmethod
    def from_state(cls, s: dict) -> Acc:
        a = cls()
        a.pos[s["bins"]] = s["pos"]
        a.neg[s["bins"]] = s["neg"]
        a.logloss_sum, a.pred_sum = s["logloss_sum"], s["pred_sum"]
        return a


class StreamingMetrics:
    def __init__(self, window_ms: int = 3_600_000, lateness: int = 2):
        self.window_ms, self.lateness = window_ms, lateness
        self.total = Acc()
        self.windows: dict[int, Acc] = {}  # window start (ms) -> accumulator, open windows only
        self.dirty: set[int] = set()  # windows updated since the last records() call
        self.newest = None
        self.late = 0

    def update(self, probs: np.ndarray, labels: np.ndarray, event_time_ms: np.ndarray) -> None:
        if not len(probs):  # a rank's share of a global batch smaller than the world is all padding
            return
        self.total.update(probs, labels)
        starts = event_time_ms // self.window_ms * self.window_ms
        newest = int(starts.max())
        self.newest = newest if self.newest is None else max(self.newest, newest)
        horizon = self.newest - self.lateness * self.window_ms
        for w in np.unique(starts).tolist():
            sel = starts == w
            if w < horizon and w not in self.windows:
                self.late += int(sel.sum())
                continue
            self.windows.setdefault(w, Acc()).update(probs[sel], labels[sel])
            self.dirty.add(w)

    def overall(self) -> dict:
        return self.total.summary()

    def records(self, **extra) -> list[dict]:
        """Rows for the metrics log: each window updated since the last call, then ``overall``.

        A window's row holds its cumulative figures; a later row for the same window supersedes it (readers
        keep the last), so a row rewritten after a restart from an older checkpoint is harmless.
        """
        horizon = (self.newest or 0) - self.lateness * self.window_ms
        closing = {w for w in self.windows if w < horizon}
        rows = [{"kind": "window", "window_start_ms": w, "window_end_ms": w + self.window_ms, "closed": w in closing,
                 **self.windows[w].summary(), **extra} for w in sorted(self.dirty | closing)]
        self.dirty.clear()
        for w in closing:
            del self.windows[w]
        rows.append({"kind": "overall", **self.overall(), "late": self.late, **extra})
        return rows

    def state(self) -> dict:
        return {"window_ms": self.window_ms, "lateness": self.lateness, "newest": self.newest, "late": self.late,
                "total": self.total.state(), "windows": {str(w): a.state() for w, a in self.windows.items()},
                "dirty": sorted(self.dirty)}

    @classmethod
    def from_state(cls, s: dict) -> StreamingMetrics:
        m = cls(s["window_ms"], s["lateness"])
        m.newest, m.late, m.total = s["newest"], s["late"], Acc.from_state(s["total"])
        m.windows = {int(w): Acc.from_state(a) for w, a in s["windows"].items()}
        m.dirty = set(s["dirty"])
        return m
