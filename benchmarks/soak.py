"""Soak test: the whole streaming pipeline at a fixed event rate on the embedded broker, for minutes.

    .venv/bin/python benchmarks/soak.py                        # 10 minutes, rate = half the measured pipeline rate
    .venv/bin/python benchmarks/soak.py --minutes 4 --rate 300 --json soak.json

Starts the embedded broker, creates the topics, then runs as subprocesses (each in its own process group):
``lum produce synthetic --rate R`` (a fixed rate), ``lum agents`` (sequence agent and joiner) and one DLRM
trainer (``lum train --features baseline --preset debug``). Without ``--rate``, R is half the rate the
pipeline sustains as the soak deploys it (floor 200 events/s): the agents and the trainer start, 200,000 events
are produced as fast as possible beside them, and the agents' time to take them in (from their first commit to
caught up, the producer done), with the producer, the trainer and the broker on the same cores, gives the rate
(the output says whether the agents or the producer were the limit, and the load average). The agents and the
trainer keep running and the soak's producer continues the same stream (``--skip``). The other half is
headroom: the machine's other load changes during the soak.

It samples every 10 s and prints every minute and at the end: consumer-group lag (last, max so far; lag =
fetched end offset - committed, from ``streaming.status``), the RSS (VmRSS) of every process it started and of
each of their descendants (``agents/joiner-1``: an agent worker) at the start, at 2 minutes and now, the bytes
under the agents' RocksDB data directory, the dead-letter count, the ``training-examples`` count, the
examples in the trainer's last checkpoint, the joiner's CPU per event (CPU seconds of its workers per event
they consumed, over the last minute and since the start: steadier than lag when the machine's other load
varies), and the load average. At the end, one verdict per goal:

- lag bounded, per group: no upward trend over the last half. The peak lag of the last quarter must not exceed
  1.25x the peak of the third quarter plus 5 s worth of events (the allowance absorbs batching), and the
  least-squares slope of the lag over the last half must stay under 2% of the input rate (a steady climb is
  falling behind). The trainer commits only at a checkpoint (every 60 s by default), so its committed lag is a
  saw-tooth whose teeth are the checkpoint interval: sampled every 10 s, its slope measures where the samples fell
  on the teeth, not a trend. The trainer is therefore judged on its committed lag's peaks and on its own lag
  (``lum_consumer_lag`` on its metrics endpoint: the end offset its fetches saw minus its position), peaks
  and slope.
- RSS growth < 10% per process (the agents' supervisor and each worker apart), from the sample at 2 minutes
  (or at half the run, if shorter) to the end. The broker's RSS is shown but not judged: its memory storage
  keeps every record, so it grows by design.

Every process it started is stopped on exit, Ctrl-C and SIGTERM included. ``--json OUT`` writes the config,
the samples and the verdicts. The machine is usually shared: read rates and lags as noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas import metrics  # noqa: E402
from schemas.settings import KafkaSettings  # noqa: E402
from schemas.topics import BEHAVIORS, DEAD_LETTERS, IMPRESSIONS, TRAINING_EXAMPLES  # noqa: E402
from streaming import status as st  # noqa: E402
from streaming.broker import EmbeddedBroker, free_port  # noqa: E402
from streaming.kafka import create_topics  # noqa: E402

LUM = str(Path(sys.executable).parent / "lum")
SEED = 7
USERS = 2000
MEASURE_EVENTS = 200_000  # enough that the pipeline (thousands of events/s) can be timed
RATE_FLOOR = 200.0
SLOPE_SHARE = 0.02  # lag growth over the last half tolerated, as a share of the input rate
BASE_S = 120.0  # RSS growth is judged from this point of the soak to its end
GROUPS = ("lum-sequences", "lum-joiner", "lum-dlrm-baseline")
TRAINER = GROUPS[2]
POSITION = f"{TRAINER} position"  # the trainer's own lag (fetched end - its position), from its metrics endpoint
MB = 1 << 20


# --- processes ----------------------------------------------------------------------------------------------
class Procs:
    """Subprocesses in their own process groups, stopped together (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs, self.procs = env, logs, {}

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")
        p = subprocess.Popen([LUM, *args], env=self.env | (env or {}), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                             start_new_session=True)
        out.close()
        self.procs[name] = p
        return p

    def stop(self, name: str | None = None, grace: float = 20.0) -> None:
        names = [name] if name else list(self.procs)
        for n in names:
            _signal_group(self.procs[n], signal.SIGTERM)
        deadline = time.monotonic() + grace
        for n in names:
            p = self.procs.pop(n)
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p, signal.SIGKILL)  # the group: workers of a supervisor that exited first, too
            p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(d))
    return kids


