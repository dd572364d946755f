"""DLRM trainer and scorer figures on this machine (CPU).

    .venv/bin/python benchmarks/bench_dlrm.py [--quick] [--json OUT] [--only step,kafka,collisions,auc,scoring]
                                              [--rounds 3] [--decoder-process auto|yes|no] [--skip-scoring]

Prints: training examples/s of the step alone (pre-featurized batches) and with featurization (examples as
the Kafka trainer receives them: each batch's messages decoded together into ``schemas.codec.ExampleColumns``); end to end from Kafka (embedded broker started
here, examples produced first, ``lum train``'s path and default checkpoint cadence: consumer group, prefetch
thread, optional decoder process, dedup, featurize, train, checkpoints, offset commits, --until-caught-up;
examples/s from the end of the first step to the end of the last, so neither the group join nor the producer
nor the first batch counts; the time spent in checkpoints, the final one included, apart), in ``--rounds``
rounds each right after a featurize + step run on the same examples, so that both see the same load, with
the process's CPU per example beside (less noisy than examples/s where other processes share the cores); rows
shared by distinct ids with hashing and with TorchRec's managed collisions (MCH) at 100k and 1M ids;
progressive AUC and examples/s of hashing vs managed collisions on the synthetic stream (several seeds);
scoring latency p50/p99 for 100 candidates. ``--json OUT`` writes the headline figures (``step_ex_s``,
``featurize_step_ex_s``, ``kafka_e2e_ex_s``: debug preset, batch 512, after the first batch, the best round;
``kafka_e2e_ratio``; ``kafka_cpu_us_per_ex``; ``kafka_checkpoint_s``; ``shared_rows_1m``: MCH; and more).
Other processes share the 2 cores: figures are noisy.
"""

from __future__ import annotations

import argparse
import json
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


def _wire(exs):
    """The examples encoded and decoded one by one with the topic's codec (models)."""
    from schemas.topics import TRAINING_EXAMPLES

    return [TRAINING_EXAMPLES.decode(TRAINING_EXAMPLES.encode(e)) for e in exs]


def _admit(cols):
    """A batch of columns as the Kafka source hands it over: with its dedup keys (computed in the timed part)."""
    from trainers.dlrm.dedup import RecentIds
    from trainers.dlrm.train import Batch

    return Batch(cols, keys=RecentIds.keys(cols.example_id))


def _wire_batches(exs, b):
    """Batches as the Kafka trainer receives them: each batch's messages decoded together into columns."""
    from schemas.codec import decode_columns
    from schemas.topics import TRAINING_EXAMPLES

    out = []
    for part in _batches(exs, b):
        cols, errors = decode_columns([TRAINING_EXAMPLES.encode(e) for e in part])
        assert not errors, errors
        out.append(cols)
    return out


def bench_step(preset: str, n: int, batch: int, lum_dim: int, ids: str = "hash") -> dict:
    bs = _wire_batches(synthetic_examples(n, seed=1, lum_dim=lum_dim), batch)
    n = sum(map(len, bs))
    trainer = Trainer(DLRMConfig.preset(preset, features="lum", ids=ids))
    trainer.train_batch(_admit(bs[0]))  # build + warm up
    t, c = time.perf_counter(), time.process_time()
    for b in bs[1:]:
        trainer.train_batch(_admit(b))
    with_feat = (n - len(bs[0])) / (time.perf_counter() - t)
    with_feat_cpu = 1e6 * (time.process_time() - c) / (n - len(bs[0]))
    fbs = [trainer.featurizer(b) for b in bs[1:]]
    t = time.perf_counter()
    for fb in fbs:  # the step alone: forward, loss, backward (fused embedding update), Adam
        logits = trainer.model(fb.dense, fb.sparse).squeeze(-1)
        loss = __import__("torch").nn.functional.binary_cross_entropy_with_logits(logits, fb.labels)
        trainer.opt.zero_grad()
        loss.backward()
        trainer.opt.step()
    step_only = sum(len(fb) for fb in fbs) / (time.perf_counter() - t)
    return {"preset": preset, "ids": ids, "batch": batch, "D": lum_dim, "step_only": step_only,
            "with_featurize": with_feat, "with_featurize_cpu_us": with_feat_cpu}


