"""Incremental DLRM training on a stream of TrainingExample mini-batches, with progressive validation and
checkpoints that hold everything needed to resume (config, model, optimizers, step, metrics, offsets).

    from trainers.dlrm.train import train, Batch
    train(cfg, batches, checkpoint_dir="ckpt/lum")      # batches: iterable of Batch or list[TrainingExample]
    torchrun --nproc-per-node 2 -m trainers.dlrm.train --demo DIR [--ids mch]   # DMP over 2 CPU processes (gloo)

Batches are read ``prefetch`` ahead in a thread, which at world size 1 also featurizes them once the model exists
(fetching and featurizing overlap the step; the Kafka adapter, ``kafka_source``, can decode in a child process so
that decoding does too; a batch from which admission then drops examples is featurized again, in the step).
``lum train`` wires the two together.

Progressive validation: each batch is scored by the model *before* it trains on that batch. The training
forward pass already does exactly that (the fused embedding optimizer and Adam update only after the
forward), so its predictions feed the metrics; no second forward is needed.

Checkpoint protocol (``DIR``):
  1. append the metrics rows since the last checkpoint to ``DIR/metrics.jsonl`` (readers keep the last row
     per window, so rows rewritten after a rollback supersede the lost ones);
  2. save model + optimizers with torch.distributed.checkpoint into ``DIR/ckpt-<step>/``, then
     ``dedup.npy`` (recent example ids) and ``meta.json`` (config, step, examples, offsets, metrics state,
     trained-id log length, duplicate and skipped counts);
  3. atomically replace ``DIR/LATEST`` (write, fsync, rename, fsync dir): only now is the checkpoint durable;
  4. call ``on_durable(offsets)``: the Kafka adapter commits the offsets the checkpoint covers.
On start, ``LATEST`` (or, if it is unusable, the newest older checkpoint that loads) is loaded: training resumes from its state and offsets, so examples after it
are trained again exactly once and none before it are. With ``record_example_ids`` each rank appends the
ids it trained to ``DIR/trained_ids-rank<r>.log``; the checkpoint records the log's length and a restart
truncates it there, so the log always lists exactly the examples inside the durable model state.

World size > 1 (torchrun): only rank 0 iterates the source (one Kafka reader, so the checkpoint's offsets
cover every example any rank trained); each step it splits the global batch into equal shares, padded with
zero-weight copies (the sharded embedding all-to-all needs equal batch sizes), and scatters them with the
step's decisions (checkpoint now, stop), so every rank steps in lockstep. The metrics log holds rank 0's share.

Integrity:
- re-delivered examples (the joiner is at-least-once) are dropped by example id: the ids of the last
  ``dedup_horizon`` trained examples are remembered (8-byte hashes in fixed memory, ``trainers.dlrm.dedup``;
  up to 1/16 more) and kept in the checkpoint; a duplicate arriving more than that many examples after its
  first copy is trained again (a source may hand over the hashes with the batch, ``Batch.keys``, computed off
  the step's thread);
- a step whose loss is not finite on any rank is skipped on all ranks before backward (nothing is updated),
  counted (``skipped_batches``) and its examples go to ``on_bad_batch`` (the Kafka adapter dead-letters them);
- start-up loads the newest checkpoint that loads (``trainers.checkpoint``; an unusable one is skipped with a
  warning) and refuses one whose saved model config differs from the requested one, naming the fields.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from schemas import metrics as prom
from schemas.events import TrainingExample

from ..checkpoint import Refuse, atomic_write, candidates, load_newest_good
from ..checkpoint import latest as latest_checkpoint
from .dedup import RecentIds
from .features import FeatureBatch, Featurizer, resolve_lum_dims
from .metrics import StreamingMetrics
from .model import TABLES, DLRMConfig, build_model, mch_sharder, reset_evicted_rows_on_cpu

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1
SWITCH_INTERVAL_S = 0.0005  # GIL switch interval while a prefetch thread runs (see _Prefetch)


@dataclass
class Batch:
    examples: list[TrainingExample]
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset once this batch is trained
    sources: list[tuple[int, int]] | None = None  # (partition, offset) of each example, for dead letters
    weights: list[float] | None = None  # 0 for padding rows (world size > 1); None: all 1
    keys: list[int] | None = None  # RecentIds.key of each example, if the source computed them
    features: FeatureBatch | None = None  # the examples featurized ahead (prefetch thread or the source)


def ensure_process_group() -> tuple[int, int]:
    """(rank, world size). Under torchrun the env:// group; otherwise a private single-process gloo group."""
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group("gloo")
        else:  # a file store: no port to pick or race for
            store = tempfile.NamedTemporaryFile(prefix="lum-dlrm-pg-", delete=False).name
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


