"""Streaming throughput on the embedded broker: plain consumer, Faust no-op agent, sequence agent, joiner.

    .venv/bin/python benchmarks/bench_streaming.py            # 200,000 behaviors over >= 100,000 users
    .venv/bin/python benchmarks/bench_streaming.py --quick    # 20,000 events, seconds
    .venv/bin/python benchmarks/bench_streaming.py --json OUT # also write the rates (events/s) as JSON
    .venv/bin/python benchmarks/bench_streaming.py --logic    # the sequence agent's logic alone, no broker

One run, one broker, the same pre-produced ``behaviors`` events for every consumer (each in a fresh consumer
group; the agent runs get identical copies under their own topic prefix, so that each starts with an empty
``sequence-deltas`` topic): a plain confluent-kafka consumer (the client's ceiling: the best of 3 reads), a
no-op Faust agent (Faust's ceiling), the sequence agent on the batch worker with 1 and 2 worker processes (as
deployed), the I/O floor (``IoFloor``: the worker and the agent's decode with one state read, write and output
per user and no logic, in this process), and the joiner over a synthetic impressions + behaviors stream, on
both runtimes. Worker rates count while all of a row's workers run. ``--json`` keys: plain_consumer,
faust_noop, sequences_faust, sequences_worker_1, sequences_worker_2 (total, while both run), joiner_worker,
joiner_faust, io_floor; also io_floor_per_cpu_s and io_floor_cores, plain_consumer_reads and
plain_consumer_cores (each read's rate and the cores it used), sequences_worker_2_span
(from the first batch of either worker to the last of both, so it also counts one worker's late start) and
cores_2_workers (the cores the 2 workers and the broker used while both ran, and the machine's idle cores: on a
machine with few cores, what bounds the speed-up). Then a cProfile of
the sequence agent (in this process) says what bounds it. The machine is shared (2 cores, other jobs running):
read the figures as +-20%.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from schemas.events import BehaviorEvent  # noqa: E402
from schemas.settings import KafkaSettings  # noqa: E402
from schemas.topics import ALL_TOPICS, BEHAVIORS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import process_cpu  # noqa: E402


def _count(state: dict, added: int, n: int) -> None:
    """Count events in a Faust worker; print the rate (from the first event on) and exit after ``n``."""
    state["n"] += added
    if not state["t0"]:
        state["t0"], state["first"] = time.perf_counter(), state["n"]
    if state["n"] >= n:
        dt = time.perf_counter() - state["t0"]
        print(json.dumps({"events": n, "rate": (n - state["first"]) / dt}), flush=True)
        os._exit(0)


# --- Faust no-op agent (child process) ----------------------------------------------------------------

def faust_noop_child(bootstrap: str, topic: str, n: int) -> None:
    import faust

    app = faust.App(f"bench-faust-{uuid.uuid4().hex[:6]}", broker=f"kafka://{bootstrap}", store="memory://",
                    broker_session_timeout=6.0, consumer_auto_offset_reset="earliest", web_enabled=False)
    src = app.topic(topic, key_serializer="raw", value_serializer="raw")
    state = {"n": 0, "t0": 0.0, "first": 0}

    @app.agent(src)
    async def noop(stream):
        async for _value in stream:
            _count(state, 1, n)

    sys.argv = [sys.argv[0], "worker", "--without-web", "-l", "warn"]
    app.main()


# --- helpers -------------------------------------------------------------------------------------------
T0 = 1_767_225_600_000


def behaviors(n: int, users: int, seed: int = 0):
    """The benchmark's stream: ``n`` behaviors of users drawn uniformly from ``users``, Zipf items."""
    rng = np.random.default_rng(seed)
    uid = rng.integers(0, users, n)
    items = rng.zipf(1.3, n) % 100_000
    scen = rng.integers(0, 3, n)
    for i in range(n):
        yield BehaviorEvent(event_id=f"b{i}", user_id=int(uid[i]), item_id=int(items[i]),
                            category_id=int(items[i]) % 500, behavior="view" if i % 5 else "click",
                            scenario=("home", "search", "detail")[scen[i]], query="shoes" if scen[i] == 1 else None,
                            event_time_ms=T0 + i * 10)


