"""Foundation figures: schema encode/decode rates, synthetic generation and producer throughput.

    .venv/bin/python benchmarks/bench_foundation.py [--events 200000] [--bootstrap HOST:PORT] [--json OUT]

Starts its own embedded broker unless --bootstrap is given. Prints two tables; ``--json OUT`` also writes them
as JSON (``{"codec": [...], "producer": [...]}``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson  # noqa: E402

from schemas import codec  # noqa: E402
from schemas.events import BehaviorEvent, ImpressionEvent, LumFeatures, TrainingExample  # noqa: E402
from schemas.settings import KafkaSettings  # noqa: E402
from schemas.tokenize import UserSequence, tokenize  # noqa: E402
from schemas.topics import ALL_TOPICS  # noqa: E402

T0 = 1_767_225_600_000


def rate(fn, seconds: float = 1.0) -> float:
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(200):
            fn()
        n += 200
    return n / elapsed


def codec_table() -> list[tuple]:
    b = BehaviorEvent(event_id="syn-0-123456", user_id=123456, item_id=987654321, category_id=17, behavior="click",
                      scenario="search", query="red shoes", request_id="req-0-42", event_time_ms=T0)
    imp = ImpressionEvent(request_id="req-0-42", user_id=1, item_id=2, category_id=3, position=4, scenario="home",
                          event_time_ms=T0)
    ex = TrainingExample(example_id="req-0-42/2", request_id="req-0-42", user_id=1, item_id=2, category_id=3,
                         position=4, scenario="home", event_time_ms=T0, label=1, history_items=list(range(50)),
                         history_categories=list(range(50)), lum_model_version="small-1000",
                         lum_conditions=["scenario=home", "scenario=search", "scenario=detail"],
                         lum_user=[[0.123456] * 32] * 3, lum_item=[0.5] * 32)
    lf = LumFeatures(user_id=1, model_version="small-1000", computed_at_ms=T0,
                     conditions=[{"condition": f"scenario={i}", "vector": [0.1] * 32} for i in range(8)])
    seq = UserSequence(1, T0, [tokenize(b)] * 1024)
    rows = []
    for name, value in (("BehaviorEvent", b), ("ImpressionEvent", imp), ("TrainingExample (3x32 LUM)", ex),
                        ("LumFeatures (8x32)", lf)):
        data = codec.encode(value)
        model = type(value)
        rows.append((name + " JSON", len(data), rate(lambda: codec.encode(value)), rate(lambda: codec.decode(model, data))))
        # The alternative considered: orjson + pydantic validation from Python objects.
        raw = orjson.dumps(value.model_dump())
        rows.append((name + " orjson+validate", len(raw), rate(lambda: orjson.dumps(value.model_dump())),
                     rate(lambda: model.model_validate(orjson.loads(raw)))))
    data = codec.encode_user_sequence(seq)
    rows.append(("UserSequence 1024 pairs (binary)", len(data), rate(lambda: codec.encode_user_sequence(seq)),
                 rate(lambda: codec.decode_user_sequence(data))))
    rows.append(("tokenize(BehaviorEvent)", 0, rate(lambda: tokenize(b)), 0.0))
    return rows


def producer_table(bootstrap: str, events: int) -> list[tuple]:
    from streaming.kafka import create_topics
    from streaming.producers import produce
    from streaming.producers.synthetic import SyntheticConfig, SyntheticStream

    settings = KafkaSettings(bootstrap=bootstrap, topic_prefix=f"bench{os.getpid()}-")
    create_topics(settings, ALL_TOPICS)
    cfg = SyntheticConfig(users=100_000, items=50_000, categories=200, events=events, seed=1)
    start = time.perf_counter()
    generated = list(SyntheticStream(cfg))
    gen_rate = len(generated) / (time.perf_counter() - start)
    stats = produce(settings, generated)
    rows = [("synthetic generation only", len(generated), gen_rate),
            ("produce pre-generated events (encode + send + flush)", stats["events"], stats["events_per_s"])]
    settings2 = KafkaSettings(bootstrap=bootstrap, topic_prefix=f"bench{os.getpid()}e2e-")
    create_topics(settings2, ALL_TOPICS)
    e2e = produce(settings2, SyntheticStream(cfg.model_copy(update={"seed": 2})))
    rows.append(("generate + produce (lum produce synthetic)", e2e["events"], e2e["events_per_s"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--bootstrap")
    ap.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    args = ap.parse_args()
    result: dict = {"events": args.events, "codec": [], "producer": []}

    print("\n## Schema encode/decode (one core)\n")
    print(f"| {'message':42s} | bytes | encode/s | decode/s |\n|---|---:|---:|---:|")
    for name, size, enc, dec in codec_table():
        result["codec"].append({"message": name, "bytes": size, "encode_per_s": enc, "decode_per_s": dec})
        print(f"| {name:42s} | {size:5d} | {enc:9,.0f} | {dec:9,.0f} |")

    from streaming.broker import EmbeddedBroker

    broker = None if args.bootstrap else EmbeddedBroker().start()
    try:
        print(f"\n## Producer throughput ({args.events:,} synthetic events, 100k users, embedded broker"
              f"{'' if broker else ' at ' + args.bootstrap})\n")
        print(f"| {'stage':55s} | events | events/s |\n|---|---:|---:|")
        for name, n, r in producer_table(args.bootstrap or broker.bootstrap, args.events):
            result["producer"].append({"stage": name, "events": n, "events_per_s": r})
            print(f"| {name:55s} | {n:,} | {r:,.0f} |")
    finally:
        if broker:
            broker.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
