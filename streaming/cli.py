"""Operator commands of the streaming side: ``lum broker``, ``lum topics``, ``lum produce``.

    lum broker [--port 9092] [--storage memory://tansu/ | s3://BUCKET/]
    lum topics create|list|describe
    lum produce synthetic [--users U] [--items I] [--events N] [--rate R] [--seed S] [--skip N]
    lum produce movielens PATH [--speedup X]
    lum produce taobao PATH [--speedup X]
    lum produce amazon PATH [--meta META_FILE] [--speedup X]
"""

from __future__ import annotations

import argparse
import json


def register(sub, common) -> None:
    p = sub.add_parser("broker", parents=[common], help="run the embedded Kafka-compatible broker (Tansu)")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--storage", default="memory://tansu/",
                   help="memory://tansu/ (lost on stop) or s3://BUCKET/ (survives restarts; AWS_* variables: "
                        "AWS_ENDPOINT, AWS_ALLOW_HTTP, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)")
    p.set_defaults(handler=_broker)

    p = sub.add_parser("topics", parents=[common], help="create, list or describe lum-stream's topics")
    p.add_argument("action", choices=["create", "list", "describe"])
    p.add_argument("--partitions", type=int, help="override the registry's partition count (create)")
    p.add_argument("--replication", type=int, default=1, help="replication factor (create)")
    p.set_defaults(handler=_topics)

    p = sub.add_parser("produce", parents=[common], help="stream events into the behaviors/impressions topics")
    src = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    s = src.add_parser("synthetic", parents=[common], help="seeded generator with real structure (interests by condition, drift)")
    s.add_argument("--users", type=int, default=1000)
    s.add_argument("--items", type=int, default=5000)
    s.add_argument("--categories", type=int, default=50)
    s.add_argument("--events", type=int, default=100_000, help="behavior + impression events to produce")
    s.add_argument("--rate", type=float, default=0, help="events/s (0: as fast as possible)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--skip", type=int, default=0,
                   help="continue a stream: generate and drop its first N events (same seed, same world)")
    s.add_argument("--duplicate-rate", type=float, default=0.0, help="share of behaviors sent twice (producer retries)")
    s.set_defaults(handler=_produce)
    for name, what in (("movielens", "MovieLens (100K u.data, 1M ratings.dat, 20M/25M/latest ratings.csv)"),
                       ("taobao", "Taobao UserBehavior.csv"),
                       ("amazon", "Amazon reviews (2014/2018/2023 JSON lines or ratings CSV; a folder may add meta_*)")):
        s = src.add_parser(name, parents=[common], help=f"replay {what} in event-time order")
        s.add_argument("path", help="folder (MovieLens) or file/folder (Taobao, Amazon)")
        s.add_argument("--speedup", type=float, default=0, help="event-time speed-up factor (0: as fast as possible)")
        s.add_argument("--limit", type=int, default=0, help="stop after N events (0: all)")
        s.add_argument("--impressions", action="store_true",
                       help="also derive impressions and clicks (positive: rating >= 4 / later cart, fav or buy)")
        if name == "amazon":
            s.add_argument("--meta", help="metadata JSON lines (asin or parent_asin -> categories / category / "
                                          "main_cat / main_category; plain or .gz): the items' categories "
                                          "(default: a meta_* file in the PATH folder)")
        s.set_defaults(handler=_produce)


def _settings():
    from schemas.settings import KafkaSettings, load

    return load(KafkaSettings)


def _broker(args: argparse.Namespace) -> int:
    from .broker import run

    if not args.storage.startswith(("memory://", "s3://")):
        raise SystemExit(f"--storage {args.storage}: this broker build has memory:// and s3:// storage only")
    return run(args.port, args.storage)


def _topics(args: argparse.Namespace) -> int:
    from .kafka import admin

    settings = _settings()
    if args.action == "create":
        for name, state in admin.create_topics(settings, replication=args.replication, partitions=args.partitions).items():
            print(f"{state:8s} {name}")
    elif args.action == "list":
        for name, parts, known in admin.list_topics(settings):
            print(f"{name:40s} partitions={parts:<3d} {'' if known else '(not in registry)'}")
    else:
        print(json.dumps(admin.describe(settings), indent=2, default=str))
    return 0


def _produce(args: argparse.Namespace) -> int:
    from . import producers

    return producers.main(args, _settings())