def produce_behaviors(kafka: KafkaSettings, n: int, users: int, seed: int = 0) -> int:
    from schemas.topics import key_of
    from streaming.kafka import Output

    # No compression: aiokafka (Faust) needs the lz4 package for lz4 batches, and it is not installed here.
    p = Output(kafka, **{"compression.type": "none", "linger.ms": 20})
    distinct = set()
    for e in behaviors(n, users, seed):
        p.produce(kafka.topic(BEHAVIORS), value=BEHAVIORS.encode(e), key=key_of(e.user_id))  # ingest-time stamp
        distinct.add(e.user_id)
    p.flush(60)
    return len(distinct)


def logic_rate(n: int, users: int, batch: int = 2000, partitions: int = 4) -> dict[str, float]:
    """The sequence agent's logic alone over the same stream (no broker, in-memory store): CPU per event, and
    the part spent encoding the deltas. The worker's batches of ``batch`` events, split by partition."""
    import schemas.seqexport as sx
    import streaming.agents.sequences as sq
    from streaming.agents.store import MemoryEmit, MemoryStore, Record

    values = [(e.user_id % partitions, BEHAVIORS.encode(e)) for e in behaviors(n, users)]
    logic = sq.SequenceLogic(max_pairs=1024, clock=lambda: (T0 + 10 * 86_400_000) / 1000)
    stores, emit = [MemoryStore() for _ in range(partitions)], MemoryEmit()
    for p, store in enumerate(stores):
        logic.assign(p, store, {}, emit, lambda topic, q: [])
    spent = [0.0]

    def timed(*a):
        t = time.process_time()
        out = sx.encode_deltas(*a)
        spent[0] += time.process_time() - t
        return out

    offsets, cpu = [0] * partitions, 0.0
    sq.encode_deltas = timed
    try:
        for b in range(0, n, batch):
            by: dict[int, list] = {}
            for p, v in values[b:b + batch]:
                by.setdefault(p, []).append(Record(BEHAVIORS.name, p, offsets[p], T0, b"k", v))
                offsets[p] += 1
            t = time.process_time()
            for p, recs in by.items():
                logic.process(p, recs, emit)
                stores[p].commit({BEHAVIORS.name: offsets[p]})
            cpu += time.process_time() - t
            emit.sent.clear()
    finally:
        sq.encode_deltas = sx.encode_deltas
    return {"events_per_cpu_s": n / cpu, "us_per_event": 1e6 * cpu / n, "encode_us_per_event": 1e6 * spent[0] / n}


def plain_consumer_rate(kafka: KafkaSettings, topic: str, n: int, reads: int = 3
                        ) -> tuple[float, list[float], list[float]]:
    """The best of ``reads`` full reads (each in a fresh group), every read's rate and the cores this process
    used during it. Reads are bimodal, 5-8x apart: a read using ~1 core is bound by this process (the
    client's ceiling); one using ~0.2 waits on the broker's fetches (here 110k-160k against 0.65-1.3M events/s)."""
    from streaming.kafka import group_consumer

    rates, cores = [], []
    for _ in range(reads):
        # A plain consumer doing no work, on purpose: the ceiling the agents are compared with.
        c = group_consumer(kafka, f"bench-plain-{uuid.uuid4().hex[:6]}")
        c.subscribe([topic])
        got, t0, first, cpu0 = 0, 0.0, 0, 0.0
        while got < n:
            msgs = [m for m in c.consume(10000, 0.5) if m.error() is None]
            got += len(msgs)
            if msgs and not t0:
                t0, first, cpu0 = time.perf_counter(), got, time.process_time()
        wall = time.perf_counter() - t0
        rates.append((got - first) / wall)
        cores.append((time.process_time() - cpu0) / wall)
        c.close()
    return max(rates), rates, cores


