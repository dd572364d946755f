"""``lum demo`` (``make demo``): the whole pipeline end to end on the embedded broker, in bounded time.

    make demo                                   # fresh clone: builds .venv, then runs this
    LUM_DEMO_MINUTES=20 LUM_DEMO_STREAM_EVENTS=400000 lum demo
    LUM_DEMO_LUM_STEPS=1000 LUM_DEMO_REFRESH_EVERY_S=30 lum demo   # the earlier, faster defaults
    LUM_KAFKA_BOOTSTRAP=kafka:9092 LUM_KAFKA_PROFILE=kafka lum demo   # against an external Kafka

Phases (each a real ``lum`` process, as in production):
  1. broker + topics      embedded Tansu (unless LUM_KAFKA_BOOTSTRAP points elsewhere), ``lum topics create``
  2. agents               ``lum agents``: sequences, export, label join (runs to the end)
  3. warm-up stream       ``lum produce synthetic`` (LUM_DEMO_WARMUP_EVENTS)
  4. pre-train            ``lum pretrain --source kafka`` on the sequences seen so far
  5. refresh              ``lum refresh`` publishes LUM features + item embeddings (repeated during 6): the
                          label-aligned and scenario conditions and each user's top categories
                          (``RefreshSettings``' defaults); the mean pairwise cosine of users' answers to the shared
                          conditions is printed: near 1, they barely change the answer
  6. live stream          more events, paced; the joiner now attaches LUM features (point in time) to the
                          examples; refreshes and incremental trainer rounds run while it streams
  7. trainers             ``lum train --features baseline`` and ``--features lum --until-caught-up``, in
                          separate consumer groups on the same examples: a round per interval, a last one at the end
  8. report               summary table (with the LUM arm's lead in each window after the first features)
                          + AUC-over-time PNG (``lum report``)
Every process is stopped at the end, and on Ctrl-C.

``LUM_DEMO_OUT`` is the run folder. The demo only ever deletes a folder it created itself (it leaves a
``.lum-demo-run`` marker in it): a folder that holds anything else, or that contains the current
directory, is refused with an error naming the setting, and nothing is deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DemoSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LUM_DEMO_")

    minutes: float = Field(10.0, gt=0, description="hard bound on the whole demo (phases shrink to fit)")
    users: int = Field(2000, ge=10, description="synthetic users")
    items: int = Field(3000, ge=10, description="synthetic items")
    categories: int = Field(40, ge=2, description="synthetic item categories")
    warmup_events: int = Field(80_000, ge=1000, description="events streamed before the LUM is pre-trained")
    stream_events: int = Field(160_000, ge=1000, description="events streamed after LUM features exist")
    warmup_rate: float = Field(0, ge=0, description="warm-up producer events/s (0: as fast as possible)")
    rate: float = Field(2500, ge=0, description="live producer events/s (0: as fast as possible)")
    lum_preset: str = Field("debug", description="LUM preset to pre-train")
    # 3,000 steps: validation HR@10 still rises there (0.15-0.16 vs 0.12-0.13 at 1,000) and the LUM arm went
    # from -0.0033 +- 0.0035 AUC to level or ahead (4 runs); ~2 more minutes on 2 cores.
    lum_steps: int = Field(3000, ge=1, description="LUM pre-training steps (early stopping may end sooner)")
    # The live stream packs hours of event time into about a minute: features refreshed later in it are hours
    # staler, so the first refresh during it comes early (the loop is serial: a refresh or trainer round delays it).
    refresh_every_s: float = Field(10, gt=0, description="seconds between LUM refreshes during the live stream")
    train_every_s: float = Field(40, gt=0, description="seconds between incremental trainer rounds (--until-caught-up)")
    seed: int = Field(0, description="synthetic stream seed")
    out: Path = Field(Path("runs/demo"), description="run folder for logs, checkpoints, metrics and the plot "
                      "(the demo deletes it on a rerun only if it created it; a folder holding other files is refused)")


MARKER = ".lum-demo-run"


def prepare_out(out: Path) -> None:
    """Make ``out`` an empty run folder of the demo, with its marker; refuse (SystemExit naming
    LUM_DEMO_OUT, nothing deleted) when ``out`` holds anything a demo did not create."""
    import shutil

    out = out.resolve()
    if out.exists():
        if not out.is_dir():
            raise SystemExit(f"LUM_DEMO_OUT={out} is a file, not a folder: choose a new or empty folder")
        if (out / MARKER).is_file():
            if Path.cwd().resolve().is_relative_to(out):
                raise SystemExit(f"LUM_DEMO_OUT={out} contains the current directory: the demo will not delete "
                                 "it; choose another folder")
            shutil.rmtree(out)  # a previous run's folder, all of it ours
        elif any(out.iterdir()):
            raise SystemExit(f"LUM_DEMO_OUT={out} is not empty and is not a demo run folder (no {MARKER} in it): "
                             "the demo deletes only folders it created; choose a new or empty folder")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("created by `lum demo`: a rerun deletes this whole folder\n")


def register(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], help="run the whole pipeline end to end (embedded broker by default)")
    p.set_defaults(handler=_demo)


class Processes:
    """Starts ``lum`` subprocesses in their own process groups and stops every one of them, whatever happens."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, {}

    def start(self, name: str, *argv: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        cmd = [sys.executable, "-m", "deploy.cli", *argv]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ | (env or {}) | {"PYTHONUNBUFFERED": "1"})
        self.procs[name] = proc
        return proc

    def run(self, name: str, *argv: str, timeout: float) -> None:
        """Run to completion (bounded); a failure shows the end of its log."""
        proc = self.start(name, *argv)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(name)
            raise RuntimeError(f"{name} did not finish within {timeout:.0f}s (log: {self.logs / name}.log)")
        if code != 0:
            tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{name} failed with exit code {code}:\n  " + "\n  ".join(tail))

    def stop(self, name: str, grace: float = 15) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def _demo(args: argparse.Namespace) -> int:
    from schemas.settings import load

    return Demo(load(DemoSettings)).run()


