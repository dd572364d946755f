"""Cost per event as users and histories grow: the sequence agent and the joiner at three sizes.

    .venv/bin/python benchmarks/bench_scale.py --json runs/bench_scale.json          # three sizes, ~10 min
    .venv/bin/python benchmarks/bench_scale.py --quick                               # 3,000 events a size
    .venv/bin/python benchmarks/bench_scale.py --sizes 1e6x1024 --events 20000       # one size
    .venv/bin/python benchmarks/bench_scale.py --refresh ...      # + LUM refresh FLOPs per user (large preset)
    .venv/bin/python benchmarks/bench_scale.py --profile runs/prof ...   # + cProfile of each worker (slower)

Sizes (users x mature history in pairs): 1e3x50, 1e5x500, 1e6x1024. State is pre-seeded directly in the
agents' stores (never streamed through Kafka), then ``--events`` new events (default 20,000) for users drawn
uniformly from all users go through one real worker on the embedded broker. SAMPLING: only the users the
stream touches are seeded (at 10^6 users and 20,000 events, ~19,800 users, 1.3 GB of 1,024-pair state);
untouched users cost disk, not per-event work, so the per-event figures hold and the per-user figures
(RocksDB bytes per user) scale linearly. Each size runs in its own process (RSS is that process's).
The sequence store is seeded in its steady state: each user's newest 0..``TAIL_PAIRS`` pairs (uniformly) sit
in its append tail, the rest in its base, so the stream pays the folds a long-running agent pays (one per
``TAIL_PAIRS`` + 1 appends of a user) even where each user sees one event.

Printed per size and agent:
    events/s per worker   from the first batch to the last (wall; the machine is shared: +-30%),
                          and per CPU-second of the worker process (steadier)
    out/in bytes          bytes written to Kafka (keys + values: deltas, examples, dead letters) per input byte;
                          for the sequence agent also what the previous full-sequence export would have written
    state B/user          the agent's RocksDB on disk per seeded user after seeding (base, index, tail) and
                          after the run (+ the run's tails, folds, not yet compacted versions), and the value
                          bytes (base, index, keys, tail)
    RSS                   peak resident memory of the process
    reader                the refresh side: a local view of the same mature histories folding the run's deltas
                          (deltas and changed users per CPU-second)
The sequence agent's export is ``schemas.seqexport`` (deltas); the joiner keeps at most
``LUM_AGENT_HISTORY_LEN`` (50) history pairs a user whatever the LUM history, so its seeded history is that.
Goals (issue 14): out/in <= 2 at every size; events/s per worker within 30% across sizes, checked on the
per-CPU-second rates (spread = (max - min) / max; the wall rates are printed too, and follow the machine's load).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

SIZES = {"1e3x50": (1_000, 50), "1e5x500": (100_000, 500), "1e6x1024": (1_000_000, 1024)}
T0 = 1_767_225_600_000
PARTS = 4


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB."""
    cur = peak = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            cur = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return cur, peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def topic_bytes(kafka, topic) -> tuple[int, int]:
    """(records, key + value bytes) of a registry topic, from its start to its end."""
    from streaming.kafka import read_to_end, reader

    c = reader(kafka)
    n = b = 0
    try:
        for m in read_to_end(c, kafka.topic(topic)):
            n += 1
            b += len(m.key() or b"") + len(m.value() or b"")
    finally:
        c.close()
    return n, b


def history_rows(rng, n_users: int, hist: int, width: int) -> np.ndarray:
    """(n_users, hist, width) int64 mature histories: times one minute apart ending before T0, a small
    condition vocabulary (as real tokenized conditions), Zipf items."""
    rows = np.empty((n_users, hist, width), dtype=np.int64)
    rows[:, :, 0] = T0 - 60_000 * np.arange(hist, 0, -1)[None, :]
    rows[:, :, 1] = rng.integers(1, 2**62, (n_users, hist))
    for k in range(width - 4):
        vocab = rng.integers(1, 2**62, 3 if k < 2 else 40)
        rows[:, :, 2 + k] = vocab[rng.integers(0, len(vocab), (n_users, hist))]
    rows[:, :, -2] = rng.zipf(1.3, (n_users, hist)) % 100_000
    rows[:, :, -1] = rows[:, :, -2] % 40
    return rows