def process_rss(name: str, pid: int, kids: dict[int, list[int]]) -> dict[str, int]:
    """VmRSS in bytes of a started process and of each of its descendants, by name: ``name`` for the process
    itself, ``name/<agent>-<index>`` for an agent worker (the same name across a restart), ``name/<pid>`` for
    any other descendant. A process that is gone is left out."""
    out, todo = {}, [(pid, name)]
    while todo:
        p, n = todo.pop()
        todo += [(c, f"{name}/{_child_name(c)}") for c in kids.get(p, [])]
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[n] = out.get(n, 0) + int(line.split()[1]) * 1024
        except OSError:
            pass
    return out


def process_cpu(name: str, pid: int, kids: dict[int, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system, all threads) of a started process and of each descendant, named as by
    ``process_rss``."""
    out, todo, tick = {}, [(pid, name)], os.sysconf("SC_CLK_TCK")
    while todo:
        p, n = todo.pop()
        todo += [(c, f"{name}/{_child_name(c)}") for c in kids.get(p, [])]
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            out[n] = out.get(n, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def cpu_per_event(samples: list[dict], group: str = "lum-joiner", prefix: str = "agents/joiner") -> list[tuple]:
    """(t_s, CPU microseconds per event consumed) of the ``group``'s workers between consecutive samples: events
    consumed = events produced - the group's lag. Steadier than lag on a shared machine (it does not count
    the time the worker waited for a core)."""
    out = []
    for a, b in zip(samples, samples[1:]):
        if a["lag"].get(group) is None or b["lag"].get(group) is None:
            continue
        cpu = lambda s: sum(v for k, v in s.get("cpu_s", {}).items() if k.startswith(prefix))  # noqa: E731
        done = (b["events"] - b["lag"][group]) - (a["events"] - a["lag"][group])
        if done > 0 and cpu(b) >= cpu(a):
            out.append((b["t_s"], 1e6 * (cpu(b) - cpu(a)) / done))
    return out


def _child_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return str(pid)
    if "-m" in argv and "--index" in argv:  # python -m streaming.agents.worker AGENT --index I
        i = argv.index("-m")
        return f"{argv[i + 2]}-{argv[argv.index('--index') + 1]}"
    return str(pid)


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:  # a RocksDB file compacted away meanwhile
                pass
    return total


# --- Kafka figures --------------------------------------------------------------------------------------------
def kafka_figures(kafka: KafkaSettings) -> tuple[dict[str, int], dict[str, int]]:
    """({group: lag}, {topic: messages}) for our groups and topics."""
    from streaming.kafka.admin import _admin

    md = _admin(kafka).list_topics(timeout=15)
    ours = {n: len(t.partitions) for n, t in md.topics.items() if not n.startswith("__")}
    ends = st.end_offsets(kafka, ours)
    lag: dict[str, int] = {}
    for row in st.group_lag(kafka, ends):
        if "lag" in row:
            lag[row["group"]] = lag.get(row["group"], 0) + row["lag"]
    return lag, {n: sum(e or 0 for e in ends[n].values()) for n in ends}


def measure_pipeline_rate(procs: Procs, kafka: KafkaSettings, trainer_args: list[str], trainer_env: dict[str, str],
                          timeout: float = 300.0) -> float | None:
    """Events/s the pipeline sustains as the soak deploys it: the agents and the trainer start, and the producer
    sends MEASURE_EVENTS events as fast as it can beside them (all on the same cores); timed from the first
    commit seen (both agents assigned and consuming) to both agent groups caught up once the producer is done.
    The agents' progress is the joiner's (it reads both inputs); the producer may be the limit, which the
    output says. None when they were too quick to time. The agents and the trainer keep running into the soak."""
    print(f"measuring the pipeline rate: {MEASURE_EVENTS} events produced as fast as possible while the agents "
          "and the trainer run ...", flush=True)
    procs.start("agents", ["agents"])
    procs.start("trainer", trainer_args, trainer_env)
    producer = procs.start("produce-measure", ["produce", "synthetic", "--users", str(USERS), "--events",
                                               str(MEASURE_EVENTS), "--rate", "0", "--seed", str(SEED)])
    t0 = done0 = produced_at = lag_at_produced = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lag, sizes = kafka_figures(kafka)
        now = time.monotonic()
        seq, join = lag.get(GROUPS[0]), lag.get(GROUPS[1])
        if produced_at is None and producer.poll() is not None:
            if producer.returncode != 0:
                raise RuntimeError(f"the measuring producer failed (see {procs.logs / 'produce-measure.log'})")
            procs.procs.pop("produce-measure")
            produced_at, lag_at_produced = now, join
        if seq is not None and join is not None:
            done = sizes.get(kafka.topic(BEHAVIORS), 0) + sizes.get(kafka.topic(IMPRESSIONS), 0) - join
            if t0 is None:
                t0, done0 = now, done
            if produced_at is not None and seq == 0 and join == 0:
                if done - done0 < MEASURE_EVENTS / 4:
                    print(f"  the agents took in {MEASURE_EVENTS} events before they could be timed", flush=True)
                    return None
                rate = (done - done0) / (now - t0)
                limit = ("the producer was the limit: the agents kept up" if (lag_at_produced or 0) < MEASURE_EVENTS / 20
                         else f"the agents were the limit: {lag_at_produced} events behind when the producer finished")
                print(f"  the agents took in {done - done0} events in {now - t0:.1f}s: {rate:.0f} events/s ({limit}); "
                      f"load average {_load()}", flush=True)
                return rate
        time.sleep(0.2)
    raise RuntimeError(f"the agents did not catch up on {MEASURE_EVENTS} events within {timeout:.0f}s")


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# --- samples, tables and verdicts -----------------------------------------------------------------------------
def trainer_lag(port: int) -> int | None:
    """The trainer's own lag over its partitions (None until its metrics endpoint answers with one)."""
    samples = metrics.scrape(port)
    return int(metrics.total(samples, "lum_consumer_lag")) if any(n == "lum_consumer_lag" for n, _ in samples) else None


