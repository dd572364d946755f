"""TrainingExamples -> DLRM inputs: a KeyedJaggedTensor of hashed ids and a dense float tensor.

    from trainers.dlrm.features import Featurizer
    fz = Featurizer(cfg)
    batch = fz(examples)            # FeatureBatch(dense (B, F), sparse KJT, labels (B,), event_time_ms (B,))
    cols = fz.columns(examples)     # the same as numpy FeatureColumns (picklable, cut/concat by rows); cols.batch()
    fz.collision_report()           # per table: distinct ids seen, share of them sharing a row, expected share

Ids are arbitrary 64-bit values and new ones keep arriving, so each table is indexed by a salted 64-bit mix
(splitmix64) of the id modulo the table size: any id maps to a valid row, nothing is dropped. Distinct ids
can share a row; ``CollisionStats`` measures how often, against the uniform-hashing expectation. With
``cfg.ids == "mch"`` the raw ids go to the model, whose TorchRec managed-collision modules own the id -> row map
(``trainers.dlrm.model.ManagedIds``).

LUM inputs are taken by condition *name*: vectors are reordered to the configured condition list, a
condition the example lacks is absent (zeros, flag 0), one it has beyond the list is ignored, and a vector
of the wrong size is treated as absent. Every such case is counted in ``lum_stats``. The target's own-category
vector (interest matching, paper 4.3) is the example's ``target_category`` vector (the joiner's pick of the
user's answer for the candidate's category, or a per-candidate group query), else its condition naming the
target's category (configured or not, e.g. ``behavior=buy,category=17`` from ``LUM_REFRESH_CONDITIONS``), else
absent.
Besides each condition's cosine with the item, the DLRM can get each condition's *contrast* (``contrast``,
``DLRMConfig.lum_contrast``): how the item lines up with the direction in which that condition moves the
user's answer, at unit scale.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from operator import attrgetter, itemgetter
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch

from schemas.codec import ExampleColumns
from schemas.events import TrainingExample
from schemas.tokenize import condition_id

from .model import (BASELINE_DENSE, FEATURE_LAYOUT, FEATURE_TABLE, SPARSE_FEATURES, TABLES, TARGET_CATEGORY, DLRMConfig,
                    dense_feature_names)

_U64 = np.uint64
_SCALAR_NAMES = ("user_id", "item_id", "category_id", "position", "event_time_ms", "label")
_SCALARS = attrgetter(*_SCALAR_NAMES)
_HIST_ITEMS, _HIST_CATS = attrgetter("history_items"), attrgetter("history_categories")
_SCENARIO, _QUERY, _EXAMPLE_ID = attrgetter("scenario"), attrgetter("query"), attrgetter("example_id")
_CATEGORY = attrgetter("category_id")
_SALT = {t: i + 1 for i, t in enumerate(TABLES)}  # per table, so one id lands on unrelated rows in each


def hash_ids(ids: np.ndarray, rows: int, salt: int) -> np.ndarray:
    """Row of each id in a table of ``rows`` rows: splitmix64(id ^ salt-mix) mod rows, as int64."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        z = ids.astype(_U64) ^ _U64((salt * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = z + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        z = z ^ (z >> _U64(31))
    return (z % _U64(rows)).astype(np.int64)