class IoFloor:
    """The sequence agent's I/O with none of its logic, hosted by the same worker (``--json`` key io_floor):
    a batch decoded as the agent decodes it (``SequenceLogic.decode``: validation, dead letters), then one
    multi-get of a key per user, one value per user staged, and one output per user. The worker adds the
    rest as for any agent (a Record per message, one synced RocksDB write with the positions, flush, offset
    commit). What an agent on this stack (Python, confluent-kafka, rocksdict, pydantic) pays per event before
    its own work, so the gap to the plain consumer splits into the stack's share and the agent logic's."""

    name, inputs = "sequences", (BEHAVIORS,)

    def __init__(self) -> None:
        from streaming.agents.sequences import SequenceLogic

        self.decoder = SequenceLogic()
        self.stores: dict = {}

    def assign(self, partition, store, committed, emit, read) -> dict[str, int]:
        self.stores[partition] = store
        return {BEHAVIORS.name: committed.get(BEHAVIORS.name) or 0}

    def process(self, partition, records, emit) -> None:
        from schemas.topics import SEQUENCE_DELTAS, key_of
        from streaming.agents.sequences import user_key

        good, offsets = self.decoder.decode(records, emit)
        raw = {r.offset: r.value for r in records}
        last = {f["user_id"]: raw[o] for f, o in zip(good, offsets)}  # each user's last event of the batch
        store, keys = self.stores[partition], [user_key(u) for u in last]
        store.get_many(keys)
        store.update(dict(zip(keys, last.values())))
        emit.send_many(SEQUENCE_DELTAS, list(last.values()), [key_of(u) for u in last], partition)

    def revoke(self, partition) -> None:
        self.stores.pop(partition, None)

    def gauges(self) -> dict[str, float]:
        return {}


def in_process(kafka: KafkaSettings, n: int, data_dir: Path, group: str, logic=None,
               prof: cProfile.Profile | None = None) -> dict[str, float]:
    """The sequence worker (``logic``: another logic in its place) in this process, from its first batch to
    ``n`` events (profiled by ``prof`` if given): events/s, events per CPU-second (every thread of the
    process) and cores used."""
    from streaming.agents.settings import AgentSettings
    from streaming.agents.worker import Worker

    cfg = AgentSettings(data_dir=data_dir, log_interval_s=1e9, sequences_group=f"{group}-{uuid.uuid4().hex[:6]}")
    w = Worker("sequences", kafka, cfg, logic=logic)
    try:
        w.start()
        while w.consumed == 0:
            w.step()
        first, t0, cpu0 = w.consumed, time.perf_counter(), time.process_time()
        if prof is not None:
            prof.enable()
        while w.consumed < n:
            w.step()
        if prof is not None:
            prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        w.close()
    events = w.consumed - first
    return {"rate": events / wall, "events_per_cpu_s": events / cpu, "cores": cpu / wall}


