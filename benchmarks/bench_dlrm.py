"""DLRM trainer and scorer figures on this machine (CPU).

    .venv/bin/python benchmarks/bench_dlrm.py [--quick]

Prints: training examples/s of the step alone (pre-featurized batches) and with featurization; end to end
from Kafka (embedded broker started here, examples produced first, ``lum train``'s path: consumer group,
decode, featurize, train, checkpoints, offset commits, --until-caught-up); scoring latency p50/p99 for 100
candidates with a small LUM (D=32) and a 10x larger one (D=320), live (DMP) model and checkpoint copy.
Other processes share the 2 cores: figures are noisy.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# One intra-op thread: with the 2 cores shared, 2 OpenMP threads spin-wait and steps vary 18-370 ms.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.events import ItemEmbedding, LumFeatures  # noqa: E402
from trainers.dlrm.model import DLRMConfig  # noqa: E402
from trainers.dlrm.score import LumStore, Scorer  # noqa: E402
from trainers.dlrm.synthetic import synthetic_examples  # noqa: E402
from trainers.dlrm.train import Trainer  # noqa: E402


def _batches(exs, b):
    return [exs[i:i + b] for i in range(0, len(exs), b)]


def bench_step(preset: str, n: int, batch: int, lum_dim: int) -> dict:
    exs = synthetic_examples(n, seed=1, lum_dim=lum_dim)
    trainer = Trainer(DLRMConfig.preset(preset, features="lum"))
    bs = _batches(exs, batch)
    trainer.train_batch(bs[0])  # build + warm up
    t = time.perf_counter()
    for b in bs[1:]:
        trainer.train_batch(b)
    with_feat = (len(exs) - len(bs[0])) / (time.perf_counter() - t)
    fbs = [trainer.featurizer(b) for b in bs[1:]]
    t = time.perf_counter()
    for fb in fbs:  # the step alone: forward, loss, backward (fused embedding update), Adam
        logits = trainer.model(fb.dense, fb.sparse).squeeze(-1)
        loss = __import__("torch").nn.functional.binary_cross_entropy_with_logits(logits, fb.labels)
        trainer.opt.zero_grad()
        loss.backward()
        trainer.opt.step()
    step_only = sum(len(fb) for fb in fbs) / (time.perf_counter() - t)
    return {"preset": preset, "batch": batch, "D": lum_dim, "step_only": step_only, "with_featurize": with_feat}


def bench_kafka(n: int, batch: int) -> dict:
    from schemas.settings import KafkaSettings
    from schemas.topics import ALL_TOPICS, TRAINING_EXAMPLES, key_of
    from streaming.kafka import Output, create_topics
    from streaming.broker import EmbeddedBroker
    from trainers.dlrm.kafka_source import KafkaExamples

    exs = synthetic_examples(n, seed=2, lum_dim=32)
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as d:
        kafka = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix="bench-")
        create_topics(kafka, ALL_TOPICS)
        p = Output(kafka, **{"linger.ms": 20})
        topic = kafka.topic(TRAINING_EXAMPLES)
        for ex in exs:
            p.produce(topic, key=key_of(ex.user_id), value=TRAINING_EXAMPLES.encode(ex))
        p.flush(60)
        trainer = Trainer(DLRMConfig.preset("debug", features="lum"), d, every_batches=50, every_s=30)
        trainer.ensure_model(exs[:1])  # imports torchrec and builds DMP outside the timed part
        src = KafkaExamples(kafka, "bench-dlrm", batch, until_caught_up=True, idle_timeout_s=5)
        t = time.perf_counter()
        first = {}

        def batches():
            for b in src:
                if b.examples and "t" not in first:
                    first["t"], first["n"] = time.perf_counter(), len(b.examples)
                yield b
        trainer.fit(batches(), on_durable=src.commit)
        end = time.perf_counter()
        src.close()
        assert trainer.examples == n, (trainer.examples, n)
        return {"examples": n, "batch": batch, "incl_join": n / (end - t),
                "after_first_batch": (n - first["n"]) / (end - first["t"])}


def bench_scoring(lum_dim: int, conditions: int, reps: int) -> list[dict]:
    exs = synthetic_examples(3000, seed=3, lum_dim=lum_dim)
    conds = [f"scenario={s}" for s in ("home", "search", "detail")] + [f"extra{k}" for k in range(conditions - 3)]
    cfg = DLRMConfig.preset("debug", features="lum", lum_conditions=conds, lum_dim=lum_dim)
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, d)
        for b in _batches(exs, 256):
            trainer.train_batch(b)
        trainer.checkpoint()
        scorers = {"live DMP": Scorer.from_trainer(trainer), "checkpoint copy": Scorer.from_checkpoint(d)}
    rng = np.random.default_rng(0)
    store = LumStore()
    ex = exs[-1]
    store.put_user(LumFeatures(user_id=ex.user_id, model_version="b", computed_at_ms=ex.event_time_ms,
                               conditions=[{"condition": c, "vector": rng.normal(0, 1, lum_dim).tolist()}
                                           for c in conds]))
    cands = [(e.item_id, e.category_id) for e in exs[-100:]]
    for e in exs[-100:]:
        store.put_item(ItemEmbedding(item_id=e.item_id, category_id=e.category_id, model_version="b",
                                     vector=rng.normal(0, 1, lum_dim).tolist(), computed_at_ms=e.event_time_ms))
    out = []
    for name, s in scorers.items():
        for _ in range(20):  # warm up
            s.score(ex.user_id, ex.scenario, cands, store=store, history_items=ex.history_items,
                    history_categories=ex.history_categories)
        lat = []
        for _ in range(reps):
            t = time.perf_counter()
            s.score(ex.user_id, ex.scenario, cands, store=store, history_items=ex.history_items,
                    history_categories=ex.history_categories)
            lat.append((time.perf_counter() - t) * 1e3)
        out.append({"model": name, "K": len(conds), "D": lum_dim, "dense_inputs": s.featurizer.n_dense,
                    "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))})
    return out


def bench_collisions(distinct: int, rows: int) -> dict:
    from schemas.events import MAX_ID
    from trainers.dlrm.features import CollisionStats, hash_ids

    ids = np.random.default_rng(0).integers(0, MAX_ID, distinct)
    stats = CollisionStats(rows)
    for chunk in np.array_split(ids, 100):
        stats.update(chunk, hash_ids(chunk, rows, 2))
    return stats.report()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    args = ap.parse_args()
    logging.basicConfig(level="WARNING")
    q = args.quick
    print("## training step (synthetic examples, features=lum, K=3)")
    print("| preset | batch | LUM D | step only ex/s | featurize + step ex/s |\n|---|---|---|---|---|")
    for preset, d in (("debug", 32), ("base", 32)):
        r = bench_step(preset, 10_000 if q else 40_000, 512, d)
        print(f"| {r['preset']} | {r['batch']} | {r['D']} | {r['step_only']:,.0f} | {r['with_featurize']:,.0f} |")
    print("\n## end to end from Kafka (embedded broker, lum train's path, debug preset, D=32)")
    r = bench_kafka(10_000 if q else 50_000, 512)
    print("| examples | batch | ex/s incl. group join | ex/s after first batch |\n|---|---|---|---|")
    print(f"| {r['examples']:,} | {r['batch']} | {r['incl_join']:,.0f} | {r['after_first_batch']:,.0f} |")
    print("\n## hashing random 63-bit ids into one table (share of distinct ids sharing their row)")
    print("| distinct ids | rows | measured | uniform expectation |\n|---|---|---|---|")
    for n, rows in ((100_000, 1 << 20), (1_000_000, 1 << 20), (10_000, 1 << 14)):
        r = bench_collisions(n, rows)
        print(f"| {n:,} | {rows:,} | {r['collision_rate']:.4f} | {r['expected_rate']:.4f} |")
    print("\n## scoring 100 candidates (one user), CPU, batch of 100 rows")
    print("| model | K conditions | LUM D | dense inputs | p50 ms | p99 ms |\n|---|---|---|---|---|---|")
    for d, k in ((32, 3), (320, 3), (32, 30)):
        for r in bench_scoring(d, k, 200 if q else 1000):
            print(f"| {r['model']} | {r['K']} | {r['D']} | {r['dense_inputs']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
