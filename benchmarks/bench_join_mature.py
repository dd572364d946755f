"""The joiner's per-event CPU as its state matures, without a broker: is the cost flat over time?

    .venv/bin/python benchmarks/bench_join_mature.py                         # 1.5M events, ~2 min
    .venv/bin/python benchmarks/bench_join_mature.py --events 400000 --profile-from 300000
    .venv/bin/python benchmarks/bench_join_mature.py --json OUT

The soak's stream (``lum produce synthetic --users 2000 --seed 7``; ~12 events per event-second, so the
24 h retention is reached after ~1M events) goes through ``JoinLogic`` on real ``RocksStore``s (4 partitions
by user, synced commits, the worker's memory budget) in batches of ``--batch`` events, exactly as the worker
drives it (process, commit, delivered), with the outputs counted instead of produced. Printed per window of
``--window`` events: CPU microseconds per event (process time, all threads: RocksDB's compactions count; the
main thread's alone; and wall, which also counts the synced writes), output messages per event (examples +
changelog + late clicks: the producer calls the worker would make), the event time reached (hours), the keys
and SST megabytes in the stores, the megabytes compactions wrote in the window (10 MB resolution), and the RSS.
Flat rows after the first day of event time are the goal (issue 9: the soak's joiner fell behind once retention
and eviction started).
``--profile-from N`` runs cProfile from event N to the end and prints its top functions.
The encoded stream is cached under the temporary directory. The machine is shared: read microseconds +-20%.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pickle
import pstats
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas.topics import BEHAVIORS, IMPRESSIONS, key_of  # noqa: E402
from streaming.agents.join_logic import JoinConfig, JoinLogic  # noqa: E402
from streaming.agents.store import Record, RocksStore  # noqa: E402

PARTS = 4


def stream(events: int, users: int, seed: int) -> list[tuple[str, int, bytes]]:
    """(topic, user, encoded value) of the soak's synthetic stream, cached."""
    cache = Path(tempfile.gettempdir()) / f"lum-join-mature-{events}-{users}-{seed}.pkl"
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    from schemas.events import ImpressionEvent
    from streaming.producers.synthetic import SyntheticConfig, SyntheticStream

    out = []
    for ev in SyntheticStream(SyntheticConfig(users=users, events=events, seed=seed)):
        topic = IMPRESSIONS if isinstance(ev, ImpressionEvent) else BEHAVIORS
        out.append((topic.name, ev.user_id, topic.encode(ev)))
    cache.write_bytes(pickle.dumps(out, protocol=5))
    return out


class CountingEmit:
    """An Emit that counts messages (what the worker's producer would be handed) and their bytes."""

    def __init__(self) -> None:
        self.messages, self.calls, self.bytes = Counter(), 0, 0

    def send(self, topic, value, key=None, partition=None) -> None:
        self.calls += 1
        self.messages[topic.name] += 1
        self.bytes += len(value or b"") + len(key or b"")

    def send_many(self, topic, values, keys, partition=None) -> None:
        self.calls += 1
        self.messages[topic.name] += len(values)
        self.bytes += sum(len(v or b"") for v in values) + sum(len(k or b"") for k in keys)

    def dead_letter(self, record, reason) -> None:
        self.messages["dead-letters"] += 1


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rocks_sizes(stores) -> tuple[float, float]:
    """(SST files, bytes written by compactions so far) of ``stores`` in MB (the latter 10 MB resolution)."""
    sst = compacted = 0.0
    for s in stores:
        sst += (s.db.property_int_value("rocksdb.total-sst-files-size") or 0) / 2**20
        for line in (s.db.property_value("rocksdb.stats") or "").splitlines():
            if line.startswith("Cumulative compaction:"):  # "Cumulative compaction: 0.12 GB write, ..."
                compacted += float(line.split()[2]) * 1024
    return sst, compacted