def idle_seconds() -> float | None:
    """CPU seconds the whole machine has spent idle (or waiting on I/O), all cores together (Linux's /proc)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")  # "cpu user nice system idle iowait"


def profile_sequences(kafka: KafkaSettings, n: int, data_dir: Path) -> cProfile.Profile:
    """cProfile of the sequence agent on a worker in this process, from its first batch to ``n`` events."""
    prof = cProfile.Profile()
    in_process(kafka, n, data_dir, "bench-seq", prof=prof)
    return prof


def metrics(port: int) -> dict[str, float]:
    """One worker's figures (schemas.metrics: prometheus_client's parser), summed over topics and partitions."""
    from schemas.metrics import scrape, total

    s = scrape(port)
    return {"events": total(s, "lum_events_consumed_total"),
            "first_batch": total(s, "lum_first_batch_timestamp_seconds"),
            "last_batch": total(s, "lum_last_batch_timestamp_seconds"),
            "partitions": total(s, "lum_agent_state", name="assigned_partitions"),
            "cpu_s": total(s, "lum_agent_state", name="cpu_seconds_between_batches"),
            "outputs": total(s, "lum_sequences_published_total") + total(s, "lum_examples_emitted_total")}


def workers_rate(kafka: KafkaSettings, agent: str, n: int, data_dir: Path, workers: int = 1,
                 broker_pid: int | None = None) -> dict:
    """``workers`` worker processes (``python -m streaming.agents.worker AGENT``, as deployed) in one group on
    the same topics: their total events/s while all run (``rate``; ``span_rate`` counts from the first batch of
    any to the last of all), events, partitions, events per CPU-second and the agent's outputs per worker, and
    the cores the workers and the broker used while all ran, and the machine's idle ones (``while_all_run``).
    1 worker is measured the same way as 2."""
    from streaming.broker import free_port

    port = free_port()
    env = os.environ | {"LUM_KAFKA_BOOTSTRAP": kafka.bootstrap, "LUM_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
                        "LUM_DATA_DIR": str(data_dir), "LUM_METRICS_PORT": str(port),
                        f"LUM_AGENT_{agent.upper()}_GROUP": f"bench-{agent}-{uuid.uuid4().hex[:6]}",
                        "LUM_JOIN_WINDOW_MS": "60000"}
    # Port+i: one may collide with another process; free_port() is a best effort.
    procs = [subprocess.Popen([sys.executable, "-m", "streaming.agents.worker", agent, "--index", str(i),
                               "--log-level", "WARNING"], cwd=ROOT, env=env) for i in range(workers)]
    samples = []  # (time, events per worker, CPU seconds per worker, the broker's CPU seconds, machine idle seconds)
    try:
        # All start together and join the same generation (Tansu waits ~3 s for members), so the
        # partitions are split from the first fetch. But one worker's first batch can come up to ~1 s after
        # the other's, in a run of ~2 s: a rate from the first batch of either to the last of both measures
        # that skew (1.03-1.67x of one worker here in one day's runs). The rate is taken while all run.
        while True:
            ms = [metrics(port + i) for i in range(workers)]
            done = [int(m["events"]) for m in ms]
            samples.append((time.perf_counter(), done, [m["cpu_s"] for m in ms],
                            process_cpu("broker", broker_pid, {}).get("broker") if broker_pid else None,
                            idle_seconds()))
            if sum(done) >= n:
                break
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a worker exited")
            time.sleep(0.2)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    out = {"span_rate": n / (max(m["last_batch"] for m in ms) - min(m["first_batch"] for m in ms if m["events"])),
           "events": done, "partitions": [int(m["partitions"]) for m in ms],
           "events_per_cpu_s": [round(d / m["cpu_s"]) if m["cpu_s"] else 0 for d, m in zip(done, ms)],
           "outputs": [int(m["outputs"]) for m in ms]}
    run = while_all_run(samples, done)
    return out | run | {"rate": run["rate"] or out["span_rate"]}  # tiny runs: the span


def while_all_run(samples: list[tuple], final: list[int], min_s: float = 0.3) -> dict:
    """Total events/s and cores between the first and the last sample at which every worker had started and
    none had finished (``samples``: (time, events per worker, CPU seconds per worker, the broker's CPU seconds,
    the machine's idle CPU seconds; either of the last two None where unknown); ``final``: each worker's last
    count). ``overlap_s`` 0 and no cores where that is under ``min_s``."""
    both = [s for s in samples if all(0 < d < f for d, f in zip(s[1], final))]
    if len(both) < 2 or both[-1][0] - both[0][0] < min_s:
        return {"rate": None, "overlap_s": 0.0, "cores": {"workers": None, "broker": None, "idle": None}}
    (t0, d0, c0, b0, i0), (t1, d1, c1, b1, i1) = both[0], both[-1]
    dt = t1 - t0
    return {"rate": (sum(d1) - sum(d0)) / dt, "overlap_s": dt,
            "cores": {"workers": (sum(c1) - sum(c0)) / dt, "broker": None if b0 is None else (b1 - b0) / dt,
                      "idle": None if i0 is None else (i1 - i0) / dt}}


def faust_rate(*child_args: str) -> float:
    # Faust writes its data directory ("{app id}-data") into the working directory: a throwaway one.
    with tempfile.TemporaryDirectory(prefix="bench-faust-") as cwd:
        out = subprocess.run([sys.executable, __file__, *child_args], cwd=cwd, capture_output=True, text=True,
                             timeout=900)
    for line in (out.stdout + out.stderr).splitlines():  # Faust redirects stdout into its log
        if '{"events"' in line:
            return json.loads(line[line.index('{"events"'):])["rate"]
    raise RuntimeError(f"faust agent failed: {out.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="20,000 events over 10,000 users")
    ap.add_argument("--events", type=int)
    ap.add_argument("--users", type=int)
    ap.add_argument("--faust-child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--json", metavar="OUT", help="write the rates (events/s) to this JSON file")
    ap.add_argument("--logic", action="store_true", help="only the sequence agent's logic, no broker, at "
                    "150,000 / 10,000 / 2,000 users (from one event per user and batch to many)")
    args = ap.parse_args()
    if args.faust_child:
        faust_noop_child(args.faust_child[0], args.faust_child[1], int(args.faust_child[2]))
        return
    if args.logic:
        n = args.events or (20_000 if args.quick else 200_000)
        out = {}
        print(f"sequence agent logic, {n:,} events, batches of 2,000 over 4 partitions, in-memory store:")
        for users in ([args.users] if args.users else [150_000, 10_000, 2_000]):
            r = logic_rate(n, users)
            out[f"logic_sequences_{users}_users"] = round(r["events_per_cpu_s"])
            print(f"  {users:>7,} users: {r['events_per_cpu_s']:9,.0f} events per CPU-second ({r['us_per_event']:.1f} "
                  f"us/event, of which encoding the deltas {r['encode_us_per_event']:.2f})", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out | {"events": n}, indent=1) + "\n")
        return
    from schemas.logs import setup_logging

    setup_logging("WARNING")
    from streaming.kafka import create_topics
    from streaming.broker import EmbeddedBroker
    from streaming.producers import produce
    from streaming.producers.synthetic import SyntheticConfig, SyntheticStream

    n = args.events or (20_000 if args.quick else 200_000)
    users = args.users or (10_000 if args.quick else 150_000)
    rows = []
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(100))

        def fresh() -> tuple[KafkaSettings, int]:
            """Its own copy of the same events (same seed): each agent run starts with empty
            export topics, else it would rebuild the previous run's output and find nothing to do."""
            kafka = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=f"bench{next(runs)}-")
            create_topics(kafka, ALL_TOPICS)
            return kafka, produce_behaviors(kafka, n, users)

        t = time.perf_counter()
        kafka, distinct = fresh()
        print(f"produced {n} behaviors, {distinct} distinct users, in {time.perf_counter() - t:.1f}s", flush=True)
        topic = kafka.topic(BEHAVIORS)

        best, reads, read_cores = plain_consumer_rate(kafka, topic, n)
        rows.append(("plain confluent-kafka consumer", best, "best of " + " / ".join(
            f"{r:,.0f} ({c:.2f} cores)" for r, c in zip(reads, read_cores)) + "; a read below ~1 core waits on the "
            "broker"))
        print(rows[-1], flush=True)
        rows.append(("Faust no-op agent (per-event iteration)", faust_rate("--faust-child", broker.bootstrap, topic,
                                                                            str(n)), ""))
        print(rows[-1], flush=True)
        pid = broker.proc.pid
        one = workers_rate(fresh()[0], "sequences", n, Path(tmp) / "s1", broker_pid=pid)
        rate = one["rate"]
        rows.append(("sequence agent, 1 worker", rate, f"{rate / rows[0][1]:.0%} of the plain consumer; "
                     f"{one['events_per_cpu_s'][0]:,} events per CPU-second; {one['outputs'][0]} sequences "
                     f"published; cores used: {_cores(one['cores'])}"))
        print(rows[-1], flush=True)
        floor = in_process(kafka, n, Path(tmp) / "floor", "bench-floor", IoFloor())
        rows.append(("I/O floor: the worker, decode, no logic", floor["rate"], (
            f"{floor['rate'] / rows[0][1]:.0%} of the plain consumer; {floor['events_per_cpu_s']:,.0f} events per "
            f"CPU-second ({floor['cores']:.2f} cores); the agent's decode and one state read, write and output "
            f"per user: what an agent pays on this stack before its logic")))
        print(rows[-1], flush=True)
        two = workers_rate(fresh()[0], "sequences", n, Path(tmp) / "s2", workers=2, broker_pid=pid)
        rate2, cores = two["rate"], two["cores"]
        rows.append(("sequence agent, 2 workers (total)", rate2, f"{rate2 / 2:,.0f}/s per worker, {rate2 / rate:.2f}x "
                     f"of 1 worker, {_window(two)}; events per CPU-second per worker "
                     f"{two['events_per_cpu_s']}; events {two['events']}, partitions {two['partitions']}; "
                     f"cores used while both ran: {_cores(cores)}"))
        print(rows[-1], flush=True)

        jkafka = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix="bench-join-")
        create_topics(jkafka, ALL_TOPICS)
        cfg = SyntheticConfig(users=max(users // 10, 1000), items=20_000, events=n // 2, seed=1)
        stats = produce(jkafka, SyntheticStream(cfg), progress_every=1e9)
        jn = int(stats["events"])
        j = workers_rate(jkafka, "joiner", jn, Path(tmp) / "j", broker_pid=pid)
        rows.append(("joiner (impressions + behaviors)", j["rate"], f"{j['events_per_cpu_s'][0]:,} events per "
                     f"CPU-second; {jn} events, {j['outputs'][0]} examples; cores used: {_cores(j['cores'])}"))
        print(rows[-1], flush=True)

        from streaming.agents.faust_app import bench_faust

        f = bench_faust(fresh()[0], n)
        rows.append(("sequence agent on Faust (1 worker)", f["rate"], f"{f['rate'] / rows[1][1]:.0%} of the Faust no-op; "
                     f"{f.get('events_per_cpu_s', 0):,.0f} events per CPU-second"))
        print(rows[-1], flush=True)
        # The joiner's changelog is per topic prefix: a fresh prefix so the Faust joiner starts from empty state.
        fkafka = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix="bench-join-faust-")
        create_topics(fkafka, ALL_TOPICS)
        produce(fkafka, SyntheticStream(cfg), progress_every=1e9)
        f = bench_faust(fkafka, jn, "joiner")
        rows.append(("joiner on Faust (1 worker)", f["rate"], f"{f.get('events_per_cpu_s', 0):,.0f} events per CPU-second"))
        print(rows[-1], flush=True)

        prof = profile_sequences(fresh()[0], n, Path(tmp) / "prof")

    rates = dict(zip(["plain_consumer", "faust_noop", "sequences_worker_1", "io_floor", "sequences_worker_2",
                      "joiner_worker", "sequences_faust", "joiner_faust"], [round(r) for _, r, _ in rows]))
    if args.json:
        extra = {"plain_consumer_reads": [round(r) for r in reads],
                 "plain_consumer_cores": [round(c, 2) for c in read_cores],
                 "io_floor_per_cpu_s": round(floor["events_per_cpu_s"]), "io_floor_cores": round(floor["cores"], 2),
                 "sequences_worker_2_span": round(two["span_rate"]),
                 "cores_2_workers": cores}
        Path(args.json).write_text(json.dumps(rates | extra | {"events": n, "users": distinct}, indent=1) + "\n")

    print(f"\n{n} events ({distinct} users), 4 partitions, embedded broker, {os.cpu_count()} cores shared with the "
          f"broker and other jobs (load average {os.getloadavg()[0]:.1f})\n")
    print(f"| {'consumer':42s} | {'events/s':>9s} | notes |")
    print(f"|{'-' * 44}|{'-' * 11}|-------|")
    for name, r, note in rows:
        print(f"| {name:42s} | {r:9,.0f} | {note} |")
    print(f"\ngoals: sequence worker >= 1/3 of the plain consumer: {rates['sequences_worker_1'] / rates['plain_consumer']:.2f}"
          f" (the I/O floor, no agent logic: {rates['io_floor'] / rates['plain_consumer']:.2f})"
          f"; 2 workers >= 1.8x one: {rates['sequences_worker_2'] / rates['sequences_worker_1']:.2f}x (cores used: "
          f"{_cores(cores)}, of {os.cpu_count()})")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
    print("\nsequence agent, 1 worker, cProfile (tottime; profiling slows it ~2x):")
    print("\n".join(line for line in s.getvalue().splitlines()[4:] if line.strip()))
    print("\nwhere the sequence agent's time goes (cumulative, share of the profiled loop):")
    for what, share in profile_shares(prof):
        print(f"  {share:5.1%}  {what}")


def _window(run: dict) -> str:
    if not run["overlap_s"]:
        return "from the first batch of either to the last of both (too short a run to measure while both ran)"
    return (f"while both ran ({run['overlap_s']:.1f} s; from the first batch of either to the last of both: "
            f"{run['span_rate']:,.0f}/s)")


def _cores(cores: dict) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in cores.items() if v is not None) or "unknown"