def bench_featurize_step(bs: list, preset: str = "debug") -> dict:
    """Featurize + step on a fresh trainer (examples/s and CPU us/ex after the first batch)."""
    trainer = Trainer(DLRMConfig.preset(preset, features="lum"))
    trainer.train_batch(_admit(bs[0]))  # build + warm up
    t, c = time.perf_counter(), time.process_time()
    for b in bs[1:]:
        trainer.train_batch(_admit(b))
    n = sum(len(b) for b in bs[1:])
    return {"ex_s": n / (time.perf_counter() - t), "cpu_us_per_ex": 1e6 * (time.process_time() - c) / n}


def bench_kafka(n: int, batch: int, rounds: int = 3, prefetch: int = 4, decoder_process: bool | None = None) -> dict:
    """End to end from Kafka, ``rounds`` times (a new consumer group and checkpoint directory each), each round
    right after a featurize + step run on the same examples (decoded from the wire): on a shared machine the two
    then see the same load. Returns every round and the best of each measure."""
    from schemas.settings import KafkaSettings
    from schemas.topics import ALL_TOPICS, TRAINING_EXAMPLES, key_of
    from streaming.broker import EmbeddedBroker
    from streaming.kafka import Output, create_topics
    from trainers.dlrm.cli import DLRMSettings
    from trainers.dlrm.kafka_source import KafkaExamples

    exs = synthetic_examples(n, seed=2, lum_dim=32)
    wire = _wire_batches(exs, batch)
    cadence = DLRMSettings.model_fields  # lum train's default checkpoint cadence
    runs = []
    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix="bench-")
        create_topics(kafka, ALL_TOPICS)
        p = Output(kafka, **{"linger.ms": 20})
        topic = kafka.topic(TRAINING_EXAMPLES)
        for ex in exs:
            p.produce(topic, key=key_of(ex.user_id), value=TRAINING_EXAMPLES.encode(ex))
        p.flush(60)
        for r in range(rounds):
            fs = bench_featurize_step(wire)
            times: dict = {"ckpt": 0.0}

            class Timed(Trainer):  # when the first step ends, the last one ends, and time in checkpoints
                def train_batch(self, b, **kw):
                    out = super().train_batch(b, **kw)
                    now = time.perf_counter()
                    if b.examples and "first" not in times:  # the clock starts when the first step has ended
                        times["first"], times["first_n"], times["first_cpu"] = now, self.examples, time.process_time()
                    times["last_step"], times["last_cpu"] = now, time.process_time()
                    return out

                def checkpoint(self, *a, **kw):
                    t0 = time.perf_counter()
                    try:
                        return super().checkpoint(*a, **kw)
                    finally:
                        times["ckpt"] += time.perf_counter() - t0

            with tempfile.TemporaryDirectory() as d:
                trainer = Timed(DLRMConfig.preset("debug", features="lum"), d,
                                every_batches=cadence["checkpoint_every_batches"].default,
                                every_s=cadence["checkpoint_every_s"].default)
                trainer.ensure_model(exs[:1])  # imports torchrec and builds DMP outside the timed part
                src = KafkaExamples(kafka, f"bench-dlrm-{r}", batch, until_caught_up=True, idle_timeout_s=5,
                                    recorder=trainer.rec,  # as lum train
                                    **({} if decoder_process is None else {"decoder_process": decoder_process}))
                t = time.perf_counter()
                trainer.fit(src, on_durable=src.commit, prefetch=prefetch)
                end = time.perf_counter()
                src.close()
            assert trainer.examples == n, (trainer.examples, n)
            # After the first batch: from the end of its step to the end of the last step, the examples trained in
            # between (checkpoints in between count; the final one, after the stream ended, is reported apart).
            # cpu_us_per_ex: this process's CPU (all threads) per example over the same span, less noisy than
            # ex/s on a shared machine (the broker's CPU is not in it).
            trained = trainer.examples - times["first_n"]
            runs.append({"featurize_step_ex_s": fs["ex_s"], "featurize_step_cpu_us_per_ex": fs["cpu_us_per_ex"],
                         "incl_join": n / (end - t), "checkpoint_s": times["ckpt"],
                         "after_first_batch": trained / (times["last_step"] - times["first"]),
                         "cpu_us_per_ex": 1e6 * (times["last_cpu"] - times["first_cpu"]) / trained})
    best = {k: (min if "cpu" in k or k == "checkpoint_s" else max)(r[k] for r in runs) for k in runs[0]}
    return {"examples": n, "batch": batch, "decoder_process": getattr(src, "decoder_process", False),
            "runs": runs, **best}


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


