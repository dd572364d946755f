"""Incremental DLRM training on a stream of TrainingExample mini-batches, with progressive validation and
checkpoints that hold everything needed to resume (config, model, optimizers, step, metrics, offsets).

    from trainers.dlrm.train import train, Batch
    train(cfg, batches, checkpoint_dir="ckpt/lum")      # batches: iterable of Batch or list[TrainingExample]
    torchrun --nproc-per-node 2 -m trainers.dlrm.train --demo DIR   # DMP over 2 CPU processes (gloo)

The Kafka adapter (``kafka_source``) is one source of batches; ``lum train`` wires the two together.

Progressive validation: each batch is scored by the model *before* it trains on that batch. The training
forward pass already does exactly that (the fused embedding optimizer and Adam update only after the
forward), so its predictions feed the metrics; no second forward is needed.

Checkpoint protocol (``DIR``):
  1. append the metrics rows since the last checkpoint to ``DIR/metrics.jsonl`` (readers keep the last row
     per window, so rows rewritten after a rollback supersede the lost ones);
  2. save model + optimizers with torch.distributed.checkpoint into ``DIR/ckpt-<step>/``, then
     ``meta.json`` (config, step, examples, offsets, metrics state, trained-id log length);
  3. atomically replace ``DIR/LATEST`` (write, fsync, rename, fsync dir): only now is the checkpoint durable;
  4. call ``on_durable(offsets)``: the Kafka adapter commits the offsets the checkpoint covers.
On start, ``LATEST`` (if any) is loaded: training resumes from its state and offsets, so examples after it
are trained again exactly once and none before it are. With ``record_example_ids`` each rank appends the
ids it trained to ``DIR/trained_ids-rank<r>.log``; the checkpoint records the log's length and a restart
truncates it there, so the log always lists exactly the examples inside the durable model state.

World size > 1 (torchrun): every rank trains its own share of each step (equal batch sizes: the sharded
embedding all-to-all needs them), checkpoints on the batch cadence only (ranks must agree), and the metrics
log holds rank 0's share. ``lum train`` reads Kafka at world size 1.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from schemas.events import TrainingExample

from .features import Featurizer, resolve_lum_dims
from .metrics import StreamingMetrics
from .model import TABLES, DLRMConfig, build_model

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


@dataclass
class Batch:
    examples: list[TrainingExample]
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset once this batch is trained


def ensure_process_group() -> tuple[int, int]:
    """(rank, world size). Under torchrun the env:// group; otherwise a private single-process gloo group."""
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group("gloo")
        else:  # a file store: no port to pick or race for
            store = tempfile.NamedTemporaryFile(prefix="lum-dlrm-pg-", delete=False).name
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def _fsync_write(path: Path, data: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    latest = Path(checkpoint_dir) / "LATEST"
    return Path(checkpoint_dir) / latest.read_text().strip() if latest.exists() else None


def read_meta(checkpoint_dir: str | Path) -> dict | None:
    path = latest_checkpoint(checkpoint_dir)
    return json.loads((path / "meta.json").read_text()) if path else None


class Trainer:
    """DMP-wrapped DLRM + optimizers + featurizer + metrics; built lazily when LUM sizes come from data."""

    def __init__(self, cfg: DLRMConfig, checkpoint_dir: str | Path | None = None, *, window_ms: int = 3_600_000,
                 every_batches: int = 50, every_s: float = 60.0, record_example_ids: bool = False, keep: int = 2):
        self.rank, self.world = ensure_process_group()
        self.cfg, self.dir = cfg, Path(checkpoint_dir) if checkpoint_dir else None
        self.every_batches, self.every_s, self.keep = every_batches, every_s, keep
        self.record_ids = record_example_ids and self.dir is not None
        self.model = self.opt = self.featurizer = None
        self.step = self.examples = 0
        self.offsets: dict[int, int] = {}
        self.metrics = StreamingMetrics(window_ms)
        self._pending_ids: list[str] = []
        self._since_ckpt, self._last_ckpt_t, self._unsaved = 0, time.monotonic(), False
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if latest_checkpoint(self.dir):
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
        model = build_model(cfg, device="meta")  # tables materialize sharded inside DMP
        emb_opt = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
        apply_optimizer_in_backward(emb_opt[cfg.embedding_optimizer], model.sparse_arch.parameters(),
                                    {"lr": cfg.sparse_lr})  # fused into the embedding kernels by DMP
        # Column-wise only splits with min_partition below the table's dim.
        extra = {"min_partition": max(1, cfg.embedding_dim // 2)} if cfg.sharding == "column_wise" else {}
        constraints = {f"t_{t}": ParameterConstraints(sharding_types=[cfg.sharding], **extra) for t in TABLES}
        sharders = [EmbeddingBagCollectionSharder()]
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=self.world, compute_device="cpu"),
                                           constraints=constraints)
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        self.model = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
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

    def train_batch(self, batch: Batch | list[TrainingExample]) -> float | None:
        """One progressive-validation + training step; returns the loss (None for an empty batch)."""
        if not isinstance(batch, Batch):
            batch = Batch(list(batch))
        if any(self.offsets.get(p) != o for p, o in batch.offsets.items()):
            self.offsets.update(batch.offsets)
            self._unsaved = True
        if not batch.examples:  # e.g. every message was dead-lettered: only the offsets move
            return None
        self.ensure_model(batch.examples)
        fb = self.featurizer(batch.examples)
        self.model.train()
        logits = self.model(fb.dense, fb.sparse).squeeze(-1)  # (B,): scored before this batch's update
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, fb.labels)
        self.opt.zero_grad()
        loss.backward()  # the fused embedding optimizer updates the tables here
        self.opt.step()
        self.metrics.update(torch.sigmoid(logits.detach()).numpy(), fb.labels.numpy(), fb.event_time_ms)
        self.step += 1
        self.examples += len(fb)
        self._since_ckpt += 1
        self._unsaved = True
        if self.record_ids:
            self._pending_ids.extend(fb.example_ids)
        return float(loss.detach())

    def checkpoint_due(self) -> bool:
        if self._since_ckpt >= self.every_batches:
            return True
        # Time-based cadence only at world size 1: ranks could disagree on the clock and deadlock in save.
        return self.world == 1 and self._unsaved and time.monotonic() - self._last_ckpt_t >= self.every_s

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
        if self.rank == 0:
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
            meta = {"format": CHECKPOINT_FORMAT, "config": self.cfg.model_dump(), "step": self.step,
                    "examples": self.examples, "offsets": {str(p): o for p, o in self.offsets.items()},
                    "world_size": self.world, "metrics": self.metrics.state(), "ids_log_bytes": all_ids_bytes,
                    "saved_at_ms": int(time.time() * 1000)}
            _fsync_write(path / "meta.json", json.dumps(meta))
            _fsync_write(self.dir / "LATEST", name)  # the checkpoint is durable from here on
            self._prune(keep=name)
        dist.barrier()
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
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        path = latest_checkpoint(self.dir)
        meta = json.loads((path / "meta.json").read_text())
        saved = DLRMConfig(**meta["config"])
        if saved.features != self.cfg.features:
            raise SystemExit(f"{self.dir} holds a features={saved.features} model; asked for {self.cfg.features}")
        if saved.sharding != self.cfg.sharding or meta["world_size"] != self.world:
            log.info("resharding checkpoint: %s x%d -> %s x%d", saved.sharding, meta["world_size"],
                     self.cfg.sharding, self.world)
        self.cfg = saved.model_copy(update={"sharding": self.cfg.sharding})  # the model is what was saved
        self._build()
        state = {"model": self.model.state_dict()}
        dcp.load(state, checkpoint_id=str(path))
        self.model.load_state_dict(state["model"])
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
        self.step, self.examples = meta["step"], meta["examples"]
        self.offsets = {int(p): o for p, o in meta["offsets"].items()}
        self.metrics = StreamingMetrics.from_state(meta["metrics"])
        if self.record_ids:
            sizes = meta["ids_log_bytes"]
            size = sizes[self.rank] if self.world == len(sizes) else 0
            log_path = self._ids_log()
            with open(log_path, "a") as f:  # drop ids trained after the checkpoint: they are trained again
                f.truncate(size)
        log.info("resumed from %s: step %d, %d examples, offsets %s", path.name, self.step, self.examples,
                 self.offsets)

    # ------------------------------------------------------------------------------------ loop

    def fit(self, batches: Iterable[Batch | list[TrainingExample]], *, on_durable=None,
            stop: Callable[[], bool] | None = None, progress_s: float = 10.0) -> dict:
        """Train on every batch, checkpointing on cadence and at the end; returns the overall metrics."""
        t0 = last = time.monotonic()
        n0 = self.examples
        for batch in batches:
            self.train_batch(batch)
            if self.checkpoint_due():
                self.checkpoint(on_durable)
            now = time.monotonic()
            if now - last >= progress_s:
                o = self.metrics.overall()
                log.info("step %d: %d examples, %.0f ex/s, progressive AUC %s, logloss %s", self.step,
                         self.examples, (self.examples - n0) / (now - t0), _fmt(o["auc"]), _fmt(o["logloss"]))
                last = now
            if stop is not None and stop():
                break
        if self._unsaved:
            self.checkpoint(on_durable)
        return self.metrics.overall()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def train(cfg: DLRMConfig, batches: Iterable[Batch | list[TrainingExample]], checkpoint_dir: str | Path | None = None,
          **kwargs) -> Trainer:
    """Train on an iterable of batches (resuming from ``checkpoint_dir`` if it holds one); returns the trainer."""
    fit_keys = {"on_durable", "stop", "progress_s"}
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
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .synthetic import synthetic_examples

    rank, world = ensure_process_group()
    exs = synthetic_examples(args.batches * args.batch_size * world, seed=1)
    mine = exs[rank::world]  # a disjoint share per rank, equal batch sizes
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    cfg = DLRMConfig.preset("debug", features=args.features, sharding=args.sharding)
    trainer = train(cfg, batches, args.demo, every_batches=max(1, args.batches // 2))
    if rank == 0:
        print(json.dumps({"world_size": world, "step": trainer.step, "examples": trainer.examples,
                          "overall": trainer.metrics.overall()}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(_demo())
