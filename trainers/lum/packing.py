"""Sequences -> token rows: packing for training (paper sec. 4.1.3) and group query for inference (sec. 4.2).

A user's history (``Seq``: numpy arrays, oldest first) becomes tokens ``[c1, i1, c2, i2, ...]`` (or ``[i1, i2,
...]`` for the items-only baseline). ``pack_rows`` places many users' token runs into fixed-length rows
(first-fit decreasing); positions restart per user and each run gets its own segment id, which the model's
mask turns into block-diagonal causal attention. ``group_query_batch`` appends K query conditions after each
user's prefix; the mask lets each query see the prefix and itself only, so one pass answers K questions.

    from trainers.lum.packing import Seq, pack_rows, make_batch
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from schemas.tokenize import CONDITION_KINDS, UserSequence

from .model import COND, ITEM, PAD, QUERY

N_KINDS = len(CONDITION_KINDS)


@dataclass
class Seq:
    """One user's history, oldest first."""

    user_id: int
    conds: np.ndarray  # (n, n_kinds) int64 condition ids, 0 = any
    items: np.ndarray  # (n,) int64
    cats: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, s: slice) -> Seq:
        return Seq(self.user_id, self.conds[s], self.items[s], self.cats[s])

    @staticmethod
    def from_user_sequence(us: UserSequence) -> Seq:
        a = np.array([(*p.conditions, p.item_id, p.category_id) for p in us.pairs], dtype=np.int64).reshape(
            -1, N_KINDS + 2)
        return Seq(us.user_id, a[:, :N_KINDS], a[:, N_KINDS], a[:, N_KINDS + 1])


@dataclass
class Tokens:
    """One user's token run: kind (L,), cond (L, n_kinds), item (L,), cat (L,), and label (L,): the raw id of
    the item each token is trained to predict, -1 where it is not a trained position."""

    kind: np.ndarray
    cond: np.ndarray
    item: np.ndarray
    cat: np.ndarray
    label: np.ndarray | None = None  # None: no trained position (inference runs)

    def __post_init__(self):
        if self.label is None:
            self.label = np.full(len(self.kind), -1, np.int64)

    def __len__(self) -> int:
        return len(self.kind)


def to_tokens(seq: Seq, use_conditions: bool = True, drop: float = 0.0,
              rng: np.random.Generator | None = None, queries: bool = False) -> Tokens:
    """Interleave condition and item tokens ``[c1, i1, c2, i2, ...]``; each condition token is trained to
    predict its item (items-only: each item predicts the next one).

    Training must teach the questions inference asks, where some condition kinds are unknown ('any': the next
    item's category or behavior before the user acts), while the history inference reads has every condition.
    ``queries=True`` (group query in training): each pair gets a query token ``q_k`` before ``c_k``, holding
    ``c_k``'s conditions with each kind set to 'any' with chance ``drop``; it is hidden from every other token
    (as inference's queries are), shares ``c_k``'s position and is the position trained to predict ``i_k``;
    ``c_k`` keeps every condition and serves as history. ``queries=False``: the condition tokens themselves
    are dropped and trained (history and questions alike lose conditions; on ML-100K this trained the
    unconditional question on a quarter of the positions and cost next-item HR@10 against items-only).
    """
    n = len(seq)
    if not use_conditions:
        label = np.append(seq.items[1:], -1).astype(np.int64)  # item t predicts item t+1
        return Tokens(np.full(n, ITEM, np.int8), np.zeros((n, N_KINDS), np.int64), seq.items.copy(),
                      seq.cats.copy(), label)
    rng = rng or np.random.default_rng()
    conds = seq.conds
    if drop > 0 and not queries:
        conds = np.where(rng.random(conds.shape) < drop, 0, conds)
    step = 3 if queries else 2  # tokens per pair: [q, c, i] or [c, i]
    kind = np.tile(np.array([QUERY, COND, ITEM] if queries else [COND, ITEM], np.int8), n)
    cond = np.zeros((step * n, N_KINDS), np.int64)
    cond[step - 2::step] = conds
    if queries:
        cond[0::step] = np.where(rng.random(conds.shape) < drop, 0, conds)
    item, cat = np.zeros(step * n, np.int64), np.zeros(step * n, np.int64)  # 0 at conditions: nothing to leak
    item[step - 1::step], cat[step - 1::step] = seq.items, seq.cats
    label = np.full(step * n, -1, np.int64)
    label[0::step] = seq.items  # the query (or, without queries, the condition token) of pair k predicts item k
    return Tokens(kind, cond, item, cat, label)


def query_tokens(conditions: np.ndarray) -> Tokens:
    """(K, n_kinds) condition ids -> K query-condition tokens."""
    k = len(conditions)
    return Tokens(np.full(k, QUERY, np.int8), conditions.astype(np.int64), np.zeros(k, np.int64),
                  np.zeros(k, np.int64))


def concat(a: Tokens, b: Tokens) -> Tokens:
    return Tokens(*(np.concatenate([getattr(a, f.name), getattr(b, f.name)]) for f in fields(Tokens)))