class CollisionStats:
    """Distinct ids seen per table and how many share their row with another distinct id.

    Tracks at most ``max_tracked`` distinct ids per table (memory bound); the rate is measured over those.
    """

    def __init__(self, rows: int, max_tracked: int = 2_000_000):
        self.rows, self.max_tracked = rows, max_tracked
        self.seen: set[int] = set()
        self.per_row = np.zeros(rows, dtype=np.int32)
        self.colliding = 0  # ids in rows holding more than one (kept as ids arrive: ``report`` is O(1))

    def update(self, ids: np.ndarray, buckets: np.ndarray) -> None:
        if len(self.seen) >= self.max_tracked or ids.size == 0:
            return
        uniq, idx = np.unique(ids, return_index=True)
        new = set(uniq.tolist()) - self.seen  # set algebra in C: no Python code per id
        if new:
            self.seen |= new
            at = idx[np.searchsorted(uniq, np.fromiter(new, dtype=uniq.dtype, count=len(new)))]
            rows, n = np.unique(buckets[at], return_counts=True)
            old = self.per_row[rows]
            self.colliding += int(np.where(old + n > 1, old + n, 0).sum() - np.where(old > 1, old, 0).sum())
            self.per_row[rows] = old + n

    def report(self) -> dict[str, float | int]:
        n = len(self.seen)
        expected = 1.0 - (1.0 - 1.0 / self.rows) ** max(n - 1, 0)  # P(another of n uniform ids shares my row)
        return {"rows": self.rows, "distinct_ids": n, "collision_rate": self.colliding / n if n else 0.0,
                "expected_rate": expected}


class LumArrays(NamedTuple):
    user: np.ndarray  # (B, K, D) condition vectors, zeros where absent
    user_ok: np.ndarray  # (B, K) 1.0 where that condition's vector is present
    item: np.ndarray  # (B, D) target item's LUM embedding, zeros where absent
    item_ok: np.ndarray  # (B,) 1.0 where present
    own: np.ndarray  # (B,) index of the row's own "scenario=<s>" condition, -1 if not configured
    cat: np.ndarray | None = None  # (B, D) the user's vector under the target's own category condition
    cat_ok: np.ndarray | None = None  # (B,) 1.0 where present (None: both filled by ``Featurizer.own_category``)


@lru_cache(maxsize=4096)
def condition_category(name: str) -> int | None:
    """The category a condition name fixes (``"behavior=buy,category=17"`` -> 17), None if it fixes none."""
    for part in name.split(","):
        kind, _, value = part.partition("=")
        if kind.strip() == "category":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _empty_lum(B: int, K: int, D: int) -> tuple[np.ndarray, ...]:
    """Zeroed LUM arrays of a batch: user vectors (B, K, D) and flags (B, K), item (B, D) and flag (B,),
    own-category vector (B, D) and flag (B,); rows without a value stay absent."""
    f = np.float32
    return (np.zeros((B, K, D), f), np.zeros((B, K), f), np.zeros((B, D), f), np.zeros(B, f),
            np.zeros((B, D), f), np.zeros(B, f))