_fsync_write = atomic_write
# Fields that may differ between the saved and the requested model: sharding is re-planned on load, and LUM
# sizes left unset (None) are taken from the checkpoint.
_RESHARDABLE = {"sharding"}
_FROM_CHECKPOINT_IF_UNSET = {"lum_conditions", "lum_dim", "prior_ctr"}


def config_differences(saved: DLRMConfig, requested: DLRMConfig) -> list[str]:
    """'field: saved X, requested Y' for every model field that would make the checkpoint a different model."""
    out = []
    req = requested.model_dump()
    for k, v in saved.model_dump().items():
        if k in _RESHARDABLE or (k in _FROM_CHECKPOINT_IF_UNSET and req.get(k) is None):
            continue
        if req.get(k) != v:
            out.append(f"{k}: saved {v!r}, requested {req.get(k)!r}")
    return out


def read_meta(checkpoint_dir: str | Path) -> dict | None:
    path = latest_checkpoint(checkpoint_dir)
    return json.loads((path / "meta.json").read_text()) if path else None


class Trainer:
    """DMP-wrapped DLRM + optimizers + featurizer + metrics; built lazily when LUM sizes come from data."""

    def __init__(self, cfg: DLRMConfig, checkpoint_dir: str | Path | None = None, *, window_ms: int = 3_600_000,
                 every_batches: int = 50, every_s: float = 60.0, record_example_ids: bool = False, keep: int = 2,
                 dedup_horizon: int = 1_000_000,
                 on_bad_batch: Callable[[Batch, str], None] | None = None, device: str | torch.device = "cpu"):
        self.rank, self.world = ensure_process_group()
        self.rec = prom.Recorder(f"dlrm-{cfg.features}", self.rank)
        self.device = torch.device(device)  # "cuda": tables and MLPs on the GPU (benchmarks/gpu_check.py)
        self.seen = RecentIds(dedup_horizon)
        self.duplicates = self.skipped_batches = 0
        self.on_bad_batch = on_bad_batch
        self.cfg, self.dir = cfg, Path(checkpoint_dir) if checkpoint_dir else None
        self.every_batches, self.every_s, self.keep = every_batches, every_s, keep
        self.record_ids = record_example_ids and self.dir is not None
        self.model = self.opt = self.featurizer = None
        self.step = self.examples = 0
        self.offsets: dict[int, int] = {}
        self.metrics = StreamingMetrics(window_ms)
        self._pending_ids: list[str] = []
        self._featurizing = threading.Lock()  # the featurizer's state: used by the step's and the prefetch thread
        self._since_ckpt, self._last_ckpt_t, self._unsaved = 0, time.monotonic(), False
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if candidates(self.dir):
                self._restore()
            elif self.record_ids:
                self._ids_log().open("w").close()  # nothing durable yet: the log starts empty

    # ------------------------------------------------------------------------------------ model set-up

    def _ids_log(self) -> Path:
        return self.dir / f"trained_ids-rank{self.rank}.log"

    def _build(self) -> None:
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
        from torchrec.optim import RowWiseAdagrad
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
        from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        cfg = self.cfg
        model = build_model(cfg, device="meta", world_size=self.world)  # tables materialize sharded inside DMP
        emb_opt = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
        apply_optimizer_in_backward(emb_opt[cfg.embedding_optimizer], model.sparse_arch.parameters(),
                                    {"lr": cfg.sparse_lr})  # fused into the embedding kernels by DMP
        # Column-wise only splits with min_partition below the table's dim.
        extra = {"min_partition": max(1, cfg.embedding_dim // 2)} if cfg.sharding == "column_wise" else {}
        if cfg.ids == "mch":  # managed collisions shard row-wise only (the fused kernel on CPU)
            constraints = {f"t_{t}": ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused"])
                           for t in TABLES}
            sharders = [mch_sharder()]
        else:
            constraints = {f"t_{t}": ParameterConstraints(sharding_types=[cfg.sharding], **extra) for t in TABLES}
            sharders = [EmbeddingBagCollectionSharder()]
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=self.world, compute_device=self.device.type),
                                           constraints=constraints)
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        self.model = DistributedModelParallel(model, device=self.device, plan=plan, sharders=sharders)
        if cfg.ids == "mch" and self.device.type == "cpu":
            reset_evicted_rows_on_cpu(self.model)
        dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(self.model.named_parameters())),
                                      lambda params: torch.optim.Adam(params, lr=cfg.dense_lr))
        dense.init_state()  # Adam's state exists before a restore loads into it (a zero-grad step is a no-op)
        self.dense_opt = dense
        self.opt = CombinedOptimizer([self.model.fused_optimizer, dense])
        self.featurizer = Featurizer(cfg)
        log.info("DLRM built: features=%s, %d dense inputs, tables %s, sharding %s over %d rank(s)", cfg.features,
                 self.featurizer.n_dense, cfg.table_rows, cfg.sharding, self.world)

    def ensure_model(self, examples: list[TrainingExample]) -> None:
        if self.model is not None:
            return
        self.cfg = resolve_lum_dims(self.cfg, examples)
        if self.world > 1:  # every rank must build the same model: take rank 0's resolution
            box = [self.cfg.model_dump()]
            dist.broadcast_object_list(box, src=0)
            self.cfg = DLRMConfig(**box[0])
        if not self.cfg.lum_resolved:
            raise SystemExit("features=lum but the first batch carries no LUM features to size the inputs from: "
                             "set LUM_DLRM_LUM_CONDITIONS ('scenario=home;scenario=search') and LUM_DLRM_LUM_DIM")
        self._build()

    # ------------------------------------------------------------------------------------ training

    def admit(self, batch: Batch | list[TrainingExample]) -> Batch:
        """Drop examples already trained (within the dedup horizon) or repeated inside this batch."""
        if not isinstance(batch, Batch):
            batch = Batch(list(batch))
        keys = batch.keys
        if keys is None or len(keys) != len(batch.examples):
            keys = RecentIds.keys([ex.example_id for ex in batch.examples])
        known = self.seen.contains_many(keys)
        if not known.any() and len(set(keys)) == len(keys):  # the usual case: no per-example work
            keep = range(len(keys))
        else:
            keep, fresh = [], set()
            for i, (k, old) in enumerate(zip(keys, known.tolist())):
                if not old and k not in fresh:
                    fresh.add(k)
                    keep.append(i)
            keys = [keys[i] for i in keep]
        dropped = len(batch.examples) - len(keep)
        if dropped:
            log.info("dropping %d re-delivered example(s)", dropped)
            batch = Batch([batch.examples[i] for i in keep], batch.offsets,
                          [batch.sources[i] for i in keep] if batch.sources else None)  # featurized again
        batch._keys, batch._dups = keys, dropped  # counted once trained (a checkpoint may come in between)
        return batch

    def train_batch(self, batch: Batch | list[TrainingExample], *, admitted: bool = False) -> float | None:
        """One progressive-validation + training step on this rank's share; returns the loss (None: no step).

        At world size 1 duplicates are dropped here; at world size > 1 ``fit`` admits on rank 0 before the split.
        """
        if not isinstance(batch, Batch):
            batch = Batch(list(batch))
        if not admitted and self.world == 1:
            batch = self.admit(batch)
        self.duplicates += getattr(batch, "_dups", 0)
        if any(self.offsets.get(p) != o for p, o in batch.offsets.items()):
            self.offsets.update(batch.offsets)
            self._unsaved = True
        if not batch.examples:  # e.g. every message was dead-lettered: only the offsets move
            return None
        self.ensure_model(batch.examples)
        fb = batch.features
        with self._featurizing:
            if fb is None:
                fb = self.featurizer(batch.examples)
            else:  # featurized ahead: counted now that it trains as it is
                self.featurizer.count(fb.columns)
        self.model.train()
        dev = self.device
        dense, sparse, labels = ((fb.dense, fb.sparse, fb.labels) if dev.type == "cpu" else
                                 (fb.dense.to(dev, non_blocking=True), fb.sparse.to(dev, non_blocking=True),
                                  fb.labels.to(dev, non_blocking=True)))
        logits = self.model(dense, sparse).squeeze(-1)  # (B,): scored before this batch's update
        per = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        w = (torch.ones_like(per) if batch.weights is None
             else torch.tensor(batch.weights, dtype=per.dtype, device=per.device))
        loss = (per * w).sum() / w.sum().clamp(min=1.0)
        finite = torch.tensor([1.0 if math.isfinite(float(loss.detach())) else 0.0])
        if self.world > 1:  # every rank must take the same branch: backward runs the embedding all-to-all
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        self.opt.zero_grad()
        if finite.item() < 1.0:
            self.skipped_batches += 1
            self._unsaved = True
            log.error("non-finite loss at step %d: batch skipped (nothing updated), %d skipped so far; its "
                      "examples go to dead-letters", self.step, self.skipped_batches)
            if self.on_bad_batch is not None and self.rank == 0:  # rank 0 holds the whole global batch
                self.on_bad_batch(getattr(batch, "_global", batch), f"non-finite training loss ({float(loss.detach())}) at step {self.step}")
            return None
        loss.backward()  # the fused embedding optimizer updates the tables here
        self.opt.step()
        real = np.ones(len(fb), dtype=bool) if batch.weights is None else np.asarray(batch.weights) > 0
        probs = torch.sigmoid(logits.detach()).cpu().numpy()
        self.metrics.update(probs[real], fb.labels.numpy()[real], fb.event_time_ms[real])
        self.seen.add_many(getattr(batch, "_keys", ()))
        self.step += 1
        self.examples += getattr(batch, "n_global", int(real.sum()))  # all ranks count the global batch
        self.rec.trained(int(real.sum()))  # this rank's share: summed over workers it is the global count
        self._since_ckpt += 1
        self._unsaved = True
        if self.record_ids:
            self._pending_ids.extend(i for i, r in zip(fb.example_ids, real) if r)
        return float(loss.detach())

    def checkpoint_due(self) -> bool:
        if self._since_ckpt >= self.every_batches:
            return True
        # At world size > 1 only rank 0's answer counts (``fit`` broadcasts it): ranks never disagree.
        return self._unsaved and time.monotonic() - self._last_ckpt_t >= self.every_s

    def checkpoint(self, on_durable: Callable[[dict[int, int]], None] | None = None) -> Path | None:
        """Steps 1-4 of the module docstring; collective over all ranks."""
        import torch.distributed.checkpoint as dcp

        if self.dir is None or self.model is None:
            return None
        box = [f"ckpt-{self.step:09d}-{time.time_ns() // 1000:016d}"]  # unique: never overwrite the durable one
        dist.broadcast_object_list(box, src=0)  # one name for all ranks
        name = box[0]
        path = self.dir / name
        rows = self.metrics.records(step=self.step, examples=self.examples, features=self.cfg.features)
        if w := [r for r in rows if r["kind"] == "window"]:
            self.rec.window(w[-1]["auc"], w[-1].get("ne"), w[-1]["logloss"])
        if self.rank == 0:
            rows[-1].update(duplicates_dropped=self.duplicates, skipped_batches=self.skipped_batches)
            rows[-1]["collisions"] = self.featurizer.collision_report()
            rows[-1]["lum_inputs"] = dict(self.featurizer.lum_stats)
            rows[-1]["lum_versions"] = dict(self.featurizer.lum_versions)
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
                f.flush()
                os.fsync(f.fileno())
        dist.barrier()
        dcp.save({"model": self.model.state_dict(), "optim": self.opt.state_dict()}, checkpoint_id=str(path))
        ids_bytes = 0
        if self.record_ids:
            with open(self._ids_log(), "a") as f:
                f.write("".join(i + "\n" for i in self._pending_ids))
                f.flush()
                os.fsync(f.fileno())
                ids_bytes = f.tell()
            self._pending_ids.clear()
        all_ids_bytes = [None] * self.world
        dist.all_gather_object(all_ids_bytes, ids_bytes)
        if self.rank == 0:
            with open(path / "dedup.npy", "wb") as f:  # the recent example ids, oldest first
                np.save(f, self.seen.to_array())
                f.flush()
                os.fsync(f.fileno())
            meta = {"format": CHECKPOINT_FORMAT, "config": self.cfg.model_dump(), "step": self.step,
                    "examples": self.examples, "offsets": {str(p): o for p, o in self.offsets.items()},
                    "world_size": self.world, "metrics": self.metrics.state(), "ids_log_bytes": all_ids_bytes,
                    "duplicates": self.duplicates, "skipped_batches": self.skipped_batches,
                    "dedup_horizon": self.seen.horizon, "saved_at_ms": int(time.time() * 1000)}
            _fsync_write(path / "meta.json", json.dumps(meta))
            _fsync_write(self.dir / "LATEST", name)  # the checkpoint is durable from here on
            self._prune(keep=name)
        dist.barrier()
        self.rec.checkpointed()
        self._since_ckpt, self._last_ckpt_t, self._unsaved = 0, time.monotonic(), False
        if on_durable is not None and self.offsets:
            on_durable(dict(self.offsets))
        log.info("checkpoint %s durable: step %d, %d examples, offsets %s", name, self.step, self.examples,
                 self.offsets)
        return path

    def _prune(self, keep: str) -> None:
        """Keep the newest ``self.keep`` checkpoints up to ``keep`` (LATEST); later names are crash leftovers."""
        ckpts = sorted(p for p in self.dir.glob("ckpt-*") if p.is_dir())
        i = [p.name for p in ckpts].index(keep)
        for p in ckpts[:max(0, i + 1 - self.keep)] + ckpts[i + 1:]:
            shutil.rmtree(p, ignore_errors=True)

    def _restore(self) -> None:
        found = load_newest_good(self.dir, self._load)
        if found is None:
            return
        path, meta = found
        if "saved_at_ms" in meta:
            self.rec.checkpointed(meta["saved_at_ms"] / 1000)
        self.step, self.examples = meta["step"], meta["examples"]
        self.offsets = {int(p): o for p, o in meta["offsets"].items()}
        self.metrics = StreamingMetrics.from_state(meta["metrics"])
        self.duplicates, self.skipped_batches = meta.get("duplicates", 0), meta.get("skipped_batches", 0)
        if (path / "dedup.npy").exists():
            self.seen = RecentIds.from_array(self.seen.horizon, np.load(path / "dedup.npy"))
        if self.record_ids:
            sizes = meta["ids_log_bytes"]
            size = sizes[self.rank] if self.world == len(sizes) else 0
            log_path = self._ids_log()
            with open(log_path, "a") as f:  # drop ids trained after the checkpoint: they are trained again
                f.truncate(size)
        log.info("resumed from %s: step %d, %d examples, offsets %s", path.name, self.step, self.examples,
                 self.offsets)

    def _load(self, path: Path) -> dict:
        """Model and optimizer state from one checkpoint; raises if it is unusable, ``Refuse`` if incompatible."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {meta.get('format')!r}, this build reads {CHECKPOINT_FORMAT}")
        saved = DLRMConfig.from_saved(meta["config"])
        diffs = config_differences(saved, self.cfg)
        if diffs:
            raise Refuse(f"{self.dir} holds a different model than requested; refusing to resume ("
                         + "; ".join(diffs) + "). Use another --checkpoint-dir, or request the saved config.")
        if saved.ids == "mch" and meta["world_size"] != self.world:
            raise Refuse(f"{path.name}: managed-collision tables are bucketed per rank ({meta['world_size']} "
                         f"rank(s)); resume it at world size {meta['world_size']}, not {self.world}")
        if saved.sharding != self.cfg.sharding or meta["world_size"] != self.world:
            log.info("resharding checkpoint: %s x%d -> %s x%d", saved.sharding, meta["world_size"],
                     self.cfg.sharding, self.world)
        requested = self.cfg
        self.cfg = saved.model_copy(update={"sharding": self.cfg.sharding})  # the model is what was saved
        try:
            self._build()
            state = {"model": self.model.state_dict()}
            dcp.load(state, checkpoint_id=str(path))
            self.model.load_state_dict(state["model"])
        except BaseException:
            self.cfg, self.model = requested, None
            raise
        # Optimizer state, the dense (Adam) part and the fused embedding part separately: some resharding
        # moves cannot carry the latter (row-wise Adagrad state of column shards).
        for part, opt in (("dense", self.dense_opt), ("embedding", self.model.fused_optimizer)):
            try:
                ostate = {"optim": opt.state_dict()}
                dcp.load(ostate, checkpoint_id=str(path))
                opt.load_state_dict(ostate["optim"])
            except (Exception, CheckpointException) as e:  # the weights are loaded and valid either way
                log.warning("%s optimizer state not restored under the new sharding; it restarts: %s", part,
                            str(e).strip().splitlines()[-1][:300])
        return meta

    # ------------------------------------------------------------------------------------ loop

    def fit(self, batches: Iterable[Batch | list[TrainingExample]] | None, *, on_durable=None,
            stop: Callable[[], bool] | None = None, progress_s: float = 10.0, prefetch: int = 2) -> dict:
        """Train on every batch, checkpointing on cadence and at the end; returns the overall metrics.

        ``batches`` is read on rank 0 only (other ranks may pass None), ``prefetch`` batches ahead in a thread
        so that fetching and decoding overlap the step; rank 0 decides and broadcasts every step.
        """
        it = iter(batches) if self.rank == 0 and batches is not None else iter(())
        if self.world == 1 and prefetch > 0:  # featurized in the prefetch thread too, beside the step
            self._source, self._told_source = batches, False
            it = map(self._featurize_ahead, it)
        source = _Prefetch(it, prefetch)
        try:
            self._loop(source, on_durable, stop, progress_s)
        finally:
            source.close()  # the reader thread stops before the caller closes the Kafka consumer
            gc.unfreeze()
        unsaved = [self._unsaved]
        if self.world > 1:
            dist.broadcast_object_list(unsaved, src=0)
        if unsaved[0]:
            self.checkpoint(on_durable)
        return self.metrics.overall()

    def _featurize_ahead(self, batch):
        """``batch`` with its features, once the model (and so the featurizer's config) exists; in the prefetch
        thread (at world size > 1 each rank featurizes its own share after the split). A source that can
        featurize beside the step (the Kafka adapter's decoder process: ``featurize_with``) is told the config."""
        if self.featurizer is not None and not self._told_source:
            self._told_source = True
            tell = getattr(self._source, "featurize_with", None)
            if tell is not None:
                tell(self.cfg)
        if isinstance(batch, Batch) and batch.features is None and self.featurizer is not None and len(batch.examples):
            with self._featurizing:
                batch.features = self.featurizer(batch.examples, count=False)
        return batch

    def _loop(self, source: Iterator, on_durable, stop, progress_s: float) -> None:
        t0 = last = time.monotonic()
        n0 = self.examples
        frozen = False
        while True:
            if not frozen and self.model is not None:
                # The long-lived heap (torch, TorchRec, the model) out of the collector's sight: a full collection
                # scanned it about every 1.5 s of streaming, pausing the loop ~0.25 s (measured; frozen: ~0.02 s).
                gc.freeze()
                frozen = True
            if self.rank == 0:
                batch = next(source, None)
                ending = batch is None or (stop is not None and stop())
                if batch is not None:
                    batch = self.admit(batch)
            if self.world == 1:
                share, ending = batch, ending
                if share is not None:
                    self.train_batch(share, admitted=True)
                due = self.checkpoint_due()
            else:
                # One collective per step: this rank's share, whether to stop, and whether the previous step
                # was due for a checkpoint (rank 0's clock decides for all ranks).
                out = [None]
                ins = self._split(batch, ending, self.checkpoint_due()) if self.rank == 0 else None
                dist.scatter_object_list(out, ins, src=0)
                share, ending, due_before = out[0]
                if due_before:
                    self.checkpoint(on_durable)
                if share is not None:
                    if self.rank == 0:
                        share._keys, share._dups, share._global = batch._keys, batch._dups, batch
                    self.train_batch(share, admitted=True)
                due = False
            if due:
                self.checkpoint(on_durable)
            now = time.monotonic()
            if now - last >= progress_s and self.rank == 0:
                o = self.metrics.overall()
                log.info("step %d: %d examples, %.0f ex/s, progressive AUC %s, NE %s, logloss %s", self.step,
                         self.examples, (self.examples - n0) / (now - t0), _fmt(o["auc"]), _fmt(o["ne"]),
                         _fmt(o["logloss"]))
                last = now
            if ending:
                break

    def _split(self, batch: Batch | None, ending: bool, due: bool) -> list[tuple[Batch | None, bool, bool]]:
        """Rank 0: per rank (equal share of the global batch, zero-weight padded; ending; checkpoint first)."""
        if batch is None:
            return [(None, ending, due)] * self.world
        exs, n = batch.examples, self.world
        size = -(-len(exs) // n)
        out = []
        for r in range(n):
            mine = exs[r * size:(r + 1) * size]
            pad = size - len(mine)
            share = Batch(mine + [exs[0]] * pad if exs else [], batch.offsets, None, [1.0] * len(mine) + [0.0] * pad)
            share.n_global = len(exs)
            out.append((share, ending, due))
        return out


class _Prefetch:
    """Iterate ``it`` in a daemon thread, at most ``depth`` items ahead; its exceptions re-raise in ``next``.

    ``close()`` stops the thread (at its next item) and waits for it, so the caller may then close what the
    iterator reads from."""

    _DONE = object()

    def __init__(self, it: Iterator, depth: int):
        self.it, self.q = it, queue.Queue(maxsize=max(1, depth))
        self.stopping = threading.Event()
        self.thread = None
        self._interval = None
        if depth > 0:  # 0: no thread, the caller's thread reads
            # The step's torch calls drop and retake the GIL hundreds of times per batch; at the default 5 ms
            # switch interval each retake can wait that long for this thread's Python work (measured: the step
            # at 1/3 of its speed). A short interval while the thread runs keeps the two overlapping.
            self._interval = sys.getswitchinterval()
            sys.setswitchinterval(min(self._interval, SWITCH_INTERVAL_S))
            self.thread = threading.Thread(target=self._run, name="dlrm-prefetch", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            for x in self.it:
                while not self.stopping.is_set():
                    try:
                        self.q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stopping.is_set():
                    break
            self.q.put(self._DONE)
        except BaseException as e:  # noqa: BLE001
            self.q.put(e)
        finally:
            close = getattr(self.it, "close", None)
            if close is not None:
                close()

    def __iter__(self):
        return self

    def __next__(self):
        if self.thread is None:
            return next(self.it)
        x = self.q.get()
        if x is self._DONE:
            self.q.put(x)
            raise StopIteration
        if isinstance(x, BaseException):
            raise x
        return x

    def close(self) -> None:
        self.stopping.set()
        if self.thread is None:
            close = getattr(self.it, "close", None)
            if close is not None:
                close()
            return
        while self.thread.is_alive():  # drain, so a blocked put returns and the thread sees the flag
            try:
                self.q.get(timeout=0.1)
            except queue.Empty:
                pass
        if self._interval is not None:
            sys.setswitchinterval(self._interval)
            self._interval = None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def train(cfg: DLRMConfig, batches: Iterable[Batch | list[TrainingExample]], checkpoint_dir: str | Path | None = None,
          **kwargs) -> Trainer:
    """Train on an iterable of batches (resuming from ``checkpoint_dir`` if it holds one); returns the trainer."""
    fit_keys = {"on_durable", "stop", "progress_s", "prefetch"}
    trainer = Trainer(cfg, checkpoint_dir, **{k: v for k, v in kwargs.items() if k not in fit_keys})
    trainer.fit(batches, **{k: v for k, v in kwargs.items() if k in fit_keys})
    return trainer


def _demo(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node 2 -m trainers.dlrm.train --demo DIR``: a few synthetic batches per rank."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--demo", required=True, metavar="DIR")
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--features", default="lum", choices=["baseline", "lum"])
    p.add_argument("--sharding", default="table_wise", choices=["table_wise", "column_wise"])
    p.add_argument("--ids", default="hash", choices=["hash", "mch"])
    args = p.parse_args(argv)
    from schemas.logs import setup_logging

    setup_logging("INFO")
    from .synthetic import synthetic_examples

    rank, world = ensure_process_group()
    exs = synthetic_examples(args.batches * args.batch_size * world, seed=1)
    step = args.batch_size * world  # rank 0 reads global batches; fit scatters equal shares to every rank
    batches = [exs[i:i + step] for i in range(0, len(exs), step)] if rank == 0 else None
    small = {"user": 256, "item": 512, "category": 64, "scenario": 16, "position": 64}  # mch: evictions happen
    cfg = DLRMConfig.preset("debug", features=args.features, sharding=args.sharding, ids=args.ids,
                            **({"mch_eviction_interval": 2, "table_rows": small} if args.ids == "mch" else {}))
    trainer = train(cfg, batches, args.demo, every_batches=max(1, args.batches // 2))
    if rank == 0:
        print(json.dumps({"world_size": world, "step": trainer.step, "examples": trainer.examples,
                          "overall": trainer.metrics.overall()}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(_demo())