def sample(t0: float, procs: Procs, kafka: KafkaSettings, data_dir: Path, ckpt: Path, trainer_port: int) -> dict:
    lag, sizes = kafka_figures(kafka)
    kids = _children()
    trained = st.checkpoint(ckpt, time.time()).get("examples") if (ckpt / "LATEST").exists() else None
    return {"t_s": round(time.monotonic() - t0, 1),
            "lag": {g: lag.get(g) for g in GROUPS} | {POSITION: trainer_lag(trainer_port)},
            "rss": {k: v for n, p in procs.procs.items() for k, v in process_rss(n, p.pid, kids).items()},
            "cpu_s": {k: v for n, p in procs.procs.items() for k, v in process_cpu(n, p.pid, kids).items()},
            "alive": {n: p.poll() is None for n, p in procs.procs.items()},
            "load_1m": round(os.getloadavg()[0], 2), "rocksdb_bytes": dir_bytes(data_dir), "dead_letters": sizes.get(kafka.topic(DEAD_LETTERS), 0),
            "training_examples": sizes.get(kafka.topic(TRAINING_EXAMPLES), 0), "trained_examples": trained,
            "events": sizes.get(kafka.topic(BEHAVIORS), 0) + sizes.get(kafka.topic(IMPRESSIONS), 0)}


def _table(header: list[str], rows: list[list]) -> list[str]:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]


def base_sample(samples: list[dict], duration: float) -> dict | None:
    """The sample RSS growth is measured from: the first at or after 2 minutes (half the run, if shorter)."""
    return next((s for s in samples if s["t_s"] >= min(BASE_S, duration / 2)), None)


def _alive(sample: dict, name: str) -> bool:
    root = name.split("/")[0]
    return bool(sample["alive"].get(root)) and name in sample["rss"]