def run_worker(agent: str, kafka, cfg, total: int, timeout_s: float = 900) -> dict:
    """One real worker in this (main) thread until it has consumed ``total`` events; a watcher thread
    prints progress and stops it (so a profiler sees the worker's work)."""
    from streaming.agents.worker import Worker

    w = Worker(agent, kafka, cfg, 0)

    def watch():
        deadline = time.monotonic() + timeout_s
        last_print = time.monotonic()
        while w.consumed < total and time.monotonic() < deadline:
            time.sleep(0.2)
            if time.monotonic() - last_print > 10:
                last_print = time.monotonic()
                print(f"    {agent}: {w.consumed:,}/{total:,} events", flush=True)
        w.stop_event.set()

    threading.Thread(target=watch, daemon=True).start()
    prof = os.environ.get("BENCH_SCALE_PROFILE")  # --profile: cProfile of the worker's thread, stats to this file
    if prof:
        import cProfile

        pr = cProfile.Profile()
        pr.runcall(w.run)
        pr.dump_stats(prof)
    else:
        w.run()
    wall = w.last_event_at - w.first_event_at
    cpu = w.cpu_last - w.cpu_first
    first_batch = min(cfg.batch_size, total)  # rates exclude the first batch (timed from its end)
    n = max(w.consumed - first_batch, 1)
    return {"consumed": w.consumed, "events_per_s": n / wall if wall > 0 else 0.0,
            "events_per_cpu_s": n / cpu if cpu > 0 else 0.0, "gauges": w.logic.gauges()}


