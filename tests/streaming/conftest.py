"""Helpers for the agent tests: hand-made events, producing them, workers in threads or processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from schemas.events import BehaviorEvent, ImpressionEvent
from schemas.settings import KafkaSettings
from schemas.topics import BEHAVIORS, IMPRESSIONS, Topic, key_of
from streaming.kafka import Output

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600_000  # 2026-01-01


def behavior(i: int, user: int, t: int, item: int | None = None, behavior: str = "view", scenario: str = "home",
             request_id: str | None = None, event_id: str | None = None) -> BehaviorEvent:
    return BehaviorEvent(event_id=event_id or f"e{i}", user_id=user, item_id=item if item is not None else 1000 + i,
                         category_id=(item or i) % 7, behavior=behavior, scenario=scenario,
                         query="red shoes" if scenario == "search" else None, request_id=request_id,
                         event_time_ms=T0 + t)


def impression(request_id: str, user: int, item: int, t: int, position: int = 0) -> ImpressionEvent:
    return ImpressionEvent(request_id=request_id, user_id=user, item_id=item, category_id=item % 7,
                           position=position, scenario="home", event_time_ms=T0 + t)


def produce(kafka: KafkaSettings, events, raw: list[tuple[Topic, bytes, bytes, int | None]] = ()) -> None:
    """Send events to their topic (key = user id; record timestamp = ingest time, event time in the payload),
    plus raw (topic, key, value, partition) messages."""
    out = Output(kafka)
    for e in events:
        topic = BEHAVIORS if isinstance(e, BehaviorEvent) else IMPRESSIONS
        out.produce(kafka.topic(topic), value=topic.encode(e), key=key_of(e.user_id))
    for topic, key, value, part in raw:
        out.produce(kafka.topic(topic), value=value, key=key, **({} if part is None else {"partition": part}))
    out.flush(30)


def wait_for(predicate, timeout: float = 60, every: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class ThreadWorker:
    """An agent worker in a thread of the test process (for tests that pace input against progress)."""

    def __init__(self, agent: str, kafka: KafkaSettings, cfg, index: int = 0):
        from streaming.agents.worker import Worker

        self.worker = Worker(agent, kafka, cfg, index)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.worker.run()
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def __enter__(self):
        self.thread.start()
        return self.worker

    def __exit__(self, *exc):
        self.worker.stop_event.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "worker thread did not stop"
        if self.error and not exc[0]:
            raise self.error


class ProcWorker:
    """``python -m streaming.agents.worker`` as a subprocess with its own log file."""

    def __init__(self, agent: str, log: Path, env: dict[str, str], index: int = 0):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "streaming.agents.worker", agent, "--index", str(index)],
                                     cwd=ROOT, env=os.environ | env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: str = "term", timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.kill() if sig == "kill" else self.proc.terminate()
        return self.proc.wait(timeout)


@pytest.fixture
def procs():
    """Worker processes started by a test; whatever is still running at the end is killed."""
    started: list[ProcWorker] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(10)


@pytest.fixture(scope="session")
def kit():
    """The helpers above, for test modules (tests/ is not a package, so they cannot import this file)."""
    import types

    return types.SimpleNamespace(behavior=behavior, impression=impression, produce=produce, wait_for=wait_for,
                                 ThreadWorker=ThreadWorker, ProcWorker=ProcWorker, T0=T0, ROOT=ROOT)