def report(samples: list[dict], title: str, duration: float) -> str:
    first, last = samples[0], samples[-1]
    base = base_sample(samples, duration)
    lags = [[g, _n(last["lag"].get(g)), _n(max((s["lag"][g] for s in samples if s["lag"].get(g) is not None),
                                                default=None))] for g in (*GROUPS, POSITION)]
    names = sorted({n for s in samples for n in s["rss"]}, key=lambda n: (n.split("/")[0] not in last["alive"], n))
    mb = lambda s, n: "-" if s is None or n not in s["rss"] else f"{s['rss'][n] / MB:.0f}"  # noqa: E731
    rss = [[n, mb(first, n), mb(base, n), mb(last, n), "yes" if _alive(last, n) else "NO"] for n in names]
    out = [f"--- {title}: t={last['t_s']:.0f}s, {last['events']} events produced ---"]
    out += _table(["consumer group", "lag last", "lag max"], lags)
    out += _table(["process", "RSS MB t=0", f"at t={base['t_s']:.0f}s" if base else f"at t={min(BASE_S, duration / 2):.0f}s",
                   "now", "alive"], rss)
    per_event = cpu_per_event(samples)
    if per_event:
        minute = [us for t, us in per_event if t > last["t_s"] - 60] or [per_event[-1][1]]
        out.append(f"joiner CPU per event: {_mean(minute):.0f} us over the last minute, "
                   f"{_mean([us for _, us in per_event]):.0f} us since the start (CPU of agents/joiner-* / events it "
                   "consumed)")
    out.append(f"RocksDB {last['rocksdb_bytes'] / MB:.1f} MB | dead letters {last['dead_letters']} | "
               f"training examples {last['training_examples']} | trained (last checkpoint) "
               f"{_n(last['trained_examples'])}")
    return "\n".join(out)


