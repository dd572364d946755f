"""LUM pre-training (Step 1): next-condition-item prediction on packed user sequences, with checkpoints.

    lum pretrain --preset debug --source movielens:../shared/data/ml-100k --out runs/lum --max-steps 200
    lum pretrain --preset small --source kafka --out runs/lum       # reads the user-sequences topic
    lum pretrain --source kafka --out runs/lum --resume --max-steps 2000   # continue the newest checkpoint

``train(cfg, batches, ...)`` takes any iterable of packed batches (the Kafka reader is only one source).
Each checkpoint is a directory ``DIR/step-NNNNNNNN`` holding ``model.pt`` (model + optimizer state) and
``meta.json`` (config, tokenizer version, step, Kafka offsets covered, model version); ``DIR/latest`` names
the newest. Settings: ``LUM_PRETRAIN_*`` (see ``PretrainSettings``). Uses CUDA with bf16 autocast when present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.tokenize import TOKENIZER_VERSION

from .model import LumConfig, LumModel, cosine_warmup, describe, lum_loss

log = logging.getLogger(__name__)


class PretrainSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LUM_PRETRAIN_", extra="ignore")

    max_steps: int = Field(1000, ge=1, description="optimizer steps to run")
    eval_every: int = Field(500, ge=0, description="evaluate every N steps (0: only at the end)")
    log_every: int = Field(50, ge=1, description="progress line every N steps")
    checkpoint_every: int = Field(1000, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoint directories kept")
    seed: int = Field(0, description="model init and batch order")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu' or 'cuda'")
    kafka_idle_timeout_s: float = Field(5.0, gt=0, description="--source kafka: stop reading after this idle time")
    eval_users: int = Field(0, ge=0, description="evaluate on at most N users (0: all)")
    exclude_seen: bool = Field(False, description="drop a user's earlier items from the ranking (no-repeat data)")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default); 1 where other processes "
                                              "share few cores: 2 contended threads ran ~30x slower than 1 here")


def pick_device(name: str = "auto") -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def make_optimizer(model: LumModel) -> torch.optim.Optimizer:
    cfg = model.cfg
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tokens." not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "tokens." not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)


def train(cfg: LumConfig, batches: Iterable, max_steps: int, model: LumModel | None = None,
          optimizer: torch.optim.Optimizer | None = None, step: int = 0, device: str = "cpu",
          log_every: int = 50, on_step: Callable[[int, LumModel, torch.optim.Optimizer], None] | None = None,
          seed: int = 0) -> tuple[LumModel, torch.optim.Optimizer, int, list[float]]:
    """Run optimizer steps until ``max_steps``; returns (model, optimizer, step, losses)."""
    if model is None:
        torch.manual_seed(seed)
        model = LumModel(cfg)
    model.to(device).train()
    optimizer = optimizer or make_optimizer(model)
    bf16 = device.startswith("cuda")
    losses: list[float] = []
    t0, tokens = time.perf_counter(), 0
    for batch in batches:
        if step >= max_steps:
            break
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * cosine_warmup(step, cfg.warmup_steps, max_steps)
        batch = batch.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = lum_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        tokens += batch.real_tokens
        if step % log_every == 0 or step == max_steps:
            dt = time.perf_counter() - t0
            log.info("step %d/%d loss %.4f (mean of last %d: %.4f) %.0f tokens/s", step, max_steps, losses[-1],
                     min(log_every, len(losses)), sum(losses[-log_every:]) / len(losses[-log_every:]), tokens / dt)
        if on_step is not None:
            on_step(step, model, optimizer)
    return model, optimizer, step, losses


# --- Checkpoints ------------------------------------------------------------------------------------
def model_version(model: LumModel, step: int) -> str:
    h = hashlib.blake2b(digest_size=4)
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"{model.cfg.name}-{step}-{h.hexdigest()}"


def save_checkpoint(out: str | Path, model: LumModel, optimizer: torch.optim.Optimizer | None, step: int,
                    offsets: dict[int, int] | None = None, keep: int = 3, extra: dict | None = None) -> Path:
    out = Path(out)
    d = out / f"step-{step:08d}"
    tmp = out / f".tmp-step-{step:08d}"
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None},
               tmp / "model.pt")
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
    model = LumModel(LumConfig(**meta["config"])).to(device)
    state = torch.load(d / "model.pt", map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer = make_optimizer(model)
    if state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    meta["path"] = str(d)
    return model, optimizer, meta


# --- The job ----------------------------------------------------------------------------------------
def run(preset: str, source: str, out: str, max_steps: int | None = None, settings: PretrainSettings | None = None,
        cfg: LumConfig | None = None, resume: bool = False) -> dict[str, float]:
    """Load sequences, train with periodic evaluation and checkpoints; returns the final evaluation.

    ``resume``: continue from the newest checkpoint in ``out`` (its config, weights, optimizer and step) up to
    ``max_steps`` in total, on the sequences the source holds now.
    """
    from schemas.settings import KafkaSettings, load

    from .data import leave_last_out, load_source, train_batches
    from .evaluate import catalog_of, evaluate, format_metrics
    from .model import PRESETS

    s = settings or load(PretrainSettings)
    if cfg is None:
        if preset not in PRESETS:
            raise SystemExit(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        cfg = PRESETS[preset]
    if source != "kafka" and source.partition(":")[0] not in ("movielens", "taobao"):
        raise SystemExit(f"--source {source!r}: expected kafka, movielens:PATH or taobao:PATH")
    steps = max_steps or s.max_steps
    device = pick_device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    kafka = load(KafkaSettings) if source == "kafka" else None
    t0 = time.perf_counter()
    seqs, offsets = load_source(source, kafka, s.kafka_idle_timeout_s)
    train_seqs, eval_seqs = leave_last_out(seqs)
    catalog = catalog_of(seqs)
    if s.eval_users:
        eval_seqs = eval_seqs[:s.eval_users]
    n_pairs = sum(len(x) for x in seqs)
    log.info("%s: %d users, %d pairs, loaded in %.1fs", source, len(seqs), n_pairs, time.perf_counter() - t0)
    torch.manual_seed(s.seed)
    model, opt, start = LumModel(cfg), None, 0
    if resume and any(Path(out).glob("step-*")):
        model, opt, meta = load_checkpoint(out, device)
        cfg, start = model.cfg, meta["step"]
        log.info("resuming %s from step %d (%s)", meta["path"], start, meta["model_version"])
    log.info("%s on %s", describe(model), device)

    def evaluation(model: LumModel) -> dict[str, float]:
        return evaluate(model, eval_seqs, train_seqs, exclude_seen=s.exclude_seen, device=device, catalog=catalog)

    def on_step(step: int, model: LumModel, opt: torch.optim.Optimizer) -> None:
        if s.eval_every and step % s.eval_every == 0 and step < steps:
            log.info("eval @%d: %s", step, format_metrics(evaluation(model)))
        if s.checkpoint_every and step % s.checkpoint_every == 0 and step < steps:
            save_checkpoint(out, model, opt, step, offsets, s.keep_checkpoints)

    model, opt, step, losses = train(cfg, train_batches(train_seqs, cfg, s.seed + start), steps, model=model,
                                     optimizer=opt, step=start, device=device, log_every=s.log_every,
                                     on_step=on_step, seed=s.seed)
    metrics = evaluation(model)
    save_checkpoint(out, model, opt, step, offsets, s.keep_checkpoints, extra={"eval": metrics, "source": source})
    print(f"final eval @{step} ({cfg.name}, {source}): {format_metrics(metrics)}")
    return metrics
