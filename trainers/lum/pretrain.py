"""LUM pre-training (Step 1): next-condition-item prediction on packed user sequences, with checkpoints.

    lum pretrain --source movielens:../shared/data/ml-100k --out runs/lum        # preset sized to the data
    lum pretrain --preset small --source kafka --out runs/lum       # reads the user-sequences topic
    lum pretrain --source kafka --out runs/lum --resume --max-steps 2000   # continue the newest checkpoint
    lum pretrain --nproc 2 --source movielens:PATH --out runs/lum  # = torchrun --standalone --nproc-per-node 2 ...

``train(cfg, batches, ...)`` takes any iterable of packed batches (the Kafka reader is only one source).
``run`` holds out each user's last pair (test) and second-to-last (validation), evaluates validation
NDCG@10 every ``eval_every`` steps, stops after ``patience`` evaluations without improvement and keeps the
best weights, both judged on the mean of the last ``smooth_evals`` evaluations (once there are that many; a
run too short for one full window keeps its last weights). Without ``--preset`` it picks
one sized to the data; ``exclude_seen`` defaults to on for data without repeats (ratings); both choices are
printed.
Each checkpoint is a directory ``DIR/step-NNNNNNNN`` holding ``model.pt`` (model + optimizer state),
``items.npz`` (the items it was trained on: the only ones whose vectors mean anything) and ``meta.json``
(config, tokenizer version, step, Kafka offsets and event-time range trained on, model version); ``DIR/latest``
names the newest. Settings: ``LUM_PRETRAIN_*`` (see ``PretrainSettings``). CUDA with bf16 autocast when
present (logits stay fp32). Under torchrun (gloo on CPU, NCCL on GPU), ``LUM_PRETRAIN_PARALLEL`` picks DDP
(replicated model) or FSDP2 (``fully_shard``: each transformer block, then the root holding the embeddings
and the head; blocks keep bf16 parameters with fp32 gradient reduction on CUDA, fp32 on CPU); ``auto`` is FSDP
for the ``base``/``large`` presets on GPU, DDP otherwise. Each rank takes its share of every global batch and
the loss is weighted by each rank's share of the trained positions, so the global batch and the loss do not
depend on the world size. Checkpoints hold plain (unsharded) model and optimizer state in one file, gathered
from the shards under FSDP, so a checkpoint written at any world size loads at any other (or in one process).

    LUM_PRETRAIN_PARALLEL=fsdp lum pretrain --nproc 2 --preset debug --source movielens:PATH --out runs/lum
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.tokenize import TOKENIZER_VERSION

from .model import LumConfig, LumModel, cosine_warmup, describe, lum_loss

log = logging.getLogger(__name__)


class PretrainSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LUM_PRETRAIN_", extra="ignore")

    max_steps: int = Field(3000, ge=1, description="most optimizer steps (early stopping usually ends sooner)")
    eval_every: int = Field(100, ge=0, description="validate every N steps (0: only at the end, no early stopping)")
    patience: int = Field(5, ge=1, description="stop after N validations without a better NDCG@10")
    smooth_evals: int = Field(3, ge=1, description="early stopping and the best weights follow the mean NDCG@10 of "
                                                   "the last N validations, so that one lucky validation on a small "
                                                   "set neither ends training nor is kept; the first N-1 compete with "
                                                   "nothing (1: each one alone)")
    log_every: int = Field(50, ge=1, description="progress line every N steps")
    checkpoint_best: bool = Field(True, description="checkpoint every new best validation (resumable); false: only "
                                                    "the final checkpoint")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoint directories kept")
    seed: int = Field(0, description="model init and batch order")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu' or 'cuda'")
    kafka_idle_timeout_s: float = Field(5.0, gt=0, description="--source kafka: stop reading after this idle time")
    eval_users: int = Field(0, ge=0, description="evaluate on at most N users (0: all)")
    exclude_seen: bool | None = Field(None, description="drop a user's earlier items from the ranking; "
                                                        "default: on when under 1% of pairs repeat an item")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default); 1 where other processes "
                                              "share few cores: 2 contended threads ran ~30x slower than 1 here")
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="under torchrun: 'ddp' (replicated model), 'fsdp' (FSDP2, sharded parameters, "
                            "gradients and optimizer state) or 'auto' (fsdp for the base/large presets on GPU, "
                            "else ddp)")


FSDP_PRESETS = ("base", "large")  # what ``parallel=auto`` shards (on GPU)


def parallel_mode(setting: str, cfg: LumConfig, device: str, world: int, distributed: bool) -> str:
    """'none' (no process group, or DDP at world size 1), 'ddp' or 'fsdp' (FSDP also runs at world size 1:
    the same code path and mixed precision as at N)."""
    if not distributed:
        return "none"
    if setting == "auto":
        setting = "fsdp" if device.startswith("cuda") and cfg.name in FSDP_PRESETS else "ddp"
    if setting not in ("ddp", "fsdp"):
        raise ValueError(f"LUM_PRETRAIN_PARALLEL={setting!r}: expected auto, ddp or fsdp")
    return "none" if setting == "ddp" and world == 1 else setting


def pick_device(name: str = "auto") -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def param_groups(model: LumModel) -> list[list[str]]:
    """Parameter names of the optimizer's groups (with weight decay, without), in its order."""
    named = list(model.named_parameters())
    decay = [n for n, p in named if p.dim() >= 2 and "tokens." not in n]
    kept = set(decay)
    return [decay, [n for n, _ in named if n not in kept]]


