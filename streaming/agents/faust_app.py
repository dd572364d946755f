"""The agents as a Faust app: the same sequence/joiner logic as the batch worker, hosted by ``faust worker``.

    lum agents --runtime faust [--workers N] [--only sequences|joiner]
    python -m streaming.agents.faust_app sequences --index 0       # one worker, what ``lum agents`` starts
    faust -A streaming.agents.faust_app:sequences_app worker --without-web     # Faust's own command line
    faust -A streaming.agents.faust_app:joiner_app worker --web-port 6067

One Faust App per agent; its id, the consumer group, is the agent's group with ``-faust`` appended
(``LUM_KAFKA_TOPIC_PREFIX`` + ``LUM_AGENT_SEQUENCES_GROUP`` / ``LUM_AGENT_JOINER_GROUP`` + ``-faust``): a group
cannot change its assignment protocol on the embedded broker even when empty, so the runtimes keep their own
groups and state directories (``$LUM_DATA_DIR/<agent>/<group>/p<N>``). Switching runtime therefore starts a
new group: its stores are rebuilt from the logic's changelogs and the inputs are read again from the start
(idempotent: same sequences, no duplicate examples). Each App has one Faust agent reading the logic's input topics as raw
bytes in batches (``stream.take_events(LUM_AGENT_BATCH_SIZE, LUM_AGENT_BATCH_WAIT_MS)``) and handing them to
``streaming.agents.faust_runtime.Host``. Broker, security and session timeout come from ``KafkaSettings``.
Delivery is at-least-once (Faust's exactly_once does not work on the embedded broker); state updates are
idempotent, so a kill -9 replays events without double counting.

Metrics: worker i serves the batch worker's Prometheus metrics (``schemas.metrics``, same names and labels:
dashboards read either runtime) on ``LUM_METRICS_HOST``:``LUM_METRICS_PORT + i`` when the port is set. Faust's
own web server is off (``--without-web``; Faust's ``web_enabled=False`` alone does not stop it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from schemas import metrics
from schemas.settings import KafkaSettings, load
from schemas.topics import BEHAVIORS

from .faust_runtime import Host, fail, faust_settings
from .settings import AgentSettings

log = logging.getLogger(__name__)
AGENTS = ("sequences", "joiner")


class NoopLogic:
    """Reads ``behaviors`` and does nothing: the Faust host's own ceiling (benchmarks only)."""

    name, inputs = "noop", (BEHAVIORS,)

    def assign(self, partition, store, committed, emit, read):
        return {t: off or 0 for t, off in committed.items()}

    def process(self, partition, records, emit):
        pass

    def revoke(self, partition):
        pass

    def gauges(self):
        return {}


def build_host(agent: str, kafka: KafkaSettings, cfg: AgentSettings, index: int = 0) -> Host:
    """The agent's logic with the batch worker's emit, stores (same paths and identity) and crash points."""
    from ..kafka import DeadLetters, Output
    from .runtime import Crash, make_logic
    from .store import RocksStore
    from .worker import KafkaEmit, state_identity

    crash = Crash.from_settings(cfg)
    out = Output(kafka)
    dead = DeadLetters(out, kafka, f"{agent}-faust-{index}")
    emit = KafkaEmit(out, kafka, dead, crash)
    if agent == "noop":
        logic, group = NoopLogic(), kafka.topic_prefix + cfg.sequences_group + "-faust"
    else:
        if agent == "joiner":  # JoinLogic with its item-embeddings side input, as the batch worker hosts it
            from .joiner import JoinerLogic

            logic = JoinerLogic(kafka, cfg, out, dead)
        else:
            logic = make_logic(agent, cfg)
        group = kafka.topic_prefix + {"sequences": cfg.sequences_group, "joiner": cfg.joiner_group}[agent] + "-faust"
    root = Path(cfg.data_dir) / logic.name / group
    identity: dict[str, object] = {}

    def open_store(partition: int) -> RocksStore:
        if not identity:  # cluster id and topic ids, as the batch worker records them
            identity.update(state_identity(kafka, host.committed_reader(), sorted(host.physical)))
        return RocksStore(root / f"p{partition}", identity | {"partition": partition})

    host = Host(logic, kafka, out, emit, open_store, group, cfg.flush_timeout_s, crash)
    host.rec = dead.recorder = metrics.Recorder(logic.name, index)
    if hasattr(logic, "high_water"):
        logic.high_water = lambda topic, p: host.highwater(topic, p)
    return host