def _n(x) -> str:
    return "-" if x is None else str(x)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def slope(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope (per second)."""
    mt, my = _mean(ts), _mean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den if den else 0.0


def verdicts(samples: list[dict], duration: float, rate: float, broker_memory: bool = True) -> list[dict]:
    out = []
    for g in (*GROUPS, POSITION):
        pts = [(s["t_s"], s["lag"][g]) for s in samples if s["lag"].get(g) is not None]
        q3 = [y for t, y in pts if duration / 2 <= t < 3 * duration / 4]
        q4 = [y for t, y in pts if t >= 3 * duration / 4]
        half = [(t, y) for t, y in pts if t >= duration / 2]
        if not q3 or not q4:
            out.append({"goal": f"lag bounded: {g}", "ok": None if g != POSITION else False,
                        "detail": "too few samples in the last half"})
            continue
        allowance = 5 * rate
        bound = 1.25 * max(q3) + allowance
        s = slope([t for t, _ in half], [y for _, y in half]) if len(half) > 1 else 0.0
        # Both: the peaks may not climb, and the lag may not grow by more than 2% of the input rate over the
        # last half (a steady climb that stays under the peak bound is still falling behind). Not the slope of
        # the trainer's committed saw-tooth (its own lag, POSITION, carries the slope rule for it).
        judge_slope = g != TRAINER
        out.append({"goal": f"lag bounded: {g}", "ok": max(q4) <= bound and (s <= SLOPE_SHARE * rate or not judge_slope),
                    "detail": f"peak last quarter {max(q4)} vs bound {bound:.0f} (1.25 x third quarter's {max(q3)} "
                              f"+ {allowance:.0f}); slope over last half {s:+.1f}/s vs bound "
                              f"{SLOPE_SHARE * rate:.0f}/s ({SLOPE_SHARE:.0%} of the rate"
                              + ("" if judge_slope else "; not judged: checkpoint saw-tooth") + "); "
                              f"mean q3 {_mean(q3):.0f}, q4 {_mean(q4):.0f}"})
    base, last = base_sample(samples, duration) or samples[-1], samples[-1]
    for n in sorted(base["rss"]):
        b, e = base["rss"][n], last["rss"].get(n, 0)
        goal = f"RSS growth < 10%: {n}"
        if n == "broker" and broker_memory:  # memory storage holds every record: it grows by design
            out.append({"goal": goal, "ok": None, "detail": f"not judged (memory storage): "
                        f"{b / MB:.0f} MB at t={base['t_s']:.0f}s -> {e / MB:.0f} MB at t={last['t_s']:.0f}s"})
            continue
        if not _alive(last, n):
            out.append({"goal": goal, "ok": False, "detail": "process exited"})
            continue
        growth = (e - b) / b if b else None
        out.append({"goal": goal, "ok": growth is not None and growth < 0.10,
                    "detail": f"{b / MB:.0f} MB at t={base['t_s']:.0f}s -> {e / MB:.0f} MB at t={last['t_s']:.0f}s "
                              f"({'-' if growth is None else f'{growth:+.1%}'})"})
    return out


# --- main -----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    ap.add_argument("--rate", type=float, default=None, help="producer events/s (default: half the measured "
                    f"pipeline rate, at least {RATE_FLOOR:.0f})")
    ap.add_argument("--json", type=Path, default=None, help="write config, samples and verdicts here")
    ap.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples (default 10)")
    ap.add_argument("--workdir", type=Path, default=None, help="state, checkpoints and logs (default: a temporary "
                    "directory, removed at the end)")
    args = ap.parse_args(argv)

    def _term(*_):  # SIGTERM: the same clean stop as Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _term)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lum-soak-"))
    data_dir, ckpt, logs = work / "state", work / "ckpt", work / "logs"
    for d in (data_dir, ckpt, logs):
        d.mkdir(parents=True, exist_ok=True)
    duration = args.minutes * 60
    broker = EmbeddedBroker(log_path=logs / "broker.log")
    procs = None
    try:
        broker.start()
        env = os.environ | {"LUM_KAFKA_BOOTSTRAP": broker.bootstrap, "LUM_KAFKA_PROFILE": "embedded",
                            "LUM_KAFKA_TOPIC_PREFIX": "", "LUM_DATA_DIR": str(data_dir)}
        os.environ.update({k: env[k] for k in ("LUM_KAFKA_BOOTSTRAP", "LUM_KAFKA_PROFILE", "LUM_KAFKA_TOPIC_PREFIX")})
        kafka = KafkaSettings()
        create_topics(kafka)
        print(f"embedded broker at {broker.bootstrap}; work directory {work}", flush=True)
        procs = Procs(env, logs)
        skip = 0
        trainer = ["train", "--features", "baseline", "--checkpoint-dir", str(ckpt), "--preset", "debug"]
        trainer_port = free_port()
        if args.rate is None:
            measured = measure_pipeline_rate(procs, kafka, trainer, {"LUM_METRICS_PORT": str(trainer_port)})
            rate, skip = max(RATE_FLOOR, (measured or 0) / 2), MEASURE_EVENTS
        else:
            measured, rate = None, args.rate
            procs.start("agents", ["agents"])
            procs.start("trainer", trainer, {"LUM_METRICS_PORT": str(trainer_port)})
        events = int(rate * (duration + 120))  # more than the soak needs: the producer never runs dry
        procs.start("producer", ["produce", "synthetic", "--users", str(USERS), "--events", str(events + skip),
                                 "--skip", str(skip), "--rate", f"{rate:.1f}", "--seed", str(SEED)])
        procs.procs["broker"] = broker.proc
        print(f"soak: {args.minutes:g} min at {rate:.0f} events/s"
              + (" (--rate)" if args.rate is not None else f" (half the pipeline rate measured with "
                 f"every process of the soak running, {measured:.0f}/s; floor {RATE_FLOOR:.0f})" if measured else
                 f" (pipeline rate not measured: floor {RATE_FLOOR:.0f})")
              + f"; sampling every {args.sample_s:g}s; load average {_load()}", flush=True)

        t0 = time.monotonic()
        samples = [sample(t0, procs, kafka, data_dir, ckpt, trainer_port)]
        next_minute = 60.0
        while True:
            wait = min(args.sample_s, duration - (time.monotonic() - t0))
            if wait > 0:
                time.sleep(wait)
            s = sample(t0, procs, kafka, data_dir, ckpt, trainer_port)
            samples.append(s)
            print(f"  t={s['t_s']:5.0f}s events={s['events']} lag " + " ".join(f"{g}={_n(v)}" for g, v in s["lag"].items())
                  + f" examples={s['training_examples']}", file=sys.stderr, flush=True)
            done = time.monotonic() - t0 >= duration
            if s["t_s"] >= next_minute and not done:
                print(report(samples, f"minute {int(s['t_s'] // 60)}", duration), flush=True)
                next_minute = (s["t_s"] // 60 + 1) * 60
            if done:
                break
        print(report(samples, "end", duration), flush=True)
        print(f"load average (1, 5, 15 min) at the end: {_load()}")
        results = verdicts(samples, samples[-1]["t_s"], rate)
        print("verdicts:")
        for v in results:
            print(f"  {'n/a ' if v['ok'] is None else 'PASS' if v['ok'] else 'FAIL'}  {v['goal']}: {v['detail']}")
        if args.json:
            args.json.write_text(json.dumps({"config": {"minutes": args.minutes, "rate": rate, "bootstrap": broker.bootstrap,
                                                        "measured_pipeline_rate":
                                                        measured, "sample_s": args.sample_s, "users": USERS},
                                             "samples": samples, "verdicts": results,
                                             "joiner_cpu_us_per_event": cpu_per_event(samples)}, indent=2))
        return 0 if all(v["ok"] is not False for v in results) else 1
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if procs is not None:
            procs.procs.pop("broker", None)
            procs.stop()
        broker.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
