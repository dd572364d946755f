"""``lum train`` and ``lum report``: the DLRM trainer on the ``training-examples`` stream, and its comparison.

    lum train --features baseline --checkpoint-dir ckpt/baseline --until-caught-up   # hourly job
    lum train --features lum --checkpoint-dir ckpt/lum                              # runs continuously
    lum train --nproc 2 --features lum --checkpoint-dir ckpt/lum                    # = torchrun, 2 ranks (DMP)
    torchrun --standalone --nproc-per-node 2 .venv/bin/lum train --features lum --checkpoint-dir ckpt/lum
    lum report ckpt/baseline ckpt/lum --out report.png                             # table + AUC plot

Settings (environment, prefix ``LUM_DLRM_``; flags override): see ``DLRMSettings``. The consumer group is
``<group_prefix>-<features>``, so baseline and LUM trainers read the same stream independently.
SIGTERM/SIGINT stop after the current batch with a final checkpoint and offset commit.
Under torchrun rank 0 alone reads Kafka and scatters equal shares of each batch to every rank (lockstep); the
checkpoint holds its offsets, so killing any rank and restarting trains every example exactly once.
"""

from __future__ import annotations

import argparse
import json
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class DLRMSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LUM_DLRM_", extra="ignore")

    preset: Literal["debug", "base"] = Field("base", description="model size preset (trainers.dlrm.model)")
    group_prefix: str = Field("lum-dlrm", description="consumer group prefix; the group is <prefix>-<features>")
    batch_size: int = Field(512, ge=1, description="examples per mini-batch and rank")
    checkpoint_every_batches: int = Field(200, ge=1, description="checkpoint after this many batches")
    checkpoint_every_s: float = Field(60.0, gt=0, description="... or after this many seconds")
    window_minutes: int = Field(60, ge=1, description="event-time window of the progressive metrics")
    max_wait_s: float = Field(1.0, gt=0, description="longest wait to fill a batch before training a partial one")
    idle_timeout_s: float = Field(10.0, gt=0, description="--until-caught-up: stop after this long without data")
    lum_conditions: Annotated[list[str] | None, NoDecode] = Field(
        None, description="LUM conditions, ';'-separated like LUM_REFRESH_CONDITIONS; default: the first example's")
    lum_dim: int | None = Field(None, ge=1, description="LUM vector size; default: first example's")
    lum_inputs: Literal["full", "match"] = Field("full", description="--features lum: 'full' (vectors, similarities, "
                                                 "flags) or 'match' (similarities and flags only: few dense inputs)")
    lum_contrast: bool = Field(False, description="--features lum: also each condition's contrast with the others "
                               "(sqrt(D) cos(u_c - mean, item)); helped ML-100K's 'match' inputs, cost the synthetic "
                               "demo and the Taobao sample: validate it on your data")
    sharding: Literal["table_wise", "column_wise"] = Field("table_wise", description="embedding table sharding")
    record_example_ids: bool = Field(False, description="log trained example ids per checkpoint (audits, tests)")
    dedup_horizon: int = Field(1_000_000, ge=1, description="re-delivered examples are dropped if their first "
                               "copy is among this many last trained examples (8 bytes each, in the checkpoint)")
    ids: Literal["hash", "mch"] = Field("hash", description="id -> embedding row: 'hash' (rows shared) or 'mch' "
                                        "(TorchRec managed collisions: an admitted id owns its row)")
    mch_eviction: Literal["lru", "lfu"] = Field("lru", description="mch: which id gives its row up when a table is full")
    mch_eviction_interval: int = Field(10, ge=1, description="mch: steps between admissions of new ids (they share "
                                       "one residual row until then)")
    prefetch: int = Field(4, ge=0, description="batches read, decoded and featurized ahead of the step in a thread (0: none)")
    decoder_process: bool | None = Field(None, description="decode and featurize fetched messages in a child "
                                         "process, beside the step (false: in the reading thread, where they take "
                                         "turns with the step; default: a process where 2 or more CPUs are "
                                         "available)")
    threads: int = Field(1, ge=1, description="torch intra-op threads; 1 avoids OpenMP spin-wait stalls on shared cores")


    @field_validator("lum_conditions", mode="before")
    @classmethod
    def _split(cls, v):
        return [c.strip() for c in v.split(";") if c.strip()] or None if isinstance(v, str) else v