def make_app(agent: str, kafka: KafkaSettings | None = None, cfg: AgentSettings | None = None, index: int = 0):
    """The Faust App hosting one agent (``sequences`` or ``joiner``); settings default to the environment."""
    import faust
    from faust.types import TP

    kafka = kafka or load(KafkaSettings)
    cfg = cfg or load(AgentSettings)
    host = build_host(agent, kafka, cfg, index)
    datadir = Path(cfg.data_dir) / "faust" / host.group  # Faust's own files (no tables: nearly empty)
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(**faust_settings(kafka, host.group, datadir))
    app.lum_host = host  # type: ignore[attr-defined]
    source = app.topic(*host.physical, key_serializer="raw", value_serializer="raw")

    def assignment() -> set[tuple[str, int]]:
        return {(tp.topic, tp.partition) for tp in app.consumer.assignment()}

    host.assignment = assignment

    def highwater(topic: str, partition: int) -> int | None:
        """The partition's end as carried by the last fetch (None while unknown or not assigned)."""
        try:
            return app.consumer.highwater(TP(topic, partition))
        except Exception:
            return None

    host.highwater = highwater

    @app.agent(source, name=agent)
    async def run(stream):
        try:
            async for events in stream.take_events(cfg.batch_size, within=cfg.batch_wait_ms / 1000):
                try:
                    poll = getattr(host.logic, "poll_side_inputs", None)
                    if poll is not None:
                        poll()
                    with host.rec.batch():
                        host.process_messages([e.message for e in events])
                except Exception as exc:  # nothing of the batch may be acked: stop here
                    fail(host, exc)
        finally:  # the worker stops its agents first: no batch can come after this
            host.close()

    @app.on_partitions_revoked.connect
    async def _revoked(sender, revoked, **_):
        host.revoke({tp.partition for tp in revoked if tp.topic in host.physical})

    @app.timer(cfg.log_interval_s)
    async def _report():
        host.report(index)

    return app


def __getattr__(name: str) -> Any:
    """``sequences_app`` / ``joiner_app`` for ``faust -A streaming.agents.faust_app:<agent>_app``, built on use."""
    if name.endswith("_app") and name[:-4] in AGENTS:
        app = make_app(name[:-4])
        globals()[name] = app
        return app
    raise AttributeError(name)


def worker_command(agent: str, index: int, log_level: str = "INFO") -> list[str]:
    """The command line of Faust worker ``index`` of ``agent`` (what ``lum agents --runtime faust`` runs)."""
    return [sys.executable, "-m", "streaming.agents.faust_app", agent, "--index", str(index),
            "--log-level", log_level]


def bench_faust(kafka: KafkaSettings, n: int, agent: str = "sequences", data_dir: Path | None = None,
                timeout: float = 900) -> dict[str, float]:
    """Run one Faust worker of ``agent`` over ``n`` pre-produced input events (a fresh consumer group) and
    return ``rate`` (events/s from its first batch to the batch that reached ``n``), ``events_per_cpu_s`` and
    the agent's gauges: what ``benchmarks/bench_streaming.py`` reports as ``<agent>_faust``."""
    import subprocess
    import tempfile
    import uuid

    from streaming.broker import free_port

    port = free_port()
    tmp = tempfile.TemporaryDirectory() if data_dir is None else None
    group = f"bench-faust-{agent}-{uuid.uuid4().hex[:6]}"
    env = os.environ | {"LUM_KAFKA_BOOTSTRAP": kafka.bootstrap, "LUM_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
                        "LUM_KAFKA_PROFILE": kafka.profile, "LUM_DATA_DIR": str(data_dir or tmp.name),
                        "LUM_METRICS_PORT": str(port),
                        f"LUM_AGENT_{'SEQUENCES' if agent == 'noop' else agent.upper()}_GROUP": group}
    proc = subprocess.Popen(worker_command(agent, 0, "WARNING"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    job = {"job": agent, "worker": "0"}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"faust {agent} worker exited with {proc.returncode}")
            s = metrics.scrape(port)  # prometheus_client's parser
            done = metrics.total(s, "lum_events_consumed_total", **job)
            if done >= n:
                state = {dict(lab)["name"]: v for (name, lab), v in s.items()
                         if name == "lum_agent_state" and job.items() <= dict(lab).items()}
                span = (metrics.total(s, "lum_last_batch_timestamp_seconds", **job)
                        - metrics.total(s, "lum_first_batch_timestamp_seconds", **job))
                counted = done - state["first_batch_events"]
                return {"rate": counted / span, "events": done,
                        "events_per_cpu_s": counted / max(state["cpu_seconds_between_batches"], 1e-9),
                        "sequences_published_total": metrics.total(s, "lum_sequences_published_total", **job),
                        "examples_total": metrics.total(s, "lum_examples_emitted_total", **job),
                        "late_clicks_total": metrics.total(s, "lum_examples_late_total", **job),
                        **{k: v for k, v in state.items() if k.endswith("_total")}}
            time.sleep(0.5)
        raise TimeoutError(f"faust {agent} worker did not consume {n} events within {timeout:.0f}s")
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run one lum agent as a Faust worker")
    ap.add_argument("agent", choices=AGENTS + ("noop",), help="noop: the host without logic (benchmarks)")
    ap.add_argument("--index", type=int, default=0, help="worker index (metrics port offset, log name)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    cfg = load(AgentSettings)
    app = make_app(args.agent, load(KafkaSettings), cfg, args.index)
    metrics.serve(offset=args.index)  # LUM_METRICS_PORT + index (0: off), as the batch worker
    level = {"WARNING": "warn", "CRITICAL": "crit"}.get(args.log_level.upper(), args.log_level.lower())
    sys.argv = [sys.argv[0], "worker", "-l", level, "--without-web"]
    app.main()  # runs until SIGTERM / Ctrl-C, then exits the process
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