def profile_shares(prof: cProfile.Profile) -> list[tuple[str, float]]:
    stats = pstats.Stats(prof).stats  # (file, line, function) -> (cc, nc, tottime, cumtime, callers)
    groups = {"decode + validate JSON (pydantic field validator)": ("sequences.py", "decode"),
              "tokenize a batch (blake2b event keys, condition ids)": ("tokenize.py", "tokenize_rows"),
              "new users' tails, encoded in one pass": ("tokenize.py", "encode_rows_many"),
              "append to or merge into stored users' tails and bases, dedup, cap": (
                  "sequences.py", "_append_ones|_append|_apply"),
              "encode the deltas (vectorised passes)": ("seqexport.py", "encode_deltas"),
              "produce to sequence-deltas": ("worker.py", "send|send_many"),
              "RocksDB multi-get + WriteBatch": ("~", "<method 'get' of 'builtins.Rdict' objects>|"
                                                      "<method 'write' of 'builtins.Rdict' objects>"),
              "producer flush (wait for the broker)": ("~", "<method 'flush' of 'cimpl.Producer' objects>"),
              "consume (librdkafka)": ("~", "<method 'consume' of 'cimpl.Consumer' objects>")}
    total = sum(v[2] for v in stats.values())
    out = []
    for what, (file, funcs) in groups.items():
        ct = sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(file) and fn in funcs.split("|"))
        out.append((what, ct / total))
    # The worker loop's own time (its callees are above): a Record per message, grouped by partition.
    own = sum(v[2] for (f, _, fn), v in stats.items() if f.endswith("worker.py") and fn == "step")
    out.append(("worker loop: a record per message, by partition", own / total))
    return out + [("other (the agent's batching by user, keys, store commit, metrics, ...)", 1 - sum(x for _, x in out))]


if __name__ == "__main__":
    main()
