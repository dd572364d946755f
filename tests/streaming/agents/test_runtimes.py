"""The same agent logic on both runtimes, real embedded broker: the batch worker and the Faust app.

Every test runs the agents as processes (``python -m streaming.agents.worker`` / ``python -m
streaming.agents.faust_app``) and checks outcomes on the topics only, so both runtimes pass the same checks.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from schemas.codec import decode
from schemas.events import DeadLetter, TrainingExample
from schemas.topics import BEHAVIORS, DEAD_LETTERS, IMPRESSIONS, LATE_CLICKS, TRAINING_EXAMPLES, key_of
from streaming.kafka import read_to_end, reader
from streaming.agents.sequences import expected_sequences, snapshot

ROOT = Path(__file__).resolve().parents[3]
RUNTIMES = ["worker", "faust"]
MODULE = {"worker": "streaming.agents.worker", "faust": "streaming.agents.faust_app"}


class Proc:
    """One agent worker of either runtime as a subprocess with its own log file."""

    def __init__(self, runtime: str, agent: str, log: Path, env: dict[str, str], index: int = 0):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", MODULE[runtime], agent, "--index", str(index)],
                                     cwd=ROOT, env=os.environ | env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: str = "term", timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.kill() if sig == "kill" else self.proc.terminate()
        return self.proc.wait(timeout)


@pytest.fixture
def run(procs, tmp_path):
    """run(runtime, agent, env, index=0) -> Proc; every process is killed at the end of the test."""
    def start(runtime: str, agent: str, env: dict[str, str], index: int = 0, name: str | None = None) -> Proc:
        p = Proc(runtime, agent, tmp_path / f"{name or agent}-{index}-{len(procs)}.log", env, index)
        procs.append(p)
        return p
    return start


def make_events(kit, n_users: int, per_user: int, seed: int, dup_rate: float = 0.1):
    """Interleaved users, out-of-order event times within a user, and retried (duplicate) events."""
    rng = random.Random(seed)
    events = []
    for u in range(n_users):
        user = 10_000 + u * 7919
        for t in rng.sample(range(per_user * 10), per_user):
            events.append(kit.behavior(len(events), user, t, item=rng.randrange(500),
                                       scenario=rng.choice(["home", "search"]),
                                       behavior=rng.choice(["view", "click", "buy"])))
    rng.shuffle(events)
    for d in [e for e in events if rng.random() < dup_rate]:
        events.insert(rng.randrange(events.index(d), len(events) + 1), d)
    return events


def read_all(kafka, topic, model=None):
    c = reader(kafka)
    try:
        return [decode(model, m.value()) if model else m for m in read_to_end(c, kafka.topic(topic))]
    finally:
        c.close()


def seqs_equal(kafka, expected) -> bool:
    time.sleep(0.7)  # each check reads the whole user-sequences topic: not too often
    return snapshot(kafka)[0] == expected


def assert_alive(*ps: Proc) -> None:
    for p in ps:
        assert p.proc.poll() is None, f"worker exited with {p.proc.returncode}:\n{p.text()[-3000:]}"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_sequences_equal_direct_computation_and_bad_input_of_any_size_is_dead_lettered(kafka, kit, tmp_path, run,
                                                                                        runtime):
    events = make_events(kit, n_users=12, per_user=30, seed=1)
    half = len(events) // 2
    big = os.urandom(600_000)  # a large undecodable message must not stop the agent either
    bad = [(BEHAVIORS, b"1", b"not an event", None), (BEHAVIORS, b"2", BEHAVIORS.encode(events[0])[:-5] + b"oops}", None),
           (BEHAVIORS, b"3", big, None)]
    kit.produce(kafka, events[:half], raw=bad)
    kit.produce(kafka, events[half:])
    expected = expected_sequences(events, cap=16)
    w = run(runtime, "sequences", {"LUM_DATA_DIR": str(tmp_path), "LUM_AGENT_MAX_PAIRS": "16",
                                   "LUM_AGENT_BATCH_SIZE": "97"})
    kit.wait_for(lambda: assert_alive(w) or seqs_equal(kafka, expected), timeout=90, what="snapshot == expected")
    letters = kit.wait_for(lambda: read_all(kafka, DEAD_LETTERS, DeadLetter) if len(
        read_all(kafka, DEAD_LETTERS)) >= 3 else None, timeout=30, what="three dead letters")
    assert len(letters) == 3 and {x.source_topic for x in letters} == {kafka.topic(BEHAVIORS)}
    assert all(x.error for x in letters)
    assert w.stop() == 0


def _produce_paced(kit, kafka, events, seconds: float) -> threading.Thread:
    def feed():
        chunks = 20
        for i in range(chunks):
            kit.produce(kafka, events[i * len(events) // chunks:(i + 1) * len(events) // chunks])
            time.sleep(seconds / chunks)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    return t


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_kill_9_mid_stream_then_restart_equals_uninterrupted_run(kafka, kit, tmp_path, run, runtime):
    events = make_events(kit, n_users=200, per_user=15, seed=2)
    expected = expected_sequences(events, cap=8)
    env = {"LUM_DATA_DIR": str(tmp_path), "LUM_AGENT_MAX_PAIRS": "8", "LUM_AGENT_BATCH_SIZE": "50"}
    w = run(runtime, "sequences", env)
    kit.produce(kafka, events[:100])
    kit.wait_for(lambda: assert_alive(w) or snapshot(kafka)[0], timeout=60, what="first sequences")
    feeder = _produce_paced(kit, kafka, events[100:], seconds=4)
    time.sleep(1.5)
    assert w.stop("kill") == -9
    mid = snapshot(kafka)[0]
    assert 0 < len(mid) and mid != expected  # killed mid-stream
    w2 = run(runtime, "sequences", env)
    feeder.join()
    kit.wait_for(lambda: assert_alive(w2) or "assigned partition" in w2.text(), timeout=90, what="restarted worker")
    kit.wait_for(lambda: assert_alive(w2) or seqs_equal(kafka, expected), timeout=90,
                 what="snapshot == expected after restart")
    assert w2.stop() == 0
    assert "local state at offset" in w2.text() and not re.search(r"rebuilt \d+ users", w2.text())  # its RocksDB


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_two_workers_on_two_hosts_and_rebalances_lose_nothing(kafka, kit, tmp_path, run, runtime):
    """Separate state dirs (two hosts): partitions that move are rebuilt from the changelog, nothing is lost."""
    events = make_events(kit, n_users=200, per_user=9, seed=3)
    thirds = [events[i * len(events) // 3:(i + 1) * len(events) // 3] for i in range(3)]
    base = {"LUM_AGENT_BATCH_SIZE": "100"}
    a = run(runtime, "sequences", base | {"LUM_DATA_DIR": str(tmp_path / "a")}, 0)
    kit.produce(kafka, thirds[0])
    kit.wait_for(lambda: assert_alive(a) or seqs_equal(kafka, expected_sequences(thirds[0])), timeout=90,
                 what="first third on one worker")
    b = run(runtime, "sequences", base | {"LUM_DATA_DIR": str(tmp_path / "b")}, 1)
    kit.wait_for(lambda: assert_alive(a, b) or "assigned partition" in b.text(), timeout=90, what="b shares partitions")
    kit.produce(kafka, thirds[1])
    kit.wait_for(lambda: assert_alive(a, b) or seqs_equal(kafka, expected_sequences(thirds[0] + thirds[1])),
                 timeout=90, what="second third on two workers")
    assert a.stop() == 0  # b takes over a's partitions and rebuilds them from user-sequences
    kit.produce(kafka, thirds[2])
    kit.wait_for(lambda: assert_alive(b) or seqs_equal(kafka, expected_sequences(events)), timeout=120,
                 what="all events after the rebalance")
    assert b.stop() == 0


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_joiner_labels_duplicates_and_late_clicks(kafka, kit, tmp_path, run, runtime):
    W = 10_000
    b, imp = kit.behavior, kit.impression
    events = [
        b(1, 1, 100, item=1), b(2, 1, 200, item=2),
        imp("r1", 1, 11, 1000, 0), imp("r1", 1, 12, 1000, 1), imp("r1", 1, 12, 1000, 1),  # a retried impression
        b(3, 2, 2500, item=22, behavior="click", request_id="r2"),  # before its impression
        imp("r2", 2, 21, 2000, 0), imp("r2", 2, 22, 2000, 1),
        b(4, 1, 3000, item=11, behavior="click", request_id="r1"),  # on time
    ]
    kit.produce(kafka, events, raw=[(IMPRESSIONS, key_of(1), b"garbage", None)])
    env = {"LUM_DATA_DIR": str(tmp_path), "LUM_JOIN_WINDOW_MS": str(W), "LUM_AGENT_ALLOWED_LATENESS_MS": "1000",
           "LUM_AGENT_BATCH_SIZE": "20"}
    w = run(runtime, "joiner", env)

    def advance(t):  # a behavior at event time t in every partition moves each partition's watermark
        kit.produce(kafka, [], raw=[(BEHAVIORS, key_of(999), BEHAVIORS.encode(b(0, 999, t, event_id=f"tick-{t}-{p}")), p)
                                    for p in range(BEHAVIORS.partitions)])

    advance(100_000)
    want = {"r1/11": 1, "r1/12": 0, "r2/21": 0, "r2/22": 1}
    got = kit.wait_for(lambda: assert_alive(w) or (
        ex if len(ex := read_all(kafka, TRAINING_EXAMPLES, TrainingExample)) >= len(want) else None),
        timeout=90, what="training examples")
    assert {x.example_id: x.label for x in got} == want and len(got) == len(want)
    # a click after its window closed is late: routed, never relabelled
    kit.produce(kafka, [b(5, 2, 2000 + W + 5, item=21, behavior="click", request_id="r2")])
    advance(200_000)
    kit.wait_for(lambda: assert_alive(w) or read_all(kafka, LATE_CLICKS), timeout=60, what="late click routed")
    assert w.stop() == 0
    assert {x.example_id: x.label for x in read_all(kafka, TRAINING_EXAMPLES, TrainingExample)} == want
    assert len(read_all(kafka, DEAD_LETTERS)) == 1



@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_joiner_kill_9_then_restart_on_another_host_gives_every_example_once_labelled(kafka, kit, tmp_path, run,
                                                                                      runtime):
    """Relocation: the restarted joiner has no data directory and rebuilds from joiner-changelog; the distinct
    (example_id, label) set is the one an uninterrupted join gives (labels known by construction)."""
    W, rnd = 10_000, random.Random(7)
    events, truth = [], {}
    for r in range(120):
        user, t = rnd.randrange(40), 1000 + r * 150
        events.append(kit.behavior(10 * r, user, t - 10))
        for pos in range(3):
            item = 100 + rnd.randrange(50) * 3 + pos
            events.append(kit.impression(f"q{r}", user, item, t, pos))
            truth[f"q{r}/{item}"] = 0
            if rnd.random() < 0.3:  # a click inside the window
                events.append(kit.behavior(10 * r + 1 + pos, user, t + rnd.randrange(W), item=item,
                                           behavior="click", request_id=f"q{r}"))
                truth[f"q{r}/{item}"] = 1
    events.sort(key=lambda e: e.event_time_ms)
    t_end = events[-1].event_time_ms - kit.T0 + 3 * W
    events += [kit.behavior(0, 999, t_end, event_id=f"tick-{p}") for p in range(8)]
    kit.produce(kafka, events, raw=[(BEHAVIORS, key_of(999), BEHAVIORS.encode(kit.behavior(0, 999, t_end,
                                     event_id=f"end-{p}")), p) for p in range(BEHAVIORS.partitions)])
    env = {"LUM_JOIN_WINDOW_MS": str(W), "LUM_AGENT_ALLOWED_LATENESS_MS": "1000", "LUM_AGENT_BATCH_SIZE": "20"}

    def examples():
        return {(x.example_id, x.label) for x in read_all(kafka, TRAINING_EXAMPLES, TrainingExample)}

    w1 = run(runtime, "joiner", env | {"LUM_DATA_DIR": str(tmp_path / "a")})
    kit.wait_for(lambda: assert_alive(w1) or examples(), timeout=90, what="first examples")
    assert w1.stop("kill") == -9
    w2 = run(runtime, "joiner", env | {"LUM_DATA_DIR": str(tmp_path / "b")})
    kit.wait_for(lambda: assert_alive(w2) or "assigned partition" in w2.text(), timeout=90, what="restarted joiner")
    kit.wait_for(lambda: assert_alive(w2) or len({e for e, _ in examples()}) >= len(truth), timeout=120,
                 what="every example after the restart")
    assert w2.stop() == 0
    assert examples() == set(truth.items())