# --- sequence agent -----------------------------------------------------------------------------------
def child_sequences(bootstrap: str, prefix: str, data_dir: str, users: int, hist: int, events: int, seed: int):
    from schemas.events import BehaviorEvent
    from schemas.settings import KafkaSettings
    from schemas.tokenize import ROW_WIDTH
    from schemas.topics import ALL_TOPICS, BEHAVIORS, DEAD_LETTERS, SEQUENCE_DELTAS, key_of
    from streaming.agents.sequences import (BASE, INDEX, KEYS, TAIL, TAIL_PAIRS, SequenceLogic, encode_value,
                                            put_sequence, tail_key)
    from streaming.agents.settings import AgentSettings
    from streaming.agents.store import RocksStore
    from streaming.agents.worker import state_identity
    from streaming.kafka import Output, create_topics, read_to_end, reader

    kafka = KafkaSettings(bootstrap=bootstrap, topic_prefix=prefix)
    create_topics(kafka, ALL_TOPICS)
    cfg = AgentSettings(data_dir=Path(data_dir), max_pairs=1024, log_interval_s=1e9)
    rng = np.random.default_rng(seed)
    uid = rng.integers(0, users, events)
    touched = np.unique(uid)

    # Seed: each touched user's mature history, in the store the worker will open (same identity).
    t0 = time.perf_counter()
    c = reader(kafka)
    identity = state_identity(kafka, c, [kafka.topic(BEHAVIORS)])
    c.close()
    root = Path(data_dir) / "sequences" / (prefix + cfg.sequences_group)
    logical = 0
    logic = SequenceLogic(max_pairs=cfg.max_pairs)
    for p in range(PARTS):
        store = RocksStore(root / f"p{p}", identity | {"partition": p})
        logic.reset(store)  # the agent's store layout and cap
        mine = touched[touched % PARTS == p]
        for i in range(0, len(mine), 500):
            chunk = mine[i:i + 500]
            rows = history_rows(rng, len(chunk), hist, ROW_WIDTH)
            # The steady state: each user's newest pairs in its append tail, uniformly 0..TAIL_PAIRS of them
            # (a store that has run a while), so the stream pays its share of folds (one per TAIL_PAIRS + 1 events).
            tails = rng.integers(0, min(TAIL_PAIRS, hist - 1) + 1, len(chunk)) if hist > 1 else np.zeros(len(chunk), np.int64)
            for u, r, k in zip(chunk.tolist(), rows, tails.tolist()):
                put_sequence(store, u, r[:hist - k])
                if k:
                    store.put(tail_key(u), encode_value(u, r[hist - k:]))
            first = int(chunk[0])  # stored value bytes, sampled: every record the agent keeps for the user
            logical += sum(len(v or b"") for v in store.get_many([k + first.to_bytes(8, "big") for k in
                                                                  (TAIL, BASE, INDEX, KEYS)])) * len(chunk)
            store.commit({})
            del rows
        store.commit({BEHAVIORS.name: 0})
        store.db.compact_range(None, None)  # settled, as a long-running store: the seed's compaction is no event's work
        store.close()
    gc.collect()
    seed_s = time.perf_counter() - t0
    disk = dir_bytes(root)
    print(f"    seeded {len(touched):,} users x {hist} pairs in {seed_s:.0f}s ({disk / 2**20:.0f} MB on disk)", flush=True)

    # The stream: new events after the histories (the steady state is mostly appends).
    out = Output(kafka, **{"linger.ms": 20})
    topic = kafka.topic(BEHAVIORS)
    bytes_in = 0
    scen = ("home", "search", "detail")
    for i, u in enumerate(uid.tolist()):
        e = BehaviorEvent(event_id=f"s{seed}-{i}", user_id=u, item_id=int(rng.zipf(1.3)) % 100_000,
                          category_id=i % 40, behavior=("view", "click", "cart", "buy")[i % 4],
                          scenario=scen[i % 3], query=f"cat{i % 40}" if i % 3 == 1 else None,
                          event_time_ms=T0 + i * 10)
        v, k = BEHAVIORS.encode(e), key_of(u)
        out.produce(topic, value=v, key=k, partition=u % PARTS)
        bytes_in += len(v) + len(k)
    out.flush()
    res = run_worker("sequences", kafka, cfg, events)
    disk_after = dir_bytes(root)  # + the run's tails and folds (and RocksDB's not yet compacted versions)
    cur, peak = rss_mb()  # the agent's, before the reader measurement below
    n_out, bytes_out = topic_bytes(kafka, SEQUENCE_DELTAS)
    _, dead = topic_bytes(kafka, DEAD_LETTERS)
    # What the previous export (each changed user's whole sequence, fixed 64 B pairs) would have written:
    # one record per delta, of the user's sequence length after that batch.
    grown: dict[int, int] = {}
    full = 0
    c = reader(kafka)
    for m in read_to_end(c, kafka.topic(SEQUENCE_DELTAS)):
        d = SEQUENCE_DELTAS.decode(m.value())
        grown[d.user_id] = min(grown.get(d.user_id, hist) + len(d.rows), cfg.max_pairs)
        full += len(m.key()) + 31 + 64 * grown[d.user_id]
    c.close()
    reader = reader_cost(kafka, Path(data_dir) / "view", touched, hist, rng)
    return {"agent": "sequences", "reader_deltas_per_cpu_s": reader["deltas_per_cpu_s"],
            "reader_users_per_cpu_s": reader["users_per_cpu_s"], "users": users, "history": hist, "events": events, "seeded_users": int(len(touched)),
            "events_per_s": res["events_per_s"], "events_per_cpu_s": res["events_per_cpu_s"],
            "bytes_in": bytes_in, "bytes_out": bytes_out + dead, "out_records": n_out,
            "out_per_in": (bytes_out + dead) / bytes_in, "full_export_out_per_in": full / bytes_in,
            "state_disk_bytes_per_user": disk / len(touched), "state_value_bytes_per_user": logical / len(touched),
            "state_disk_after_run_bytes_per_user": disk_after / len(touched), "rss_mb": cur, "peak_rss_mb": peak,
            "seed_s": seed_s}