def register(sub, common) -> None:
    p = sub.add_parser("train", parents=[common], help="train the DLRM incrementally on training-examples")
    p.add_argument("--features", required=True, choices=["baseline", "lum"], help="without or with LUM inputs")
    p.add_argument("--checkpoint-dir", required=True, help="checkpoints and metrics.jsonl (resumes from it)")
    p.add_argument("--until-caught-up", action="store_true", help="stop at the end of the topic as at start")
    p.add_argument("--preset", choices=["debug", "base"], help="override LUM_DLRM_PRESET")
    p.add_argument("--batch-size", type=int, help="override LUM_DLRM_BATCH_SIZE")
    p.add_argument("--nproc", type=int, help="processes: re-executes under torchrun --standalone --nproc-per-node N")
    p.set_defaults(handler=_train)

    p = sub.add_parser("report", parents=[common], help="compare trainers' progressive metrics: table + PNG")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="checkpoint dirs (each holds metrics.jsonl)")
    p.add_argument("--out", default="lum-report.png", help="PNG path (a .md table is written beside it)")
    p.set_defaults(handler=_report)


def _train(args: argparse.Namespace) -> int:
    import logging
    import signal

    from schemas import metrics
    from schemas.settings import KafkaSettings, load
    from trainers.launch import relaunch_under_torchrun

    relaunch_under_torchrun(args.nproc)
    import torch

    from .kafka_source import KafkaExamples
    from .model import DLRMConfig
    from .train import Trainer

    s = load(DLRMSettings, preset=args.preset, batch_size=args.batch_size)
    kafka = load(KafkaSettings)
    torch.set_num_threads(s.threads)  # measured: 512-example step 12-15 ms at 1 thread, 18-370 ms at 2 (shared)
    stopping = []

    def _stop(signum, _frame):
        logging.getLogger(__name__).info("signal %d: stopping after this batch", signum)
        stopping.append(signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    cfg = DLRMConfig.preset(s.preset, features=args.features, lum_conditions=s.lum_conditions, lum_dim=s.lum_dim,
                            lum_inputs=s.lum_inputs, lum_contrast=s.lum_contrast, sharding=s.sharding, ids=s.ids, mch_eviction=s.mch_eviction,
                            mch_eviction_interval=s.mch_eviction_interval)
    trainer = Trainer(cfg, args.checkpoint_dir, window_ms=s.window_minutes * 60_000,
                      every_batches=s.checkpoint_every_batches, every_s=s.checkpoint_every_s,
                      record_example_ids=s.record_example_ids, dedup_horizon=s.dedup_horizon)
    metrics.serve(offset=trainer.rank)  # LUM_METRICS_PORT + rank (0: off)
    source = None
    if trainer.rank == 0:  # one reader feeds every rank (Trainer.fit scatters equal shares)
        source = KafkaExamples(kafka, f"{s.group_prefix}-{args.features}", s.batch_size * trainer.world,
                               start_offsets=trainer.offsets, until_caught_up=args.until_caught_up,
                               max_wait_s=s.max_wait_s, idle_timeout_s=s.idle_timeout_s, stop=lambda: bool(stopping),
                               recorder=trainer.rec, decoder_process=s.decoder_process)
        trainer.on_bad_batch = source.dead_letter_batch
    try:
        overall = trainer.fit(source, on_durable=source.commit if source else None, prefetch=s.prefetch,
                              stop=lambda: bool(stopping))
    finally:
        if source is not None:
            source.close()
    if trainer.rank == 0:
        print(json.dumps({"features": args.features, "world_size": trainer.world, "step": trainer.step,
                          "examples": trainer.examples, "duplicates_dropped": trainer.duplicates,
                          "skipped_batches": trainer.skipped_batches, "dead_letters": source.dead.total,
                          "overall": overall}))
    from trainers.launch import shutdown

    shutdown()
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import report

    print(report(args.dirs, args.out))
    return 0
