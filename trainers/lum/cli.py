"""``lum pretrain`` and ``lum refresh`` (registered by ``deploy.cli``).

    lum pretrain --source movielens:../shared/data/ml-100k --out runs/lum     # preset sized to the data
    lum pretrain --preset small --source kafka --out runs/lum
    lum pretrain --source kafka --out runs/lum --resume --max-steps 2000
    lum refresh --checkpoint runs/lum --once
    lum refresh --checkpoint runs/lum --every 10
    lum pretrain --nproc 2 ...    # = torchrun --standalone --nproc-per-node 2 .venv/bin/lum pretrain ...
    LUM_PRETRAIN_PARALLEL=fsdp lum pretrain --nproc 2 ...   # FSDP2 instead of DDP (auto: FSDP for base/large on GPU)
    lum refresh --nproc 2 ...     # users split across ranks, same output as one process
"""

from __future__ import annotations

import argparse


def register(sub, common) -> None:
    p = sub.add_parser("pretrain", parents=[common], help="pre-train the Large User Model (next-condition-item)")
    p.add_argument("--preset", default=None, help="model preset: debug, small, base, large "
                                                 "(default: auto, sized to the data; the choice is printed)")
    p.add_argument("--source", required=True, help="kafka | movielens:PATH | taobao:PATH | amazon:PATH")
    p.add_argument("--nproc", type=int, default=None, help="processes: re-run under torchrun with N ranks "
                                                                 "(DDP or FSDP: $LUM_PRETRAIN_PARALLEL)")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default $LUM_PRETRAIN_MAX_STEPS)")
    p.add_argument("--exclude-seen", action="store_true", default=None,
                   help="evaluation: rank only items the user has not had (data without repeats, e.g. ratings)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out (its config, optimizer and step)")
    p.set_defaults(handler=_pretrain)

    p = sub.add_parser("refresh", parents=[common], help="publish LUM features of changed users and item embeddings")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (the newest checkpoint is used)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--once", action="store_true", help="one run, then exit (default)")
    g.add_argument("--every", type=float, metavar="MINUTES", help="repeat every MINUTES")
    p.add_argument("--nproc", type=int, default=None, help="processes: re-run under torchrun, users split across ranks")
    p.set_defaults(handler=_refresh)


def _pretrain(args: argparse.Namespace) -> int:
    from schemas.settings import load
    from trainers.launch import relaunch_under_torchrun, shutdown

    from .pretrain import PretrainSettings, run

    relaunch_under_torchrun(args.nproc)
    settings = load(PretrainSettings, exclude_seen=args.exclude_seen)
    try:
        run(args.preset, args.source, args.out, args.max_steps, settings, resume=args.resume)
    finally:
        shutdown()
    return 0


def _refresh(args: argparse.Namespace) -> int:
    from schemas.settings import KafkaSettings, load
    from trainers.launch import relaunch_under_torchrun

    from .refresh import RefreshSettings, run

    relaunch_under_torchrun(args.nproc)
    return run(args.checkpoint, args.once, args.every, load(KafkaSettings), load(RefreshSettings))