def bench_mch_collisions(distinct: int, rows: int, batch: int = 8192, interval: int = 10,
                         eviction: str = "lru") -> dict:
    """Stream ``distinct`` new ids through one MCH module (as training does), then map every id: the share of
    distinct ids whose row is shared with another id (the not-yet-admitted ones share the residual row)."""
    import torch
    from torchrec import JaggedTensor
    from torchrec.modules.mc_modules import LFU_EvictionPolicy, LRU_EvictionPolicy, MCHManagedCollisionModule

    from schemas.events import MAX_ID

    policy = {"lru": LRU_EvictionPolicy, "lfu": LFU_EvictionPolicy}[eviction]()
    m = MCHManagedCollisionModule(zch_size=rows, device=torch.device("cpu"), eviction_policy=policy,
                                  eviction_interval=interval, input_hash_size=MAX_ID)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, MAX_ID, distinct))
    m.train()
    t = time.perf_counter()
    chunks = list(torch.split(ids, batch))
    for c in chunks + [chunks[-1]] * interval:  # `interval` more steps so the last new ids get admitted
        m({"f": JaggedTensor(values=c, lengths=torch.ones(len(c), dtype=torch.int32))})
    secs = time.perf_counter() - t
    m.eval()
    out = m({"f": JaggedTensor(values=ids, lengths=torch.ones(len(ids), dtype=torch.int32))})["f"].values().numpy()
    counts = np.bincount(out, minlength=rows)
    return {"rows": rows, "distinct_ids": distinct, "collision_rate": float((counts[out] > 1).mean()),
            "ids_per_s": len(ids) / secs}