def _fill_rows(flat: np.ndarray, rows, K: int, U, u_ok, item, i_ok, cat, cat_ok) -> None:
    """Rows ``rows`` of a batch from their vectors in wire order, ``flat`` (len(rows), K [+ 1], D) then the item:
    the K configured conditions, the own-category answer where the layout has one, the item vector."""
    U[rows], u_ok[rows] = flat[:, :K], 1.0
    item[rows], i_ok[rows] = flat[:, -1], 1.0
    if flat.shape[1] > K + 1:
        cat[rows], cat_ok[rows] = flat[:, K], 1.0


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine over the last axis (0 where a side is all zeros)."""
    return np.einsum("...d,...d->...", a, b) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-8)


def direct_block(v: np.ndarray) -> np.ndarray:
    """A pre-trained vector as direct DLRM inputs: unit L2 norm / sqrt(D), so its D inputs together weigh about
    as much as one ordinary dense feature (L1 norm <= 1). Adam moves every first-layer weight by ~lr whatever
    its input's size, so a raw unit vector (components ~1/sqrt(D), L1 ~0.8 sqrt(D)) moved the hidden layer
    ~sqrt(D) times faster than a feature, per vector: on the Taobao sample (22k examples, one pass) the K+2
    vectors swamped the baseline inputs and the DLRM fit users and (user, category) pairs instead
    (test AUC 0.66 with LUM vectors vs 0.73 without; 0.73 once scaled)."""
    d = v.shape[-1]
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / (np.maximum(n, 1e-12) * np.sqrt(d))).astype(np.float32)


def lum_dense(U: np.ndarray, u_ok: np.ndarray, item: np.ndarray, i_ok: np.ndarray, own: np.ndarray,
              cat: np.ndarray, cat_ok: np.ndarray, direct: bool = True, contrasts: bool = False) -> np.ndarray:
    """(B, K*D + K + D + 1 + K + 2 + D + 2 [+ K + 1]): direct features, flags, interest-matching similarities
    (paper 4.3), with ``contrasts`` the contrasts between condition answers (``contrast``), in the order of
    ``dense_feature_names``. Only cosines: a dot of unit vectors would repeat them (/sqrt(D))."""
    B, K, D = U.shape
    both = u_ok * i_ok[:, None]  # (B, K): a similarity exists only where both sides do
    cos = _cos(U, item[:, None, :]) * both
    at = np.maximum(own, 0)[:, None]
    has_own = (own >= 0).astype(np.float32) * np.take_along_axis(both, at, 1)[:, 0]
    own_cos = np.take_along_axis(cos, at, 1)[:, 0] * has_own
    cat_cos = _cos(cat, item) * cat_ok * i_ok
    extra = []
    if contrasts:
        con, con_cat = contrast(U, u_ok, item, i_ok, cat, cat_ok)
        extra = [con, con_cat[:, None]]
    if not direct:  # lum_inputs="match": similarities and flags only
        U, item, cat = U[:, :, :0], item[:, :0], cat[:, :0]
    else:
        U, item, cat = direct_block(U), direct_block(item), direct_block(cat)
    return np.concatenate([U.reshape(B, -1), u_ok, item, i_ok[:, None], cos, own_cos[:, None],
                           has_own[:, None], cat, cat_cos[:, None], cat_ok[:, None], *extra],
                          axis=1).astype(np.float32)


def contrast(U: np.ndarray, u_ok: np.ndarray, item: np.ndarray, i_ok: np.ndarray, cat: np.ndarray,
             cat_ok: np.ndarray, min_gap: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """What each condition adds about the candidate: ((B, K), (B,)) = sqrt(D) * cos(u_k - mean, item), the
    cosine of the item with the direction in which condition k (and the own-category vector) moves the user
    away from the mean of the row's present condition vectors (all unit-normalized).

    For unit vectors cos_k - mean cos = <u_k - mean, item>: the contrast between condition answers, which is
    where a conditioned LUM's label signal sits (ML-100K: cos[liked] - cos[disliked] 0.60 test AUC, each
    cosine alone 0.56), but the answers can be nearly the same vector (mean cosine 0.9996), so the raw
    cosines differ by ~1e-3 and an MLP on unstandardized inputs never picks the difference up. Dividing by
    |u_k - mean| makes it scale-free without statistics of the data (nothing for a streaming trainer or a
    checkpoint to carry); sqrt(D) gives it about unit spread (a random direction's cosine has std 1/sqrt(D)).
    Zero where a side is absent, fewer than two conditions are present (or none for the category vector),
    or the condition does not move the answer (|u_k - mean| < ``min_gap``: the direction would be noise)."""
    B, K, D = U.shape

    def unit(v):
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

    Un = unit(U) * u_ok[..., None]
    n = u_ok.sum(1)
    mean = Un.sum(1) / np.maximum(n, 1)[:, None]  # (B, D)

    def along(diff, ok):  # sqrt(D) * cos(diff, item) where ``ok`` and the gap is real
        gap = np.linalg.norm(diff, axis=-1)
        return np.sqrt(D) * _cos(diff, item[..., None, :] if diff.ndim == 3 else item) * ok * (gap >= min_gap)

    con = along(Un - mean[:, None, :], u_ok * i_ok[:, None] * (n >= 2)[:, None])
    con_cat = along(unit(cat) - mean, cat_ok * i_ok * (n >= 1))
    return con.astype(np.float32), con_cat.astype(np.float32)


@dataclass
class FeatureBatch:
    dense: torch.Tensor  # (B, F) float32
    sparse: object  # KeyedJaggedTensor over SPARSE_FEATURES, B per key
    labels: torch.Tensor  # (B,) float32
    event_time_ms: np.ndarray  # (B,) int64
    example_ids: list[str]
    columns: FeatureColumns | None = None  # the arrays it was made of (what ``Featurizer.count`` counts)

    def __len__(self) -> int:
        return len(self.example_ids)


def _kjt(rows: dict[str, np.ndarray], hist_len: np.ndarray):
    from torchrec import KeyedJaggedTensor

    ones = np.ones(len(hist_len), dtype=np.int64)
    lengths = [hist_len if f.startswith("history_") else ones for f in SPARSE_FEATURES]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(SPARSE_FEATURES), values=torch.from_numpy(np.concatenate([rows[f] for f in SPARSE_FEATURES])),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)))


@dataclass
class FeatureColumns:
    """A batch's DLRM inputs as numpy arrays, before tensors: what ``Featurizer.columns`` computes and ``batch``
    turns into a ``FeatureBatch``. Picklable and cut and joined by rows, like the fetches the Kafka adapter's
    decoder process featurizes them from (beside the step)."""
    rows: dict[str, np.ndarray]  # sparse feature -> table rows (history features: ``hist_len`` per example)
    hist_len: np.ndarray  # (B,) int64
    dense: np.ndarray  # (B, F) float32
    labels: np.ndarray  # (B,) float32
    event_time_ms: np.ndarray  # (B,) int64
    example_ids: list[str]
    versions: list[str | None]  # each example's LUM model version (``lum_versions`` counts them once trained)
    odd: list[tuple[int, str, int]]  # (row, case, count): odd LUM inputs (``lum_stats`` counts them once trained)
    collisions: dict | None = None  # the featurizing process's ``collision_report()``, where that is another one

    def __len__(self) -> int:
        return len(self.example_ids)

    def cut(self, i: int, j: int) -> FeatureColumns:
        h = np.concatenate(([0], np.cumsum(self.hist_len)))
        return FeatureColumns({f: v[h[i]:h[j]] if f.startswith("history_") else v[i:j] for f, v in self.rows.items()},
                              self.hist_len[i:j], self.dense[i:j], self.labels[i:j], self.event_time_ms[i:j],
                              self.example_ids[i:j], self.versions[i:j],
                              [(r - i, k, n) for r, k, n in self.odd if i <= r < j], self.collisions)

    @staticmethod
    def concat(parts: list[FeatureColumns]) -> FeatureColumns:
        if len(parts) == 1:
            return parts[0]
        starts = np.cumsum([0] + [len(p) for p in parts[:-1]]).tolist()
        cat = np.concatenate
        return FeatureColumns({f: cat([p.rows[f] for p in parts]) for f in parts[0].rows},
                              cat([p.hist_len for p in parts]), cat([p.dense for p in parts]),
                              cat([p.labels for p in parts]), cat([p.event_time_ms for p in parts]),
                              [i for p in parts for i in p.example_ids], [v for p in parts for v in p.versions],
                              [(r + s, k, n) for p, s in zip(parts, starts) for r, k, n in p.odd], parts[-1].collisions)

    def batch(self) -> FeatureBatch:
        return FeatureBatch(torch.from_numpy(self.dense), _kjt(self.rows, self.hist_len),
                            torch.from_numpy(self.labels), self.event_time_ms, self.example_ids, self)


def resolve_lum_dims(cfg: DLRMConfig, examples: list[TrainingExample]) -> DLRMConfig:
    """Fill what is unset from the first batch: ``prior_ctr`` (its positive share, kept off 0 and 1) and
    ``lum_conditions``/``lum_dim`` from the first example carrying LUM features (``TARGET_CATEGORY`` is not a
    fixed condition: it feeds the own-category inputs)."""
    if cfg.prior_ctr is None and examples:
        n, pos = len(examples), sum(ex.label for ex in examples)
        cfg = cfg.model_copy(update={"prior_ctr": min(max(pos, 0.5), n - 0.5) / n})  # 0.5: one side seen once
    if cfg.lum_resolved:
        return cfg
    for ex in examples:
        if ex.lum_user:
            conds = cfg.lum_conditions or [c for c in ex.lum_conditions if c != TARGET_CATEGORY]
            return cfg.model_copy(update={"lum_conditions": conds, "lum_dim": cfg.lum_dim or len(ex.lum_user[0])})
        if ex.lum_item and cfg.lum_dim is None and cfg.lum_conditions:
            return cfg.model_copy(update={"lum_dim": len(ex.lum_item)})
    return cfg


class Featurizer:
    def __init__(self, cfg: DLRMConfig, track_collisions: bool = True, remote: bool = False):
        """``remote``: this featurizer runs in a process of its own; what it featurizes carries its collision
        figures, which the trainer's featurizer then reports (``count``)."""
        if cfg.feature_layout != FEATURE_LAYOUT:
            raise ValueError(f"this DLRM was built for dense feature layout {cfg.feature_layout}; this build computes "
                             f"layout {FEATURE_LAYOUT} (trainers.dlrm.model.FEATURE_LAYOUT): retrain it")
        self.cfg = cfg
        self.n_dense = len(dense_feature_names(cfg))
        track = track_collisions and cfg.ids == "hash"  # with "mch" the model owns the id -> row map
        self.collisions = {t: CollisionStats(cfg.table_rows[t]) for t in TABLES} if track else None
        self.lum_stats: Counter[str] = Counter()
        self.lum_versions: Counter[str] = Counter()  # examples per LUM model version: shows refreshes arriving
        if cfg.features == "lum":
            self.cond_index = {c: k for k, c in enumerate(cfg.lum_conditions)}
            # category -> the configured condition that fixes it (the first, if several do)
            self.cat_index: dict[int, int] = {}
            for k, c in enumerate(cfg.lum_conditions):
                if (cat := condition_category(c)) is not None:
                    self.cat_index.setdefault(cat, k)
        self._scenario_ids: dict[str, int] = {}
        self.remote, self.remote_collisions = remote, None

    def scenario_id(self, s: str) -> int:
        v = self._scenario_ids.get(s)
        if v is None:
            v = self._scenario_ids[s] = condition_id("scenario", s)  # the tokenizer's stable 63-bit hash
        return v

    def __call__(self, examples: list[TrainingExample] | ExampleColumns, *, count: bool = True) -> FeatureBatch:
        """Batch-native: one C-level pass per column group (attrgetter + numpy), no per-example Python code
        except for LUM vectors outside the binary fast path. ``ExampleColumns`` (decoded from the wire by
        ``schemas.codec.decode_columns``) are featurized from their columns. ``count=False``: ``lum_stats`` and
        ``lum_versions`` count the batch later, by ``count`` (once it is trained)."""
        fb = self.columns(examples).batch()
        if count:
            self.count(fb.columns)
        return fb

    def count(self, fc: FeatureColumns) -> None:
        self.lum_versions.update(v for v in fc.versions if v is not None)
        for _, case, n in fc.odd:
            self.lum_stats[case] += n
        if fc.collisions is not None:  # featurized in another process, which tracked the ids
            self.remote_collisions = fc.collisions

    def columns(self, examples: list[TrainingExample] | ExampleColumns) -> FeatureColumns:
        """The batch's inputs as numpy arrays (``FeatureColumns``); nothing is counted yet."""
        if isinstance(examples, ExampleColumns):
            return self._from_columns(examples)
        B, H = len(examples), self.cfg.history_len
        cols = np.array(list(map(_SCALARS, examples)), dtype=np.int64).reshape(B, len(_SCALAR_NAMES))
        hist_items = [h[-H:] for h in map(_HIST_ITEMS, examples)]
        hist_cats = [h[-H:] for h in map(_HIST_CATS, examples)]
        hist_len = np.fromiter(map(len, hist_items), dtype=np.int64, count=B)
        n_hist = int(hist_len.sum())
        scen = list(map(_SCENARIO, examples))
        raw = {
            "user_id": cols[:, 0], "item_id": cols[:, 1], "category_id": cols[:, 2],
            "scenario": np.fromiter(map(self.scenario_id, scen), dtype=np.int64, count=B),
            "position": cols[:, 3],
            "history_items": np.fromiter(chain.from_iterable(hist_items), dtype=np.int64, count=n_hist),
            "history_categories": np.fromiter(chain.from_iterable(hist_cats), dtype=np.int64, count=n_hist),
        }
        has_query = np.fromiter((q is not None for q in map(_QUERY, examples)), dtype=np.float32, count=B)
        odd: list[tuple[int, str, int]] = []
        lum = self.lum_arrays(examples, odd) if self.cfg.features == "lum" else None
        rows, dense = self.arrays(raw, hist_len, has_query, lum)
        return FeatureColumns(rows, hist_len, dense, cols[:, 5].astype(np.float32), cols[:, 4].copy(),
                              list(map(_EXAMPLE_ID, examples)), [ex.lum_model_version for ex in examples], odd,
                              self._report_collisions())

    def _from_columns(self, c: ExampleColumns) -> FeatureColumns:
        B, H = len(c), self.cfg.history_len
        hist_len = np.diff(c.hist_off)
        items, cats = c.history_items, c.history_categories
        if B and hist_len.max() > H:  # the last H of each history (most recent last)
            keep = np.repeat(c.hist_off[1:], hist_len) - np.arange(len(items)) <= H
            items, cats, hist_len = items[keep], cats[keep], np.minimum(hist_len, H)
        raw = {"user_id": c.user_id, "item_id": c.item_id, "category_id": c.category_id,
               "scenario": np.fromiter(map(self.scenario_id, c.scenario), dtype=np.int64, count=B),
               "position": c.position, "history_items": items, "history_categories": cats}
        has_query = c.present("query").astype(np.float32)
        odd: list[tuple[int, str, int]] = []
        lum = self.lum_columns(c, odd) if self.cfg.features == "lum" else None
        rows, dense = self.arrays(raw, hist_len, has_query, lum)
        return FeatureColumns(rows, hist_len, dense, c.label.astype(np.float32), c.event_time_ms.copy(),
                              list(c.example_id), list(c.lum_model_version), odd, self._report_collisions())

    def _report_collisions(self) -> dict | None:
        """Where this featurizer runs in a process of its own (the Kafka adapter's decoder), its collision figures
        travel with what it featurizes."""
        return self.collision_report() if self.remote and self.collisions is not None else None

    def lum_columns(self, c: ExampleColumns, odd: list) -> LumArrays:
        """``lum_arrays`` of decoded columns: rows whose conditions are exactly the configured list (or that list
        then ``TARGET_CATEGORY``), with every vector of size D and an item vector, are gathered from the flat
        float64 values at once, per layout; the others (rare) go through the per-example path."""
        K, D, B = len(self.cfg.lum_conditions), self.cfg.lum_dim, len(c)
        conds, with_cat = self.cfg.lum_conditions, [*self.cfg.lum_conditions, TARGET_CATEGORY]
        own = np.fromiter((self.cond_index.get(f"scenario={s}", -1) for s in c.scenario), dtype=np.int64, count=B)
        n_vec = np.diff(c.dims_off)
        extra = np.fromiter((0 if x == conds else 1 if x == with_cat else -1 for x in c.lum_conditions),
                            dtype=np.int64, count=B)  # vectors past the configured ones: the own-category answer
        fast = (extra >= 0) & c.has_item & (n_vec == K + 1 + extra) & (np.diff(c.vec_off) == (K + 1 + extra) * D)
        if fast.any():  # every vector of size D (the total alone could hide 31 + 33)
            fast &= np.bincount(np.repeat(np.arange(B), n_vec), c.dims != D, minlength=B) == 0
        U, u_ok, item, i_ok, cat, cat_ok = _empty_lum(B, K, D)
        for n in (0, 1):
            rows, width = np.flatnonzero(fast & (extra == n)), (K + 1 + n) * D
            if not len(rows):
                continue
            if len(rows) == B and len(c.vectors) == B * width:  # the usual batch: one reshape, no gather
                flat = c.vectors.reshape(B, K + 1 + n, D)
            else:
                flat = c.vectors[c.vec_off[rows][:, None] + np.arange(width)].reshape(-1, K + 1 + n, D)
            _fill_rows(flat, rows, K, U, u_ok, item, i_ok, cat, cat_ok)
        bare = (c.n_user < 0) & ~c.has_item  # no LUM features at all (e.g. a user not refreshed yet): common
        for b in np.flatnonzero(bare).tolist():
            odd += [(b, "user_absent", 1), (b, "item_absent", 1)]  # what the per-example path counts for them
        for b in np.flatnonzero(~fast & ~bare).tolist():  # the row's vectors as views of the flat values
            vecs = np.split(c.vectors[c.vec_off[b]:c.vec_off[b + 1]],
                            np.cumsum(c.dims[c.dims_off[b]:c.dims_off[b + 1]])[:-1])
            nu = int(c.n_user[b])
            row = SimpleNamespace(lum_conditions=c.lum_conditions[b], lum_user=vecs[:nu] if nu >= 0 else None,
                                  lum_item=vecs[-1] if c.has_item[b] else None, category_id=int(c.category_id[b]))
            self._lum_slow(row, b, U, u_ok, item, i_ok, cat, cat_ok, odd)
        odd.sort(key=itemgetter(0))  # by row (stable: each row's cases in the per-example path's order)
        return self.own_category(LumArrays(U, u_ok, item, i_ok, own, cat, cat_ok), c.category_id)

    def encode(self, raw: dict[str, np.ndarray], hist_len: np.ndarray, has_query: np.ndarray,
               lum: LumArrays | None) -> tuple[torch.Tensor, object]:
        """Raw id columns (history flattened, ``hist_len`` per row) -> (dense (B, F), KJT). Shared with serving."""
        rows, dense = self.arrays(raw, hist_len, has_query, lum)
        return torch.from_numpy(dense), _kjt(rows, hist_len)

    def arrays(self, raw: dict[str, np.ndarray], hist_len: np.ndarray, has_query: np.ndarray,
               lum: LumArrays | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``encode`` as numpy: (table rows per sparse feature, dense (B, F))."""
        cfg, B = self.cfg, len(hist_len)
        rows = {}
        for f in SPARSE_FEATURES:
            table = FEATURE_TABLE[f]
            if f == "position":  # small ints: clip into the table instead of hashing
                rows[f] = np.minimum(raw[f], cfg.table_rows[table] - 1)
            elif cfg.ids == "mch":  # raw ids: the model's managed-collision modules assign rows
                rows[f] = raw[f]
            else:
                rows[f] = hash_ids(raw[f], cfg.table_rows[table], _SALT[table])
                if self.collisions is not None:
                    self.collisions[table].update(raw[f], rows[f])
        dense = np.zeros((B, self.n_dense), dtype=np.float32)
        dense[:, 0] = np.log1p(raw["position"])
        dense[:, 1] = np.log1p(hist_len)
        dense[:, 2] = has_query
        row = np.repeat(np.arange(B), hist_len)  # history entry -> its example
        dense[:, 3] = np.log1p(np.bincount(row, raw["history_items"] == raw["item_id"][row], minlength=B))
        same_cat = np.bincount(row, raw["history_categories"] == raw["category_id"][row], minlength=B)
        dense[:, 4] = same_cat / np.maximum(hist_len, 1)
        if cfg.features == "lum":
            dense[:, len(BASELINE_DENSE):] = lum_dense(*lum, direct=cfg.lum_inputs == "full", contrasts=cfg.lum_contrast)
        return rows, dense

    def lum_arrays(self, examples: list[TrainingExample], odd: list) -> LumArrays:
        """Examples' LUM fields as arrays in the configured condition order; odd cases counted, never fatal.

        Fast path: examples decoded from the binary format whose conditions are exactly the configured list,
        or that list then ``TARGET_CATEGORY`` (the joiner's pick of the candidate's own-category answer), with
        every vector of size D, are stacked with one ``np.frombuffer`` per layout over their float64 bytes.
        """
        K, D, B = len(self.cfg.lum_conditions), self.cfg.lum_dim, len(examples)
        U, u_ok, item, i_ok, cat, cat_ok = _empty_lum(B, K, D)
        own = np.fromiter((self.cond_index.get(f"scenario={ex.scenario}", -1) for ex in examples),
                          dtype=np.int64, count=B)  # the example's own scenario condition, -1 if not configured
        conds = self.cfg.lum_conditions
        layouts = {0: (conds, [], []), 1: ([*conds, TARGET_CATEGORY], [], [])}  # own-category vectors: rows, raws
        for b, ex in enumerate(examples):
            raw = ex.__pydantic_private__.get("_lum_f64") if ex.__pydantic_private__ else None
            n = len(raw) // (8 * D) - K - 1 if raw is not None else -1
            if n in layouts and len(raw) == 8 * D * (K + n + 1) and ex.lum_conditions == layouts[n][0]:
                layouts[n][1].append(b)
                layouts[n][2].append(raw)
                continue
            self._lum_slow(ex, b, U, u_ok, item, i_ok, cat, cat_ok, odd)
        for n, (_, rows, raws) in layouts.items():
            if rows:
                flat = np.frombuffer(b"".join(raws), dtype="<f8").reshape(len(rows), K + n + 1, D)
                _fill_rows(flat, rows, K, U, u_ok, item, i_ok, cat, cat_ok)
        categories = np.fromiter(map(_CATEGORY, examples), dtype=np.int64, count=B)
        return self.own_category(LumArrays(U, u_ok, item, i_ok, own, cat, cat_ok), categories)

    def own_category(self, lum: LumArrays, categories: np.ndarray) -> LumArrays:
        """Fill the own-category inputs of rows that lack them from the configured condition naming the row's
        category (training and serving alike)."""
        U, u_ok = lum.user, lum.user_ok
        B, _, D = U.shape
        cat = np.zeros((B, D), dtype=np.float32) if lum.cat is None else lum.cat
        cat_ok = np.zeros(B, dtype=np.float32) if lum.cat_ok is None else lum.cat_ok
        if self.cat_index:
            k = np.fromiter((self.cat_index.get(c, -1) for c in categories.tolist()), dtype=np.int64, count=B)
            rows = np.flatnonzero((k >= 0) & (cat_ok == 0))
            cat[rows], cat_ok[rows] = U[rows, k[rows]], u_ok[rows, k[rows]]
        return lum._replace(cat=cat, cat_ok=cat_ok)

    def _lum_slow(self, ex: TrainingExample, b: int, U, u_ok, item, i_ok, cat, cat_ok, odd: list) -> None:
        """Row ``b`` from its model fields; each odd case is appended to ``odd`` as (b, case, count)."""
        K, D, st = len(self.cfg.lum_conditions), self.cfg.lum_dim, Counter()
        if ex.lum_user is None:
            st["user_absent"] += 1
        else:
            seen = 0
            for name, vec in zip(ex.lum_conditions, ex.lum_user):
                k = self.cond_index.get(name)
                if name == TARGET_CATEGORY or (k is None and condition_category(name) == ex.category_id):
                    if len(vec) != D:  # the candidate's own-category vector (per-candidate group query)
                        st["user_dim_mismatch"] += 1
                    elif not cat_ok[b] or name == TARGET_CATEGORY:
                        cat[b], cat_ok[b] = vec, 1.0
                    continue
                if k is None:
                    st["condition_not_configured"] += 1
                elif len(vec) != D:
                    st["user_dim_mismatch"] += 1
                else:
                    U[b, k], u_ok[b, k] = vec, 1.0
                    seen += 1
            st["condition_missing"] += K - seen
        if ex.lum_item is None:
            st["item_absent"] += 1
        elif len(ex.lum_item) != D:
            st["item_dim_mismatch"] += 1
        else:
            item[b], i_ok[b] = ex.lum_item, 1.0
        odd += [(b, case, n) for case, n in st.items() if n]

    def collision_report(self) -> dict[str, dict]:
        if self.remote_collisions is not None:
            return self.remote_collisions
        return {t: s.report() for t, s in (self.collisions or {}).items() if t != "position"}
