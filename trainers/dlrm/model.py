"""The ranking model of step 3 (LUM paper sec. 4.3): TorchRec's DLRM, used as-is, fed named embedding bags
and dense inputs that optionally carry precomputed LUM knowledge.

    from trainers.dlrm.model import DLRMConfig, build_model
    cfg = DLRMConfig.preset("debug", features="lum", lum_conditions=["scenario=home"], lum_dim=32)
    model = build_model(cfg)        # unsharded; trainers.dlrm.train wraps it in DistributedModelParallel

Sparse features (one pooled embedding each; history bags share the item/category tables):
user_id, item_id, category_id, scenario, position, history_items, history_categories.
Dense features (``dense_feature_names``): a few baseline scalars; with ``features="lum"`` also the LUM
user vector of every configured condition (direct features), the target item's LUM embedding, the cosine
similarity of each condition vector with the item vector, of the example's own scenario condition and of the
target's own category condition (interest matching, ``TARGET_CATEGORY``), with ``lum_contrast`` the contrast
of each condition answer with the others (``features.contrast``), and explicit presence flags: an absent LUM
input is zeros *and* a 0 flag. (A dot product would be cos/sqrt(D): LUM vectors are unit vectors.)
The layout is versioned (``FEATURE_LAYOUT``, stored in the config): a checkpoint of another layout is refused.
The output bias starts at the logit of ``prior_ctr`` (the first batch's positive share if unset).
Ids -> rows: salted hashing (``ids="hash"``, rows shared by distinct ids) or TorchRec's managed collisions
(``ids="mch"``: ``ManagedIds``, one row per admitted id, LRU/LFU eviction, tables sharded row-wise).
The LUM itself never runs here: its outputs arrive inside the examples, so cost does not grow with its size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

# The own-category slot (paper 4.3, interest matching): filled from an example's TARGET_CATEGORY vector (the
# joiner's pick among the user's own-category answers) or, failing that, from a condition naming the target's
# category (e.g. ``behavior=buy,category=17``).
from schemas.events import TARGET_CATEGORY  # noqa: F401 (re-exported)

# ---------------------------------------------------------------------------------------------- config

# Sparse feature -> embedding table. History bags share the tables of the target item and category, so a
# clicked item's embedding is the same whether it is the target or in someone's history.
FEATURE_TABLE: dict[str, str] = {
    "user_id": "user", "item_id": "item", "category_id": "category", "scenario": "scenario",
    "position": "position", "history_items": "item", "history_categories": "category",
}
SPARSE_FEATURES: tuple[str, ...] = tuple(FEATURE_TABLE)
TABLES: tuple[str, ...] = ("user", "item", "category", "scenario", "position")
# target_in_history: log1p(times the target item is in the history), target_category_share: share of the history
# in the target's category. Pooled bags cannot tell whether the target is among them; on real logs a repeat is
# the strongest single signal (Taobao: 6.7% positives on re-viewed items, 1.5% on the others).
BASELINE_DENSE: tuple[str, ...] = ("log1p_position", "log1p_history_len", "has_query", "log1p_target_in_history",
                                   "target_category_share")
# Version of the dense layout. 1: + dot[c] per condition (= cos/sqrt(D): both vectors are unit, redundant) and
# the own-scenario match; 2: + target-in-history inputs; no dot; own-scenario and own-category matches;
# 3: direct vectors scaled to unit norm / sqrt(D) (``features.direct_block``); 4: + contrast[c] per condition and
# contrast[category] (``features.contrast``).
FEATURE_LAYOUT = 4


class DLRMConfig(BaseModel):
    """Everything needed to rebuild the model; stored in every checkpoint."""

    model_config = ConfigDict(extra="forbid")

    features: Literal["baseline", "lum"] = "baseline"  # baseline: no LUM inputs; lum: + LUM dense inputs
    embedding_dim: int = Field(16, ge=2)  # one size for all tables: DLRM's dot interaction needs it
    table_rows: dict[str, int] = Field(  # hash buckets per table (ids are arbitrary 64-bit values)
        default_factory=lambda: {"user": 1 << 14, "item": 1 << 14, "category": 1 << 10, "scenario": 256,
                                 "position": 64})
    history_len: int = Field(50, ge=1)  # most recent history entries used (the bag is pooled)
    dense_arch: list[int] = Field(default_factory=lambda: [64])  # hidden sizes before the projection to D
    over_arch: list[int] = Field(default_factory=lambda: [64, 32])  # hidden sizes before the logit
    lum_conditions: list[str] | None = None  # LUM query conditions, in order (None: from the first example)
    lum_dim: int | None = Field(None, ge=1)  # LUM vector size (None: from the first example)
    # "full": the LUM vectors themselves (direct features, each at unit norm / sqrt(D): ``features.direct_block``)
    # and their similarities; "match": only the similarities and presence flags (interest matching, ~K+6 inputs
    # instead of ~(K+2)*D). Unscaled raw vectors cost the Taobao sample 0.08 AUC (0.725 -> 0.645).
    lum_inputs: Literal["full", "match"] = "full"
    # + contrast[c] per condition and contrast[category] (``features.contrast``): ML-100K `match` 0.7515 -> 0.7654
    # AUC (3 seeds), but on the synthetic demo stream the LUM arm lost 0.01 AUC with them: off unless asked for.
    lum_contrast: bool = False
    embedding_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd"] = "rowwise_adagrad"  # fused (CPU: no Adam)
    # Embedding learning rate (fused, applied during backward). 0.05 memorized ids within one pass on real logs
    # (Taobao sample: test log loss above a constant predictor, AUC 0.53-0.59 over seeds); 0.01 keeps a pass
    # calibrated (log loss below the constant, AUC 0.69-0.72), and more passes recover the rest on ML-100K.
    sparse_lr: float = Field(0.01, gt=0)
    dense_lr: float = Field(3e-3, gt=0)  # torch Adam on the MLPs (one pass over a stream: not too timid)
    sharding: Literal["table_wise", "column_wise"] = "table_wise"  # how DMP places tables across ranks
    seed: int = 0  # MLP init
    # Id -> row: "hash" (salted splitmix64 mod rows; distinct ids share rows) or "mch" (TorchRec's managed
    # collisions, ZCH: each admitted id owns a row; tables sharded row-wise).
    ids: Literal["hash", "mch"] = "hash"
    mch_eviction: Literal["lru", "lfu"] = "lru"  # which admitted id gives its row to a new one when full
    # Steps between admissions/evictions: a new id shares the residual (last) row for at most this many steps.
    mch_eviction_interval: int = Field(10, ge=1)
    # Expected share of positives: the output bias starts at its logit, so an untrained model predicts the base
    # rate (a 0.5 start on 3% positives costs log loss the few passes never win back). None: the first batch's.
    prior_ctr: float | None = Field(None, gt=0, lt=1)
    # Layout of the dense input (``dense_feature_names``); a checkpoint of another layout is refused on resume.
    feature_layout: int = FEATURE_LAYOUT

    @classmethod
    def from_saved(cls, saved: dict) -> DLRMConfig:
        """The config stored in a checkpoint; one written before ``feature_layout`` existed has layout 1."""
        return cls(**({"feature_layout": 1} | saved))

    @model_validator(mode="after")
    def _check(self) -> DLRMConfig:
        missing = set(TABLES) - set(self.table_rows)
        if missing:
            raise ValueError(f"table_rows lacks {sorted(missing)}")
        if self.lum_conditions is not None and len(set(self.lum_conditions)) != len(self.lum_conditions):
            raise ValueError("lum_conditions has duplicates")
        if self.lum_conditions and TARGET_CATEGORY in self.lum_conditions:
            raise ValueError(f"lum_conditions: {TARGET_CATEGORY!r} is not a fixed condition (it feeds the "
                             "own-category inputs of every LUM model); leave it out")
        return self

    @property
    def lum_resolved(self) -> bool:
        return self.features == "baseline" or (bool(self.lum_conditions) and self.lum_dim is not None)

    @classmethod
    def preset(cls, name: str, **overrides) -> DLRMConfig:
        """``debug``: seconds on a CPU (tests); ``base``: the stream-scale model."""
        presets = {
            "debug": {},
            "base": {"embedding_dim": 64, "dense_arch": [256], "over_arch": [256, 128],
                     "table_rows": {"user": 1 << 20, "item": 1 << 20, "category": 1 << 14, "scenario": 1024,
                                    "position": 128}},
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(presets)}")
        return cls(**(presets[name] | {k: v for k, v in overrides.items() if v is not None}))


def dense_feature_names(cfg: DLRMConfig) -> list[str]:
    """Column names of the dense input, in order (K conditions, D dims)."""
    names = list(BASELINE_DENSE)
    if cfg.features == "lum":
        if not cfg.lum_resolved:
            raise ValueError("lum_conditions and lum_dim must be known before the model is built")
        conds, d = cfg.lum_conditions, cfg.lum_dim
        d = d if cfg.lum_inputs == "full" else 0  # "match": no direct vector features
        names += [f"lum_user[{c}][{j}]" for c in conds for j in range(d)]  # direct features (K*D)
        names += [f"lum_user_present[{c}]" for c in conds]
        names += [f"lum_item[{j}]" for j in range(d)] + ["lum_item_present"]
        names += [f"cos[{c}]" for c in conds]  # interest matching per condition
        names += ["cos[scenario]", "scenario_condition_present"]  # the example's own scenario condition
        names += [f"lum_user[category][{j}]" for j in range(d)]  # the target's own category condition
        names += ["cos[category]", "category_condition_present"]
        if cfg.lum_contrast:  # what each condition (and the own category) adds: sqrt(D) cos(u_c - mean, item)
            names += [f"contrast[{c}]" for c in conds] + ["contrast[category]"]
    return names


# ---------------------------------------------------------------------------------------------- model


def table_configs(cfg: DLRMConfig):
    from torchrec import EmbeddingBagConfig, PoolingType

    return [EmbeddingBagConfig(name=f"t_{t}", embedding_dim=cfg.embedding_dim, num_embeddings=cfg.table_rows[t],
                               feature_names=[f for f in SPARSE_FEATURES if FEATURE_TABLE[f] == t],
                               pooling=PoolingType.MEAN if t in ("item", "category") else PoolingType.SUM)
            for t in TABLES]


class ManagedIds(torch.nn.Module):
    """TorchRec's ``ManagedCollisionEmbeddingBagCollection`` with one ``MCHManagedCollisionModule`` per table,
    shaped like an ``EmbeddingBagCollection`` for DLRM's SparseArch (forward returns the pooled KeyedTensor).

    Input ids are the raw 63-bit ids. In training, each table records the ids it sees; every
    ``mch_eviction_interval`` steps it admits the most frequent new ids into free rows (or rows it evicts:
    LRU or LFU), and embedding rows of evicted ids are reset. An id not yet admitted maps to the table's last
    row until then. The remapping state (sorted raw ids -> rows, access metadata) is buffers of this module,
    so it lives in the model's state_dict and thus in the checkpoint.
    """

    def __init__(self, cfg: DLRMConfig, device: torch.device, buckets: int = 1):
        super().__init__()
        from torchrec import EmbeddingBagCollection
        from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
        from torchrec.modules.mc_modules import (LFU_EvictionPolicy, LRU_EvictionPolicy,
                                                 ManagedCollisionCollection, MCHManagedCollisionModule)

        tables = table_configs(cfg)
        policy = {"lru": LRU_EvictionPolicy, "lfu": LFU_EvictionPolicy}[cfg.mch_eviction]
        mcms = {t.name: MCHManagedCollisionModule(zch_size=t.num_embeddings, device=device, eviction_policy=policy(),
                                                  eviction_interval=cfg.mch_eviction_interval,
                                                  input_hash_size=(1 << 63) - 1, name=t.name, buckets=buckets)
                for t in tables}  # buckets: one per rank (row-wise shards), as TorchRec's planner requires
        self.mc_ebc = ManagedCollisionEmbeddingBagCollection(
            EmbeddingBagCollection(tables=tables, device=device), ManagedCollisionCollection(mcms, tables),
            return_remapped_features=False)
        self._configs = tables

    def embedding_bag_configs(self):
        return self._configs

    def forward(self, features):
        return self.mc_ebc(features)[0]


def mch_sharder():
    """The sharder for ``ManagedIds``: MCH supports row-wise sharding only, which TorchRec's EBC sharder does
    not offer on CPU; row-wise runs on CPU when added (same results as table-wise), so it is added here."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder

    class _RowWiseOnCPU(EmbeddingBagCollectionSharder):
        def sharding_types(self, compute_device_type: str) -> list[str]:
            return sorted(set(super().sharding_types(compute_device_type)) | {"row_wise"})

    return ManagedCollisionEmbeddingBagCollectionSharder(ebc_sharder=_RowWiseOnCPU())


