"""Serving-side scoring: N candidate items for one user from the live model and stored LUM features.

    store = LumStore()
    store.put_user(lum_features)           # LumFeatures from the lum-features topic (latest per user)
    store.put_item(item_embedding)         # ItemEmbedding from the item-embeddings topic
    scorer = Scorer.from_checkpoint("ckpt/lum")        # or Scorer.from_trainer(trainer): the live model
    probs = scorer.score(user_id, "home", [(item_id, category_id), ...], store=store,
                         history_items=[...], history_categories=[...])        # (N,) click probabilities

The LUM never runs here (paper sec. 4.4): its outputs are looked up, so the cost is one DLRM forward over N
rows whatever the LUM's size. The store keeps vectors as numpy arrays, converted once at ingest, as a
serving cache would. Candidates are scored at position 0 (position is a training-time bias feature).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from schemas.events import ItemEmbedding, ItemVectors, LumFeatures

from .features import Featurizer, LumArrays
from .model import DLRMConfig, build_model


class LumStore:
    """Latest LUM outputs per user ({condition: vector}, {own category: vector}, model version) and item embeddings
    per model version (``schemas.events.ItemVectors``: a user is matched with its own version's item vectors, as
    the joiner attaches them in training), as float32 arrays."""

    def __init__(self):
        # user -> (condition -> row, own category -> row, (K, D), model version): rows of the user's answers
        self.users: dict[int, tuple[dict[str, int], dict[int, int], np.ndarray, str]] = {}
        self.items = ItemVectors(convert=lambda v: np.asarray(v, dtype=np.float32))

    def put_user(self, f: LumFeatures) -> None:
        self.users[f.user_id] = ({c.condition: k for k, c in enumerate(f.conditions) if c.own_category is None},
                                 {c.own_category: k for k, c in enumerate(f.conditions)
                                  if c.own_category is not None},
                                 np.asarray([c.vector for c in f.conditions], dtype=np.float32), f.model_version)

    def put_item(self, e: ItemEmbedding | None) -> None:
        if e is not None:  # None: a retired version's tombstone
            self.items.add(e)

    def item(self, item_id: int, category_id: int, model_version: str) -> np.ndarray | None:
        """The item's vector under ``model_version`` (the user's), or (an item that version never trained on) its
        category's, as the joiner attaches them."""
        return self.items.get(item_id, model_version, category_id)


class Scorer:
    def __init__(self, model: torch.nn.Module, cfg: DLRMConfig):
        self.model, self.cfg = model, cfg
        self.featurizer = Featurizer(cfg, track_collisions=False)
        if cfg.features == "lum":
            self._order = list(cfg.lum_conditions)

    @classmethod
    def from_trainer(cls, trainer) -> Scorer:
        """The trainer's live (DMP) model: scores reflect every batch trained so far."""
        return cls(trainer.model, trainer.cfg)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> Scorer:
        """An unsharded copy of the latest durable checkpoint (any world size / sharding it was saved with)."""
        import torch.distributed.checkpoint as dcp

        from .train import latest_checkpoint, read_meta

        meta = read_meta(checkpoint_dir)
        if meta is None:
            raise SystemExit(f"no checkpoint in {checkpoint_dir}")
        cfg = DLRMConfig.from_saved(meta["config"])
        model = build_model(cfg)
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(latest_checkpoint(checkpoint_dir)), no_dist=True)
        model.load_state_dict(state["model"])
        return cls(model, cfg)

    @torch.no_grad()
    def score(self, user_id: int, scenario: str, candidates: Sequence[tuple[int, int]], *,
              store: LumStore | None = None, history_items: Sequence[int] = (),
              history_categories: Sequence[int] = (), query: str | None = None) -> np.ndarray:
        N, H = len(candidates), self.cfg.history_len
        hist_i = np.asarray(list(history_items)[-H:], dtype=np.int64)
        hist_c = np.asarray(list(history_categories)[-H:], dtype=np.int64)
        cand = np.asarray(candidates, dtype=np.int64).reshape(N, 2)
        raw = {"user_id": np.full(N, user_id, dtype=np.int64), "item_id": cand[:, 0], "category_id": cand[:, 1],
               "scenario": np.full(N, self.featurizer.scenario_id(scenario), dtype=np.int64),
               "position": np.zeros(N, dtype=np.int64),
               "history_items": np.tile(hist_i, N), "history_categories": np.tile(hist_c, N)}
        lum = (self.featurizer.own_category(self._lum(user_id, scenario, cand, store), cand[:, 1])
               if self.cfg.features == "lum" else None)
        dense, sparse = self.featurizer.encode(raw, np.full(N, len(hist_i), dtype=np.int64),
                                               np.full(N, query is not None, dtype=np.float32), lum)
        self.model.eval()
        logits = self.model(dense, sparse).squeeze(-1)  # (N,)
        return torch.sigmoid(logits).numpy()

    def _lum(self, user_id: int, scenario: str, cand: np.ndarray, store: LumStore | None) -> LumArrays:
        """The LUM inputs of candidates ``cand`` (N, 2: item, category), as the joiner attaches them in training:
        the configured conditions, the item vector, and the user's answer for each candidate's own category."""
        K, D, N = len(self._order), self.cfg.lum_dim, len(cand)
        U = np.zeros((K, D), dtype=np.float32)
        u_ok = np.zeros(K, dtype=np.float32)
        cat = np.zeros((N, D), dtype=np.float32)
        cat_ok = np.zeros(N, dtype=np.float32)
        found = store.users.get(user_id) if store else None
        version = found[3] if found is not None else None
        if found is not None and found[2].shape[1] == D:  # reorder by name; absent conditions stay flagged 0
            index, by_category, vecs, _ = found
            for k, c in enumerate(self._order):
                if c in index:
                    U[k], u_ok[k] = vecs[index[c]], 1.0
            for n, c in enumerate(cand[:, 1].tolist()):
                if c in by_category:
                    cat[n], cat_ok[n] = vecs[by_category[c]], 1.0
        item = np.zeros((N, D), dtype=np.float32)
        i_ok = np.zeros(N, dtype=np.float32)
        for n, (i, c) in enumerate(cand.tolist()):
            v = store.item(i, c, version) if version is not None else None  # no user vector: nothing to match
            if v is not None and v.shape[0] == D:
                item[n], i_ok[n] = v, 1.0
        own = self._order.index(f"scenario={scenario}") if f"scenario={scenario}" in self._order else -1
        return LumArrays(np.broadcast_to(U, (N, K, D)), np.broadcast_to(u_ok, (N, K)), item, i_ok,
                         np.full(N, own, dtype=np.int64), cat, cat_ok)