def bench_auc(n: int, seeds: int, batch: int = 256) -> dict:
    """Progressive AUC and featurize+step ex/s, hashing vs managed collisions, same stream and budget."""
    out = {}
    for ids in ("hash", "mch"):
        aucs, rates = [], []
        for seed in range(seeds):
            exs = _wire(synthetic_examples(n, seed=seed, users=2000, items=5000))
            trainer = Trainer(DLRMConfig.preset("debug", features="baseline", ids=ids, seed=seed))
            bs = _batches(exs, batch)
            trainer.train_batch(bs[0])
            t = time.perf_counter()
            for b in bs[1:]:
                trainer.train_batch(b)
            rates.append((n - len(bs[0])) / (time.perf_counter() - t))
            aucs.append(trainer.metrics.overall()["auc"])
        out[ids] = {"auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
                    "ex_s_mean": float(np.mean(rates)), "ex_s_std": float(np.std(rates))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    ap.add_argument("--json", metavar="OUT", help="write the headline figures as JSON")
    ap.add_argument("--skip-scoring", action="store_true", help="leave out the scoring latency table")
    ap.add_argument("--only", default="step,kafka,collisions,auc,scoring", help="comma-separated parts to run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating featurize + step / Kafka rounds")
    ap.add_argument("--decoder-process", choices=["auto", "yes", "no"], default="auto",
                    help="decode in a child process (auto: where 2 or more CPUs are available)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if args.skip_scoring:
        only.discard("scoring")
    from schemas.logs import setup_logging

    setup_logging("WARNING")  # also drops fbgemm/torchrec per-table INFO dumps
    q = args.quick
    res: dict = {}
    steps = (("debug", 32, "hash"), ("debug", 32, "mch"), ("base", 32, "hash")) if "step" in only else ()
    if steps:
        print("## training step (synthetic examples from the wire format, features=lum, K=3)")
        print("| preset | ids | batch | LUM D | step only ex/s | featurize + step ex/s | ratio |\n"
              "|---|---|---|---|---|---|---|")
    for preset, d, ids in steps:
        r = bench_step(preset, 10_000 if q else 40_000, 512, d, ids)
        print(f"| {r['preset']} | {ids} | {r['batch']} | {r['D']} | {r['step_only']:,.0f} | "
              f"{r['with_featurize']:,.0f} | {r['with_featurize'] / r['step_only']:.2f} |")
        if (preset, ids) == ("debug", "hash"):
            res["step_ex_s"], res["featurize_step_ex_s"] = r["step_only"], r["with_featurize"]
            res["featurize_step_cpu_us_per_ex"] = r["with_featurize_cpu_us"]
        if (preset, ids) == ("debug", "mch"):
            res["mch_step_ex_s"], res["mch_featurize_step_ex_s"] = r["step_only"], r["with_featurize"]
    if "kafka" in only:
        print("\n## end to end from Kafka (embedded broker, lum train's path, debug preset, D=32), each round right "
              "after a featurize + step run (same examples, same load)")
        dp = {"auto": None, "yes": True, "no": False}[args.decoder_process]
        r = bench_kafka(10_000 if q else 50_000, 512, rounds=args.rounds, decoder_process=dp)
        print("| round | featurize + step ex/s | e2e ex/s after first batch | ratio | CPU us/ex: featurize + step, e2e | "
              "e2e ex/s incl. group join and checkpoints | checkpoint s |\n|---|---|---|---|---|---|---|")
        for i, x in enumerate(r["runs"] + [r]):
            print(f"| {i + 1 if i < len(r['runs']) else 'best'} | {x['featurize_step_ex_s']:,.0f} | "
                  f"{x['after_first_batch']:,.0f} | {x['after_first_batch'] / x['featurize_step_ex_s']:.2f} | "
                  f"{x['featurize_step_cpu_us_per_ex']:.1f}, {x['cpu_us_per_ex']:.1f} | {x['incl_join']:,.0f} | "
                  f"{x['checkpoint_s']:.1f} |")
        print(f"decoding: {'child process' if r['decoder_process'] else 'reader thread'}; load average "
              f"{os.getloadavg()[0]:.1f}")
        # Headline figures: the best of the alternating rounds (the step table's run counts as one more).
        res["featurize_step_ex_s"] = max(res.get("featurize_step_ex_s", 0), r["featurize_step_ex_s"])
        res["kafka_e2e_ex_s"], res["kafka_incl_join_ex_s"] = r["after_first_batch"], r["incl_join"]
        res["kafka_e2e_ratio"] = r["after_first_batch"] / res["featurize_step_ex_s"]
        res["kafka_cpu_us_per_ex"], res["kafka_featurize_step_cpu_us_per_ex"] = \
            r["cpu_us_per_ex"], r["featurize_step_cpu_us_per_ex"]
        res["kafka_checkpoint_s"], res["kafka_decoder_process"] = r["checkpoint_s"], r["decoder_process"]
        res["kafka_rounds"] = r["runs"]
    if "collisions" in only:
        print("\n## rows shared by distinct random 63-bit ids in one table of 2^20 rows (share of ids)")
        print("| distinct ids | hashing | hashing, uniform expectation | managed collisions (MCH, LRU) | MCH ids/s |\n|---|---|---|---|---|")
        for n in (100_000, 1_000_000):
            h = bench_collisions(n, 1 << 20)
            m = bench_mch_collisions(n, 1 << 20)
            print(f"| {n:,} | {h['collision_rate']:.4f} | {h['expected_rate']:.4f} | {m['collision_rate']:.4f} | "
                  f"{m['ids_per_s']:,.0f} |")
            key = "1m" if n == 1_000_000 else "100k"
            res[f"shared_rows_{key}"], res[f"shared_rows_{key}_hash"] = m["collision_rate"], h["collision_rate"]
    if "auc" in only:
        print("\n## hashing vs managed collisions on the synthetic stream (debug tables, baseline features, 2k users, "
              "5k items, batch 256; mean ± std over seeds)")
        a = bench_auc(10_000 if q else 30_000, 3)
        res["auc"] = a
        print("| ids | progressive AUC | featurize + step ex/s |\n|---|---|---|")
        for ids, v in a.items():
            print(f"| {ids} | {v['auc_mean']:.4f} ± {v['auc_std']:.4f} | {v['ex_s_mean']:,.0f} ± {v['ex_s_std']:,.0f} |")
    if "scoring" in only:
        print("\n## scoring 100 candidates (one user), CPU, batch of 100 rows")
        print("| model | K conditions | LUM D | dense inputs | p50 ms | p99 ms |\n|---|---|---|---|---|---|")
        for d, k in ((32, 3), (320, 3), (32, 30)):
            for r in bench_scoring(d, k, 200 if q else 1000):
                print(f"| {r['model']} | {r['K']} | {r['D']} | {r['dense_inputs']} | {r['p50_ms']:.2f} | "
                      f"{r['p99_ms']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