def reset_evicted_rows_on_cpu(model: torch.nn.Module) -> int:
    """Give every CPU embedding kernel (fbgemm TBE) of ``model`` a Python ``reset_embedding_weight_momentum``.

    TorchRec's sharded managed-collision module resets the rows (weights and optimizer state) of evicted ids
    with ``fbgemm::reset_weight_momentum``, which fbgemm-gpu-cpu 1.8 does not implement ("Could not run
    'fbgemm::reset_weight_momentum' with arguments from the 'CPU' backend") at the first eviction. This zeroes
    the same rows through the kernel's per-table views. Row indices are the table-local rows that TorchRec
    passes (world size 1 and tables whose shard starts at row 0; checked). Returns how many kernels it patched.
    """
    import types

    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    def reset(tbe, pruned_indices, pruned_indices_offsets, logical_table_ids, buffer_ids):
        weights = tbe.split_embedding_weights()
        states = tbe.split_optimizer_states()
        offs = pruned_indices_offsets.tolist()
        with torch.no_grad():
            for i, t in enumerate(logical_table_ids.tolist()):
                rows = pruned_indices[offs[i]:offs[i + 1]].long()
                if rows.numel() and int(rows.max()) >= weights[t].shape[0]:
                    raise RuntimeError(f"evicted row {int(rows.max())} outside table {t}'s {weights[t].shape[0]} "
                                       "local rows (managed collisions on CPU support unsplit tables only)")
                weights[t][rows] = 0
                for state in states[t]:
                    state[rows] = 0

    tbes = {}  # the sharded MC module's kernels are not submodules: take them from its table -> kernel map
    for m in model.modules():
        for tbe, _ in getattr(m, "_table_to_tbe_and_index", {}).values():
            if isinstance(tbe, SplitTableBatchedEmbeddingBagsCodegen) and tbe.current_device.type == "cpu":
                tbes[id(tbe)] = tbe
    for tbe in tbes.values():
        tbe.reset_embedding_weight_momentum = types.MethodType(reset, tbe)
    return len(tbes)


def build_model(cfg: DLRMConfig, device: torch.device | str = "cpu", world_size: int = 1):
    """TorchRec DLRM over the named tables; ``device="meta"`` leaves tables for DMP to materialize.

    forward(dense_features (B, F_dense), sparse_features KJT[B]) -> logits (B, 1)
    """
    from torchrec import EmbeddingBagCollection
    from torchrec.models.dlrm import DLRM

    torch.manual_seed(cfg.seed)
    if cfg.ids == "mch":
        ebc = ManagedIds(cfg, torch.device(device), buckets=world_size)
    else:
        ebc = EmbeddingBagCollection(tables=table_configs(cfg), device=torch.device(device))
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=len(dense_feature_names(cfg)),
                 dense_arch_layer_sizes=[*cfg.dense_arch, cfg.embedding_dim],  # (B, F) -> (B, D)
                 over_arch_layer_sizes=[*cfg.over_arch, 1])  # (B, D + F_sparse*(F_sparse+1)/2) -> (B, 1)
    if cfg.prior_ctr is not None:  # start at the base rate, and near it for every input (small last layer)
        last = model.over_arch.model[-1]
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.fill_(math.log(cfg.prior_ctr / (1 - cfg.prior_ctr)))
    return model