def reader_cost(kafka, view_dir: Path, users: np.ndarray, hist: int, rng) -> dict:
    """The refresh side of the export: a reader's local view holding the same mature histories folds the
    run's deltas (``streaming.kafka.sequences``: read, decode, fold, re-encode, one RocksDB write)."""
    from schemas.tokenize import ROW_WIDTH
    from streaming.kafka.sequences import View, _catch_up

    view = View(view_dir)
    for i in range(0, len(users), 500):
        chunk = users[i:i + 500]
        view.put(dict(zip(chunk.tolist(), history_rows(rng, len(chunk), hist, ROW_WIDTH))))
    t = time.process_time()
    changed = _catch_up(kafka, view, None, None, None)
    cpu = time.process_time() - t
    n_deltas = sum(view.state.deltas.values())
    view.close()
    print(f"    reader: folded {n_deltas:,} deltas into {len(changed):,} users' {hist}-pair views in {cpu:.1f} CPU-s",
          flush=True)
    return {"deltas_per_cpu_s": n_deltas / cpu, "users_per_cpu_s": len(changed) / cpu}


# --- joiner -------------------------------------------------------------------------------------------
def child_joiner(bootstrap: str, prefix: str, data_dir: str, users: int, hist: int, events: int, seed: int):
    from schemas.events import BehaviorEvent, ImpressionEvent
    from schemas.settings import KafkaSettings
    from schemas.topics import (ALL_TOPICS, BEHAVIORS, DEAD_LETTERS, IMPRESSIONS, LATE_CLICKS, TRAINING_EXAMPLES,
                                key_of)
    from schemas.topics import LUM_FEATURES
    from streaming.agents.join_logic import JoinKeys
    from streaming.agents.settings import AgentSettings
    from streaming.agents.store import RocksStore
    from streaming.agents.worker import state_identity
    from streaming.kafka import Output, create_topics, reader

    kafka = KafkaSettings(bootstrap=bootstrap, topic_prefix=prefix)
    create_topics(kafka, ALL_TOPICS)
    cfg = AgentSettings(data_dir=Path(data_dir), log_interval_s=1e9)
    rng = np.random.default_rng(seed)
    # Inputs: `events` impressions over 2 h of event time (so windows close), one click per 10.
    n_imp = events * 10 // 11
    uid = rng.integers(0, users, n_imp)
    touched = np.unique(uid)
    keep = min(hist, cfg.history_len)  # the joiner prunes a user's history to history_len before open windows

    # Seed: each touched user's history, in the store the worker will open (same identity, the worker's inputs).
    t0 = time.perf_counter()
    inputs = (IMPRESSIONS, BEHAVIORS, LUM_FEATURES)
    c = reader(kafka)
    identity = state_identity(kafka, c, [kafka.topic(t) for t in inputs])
    c.close()
    root = Path(data_dir) / "joiner" / (prefix + cfg.joiner_group)
    logical = 0
    for p in range(PARTS):
        store = RocksStore(root / f"p{p}", identity | {"partition": p})
        mine = touched[touched % PARTS == p]
        for i in range(0, len(mine), 2000):
            chunk = mine[i:i + 2000]
            rows = history_rows(rng, len(chunk), keep, 8)[:, :, [0, 1, 6, 7]]  # (time, key, item, category)
            for u, r in zip(chunk.tolist(), rows):
                value = r.astype(">i8").tobytes()
                store.put(JoinKeys.history(u), value)
                logical += len(value) + 9
            store.commit({})
        store.commit({t.name: 0 for t in inputs})  # local state that covers the (empty) group offsets
        store.close()
    seed_s = time.perf_counter() - t0
    disk = dir_bytes(root)
    print(f"    seeded {len(touched):,} users x {keep} history pairs in {seed_s:.0f}s", flush=True)

    out = Output(kafka, **{"linger.ms": 20})
    bytes_in = 0
    span = 2 * 3600_000
    times = np.sort(rng.integers(0, span, n_imp)) + T0
    clicks = 0
    for i, (u, t) in enumerate(zip(uid.tolist(), times.tolist())):
        item = int(rng.zipf(1.3)) % 100_000
        imp = ImpressionEvent(request_id=f"r{seed}-{i}", user_id=u, item_id=item, category_id=item % 40,
                              position=i % 10, scenario="home", event_time_ms=t)
        v, k = IMPRESSIONS.encode(imp), key_of(u)
        out.produce(kafka.topic(IMPRESSIONS), value=v, key=k, partition=u % PARTS, timestamp=t)
        bytes_in += len(v) + len(k)
        if i % 10 == 0:
            click = BehaviorEvent(event_id=f"c{seed}-{i}", user_id=u, item_id=item, category_id=item % 40,
                                  behavior="click", scenario="home", request_id=imp.request_id,
                                  event_time_ms=t + 30_000)
            v = BEHAVIORS.encode(click)
            out.produce(kafka.topic(BEHAVIORS), value=v, key=k, partition=u % PARTS, timestamp=t + 30_000)
            bytes_in += len(v) + len(k)
            clicks += 1
    out.flush()
    total = n_imp + clicks
    res = run_worker("joiner", kafka, cfg, total)
    n_out, b_out = topic_bytes(kafka, TRAINING_EXAMPLES)
    _, b_late = topic_bytes(kafka, LATE_CLICKS)
    _, b_dead = topic_bytes(kafka, DEAD_LETTERS)
    cur, peak = rss_mb()
    return {"agent": "joiner", "users": users, "history": keep, "events": total, "seeded_users": int(len(touched)),
            "events_per_s": res["events_per_s"], "events_per_cpu_s": res["events_per_cpu_s"],
            "bytes_in": bytes_in, "bytes_out": b_out + b_late + b_dead, "out_records": n_out,
            "out_per_in": (b_out + b_late + b_dead) / bytes_in,
            "bytes_per_example": b_out / n_out if n_out else 0.0,
            "state_disk_bytes_per_user": disk / len(touched), "state_value_bytes_per_user": logical / len(touched),
            "rss_mb": cur, "peak_rss_mb": peak, "seed_s": seed_s}