def make_optimizer(model: LumModel) -> torch.optim.Optimizer:
    params = dict(model.named_parameters())
    decay, rest = param_groups(model)
    return torch.optim.AdamW([{"params": [params[n] for n in decay], "weight_decay": model.cfg.weight_decay},
                              {"params": [params[n] for n in rest], "weight_decay": 0.0}], lr=model.cfg.lr)


# --- FSDP2 ------------------------------------------------------------------------------------------
# The checkpoint format stays torch's own optimizer ``state_dict`` (parameters numbered in ``param_groups``
# order); torch.distributed.checkpoint's helpers name parameters instead. These two translate.
def optimizer_state_by_name(state: dict, model: LumModel) -> dict:
    names = [n for g in param_groups(model) for n in g]
    ids = [i for g in state["param_groups"] for i in g["params"]]
    if len(ids) != len(names):
        raise ValueError(f"optimizer state holds {len(ids)} parameters, the model has {len(names)}")
    name = dict(zip(ids, names))
    return {"state": {name[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [name[i] for i in g["params"]]} for g in state["param_groups"]]}


def optimizer_state_by_number(state: dict) -> dict:
    number = {n: i for i, n in enumerate(n for g in state["param_groups"] for n in g["params"])}
    # (torch keeps pairs such as AdamW's betas as tuples; the gathered copy holds lists)
    groups = [{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()} | {"params": [number[n] for n in
              g["params"]]} for g in state["param_groups"]]
    return {"state": {number[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def shard(model: LumModel, optimizer: torch.optim.Optimizer | None, device: str
          ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """FSDP2 over the process group: each block, then a root holding the rest (embeddings, final norm, head) and
    computing the loss. Returns (the root, an optimizer over the shards holding ``optimizer``'s state).

    On CUDA the blocks compute with bf16 parameters and reduce gradients in fp32; the root keeps fp32
    parameters (autocast still runs its matmuls in bf16) because the loss's item and user vectors must be fp32,
    exactly as without FSDP. ``model`` is sharded in place and must be plain (not sharded yet).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    saved = optimizer_state_by_name(optimizer.state_dict(), model) if optimizer and optimizer.state else None
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    bf16 = torch.device(device).type == "cuda"
    blocks = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=blocks)
    root = fully_shard(_Loss(model, dist.get_world_size()), mesh=mesh)
    optimizer = make_optimizer(model)
    if saved is not None:  # every rank holds the full state; each keeps its shard
        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    return root, optimizer


_FULL = {"full_state_dict": True, "cpu_offload": True}


def full_model_state(model: LumModel) -> dict:
    """The ``state_dict`` of an FSDP-sharded ``model`` as plain tensors on rank 0's CPU ({} on the other ranks).
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(**_FULL))


def full_optimizer_state(model: LumModel, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer ``state_dict`` (checkpoint format: parameters numbered) of an FSDP-sharded ``model``, on rank
    0's CPU ({} on the other ranks). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**_FULL))
    return optimizer_state_by_number(state) if state else {}


def train(cfg: LumConfig, batches: Iterable, max_steps: int, model: LumModel | None = None,
          optimizer: torch.optim.Optimizer | None = None, step: int = 0, device: str = "cpu",
          log_every: int = 50, on_step: Callable[[int, LumModel, torch.optim.Optimizer], bool | None] | None = None,
          seed: int = 0, parallel: str = "none", losses: list[float] | None = None,
          ) -> tuple[LumModel, torch.optim.Optimizer, int, list[float]]:
    """Run optimizer steps until ``max_steps`` or until ``on_step`` returns True; returns (model, optimizer,
    step, losses: the global batch's loss, equal on every rank).

    ``parallel`` (the process group is up unless 'none'): 'ddp' replicates ``model``; 'fsdp' shards it in
    place (``shard``: ``optimizer``'s state carries over into the returned optimizer over the shards)."""
    import torch.distributed as dist

    if parallel not in ("none", "ddp", "fsdp"):
        raise ValueError(f"parallel={parallel!r}: expected none, ddp or fsdp")
    if model is None:
        torch.manual_seed(seed)
        model = LumModel(cfg)
    device = str(device)
    model.to(device).train()
    world = dist.get_world_size() if parallel != "none" else 1
    if parallel == "fsdp":
        loss_fn, optimizer = shard(model, optimizer, device)
    else:
        optimizer = optimizer or make_optimizer(model)
        loss_fn = _Loss(model, world)
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        loss_fn = DistributedDataParallel(loss_fn, find_unused_parameters=not cfg.use_conditions)
    bf16 = device.startswith("cuda")
    losses = [] if losses is None else losses
    t0, tokens = time.perf_counter(), 0
    # Progress (rank 0): a bar with rate and ETA on a terminal, else a log line every 10 s.
    from contextlib import nullcontext

    from schemas.progress import progress
    from trainers.launch import is_main

    with progress("pretrain", total=max_steps - step, unit="steps") if is_main() else nullcontext() as bar:
        for batch in batches:
            if step >= max_steps:
                break
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * cosine_warmup(step, cfg.warmup_steps, max_steps)
            batch = batch.to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            loss = loss.detach()
            if world > 1:  # each rank's loss is weighted by its share: their mean is the global batch's loss
                dist.all_reduce(loss)
                loss /= world
            losses.append(float(loss))
            tokens += batch.real_tokens
            if step % log_every == 0 or step == max_steps:
                dt = time.perf_counter() - t0
                log.info("step %d/%d loss %.4f (mean of last %d: %.4f) %.0f tokens/s", step, max_steps,
                         losses[-1], min(log_every, len(losses)),
                         sum(losses[-log_every:]) / len(losses[-log_every:]), tokens / dt)
            if bar is not None:
                bar.update(1)
                bar.note(loss=f"{losses[-1]:.4f}")
            if on_step is not None and on_step(step, model, optimizer):
                break
    return model, optimizer, step, losses


class _Loss(torch.nn.Module):
    """The loss as a module, so DDP and FSDP see one forward per step (candidate item vectors included).

    At world size N each rank's mean loss is scaled by N x its share of the global batch's trained positions:
    averaging gradients over ranks then gives exactly the gradient of the global batch's mean loss (ranks'
    rows hold different numbers of targets), the same as one process on the whole batch.
    """

    def __init__(self, model: LumModel, world: int = 1):
        super().__init__()
        self.model, self.world = model, world

    def forward(self, batch) -> torch.Tensor:
        loss = lum_loss(self.model, batch)
        if self.world == 1:
            return loss
        import torch.distributed as dist

        n = batch.target.sum().to(loss.dtype)  # this rank's trained positions (what lum_loss averages)
        total = n.clone()
        dist.all_reduce(total)
        return loss * (n * self.world / total)


# --- Checkpoints ------------------------------------------------------------------------------------
def model_version(model: LumModel, step: int) -> str:
    h = hashlib.blake2b(digest_size=4)
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"{model.cfg.name}-{step}-{h.hexdigest()}"


def vocabulary(seqs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item ids, last category, pair count) of every item in ``seqs``, sorted by id: what a model trained on
    them knows (other items only hit hashed rows shared with trained ones: their vectors mean nothing)."""
    if not seqs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    items = np.concatenate([s.items for s in seqs])
    cats = np.concatenate([s.cats for s in seqs])
    ids, last, counts = np.unique(items[::-1], return_index=True, return_counts=True)
    return ids, cats[::-1][last], counts


def save_checkpoint(out: str | Path, model: LumModel, optimizer: torch.optim.Optimizer | dict | None, step: int,
                    offsets: dict[int, int] | None = None, keep: int = 3, extra: dict | None = None,
                    items: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Path:
    """Write ``DIR/step-N`` atomically. ``model``: plain (unsharded); ``optimizer``: an optimizer over it or its
    ``state_dict`` (``full_optimizer_state`` under FSDP). ``items``: the vocabulary trained on (``vocabulary``);
    ``extra``: more meta, e.g. ``trained_from_ms``/``trained_until_ms`` (event-time range trained on)."""
    out = Path(out)
    d = out / f"step-{step:08d}"
    tmp = out / f".tmp-step-{step:08d}"
    tmp.mkdir(parents=True, exist_ok=True)
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.state_dict()
    torch.save({"model": model.state_dict(), "optimizer": optimizer or None}, tmp / "model.pt")
    if items is not None:
        np.savez(tmp / "items.npz", ids=items[0], cats=items[1], counts=items[2])
    meta = {"config": model.cfg.model_dump(), "tokenizer_version": TOKENIZER_VERSION, "step": step,
            "kafka_offsets": {str(p): o for p, o in (offsets or {}).items()} or None,
            "model_version": model_version(model, step), "saved_at": time.time()} | (extra or {})
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if d.exists():
        import shutil

        shutil.rmtree(d)
    tmp.rename(d)  # a reader never sees a half-written checkpoint
    (out / "latest.tmp").write_text(d.name)
    (out / "latest.tmp").replace(out / "latest")
    for old in sorted(out.glob("step-*"))[:-keep]:
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s (%s)", d, meta["model_version"])
    return d


def newest_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint, else the one ``path/latest`` names, else the highest step."""
    path = Path(path)
    if (path / "meta.json").exists():
        return path
    if (path / "latest").exists():
        return path / (path / "latest").read_text().strip()
    steps = sorted(path.glob("step-*"))
    if not steps:
        raise FileNotFoundError(f"no LUM checkpoint in {path}")
    return steps[-1]


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[LumModel, torch.optim.Optimizer, dict]:
    """Rebuild model and optimizer from the newest checkpoint under ``path``; returns (model, optimizer, meta)."""
    d = newest_checkpoint(path)
    meta = json.loads((d / "meta.json").read_text())
    if meta["tokenizer_version"] > TOKENIZER_VERSION:
        raise ValueError(f"{d}: tokenizer v{meta['tokenizer_version']} is newer than this build's v{TOKENIZER_VERSION}")
    # Checkpoints from before a field existed were trained without it: query tokens (their windows were [c, i]
    # pairs) and item-id dropout (their category-only item vectors mean nothing).
    model = LumModel(LumConfig(**({"query_tokens": False, "item_id_dropout": 0.0} | meta["config"]))).to(device)
    state = torch.load(d / "model.pt", map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer = make_optimizer(model)
    if state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    meta["path"] = str(d)
    return model, optimizer, meta


def load_items(checkpoint: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(item ids, category ids) a checkpoint was trained on, or None for a checkpoint without the list."""
    f = newest_checkpoint(checkpoint) / "items.npz"
    if not f.exists():
        return None
    z = np.load(f)
    return z["ids"], z["cats"]


# --- The job ----------------------------------------------------------------------------------------
def auto_preset(n_pairs: int, cuda: bool) -> str:
    """A preset sized to the data: debug for toy sets, small up to a few million pairs on CPU, base on GPU."""
    if n_pairs < 20_000:
        return "debug"
    if cuda and n_pairs >= 1_000_000:
        return "base"
    return "small"


def fit(cfg: LumConfig, train_seqs, val_seqs, *, max_steps: int, eval_every: int = 100, patience: int = 5,
        smooth_evals: int = 3, exclude_seen: bool = False, catalog=None, seed: int = 0, device: str = "cpu",
        log_every: int = 50, model: LumModel | None = None, optimizer=None, start: int = 0, rank: int = 0,
        world: int = 1, parallel: str = "ddp",
        on_improve: Callable[[int, LumModel, torch.optim.Optimizer | dict, dict], None] | None = None,
        ) -> tuple[LumModel, torch.optim.Optimizer | dict, int, int, list[dict]]:
    """Train with early stopping on validation NDCG@10 (the mean of the last ``smooth_evals`` validations: on
    ML-100K's 943 validation users one validation spiked +0.02 over its neighbours and ended a run at step 900
    with test HR@10 0.18, where its other seeds trained to ~1,300 steps and 0.22).

    Returns (model holding the best weights, optimizer, last step, best step, validation history
    [{step, loss, ndcg@10, hr@10, smoothed_ndcg@10}]). Rank 0 validates and tells the others whether to stop.
    ``parallel``: 'ddp' (at world size > 1) or 'fsdp' (at any world size; needs the process group). Under
    FSDP rank 0 validates a plain copy gathered from the shards; the model returned is that copy holding the
    best weights and the optimizer is the gathered ``state_dict`` of the last step (rank 0; the other ranks get
    their shards and {}): what ``save_checkpoint`` and ``evaluate`` take.
    """
    import copy

    import torch.distributed as dist

    from .data import train_batches
    from .evaluate import evaluate

    mode = "fsdp" if parallel == "fsdp" else ("ddp" if world > 1 else "none")
    fsdp = mode == "fsdp"
    plain = LumModel(cfg).to(device) if fsdp and rank == 0 else None  # rank 0's unsharded copy
    best: dict = {"ndcg": -1.0, "step": start, "state": None}
    history: list[dict] = []
    losses: list[float] = []
    bad = 0

    def unsharded(m: LumModel) -> LumModel:
        """What rank 0 can evaluate and save alone. Under FSDP a collective: every rank calls it."""
        if not fsdp:
            return m
        state = full_model_state(m)
        if rank != 0:
            return m
        plain.load_state_dict(state)
        return plain

    def validate(step: int, m: LumModel, opt) -> bool:
        nonlocal bad
        whole = unsharded(m)
        flags = torch.zeros(2, device=device)  # improved, stop (on the device: NCCL broadcasts device tensors)
        h: dict = {}
        if rank == 0:
            v = evaluate(whole, val_seqs, train_seqs, exclude_seen=exclude_seen, device=device, catalog=catalog)
            tail = losses[-max(1, eval_every):]
            h = {"step": step, "loss": float(np.mean(tail)) if tail else float("nan"), "ndcg@10": v["ndcg@10"],
                 "hr@10": v["hr@10"]}
            history.append(h)
            window = history[-smooth_evals:]
            h["smoothed_ndcg@10"] = score = float(np.mean([x["ndcg@10"] for x in window]))
            # Only full windows compete: a lone first validation that happens to be high would otherwise be
            # kept and end training (ML-100K, 236 users: a LUM stopped at 600 steps keeping step 100's weights).
            if len(window) == smooth_evals:
                if score > best["ndcg"]:
                    best.update(ndcg=score, step=step, state=copy.deepcopy(whole.state_dict()))
                    bad = 0
                    flags[0] = 1
                else:
                    bad += 1
            log.info("validation @%d: loss %.4f ndcg@10 %.4f (mean of the last %d: %.4f) hr@10 %.4f (best %.4f @%d)%s",
                     step, h["loss"], v["ndcg@10"], min(smooth_evals, len(history)), score, v["hr@10"], best["ndcg"],
                     best["step"], " -> stop" if bad >= patience else "")
            flags[1] = float(bad >= patience)
        if world > 1:
            dist.broadcast(flags, 0)
        if flags[0] and on_improve is not None:
            o = full_optimizer_state(m, opt) if fsdp else opt  # every rank gathers; rank 0 saves
            if rank == 0:
                on_improve(step, whole, o, h)
        return bool(flags[1])

    def on_step(step: int, m: LumModel, opt) -> bool:
        return bool(eval_every and val_seqs and step % eval_every == 0 and validate(step, m, opt))

    model, optimizer, step, _ = train(
        cfg, train_batches(train_seqs, cfg, seed + start, rank=rank, world=world), max_steps, model=model,
        optimizer=optimizer, step=start, device=device, log_every=log_every, on_step=on_step, seed=seed,
        parallel=mode, losses=losses)
    if val_seqs and (not eval_every or (step % eval_every and bad < patience)):
        validate(step, model, optimizer)  # the last steps count too
    if fsdp:  # (collectives: the same calls on every rank, whatever rank 0 alone knows about the best step)
        optimizer = full_optimizer_state(model, optimizer)
        model = unsharded(model)
    if best["state"] is not None and rank == 0:
        model.load_state_dict(best["state"])
    if mode == "ddp":  # every rank ends with rank 0's (best) weights
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    return model, optimizer, step, (best["step"] if best["state"] is not None else step), history


def run(preset: str | None, source: str, out: str, max_steps: int | None = None,
        settings: PretrainSettings | None = None, cfg: LumConfig | None = None, resume: bool = False
        ) -> dict[str, float]:
    """Load sequences, train with early stopping on validation, evaluate on test, checkpoint; returns the test
    evaluation (rank 0; other ranks return {}).

    ``preset`` None or "auto": sized to the data (``auto_preset``). ``resume``: continue from the newest
    checkpoint in ``out`` (its config, weights, optimizer and step) up to ``max_steps`` in total.
    """
    from schemas.settings import KafkaSettings, load
    from trainers import launch

    from .data import SOURCES, load_source, repeat_share, split_users
    from .evaluate import catalog_of, evaluate, format_metrics
    from .model import PRESETS

    s = settings or load(PretrainSettings)
    if source.partition(":")[0] not in SOURCES or (source != "kafka" and not source.partition(":")[2]):
        raise SystemExit(f"--source {source!r}: expected kafka, movielens:PATH, taobao:PATH or amazon:PATH")
    if preset not in (None, "auto") and preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of auto, {', '.join(PRESETS)}")
    rank, world, dev = launch.init()
    device = str(dev) if launch.under_torchrun() else pick_device(s.device)
    import torch.distributed as dist

    if s.threads:
        torch.set_num_threads(s.threads)
    steps = max_steps or s.max_steps
    kafka = load(KafkaSettings) if source == "kafka" else None
    t0 = time.perf_counter()
    span: dict = {}
    shared: list = [None]
    if rank == 0:  # one reader: every rank trains on exactly the same sequences (a topic may grow meanwhile)
        shared = [(*load_source(source, kafka, s.kafka_idle_timeout_s, span), span)]
    if world > 1:
        dist.broadcast_object_list(shared, 0)
    seqs, offsets, span = shared[0]
    train_seqs, val_seqs, test_seqs = split_users(seqs)
    catalog = catalog_of(seqs)
    if s.eval_users:
        val_seqs, test_seqs = val_seqs[:s.eval_users], test_seqs[:s.eval_users]
    n_pairs = sum(len(x) for x in seqs)
    rep = repeat_share(seqs)
    exclude_seen = s.exclude_seen if s.exclude_seen is not None else rep < 0.01
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{source}: {len(seqs)} users, {n_pairs} pairs, {len(catalog[0])} items, {rep:.1%} repeated items; "
        f"loaded in {time.perf_counter() - t0:.1f}s")
    torch.manual_seed(s.seed)
    if resume and any(Path(out).glob("step-*")):  # the checkpoint's config, whatever --preset says
        model, opt, meta = load_checkpoint(out, device)
        cfg, start = model.cfg, meta["step"]
        say(f"preset: {cfg.name} (the checkpoint resumed: {meta['path']}, step {start}, {meta['model_version']})")
    else:
        if cfg is None:
            name = preset if preset not in (None, "auto") else auto_preset(n_pairs, device.startswith("cuda"))
            cfg = PRESETS[name]
            if preset in (None, "auto"):
                say(f"preset: {name} (chosen for {n_pairs} pairs; --preset to override)")
        model, opt, start = LumModel(cfg), None, 0
    say(f"exclude_seen: {exclude_seen} ({'set' if s.exclude_seen is not None else 'automatic: '}"
        f"{'' if s.exclude_seen is not None else ('no repeats in the data' if exclude_seen else 'items repeat')})")
    mode = parallel_mode(s.parallel, cfg, device, world, dist.is_initialized())
    log.info("%s on %s, world size %d%s", describe(model), device, world, f", {mode}" if mode != "none" else "")
    items = vocabulary(train_seqs)
    extra = {"source": source, "world_size": world, "parallel": mode, **span}

    def on_improve(step: int, m: LumModel, o, h: dict) -> None:
        save_checkpoint(out, m, o, step, offsets, s.keep_checkpoints, extra=extra | {"validation": h}, items=items)

    model, opt, step, best_step, history = fit(
        cfg, train_seqs, val_seqs, max_steps=steps, eval_every=s.eval_every, patience=s.patience,
        smooth_evals=s.smooth_evals, exclude_seen=exclude_seen, catalog=catalog, seed=s.seed, device=device,
        log_every=s.log_every, model=model, optimizer=opt, start=start, rank=rank, world=world, parallel=mode,
        on_improve=on_improve if s.checkpoint_best else None)
    metrics: dict[str, float] = {}
    if rank == 0:
        metrics = evaluate(model, test_seqs, train_seqs, exclude_seen=exclude_seen, device=device, catalog=catalog)
        save_checkpoint(out, model, opt, step, offsets, s.keep_checkpoints, items=items,
                        extra=extra | {"eval": metrics, "validation_history": history, "best_step": best_step,
                                       "exclude_seen": exclude_seen})
        print(f"final eval @{step} ({cfg.name}, {source}, best validation step {best_step}): "
              f"{format_metrics(metrics)}")
        if history:
            from trainers.plots import plot_validation

            png = plot_validation(history, best_step, Path(out) / "validation.png",
                                  f"lum pretrain ({cfg.name}, {source}): test HR@10 {metrics['hr@10']:.4f}, "
                                  f"NDCG@10 {metrics['ndcg@10']:.4f}")
            print(f"validation curves: {png}")
    launch.barrier()
    return metrics
