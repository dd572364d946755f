"""Operator commands for the agents: ``lum agents``, ``lum replay``, ``lum backfill sequences``.

    lum agents [--workers N] [--only sequences|joiner] [--runtime worker|faust]   # Ctrl-C / SIGTERM stops all
    lum replay TOPIC --from TIME --to TIME --into TOPIC|PATH.jsonl|PATH.parquet [--force] [--max-disorder-ms D]
    lum backfill sequences [--from TIME]          # refuses while the sequence agents run
    lum sequences snapshot [--every HOURS]        # fold the deltas into the compacted snapshot (once, or periodically)
    lum sequences stats                           # users, pairs and offsets of the export

Settings: ``LUM_KAFKA_*`` (broker), ``LUM_AGENT_*`` and ``LUM_DATA_DIR`` / ``LUM_JOIN_WINDOW_MS``
(``streaming.agents.settings``). Worker i of ``lum agents`` serves its metrics on ``LUM_METRICS_PORT + i``
when that is set (sequence workers first, then joiner workers; ``schemas.metrics``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger(__name__)
AGENTS = ("sequences", "joiner")


def register(sub, common) -> None:
    p = sub.add_parser("agents", parents=[common], help="run the sequence agent and the joiner (N workers each)")
    p.add_argument("--workers", type=int, default=1, help="worker processes per agent (partitions spread over them)")
    p.add_argument("--only", choices=AGENTS, help="run one agent only")
    p.add_argument("--runtime", choices=("worker", "faust"), default="worker",
                   help="worker: the batch consumer-group worker (fastest); faust: a Faust app per agent")
    p.set_defaults(handler=_agents)

    p = sub.add_parser("replay", parents=[common], help="copy a time range of a topic into a topic or a file")
    p.add_argument("topic", help="source topic (registry name, e.g. behaviors)")
    p.add_argument("--from", dest="from_", required=True, metavar="TIME", help="start (inclusive): ISO-8601 or epoch ms")
    p.add_argument("--to", required=True, metavar="TIME", help="end (exclusive): ISO-8601 or epoch ms")
    p.add_argument("--into", required=True, help="target topic, or a .jsonl / .parquet path")
    p.add_argument("--force", action="store_true", help="overwrite an existing --into file")
    p.add_argument("--max-disorder-ms", type=int, help="stop a partition at the first record this far past --to")
    p.add_argument("--max-future-ms", type=int, default=3600_000,
                   help="largest (event time - ingest time) expected: where reading may start (default 1 h)")
    p.set_defaults(handler=_replay)

    p = sub.add_parser("backfill", parents=[common], help="rebuild derived state from the source topics")
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    s = what.add_parser("sequences", parents=[common], help="rebuild the sequence state and export from behaviors")
    s.add_argument("--from", dest="from_", metavar="TIME", help="only events at or after TIME (default: all)")
    s.add_argument("--max-future-ms", type=int, default=3600_000,
                   help="largest (event time - ingest time) expected: where reading may start (default 1 h)")
    s.set_defaults(handler=_backfill)

    p = sub.add_parser("sequences", parents=[common], help="the sequence export: snapshot job and statistics")
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    s = what.add_parser("snapshot", parents=[common], help="fold the deltas since each partition's marker into "
                        "user-sequences (run it well within the deltas' retention)")
    s.add_argument("--every", type=float, metavar="HOURS", help="repeat every HOURS (default: once, then exit)")
    s.set_defaults(handler=_sequences)
    what.add_parser("stats", parents=[common], help="users, pairs and offsets of the folded export"
                    ).set_defaults(handler=_sequences)


def _kafka():
    from schemas.settings import KafkaSettings, load

    return load(KafkaSettings)


def _agents(args: argparse.Namespace) -> int:
    from .agents.supervisor import main

    return main(args)


def _replay(args: argparse.Namespace) -> int:
    from .replay import parse_time, replay

    try:
        n = replay(_kafka(), args.topic, parse_time(args.from_), parse_time(args.to), args.into, args.max_disorder_ms,
                   force=args.force, max_future_ms=args.max_future_ms)
    except (FileExistsError, ValueError) as e:
        print(f"lum replay: {e}", file=sys.stderr)
        return 2
    print(f"replayed {n} records into {args.into}")
    return 0


def _sequences(args: argparse.Namespace) -> int:
    import json

    from .kafka.sequences import snapshot, write_snapshot

    kafka = _kafka()
    if args.what == "stats":
        seqs, ends = snapshot(kafka)
        print(json.dumps({"users": len(seqs), "pairs": sum(len(s.pairs) for s in seqs.values()), "offsets": ends}))
        return 0
    if args.every is not None and args.every <= 0:
        print("lum sequences snapshot: --every must be > 0 hours", file=sys.stderr)
        return 2
    while True:
        t0 = time.monotonic()
        print(json.dumps(write_snapshot(kafka)), flush=True)
        if args.every is None:
            return 0
        wait = max(0.0, args.every * 3600 - (time.monotonic() - t0))
        log.info("next snapshot in %.0f s", wait)
        time.sleep(wait)


def _backfill(args: argparse.Namespace) -> int:
    from schemas.settings import load

    from .agents.settings import AgentSettings
    from .replay import AgentsRunning, backfill_sequences, parse_time

    try:
        stats = backfill_sequences(_kafka(), load(AgentSettings), parse_time(args.from_) if args.from_ else None,
                                   max_future_ms=args.max_future_ms)
    except AgentsRunning as e:
        print(f"lum backfill: refusing: {e}", file=sys.stderr)
        return 1
    print(" ".join(f"{k}={v}" for k, v in stats.items()))
    return 0