def agent_figures(samples: dict) -> dict[str, dict[str, float]]:
    """{agent: {figure: value}} from one or more scrapes of agent workers (``schemas.metrics.scrape``)."""
    from schemas.metrics import total

    out: dict[str, dict[str, float]] = {}
    for job in sorted({dict(lab).get("job") for name, lab in samples if name.startswith("lum_")} - {None}):
        a = out[job] = {
            "events_total": total(samples, "lum_events_consumed_total", job=job),
            "sequences_published_total": total(samples, "lum_sequences_published_total", job=job),
            "examples_total": total(samples, "lum_examples_emitted_total", job=job),
            "late_clicks_total": total(samples, "lum_examples_late_total", job=job),
            "dead_letters_total": total(samples, "lum_dead_letters_total", job=job)}
        for name in ("positives_total", "lum_features_too_new_total"):
            a[name] = total(samples, "lum_agent_state", job=job, name=name)
        if any(n == "lum_consumer_lag" and ("job", job) in lab for n, lab in samples):
            a["lag"] = total(samples, "lum_consumer_lag", job=job)  # summed over topics and partitions
    return out


class Demo:
    def __init__(self, cfg: DemoSettings):
        self.cfg = cfg
        self.out = cfg.out.resolve()
        self.start = time.monotonic()
        self.deadline = self.start + cfg.minutes * 60
        self.procs = Processes(self.out / "logs")
        self.timings: dict[str, float] = {}
        self.broker = None
        self.refreshes = self.train_rounds = 0
        self.agreement: float | None = None
        self.features_from_ms = 0
        self.final_agents: dict[str, dict[str, float]] = {}
        self.peak: dict[str, float] = {}
        self._seen: dict[str, tuple[float, float]] = {}  # agent -> (time, events) of the last scrape

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.start:6.0f}s] {msg}", flush=True)

    def run(self) -> int:
        prepare_out(self.out)
        # Ctrl-C and SIGTERM both stop everything (SIGINT explicitly: a shell's background job ignores it).
        previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._run()
            return 0
        except KeyboardInterrupt:
            self.say("interrupted: stopping every process")
            return 130
        finally:
            self.procs.stop_all()
            if self.broker:
                self.broker.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def _phase(self, name: str):
        self.say(f"== {name}")
        t = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = time.monotonic() - t

    def _run(self) -> None:
        from schemas.settings import KafkaSettings, load
        from streaming.kafka import create_topics
        from streaming.broker import EmbeddedBroker, free_port

        cfg = self.cfg
        with self._phase("broker + topics"):
            if "LUM_KAFKA_BOOTSTRAP" not in os.environ:
                self.broker = EmbeddedBroker(log_path=self.out / "logs" / "broker.log").start()
                os.environ["LUM_KAFKA_BOOTSTRAP"] = self.broker.bootstrap
                self.say(f"embedded broker at {self.broker.bootstrap} (memory storage)")
            else:  # an external cluster: a fresh topic namespace per run, so runs never mix
                os.environ.setdefault("LUM_KAFKA_TOPIC_PREFIX", f"demo{int(time.time())}-")
            self.metrics_port = free_port()
            os.environ |= {"LUM_DATA_DIR": str(self.out / "state"), "LUM_JOIN_WINDOW_MS": "120000",
                           "LUM_METRICS_PORT": "0",  # the agents get theirs below
                           "LUM_AGENT_LOG_INTERVAL_S": "10",
                           # Several processes share 2 cores: one torch thread each avoids spin-wait stalls.
                           "LUM_PRETRAIN_THREADS": "1", "LUM_REFRESH_THREADS": "1", "LUM_DLRM_THREADS": "1"}
            kafka = load(KafkaSettings)
            for name, state in create_topics(kafka).items():
                self.say(f"  topic {name}: {state}")
        with self._phase("agents"):
            # Worker i serves metrics on port + i (only the agents: every process needs a port of its own).
            self.procs.start("agents", "agents", "--workers", "1", env={"LUM_METRICS_PORT": str(self.metrics_port)})
        produce = ["produce", "synthetic", "--users", str(cfg.users), "--items", str(cfg.items),
                   "--categories", str(cfg.categories), "--seed", str(cfg.seed)]
        with self._phase("warm-up stream"):
            self.procs.run("produce-warmup", *produce, "--events", str(cfg.warmup_events), "--rate",
                           str(cfg.warmup_rate), timeout=self.left() * 0.3)
            self._wait_caught_up(self.left() * 0.15)
        with self._phase("pre-train LUM"):
            self.procs.run("pretrain", "pretrain", "--preset", cfg.lum_preset, "--source", "kafka", "--out",
                           str(self.out / "lum"), "--max-steps", str(cfg.lum_steps), timeout=self.left() * 0.4)
        with self._phase("refresh LUM features"):
            self._refresh()
            # The LUM trainer sizes its inputs from the features' contract: conditions and vector size.
            samples = self._lum_features_sample(kafka)
            sample = samples[0]
            names = input_conditions(sample)
            os.environ |= {"LUM_DLRM_LUM_CONDITIONS": ";".join(names),
                           "LUM_DLRM_LUM_DIM": str(len(sample.conditions[0].vector))}
            # A two-hour stream (~120k examples) is too short to fit the vectors as ~100 direct inputs: the
            # similarities and presence flags carry the interest match (LUM_DLRM_LUM_INPUTS=full to compare).
            os.environ.setdefault("LUM_DLRM_LUM_INPUTS", "match")
            # How much the query condition changes a user's answer: near 1, the conditions ask one question
            # (the DLRM gets K copies of one similarity), whatever the names say.
            self.agreement = condition_agreement(samples, names)
            self.features_from_ms = max(f.as_of_ms for f in samples)  # the live stream's impressions come after
            self.say(f"  LUM features {sample.model_version}: {len(names)} conditions ({'; '.join(names)}) "
                     f"+ {len(sample.conditions) - len(names)} own-category queries x {len(sample.conditions[0].vector)} "
                     f"dims; answers' mean pairwise cosine {_fmt(self.agreement)} over {len(samples)} users")
        with self._phase("live stream"):
            live = self.procs.start("produce-live", *produce, "--events", str(cfg.stream_events), "--rate",
                                    str(cfg.rate), "--skip", str(cfg.warmup_events))
            next_refresh = time.monotonic() + cfg.refresh_every_s
            next_train = time.monotonic() + cfg.train_every_s
            while live.poll() is None:
                if self.left() < 150:
                    self.say("time bound reached: stopping the producer early")
                    self.procs.stop("produce-live")
                    break
                time.sleep(5)
                self._status()
                if time.monotonic() >= next_refresh:
                    self._refresh()
                    next_refresh = time.monotonic() + cfg.refresh_every_s
                if time.monotonic() >= next_train:
                    self._train_round()
                    next_train = time.monotonic() + cfg.train_every_s
            self._wait_caught_up(min(60.0, self.left() * 0.3))
            self._status()
            self.final_agents = self.agent_metrics()
        with self._phase("DLRM trainers, last round"):
            self._train_round(final=True)
        with self._phase("report"):
            self.procs.run("report", "report", str(self.out / "dlrm-baseline"), str(self.out / "dlrm-lum"),
                           "--out", str(self.out / "auc.png"), timeout=60)
        self.summary()

    def _refresh(self) -> None:
        self.refreshes += 1
        self.procs.run(f"refresh-{self.refreshes}", "refresh", "--checkpoint", str(self.out / "lum"), "--once",
                       timeout=max(30.0, self.left() * 0.2))
        self.say(f"  refresh {self.refreshes}: " + _last_match(self.out / "logs" / f"refresh-{self.refreshes}.log",
                                                              "refresh done: ").partition("refresh done: ")[2])

    def _train_round(self, final: bool = False) -> None:
        """Both trainers consume what the joiner has emitted so far and stop (as an hourly job would)."""
        self.train_rounds += 1
        for features in ("baseline", "lum"):
            self.procs.start(f"train-{features}", "train", "--features", features, "--checkpoint-dir",
                             str(self.out / f"dlrm-{features}"), "--until-caught-up")
        for features in ("baseline", "lum"):
            try:
                code = self.procs.procs[f"train-{features}"].wait(max(30.0, self.left() - (20 if final else 140)))
            except subprocess.TimeoutExpired:
                self.procs.stop(f"train-{features}")  # SIGTERM: it checkpoints what it has trained
                code = "stopped at the time bound"
            if code not in (0, "stopped at the time bound"):
                raise RuntimeError(f"trainer {features} failed ({code}); see logs/train-{features}.log")
        rows = {f: _trainer_result(self.out / "logs" / f"train-{f}.log") for f in ("baseline", "lum")}
        self.say(f"  trainer round {self.train_rounds}: " + ", ".join(
            f"{f} {r.get('examples', 0):,} examples AUC {r.get('overall', {}).get('auc') or float('nan'):.4f}"
            for f, r in rows.items()))

    def _lum_features_sample(self, kafka, n: int = 200) -> list:
        """The first ``n`` LumFeatures the refresh published (at least one, else RuntimeError)."""
        from schemas.topics import LUM_FEATURES
        from streaming.kafka import read_to_end, reader

        out = []
        consumer = reader(kafka)
        try:
            with contextlib.closing(read_to_end(consumer, kafka.topic(LUM_FEATURES), idle_timeout_s=30)) as msgs:
                for msg in msgs:
                    out.append(LUM_FEATURES.decode(msg.value()))
                    if len(out) >= n:
                        break
        finally:
            consumer.close()
        if not out:
            raise RuntimeError("the refresh job published no LUM features (see logs/refresh-1.log)")
        return out

    def agent_metrics(self) -> dict[str, dict[str, float]]:
        """{agent: {figure: value}} from the workers' Prometheus endpoints (sequences, joiner), read with the
        client's parser; ``events_per_second`` is the rate since the previous call."""
        from schemas.metrics import scrape

        now = time.monotonic()
        out = agent_figures(scrape(self.metrics_port) | scrape(self.metrics_port + 1))
        for agent, a in out.items():
            t, n = self._seen.get(agent, (None, 0.0))
            a["events_per_second"] = (a["events_total"] - n) / (now - t) if t is not None and now > t else 0.0
            self._seen[agent] = (now, a["events_total"])
        return out

    def _status(self) -> None:
        m = self.agent_metrics()
        seq, join = m.get("sequences", {}), m.get("joiner", {})
        for agent, values in m.items():
            self.peak[agent] = max(self.peak.get(agent, 0), values.get("events_per_second", 0))
        self.say(f"  sequences: {seq.get('events_total', 0):,.0f} events ({seq.get('events_per_second', 0):,.0f}/s)"
                 f" | joiner: {join.get('events_total', 0):,.0f} events, {join.get('examples_total', 0):,.0f} examples"
                 f" ({join.get('events_per_second', 0):,.0f} ev/s) | lag {self._lag(m):,.0f}")

    @staticmethod
    def _lag(m: dict[str, dict[str, float]]) -> float:
        return sum(a.get("lag", 0) for a in m.values())

    def _lead(self) -> dict:
        from trainers.dlrm.report import load_metrics

        try:
            runs = [load_metrics(self.out / f"dlrm-{f}")[1] for f in ("baseline", "lum")]
        except SystemExit:  # a trainer wrote no metrics
            return {"windows": 0}
        return lead_once_features_exist(*runs, self.features_from_ms)

    def _wait_caught_up(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = self.agent_metrics()
            if {"sequences", "joiner"} <= set(m) and all("lag" in a for a in m.values()) and self._lag(m) == 0:
                return
            time.sleep(2)
        self.say("  agents not fully caught up within the bound; going on")

    def summary(self) -> None:
        logs = self.out / "logs"
        seq, join = self.final_agents.get("sequences", {}), self.final_agents.get("joiner", {})
        produced = [_kv(_last_match(logs / f"produce-{p}.log", "events=")) for p in ("warmup", "live")]
        trainers = {f: _trainer_result(logs / f"train-{f}.log") for f in ("baseline", "lum")}
        rates = {f: _last_match(logs / f"train-{f}.log", " ex/s").partition("examples, ")[2].partition(",")[0]
                 for f in trainers}
        pretrain = _last_match(logs / "pretrain.log", "final eval").partition("): ")[2]
        print("\n== summary\n")
        print("| stage | what | figures |\n|---|---|---|")
        print(f"| producer | events produced | {sum(int(p.get('events', 0)) for p in produced):,} "
              f"(warm-up {float(produced[0].get('events_per_s', 0)):,.0f}/s, live "
              f"{float(produced[1].get('events_per_s', 0)):,.0f}/s paced) |")
        print(f"| sequence agent | events consumed, users' sequences published | {seq.get('events_total', 0):,.0f}, "
              f"{seq.get('sequences_published_total', 0):,.0f}; peak {self.peak.get('sequences', 0):,.0f} events/s |")
        print(f"| joiner | events consumed, examples joined (positives) | {join.get('events_total', 0):,.0f}, "
              f"{join.get('examples_total', 0):,.0f} ({join.get('positives_total', 0):,.0f}); peak "
              f"{self.peak.get('joiner', 0):,.0f} events/s; late clicks {join.get('late_clicks_total', 0):,.0f}; "
              f"LUM features skipped as too new {join.get('lum_features_too_new_total', 0):,.0f} |")
        print(f"| agents | consumer lag at the end, dead letters | {self._lag(self.final_agents):,.0f}, "
              f"{seq.get('dead_letters_total', 0) + join.get('dead_letters_total', 0):,.0f} |")
        print(f"| LUM pre-training | {self.cfg.lum_preset}, {self.cfg.lum_steps} steps | "
              f"{_last_match(logs / 'pretrain.log', 'tokens/s').rpartition(') ')[2]}; {pretrain} |")
        print(f"| LUM refresh | {self.refreshes} runs | last: "
              f"{_last_match(logs / f'refresh-{self.refreshes}.log', 'refresh done: ').partition('refresh done: ')[2]}; "
              f"conditions' answers agree: mean pairwise cosine {_fmt(self.agreement)} |")
        for f, r in trainers.items():
            o = r.get("overall", {})
            print(f"| DLRM {f} | {self.train_rounds} rounds, examples trained | {r.get('examples', 0):,}; "
                  f"last round {rates[f]}; AUC {o.get('auc') or float('nan'):.4f}, NE {o.get('ne') or float('nan'):.4f}, log loss "
                  f"{o.get('logloss') or float('nan'):.4f}, calibration {o.get('calibration') or float('nan'):.3f} |")
        lead = self._lead()
        if lead["windows"]:
            from trainers.dlrm.report import _utc

            d = lead["deltas"]
            print(f"| DLRM lum vs baseline | event-time windows from the first LUM features ({_utc(lead['from_ms'])}) | "
                  f"ahead in {lead['ahead']} of {lead['windows']}; AUC difference per window {min(d):+.4f} to "
                  f"{max(d):+.4f} (mean {sum(d) / len(d):+.4f}) |")
        print("\n| phase | seconds |\n|---|---:|")
        for name, sec in self.timings.items():
            print(f"| {name} | {sec:.0f} |")
        report = self.out / "auc.md"
        if report.exists():
            print("\n" + report.read_text())
        print(f"plot: {self.out / 'auc.png'}; logs: {logs}; total {time.monotonic() - self.start:.0f}s "
              f"(bound {self.cfg.minutes:.0f} min)")


def lead_once_features_exist(baseline: list[dict], lum: list[dict], from_ms: int) -> dict:
    """The LUM arm's AUC minus the baseline's in each event-time window (``load_metrics`` rows) that starts at or
    after ``from_ms`` (when the first LUM features exist; before it the LUM arm has no LUM inputs, and its gap
    is the noise of a different model): {"from_ms", "windows", "ahead", "deltas"}."""
    base = {w["window_start_ms"]: w["auc"] for w in baseline if w.get("auc") is not None}
    deltas = [w["auc"] - base[w["window_start_ms"]] for w in lum
              if w["window_start_ms"] >= from_ms and w.get("auc") is not None and w["window_start_ms"] in base]
    return {"from_ms": from_ms, "windows": len(deltas), "ahead": sum(d > 0 for d in deltas), "deltas": deltas}


def input_conditions(features) -> list[str]:
    """The conditions of a ``LumFeatures`` that the DLRM takes as inputs: all but the answers to the user's
    own-category queries (``LUM_REFRESH_TOP_CATEGORIES``), which differ between users and are matched to a
    candidate by its category instead."""
    return [c.condition for c in features.conditions if c.own_category is None]


def condition_agreement(features: list, names: list[str] | None = None) -> float | None:
    """Mean over users of the mean pairwise cosine between a user's condition answers (``LumFeatures``), over
    the conditions in ``names`` (default: all): 1.0 when the conditions do not change the answer. None when
    no user has two answers."""
    import numpy as np

    per_user = []
    for f in features:
        v = np.array([c.vector for c in f.conditions if names is None or c.condition in names], dtype=np.float64)
        if len(v) < 2:
            continue
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        sim = v @ v.T
        per_user.append(sim[np.triu_indices(len(v), 1)].mean())
    return float(np.mean(per_user)) if per_user else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _last_match(path: Path, needle: str) -> str:
    """The last line of a log that contains ``needle`` ('' when none)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if needle in line), "")


def _kv(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def _trainer_result(path: Path) -> dict:
    """The JSON summary ``lum train`` prints when it stops."""
    import json

    line = _last_match(path, '"features"')
    try:
        return json.loads(line[line.index("{"):]) if line else {}
    except ValueError:
        return {}