def run(args) -> dict:
    events = stream(args.events, args.users, args.seed)[:args.limit]
    cfg = JoinConfig()
    logic = JoinLogic(cfg)
    offsets: dict[tuple[str, int], int] = Counter()
    logic.high_water = lambda topic, p: offsets[(topic, p)]  # kept up: every stream at its end
    emit = CountingEmit()
    tmp = tempfile.TemporaryDirectory(prefix="lum-join-mature-")
    stores = {p: RocksStore(Path(tmp.name) / f"p{p}", {"partition": p}) for p in range(PARTS)}
    for p, s in stores.items():
        logic.assign(p, s, {}, emit, lambda t, q: iter(()))
    rows, prof = [], None
    w_cpu, w_wall, w_n, w_msgs = time.process_time(), time.perf_counter(), 0, sum(emit.messages.values())
    w_main = time.thread_time()
    w_compacted = 0.0
    t_first = None
    for i in range(0, len(events), args.batch):
        if args.profile_from is not None and prof is None and i >= args.profile_from:
            prof = cProfile.Profile()
            prof.enable()
        by_part: dict[int, list[Record]] = {}
        for topic, user, value in events[i:i + args.batch]:
            p = user % PARTS
            off = offsets[(topic, p)]
            offsets[(topic, p)] = off + 1
            by_part.setdefault(p, []).append(Record(topic, p, off, 0, key_of(user), value))
        for p, records in by_part.items():
            logic.process(p, records, emit)
            stores[p].commit({t: offsets[(t, p)] for t in (IMPRESSIONS.name, BEHAVIORS.name)})
        logic.delivered()
        w_n += sum(len(r) for r in by_part.values())
        if w_n >= args.window or i + args.batch >= len(events):
            cpu, wall, main = time.process_time(), time.perf_counter(), time.thread_time()
            wm = max(st.wm for st in logic.parts.values())
            if t_first is None:
                t_first = wm
            msgs = sum(emit.messages.values())
            keys = sum(int(s.db.property_int_value("rocksdb.estimate-num-keys") or 0) for s in stores.values())
            sst, compacted = rocks_sizes(stores.values())
            row = {"events": min(i + args.batch, len(events)), "us_per_event": 1e6 * (cpu - w_cpu) / w_n,
                   "wall_us_per_event": 1e6 * (wall - w_wall) / w_n,
                   "main_thread_us_per_event": 1e6 * (main - w_main) / w_n,
                   "out_per_event": (msgs - w_msgs) / w_n, "event_hours": (wm - t_first) / 3600_000,
                   "keys": keys, "sst_mb": sst, "compaction_write_mb": compacted - w_compacted, "rss_mb": rss_mb()}
            rows.append(row)
            print(f"  {row['events']:>9,} events  {row['us_per_event']:6.1f} us/event (main thread {row['main_thread_us_per_event']:5.1f}, "
                  f"wall {row['wall_us_per_event']:6.1f})  "
                  f"{row['out_per_event']:5.2f} out msgs/event  event time +{row['event_hours']:5.1f} h  "
                  f"~{keys:>9,} keys  SST {sst:4.0f} MB (compactions wrote {row['compaction_write_mb']:5.0f} MB)  "
                  f"RSS {row['rss_mb']:.0f} MB", flush=True)
            w_cpu, w_wall, w_main, w_n, w_msgs, w_compacted = cpu, wall, main, 0, msgs, compacted
    if prof is not None:
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        print(s.getvalue())
    for s in stores.values():
        s.close()
    tmp.cleanup()
    late = rows[len(rows) // 2:]
    summary = {"events": len(events), "us_per_event_all": sum(r["us_per_event"] for r in rows) / len(rows),
               "us_per_event_last_half": sum(r["us_per_event"] for r in late) / len(late),
               "events_per_cpu_s_last_half": 1e6 / (sum(r["us_per_event"] for r in late) / len(late)),
               "messages": dict(emit.messages), "emit_calls": emit.calls, "counts": logic.gauges(),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"last half: {summary['us_per_event_last_half']:.1f} us/event "
          f"({summary['events_per_cpu_s_last_half']:,.0f} events per CPU-second); messages {dict(emit.messages)}; "
          f"emit calls {emit.calls}")
    return {"rows": rows, "summary": summary}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_500_000)
    ap.add_argument("--limit", type=int, default=None, help="only the first N events of the (cached) stream")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--batch", type=int, default=560, help="events per worker batch (the soak's ~2,800/s x 200 ms)")
    ap.add_argument("--window", type=int, default=100_000, help="events per printed row")
    ap.add_argument("--profile-from", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    res = run(args)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