@dataclass
class Batch:
    """Rows of tokens (B, T) with per-token kind, segment and position; ``packed`` selects the masked path."""

    kind: torch.Tensor  # (B, T) int8
    cond: torch.Tensor  # (B, T, n_kinds) int64
    item: torch.Tensor  # (B, T) int64
    cat: torch.Tensor  # (B, T) int64
    pos: torch.Tensor  # (B, T) int64, restarts per segment
    seg: torch.Tensor  # (B, T) int64, -1 = pad
    target: torch.Tensor  # (B, T) bool: trained positions (a label to predict)
    label: torch.Tensor  # (B, T) int64: raw id of the item each trained position predicts (-1 elsewhere)
    packed: bool = True  # False: one user per row, right-padded: plain causal attention suffices
    # Loss candidates set by the training sampler (``trainers.lum.data``): distinct sorted ids, their categories
    # and log Q (chance to be a candidate). None: the loss uses the batch's own item tokens.
    cand_item: torch.Tensor | None = None
    cand_cat: torch.Tensor | None = None
    cand_logq: torch.Tensor | None = None

    def to(self, device) -> Batch:
        return Batch(**{f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
                        for f in fields(self) for v in [getattr(self, f.name)]})

    @property
    def real_tokens(self) -> int:
        return int((self.kind != PAD).sum())


def make_batch(runs: list[Tokens], rows: list[list[int]], row_len: int, packed: bool = True) -> Batch:
    """Lay out ``runs`` into rows: ``rows[r]`` lists the run indices of row r, in order."""
    B = len(rows)
    kind = np.zeros((B, row_len), np.int8)
    cond = np.zeros((B, row_len, N_KINDS), np.int64)
    item = np.zeros((B, row_len), np.int64)
    cat = np.zeros((B, row_len), np.int64)
    pos = np.zeros((B, row_len), np.int64)
    seg = np.full((B, row_len), -1, np.int64)
    label = np.full((B, row_len), -1, np.int64)
    for r, members in enumerate(rows):
        t = 0
        for s, i in enumerate(members):
            run, L = runs[i], len(runs[i])
            if t + L > row_len:
                raise ValueError(f"row {r} overflows: {t} + {L} > {row_len}")
            span = slice(t, t + L)
            kind[r, span], cond[r, span], item[r, span], cat[r, span] = run.kind, run.cond, run.item, run.cat
            label[r, span] = run.label
            # Positions restart per user and count the user's non-query tokens before a token: a query shares
            # the position of the condition token it stands for ("the next condition").
            real = run.kind != QUERY
            pos[r, span] = np.cumsum(real) - real
            seg[r, span] = s
            t += L
    t = torch.from_numpy
    return Batch(t(kind), t(cond), t(item), t(cat), t(pos), t(seg), t(label >= 0), t(label), packed)


def pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing bin packing of runs into rows of ``row_len`` tokens; returns run indices per row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        L = lengths[i]
        if L > row_len:
            raise ValueError(f"run of {L} tokens does not fit a row of {row_len}")
        for r, f in enumerate(free):
            if f >= L:
                rows[r].append(i)
                free[r] -= L
                break
        else:
            rows.append([i])
            free.append(row_len - L)
    return rows


def chunk(seq: Seq, max_pairs: int) -> list[Seq]:
    """Split a long history into windows of at most ``max_pairs`` pairs, cut from the newest end."""
    n = len(seq)
    return [seq[max(0, end - max_pairs):end] for end in range(n, 0, -max_pairs)]


def padded_batch(runs: list[Tokens], row_len: int | None = None) -> Batch:
    """One run per row, right-padded (the baseline packing is measured against)."""
    return make_batch(runs, [[i] for i in range(len(runs))], row_len or max(len(r) for r in runs), packed=False)


def group_query_batch(prefixes: list[Tokens], conditions: np.ndarray, row_len: int) -> tuple[Batch, torch.Tensor]:
    """Pack ``[prefix_u, q1..qK]`` for many users; returns the batch and (U, K, 2) (row, column) of each query.

    ``conditions``: (K, n_kinds) shared by all users, or (U, K, n_kinds) per user.
    """
    conditions = np.asarray(conditions, dtype=np.int64)
    K = conditions.shape[-2]
    shared = query_tokens(conditions) if conditions.ndim == 2 else None
    runs = [concat(p, shared if shared is not None else query_tokens(conditions[u])) for u, p in enumerate(prefixes)]
    rows = pack_rows([len(r) for r in runs], row_len)
    where = torch.zeros(len(runs), K, 2, dtype=torch.long)
    for r, members in enumerate(rows):
        t = 0
        for i in members:
            t += len(runs[i])
            where[i, :, 0] = r
            where[i, :, 1] = torch.arange(t - K, t)
    return make_batch(runs, rows, row_len), where


def truncate_prefix(seq: Seq, max_pairs: int) -> Seq:
    return seq[max(0, len(seq) - max_pairs):]


def inference_prefix(seq: Seq, cfg) -> Seq:
    """The history evaluation and refresh feed the model: the newest ``cfg.context_pairs`` pairs, so the query
    (or the last item) lands on a position training used."""
    return truncate_prefix(seq, cfg.context_pairs)