def refresh_flops(pairs: int = 1024, conditions: int = 3) -> dict:
    """FLOPs of one user's refresh (group query over ``pairs`` pairs, K conditions) with the ``large`` preset,
    counted by torch's FlopCounterMode on the real ``condition_outputs`` path. Layers are identical, so it
    runs 1 and 2 layers (small vocabularies: lookups are not FLOPs) and extrapolates to the preset's depth."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from schemas.tokenize import parse_condition
    from trainers.lum.model import PRESETS, LumModel
    from trainers.lum.packing import Seq
    from trainers.lum.refresh import condition_outputs

    torch.set_num_threads(1)
    conds = np.array([parse_condition(f"category={c}") for c in range(conditions)])
    rng = np.random.default_rng(0)
    user = [Seq(1, rng.integers(1, 1000, (pairs, 4)), rng.integers(0, 10**5, pairs), rng.integers(0, 40, pairs))]
    large = PRESETS["large"]
    flops, secs = {}, {}
    for layers in (1, 2):
        cfg = large.model_copy(update={"item_buckets": 1009, "cat_buckets": 101, "cond_buckets": 101,
                                       "n_layers": layers})
        counter = FlopCounterMode(display=False)
        t = time.perf_counter()
        with counter:
            condition_outputs(LumModel(cfg), user, conds, 1, "cpu")
        flops[layers], secs[layers] = counter.get_total_flops(), time.perf_counter() - t
    per_layer = flops[2] - flops[1]
    total = flops[1] - per_layer + large.n_layers * per_layer
    row_len = max(large.row_len, 2 * large.max_pairs + conditions)
    print(f"refresh, large preset, {pairs} pairs, K={conditions}: {total / 1e9:,.0f} GFLOP per user "
          f"(row of {row_len} tokens for {2 * pairs + conditions} real ones); 1-layer CPU pass "
          f"{flops[1] / secs[1] / 1e9:.1f} GFLOP/s here", flush=True)
    return {"gflop_per_user": total / 1e9, "row_len": row_len, "tokens": 2 * pairs + conditions,
            "cpu_gflop_per_s": flops[1] / secs[1] / 1e9}


# --- driver -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--agents", default="sequences,joiner")
    ap.add_argument("--events", type=int, default=0, help="events per size (default 20,000; --quick 3,000)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--refresh", action="store_true",
                    help="also count the LUM refresh FLOPs per user at 1,024 pairs (large preset; minutes on CPU)")
    ap.add_argument("--profile", type=Path, help="write cProfile stats of each worker to DIR/<agent>-<size>.prof")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-args", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        from schemas.logs import setup_logging

        setup_logging("WARNING")
        fn = {"sequences": child_sequences, "joiner": child_joiner}[args.child]
        print("RESULT " + json.dumps(fn(**json.loads(args.child_args))), flush=True)
        return 0

    from streaming.broker import EmbeddedBroker

    events = args.events or (3_000 if args.quick else 20_000)
    results = []
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for size in args.sizes.split(","):
            users, hist = SIZES[size]
            for agent in args.agents.split(","):
                print(f"{agent} @ {size}: {users:,} users, {hist}-pair histories, {events:,} events", flush=True)
                kw = {"bootstrap": broker.bootstrap, "prefix": f"scale-{size}-{agent}-", "data_dir": f"{tmp}/{size}",
                      "users": users, "hist": hist, "events": events, "seed": 0}
                load = os.getloadavg()[0]  # a shared machine: the load says how far to trust the rates
                env = os.environ.copy()
                if args.profile:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    env["BENCH_SCALE_PROFILE"] = str(args.profile.resolve() / f"{agent}-{size}.prof")
                proc = subprocess.run([sys.executable, __file__, "--child", agent, "--child-args", json.dumps(kw)],
                                      cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
                load = (load, os.getloadavg()[0])
                for line in proc.stdout.splitlines():
                    if line.startswith("RESULT "):
                        r = json.loads(line[7:]) | {"size": size, "load_avg_1m": load}
                        results.append(r)
                        print(f"  -> {r['events_per_s']:,.0f} events/s ({r['events_per_cpu_s']:,.0f}/CPU-s), "
                              f"out/in {r['out_per_in']:.2f}, state {r['state_disk_bytes_per_user']:,.0f} B/user, "
                              f"peak RSS {r['peak_rss_mb']:,.0f} MB", flush=True)
                    elif line.strip():
                        print(line, flush=True)
                if proc.returncode:
                    print(proc.stderr[-3000:], flush=True)
                    raise SystemExit(f"{agent} @ {size} failed")
                subprocess.run(["rm", "-rf", f"{tmp}/{size}"], check=False)
    print()
    print("| agent | users x history | events/s per worker (per CPU-s) | out/in bytes | full-sequence export out/in "
          "| state B/user (disk / after run / value) | peak RSS MB | load avg before / after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        full = f"{r['full_export_out_per_in']:.1f}" if "full_export_out_per_in" in r else "-"
        print(f"| {r['agent']} | {r['users']:,} x {r['history']} | {r['events_per_s']:,.0f} ({r['events_per_cpu_s']:,.0f}) "
              f"| {r['out_per_in']:.2f} | {full} | {r['state_disk_bytes_per_user']:,.0f} / "
              f"{r.get('state_disk_after_run_bytes_per_user', 0):,.0f} / "
              f"{r['state_value_bytes_per_user']:,.0f} | {r['peak_rss_mb']:,.0f} | "
              f"{r['load_avg_1m'][0]:.1f} / {r['load_avg_1m'][1]:.1f} |")
    for r in results:
        if "reader_deltas_per_cpu_s" in r:
            print(f"reader (refresh view) @ {r['size']}: {r['reader_deltas_per_cpu_s']:,.0f} deltas/CPU-s, "
                  f"{r['reader_users_per_cpu_s']:,.0f} changed {r['history']}-pair users/CPU-s")
    for r in results:  # per-user work (state lookups, one delta) is shared by a user's events in one batch
        if r["agent"] == "sequences" and r.get("out_records"):
            print(f"sequences @ {r['size']}: {r['events'] / r['out_records']:.2f} events per changed user and batch")
    for agent in {r["agent"] for r in results}:
        rates = [r["events_per_cpu_s"] for r in results if r["agent"] == agent]
        worst = max(r["out_per_in"] for r in results if r["agent"] == agent)
        spread = (max(rates) - min(rates)) / max(rates) if rates else 0
        walls = [r["events_per_s"] for r in results if r["agent"] == agent]
        print(f"{agent}: events/CPU-s spread across sizes {spread:.0%} (goal <= 30%; wall events/s spread "
              f"{(max(walls) - min(walls)) / max(walls):.0%}), worst out/in {worst:.2f} (goal <= 2)")
    refresh = refresh_flops() if args.refresh else None
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"events_per_size": events, "results": results, "refresh": refresh}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
