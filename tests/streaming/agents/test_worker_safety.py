"""Nothing lost, nothing committed for unfinished work: the batch worker against the real embedded broker
(crash injection at every named point, a failing batch, a sink that stops, bad input of any size)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
from confluent_kafka import TopicPartition

from schemas.codec import decode
from schemas.events import DeadLetter
from schemas.settings import KafkaSettings, load
from schemas.topics import ALL_TOPICS, BEHAVIORS, DEAD_LETTERS, key_of
from streaming.kafka import Output, group_consumer, read_to_end, reader
from streaming.agents.runtime import CRASH_POINTS
from streaming.agents.sequences import SequenceLogic, expected_sequences, snapshot
from streaming.agents.settings import AgentSettings


def committed(kafka: KafkaSettings, group: str = "lum-sequences") -> dict[int, int | None]:
    c = group_consumer(kafka, kafka.topic_prefix + group)
    try:
        tps = c.committed([TopicPartition(kafka.topic(BEHAVIORS), p) for p in range(BEHAVIORS.partitions)], timeout=30)
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in tps}
    finally:
        c.close()


def events_for(kit, n: int, users: int, seed: int):
    rng = random.Random(seed)
    return [kit.behavior(i, 500 + rng.randrange(users), t=rng.randrange(10_000) * 10, item=rng.randrange(300))
            for i in range(n)]


class Failing(SequenceLogic):
    """The real logic, plus a switch that makes the next ``process`` call run ``action`` (raise, freeze...)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.action = None

    def process(self, partition, records, emit):
        action, self.action = self.action, None
        if action:
            action()
        super().process(partition, records, emit)


class Thread:
    def __init__(self, worker):
        self.worker, self.error = worker, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.worker.run()
        except BaseException as e:  # noqa: BLE001 (what the test inspects)
            self.error = e

    def stop(self, timeout: float = 60):
        self.worker.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive()


def test_kill_at_each_crash_point_in_turn_then_restart_equals_uninterrupted_run(kafka, kit, tmp_path, procs):
    """Killed (SIGKILL) at every named point of a batch, one worker after another, each restarted on what the
    last one left (crashes compound, as they do in production): no event lost, none applied twice, and all
    offsets committed. One stream for all points: a worker start (imports, group join) is the cost here."""
    events = events_for(kit, 900, users=40, seed=3)
    events += events[:60]  # retries
    expected = expected_sequences(events, cap=12)
    kit.produce(kafka, events)
    env = {"LUM_DATA_DIR": str(tmp_path), "LUM_AGENT_MAX_PAIRS": "12", "LUM_AGENT_BATCH_SIZE": "20"}
    nth = {"assign": 1, "revoke": 1, "mid_produce": 25}
    for i, point in enumerate(CRASH_POINTS):
        spec = f"{point}:{nth.get(point, 3)}"
        procs.append(w := kit.ProcWorker("sequences", tmp_path / f"w{i}.log", env | {"LUM_AGENT_CRASH_AT": spec}))
        if point == "revoke":  # reached on the way out: finish, then stop it
            kit.wait_for(lambda: snapshot(kafka)[0] == expected, timeout=60, what="sequences before the stop")
            w.proc.terminate()
        assert w.proc.wait(60) == -signal.SIGKILL, w.text()[-3000:]
        assert f"LUM_AGENT_CRASH_AT={spec}" in w.text()
        if point != "revoke":
            assert snapshot(kafka)[0] != expected, f"the stream ended before {spec} was reached"
    procs.append(w := kit.ProcWorker("sequences", tmp_path / "last.log", env))
    kit.wait_for(lambda: "assigned partitions" in w.text(), timeout=60, what="last worker assigned")
    kit.wait_for(lambda: snapshot(kafka)[0] == expected, timeout=60, what="sequences after the restarts")
    kit.wait_for(lambda: sum(v or 0 for v in committed(kafka).values()) == len(events), timeout=30,
                 what="all offsets committed")
    assert w.stop() == 0, w.text()[-3000:]


def test_an_exception_in_a_batch_stops_the_worker_and_commits_nothing_of_that_batch(kafka, kit, tmp_path, caplog):
    from streaming.agents.worker import Worker

    events = events_for(kit, 80, users=15, seed=7)
    cfg = load(AgentSettings, data_dir=tmp_path, batch_size=10)
    logic = Failing.from_settings(cfg)
    kit.produce(kafka, events[:40])
    t = Thread(Worker("sequences", kafka, cfg, logic=logic))
    kit.wait_for(lambda: sum(v or 0 for v in committed(kafka).values()) == 40, what="first half committed")
    before = committed(kafka)

    def boom():
        raise RuntimeError("a bug in the logic")

    logic.action = boom
    kit.produce(kafka, events[40:])
    t.thread.join(60)
    assert isinstance(t.error, RuntimeError) and t.worker.failed
    assert "STOPPED: batch failed (RuntimeError: a bug in the logic); its offsets were NOT committed" in caplog.text
    assert committed(kafka) == before  # the revoke on the way out committed nothing of the failed batch
    t2 = Thread(Worker("sequences", kafka, cfg))  # a restart redoes it
    kit.wait_for(lambda: snapshot(kafka)[0] == expected_sequences(events), what="all events after restart")
    t2.stop()
    assert t2.error is None and sum(committed(kafka).values()) == 80


def test_sink_stopped_past_the_flush_timeout_moves_no_offset_and_a_restart_loses_nothing(kit, tmp_path):
    from streaming.kafka import create_topics
    from streaming.broker import EmbeddedBroker
    from streaming.agents.worker import Worker

    with EmbeddedBroker(log_path=tmp_path / "broker.log") as broker:  # its own broker: this test freezes it
        kafka = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix="sink-")
        create_topics(kafka, ALL_TOPICS)
        events = events_for(kit, 60, users=10, seed=8)
        cfg = load(AgentSettings, data_dir=tmp_path, batch_size=10, flush_timeout_s=2)
        logic = Failing.from_settings(cfg)
        kit.produce(kafka, events[:30])
        t = Thread(Worker("sequences", kafka, cfg, logic=logic))
        kit.wait_for(lambda: sum(v or 0 for v in committed(kafka).values()) == 30, what="first half committed")
        before = committed(kafka)
        resume = threading.Timer(6, lambda: os.kill(broker.proc.pid, signal.SIGCONT))

        def freeze():  # the broker stops answering between consume and flush, longer than the flush timeout
            os.kill(broker.proc.pid, signal.SIGSTOP)
            resume.start()

        logic.action = freeze
        kit.produce(kafka, events[30:])
        t.thread.join(90)
        resume.join()
        assert t.error is not None and "delivery failed" in str(t.error), t.error
        assert committed(kafka) == before
        t2 = Thread(Worker("sequences", kafka, cfg))
        kit.wait_for(lambda: snapshot(kafka)[0] == expected_sequences(events), what="all events after restart")
        t2.stop()
        assert sum(committed(kafka).values()) == 60


def test_issue_9_scenario_valid_oversized_and_malformed_on_one_partition(kafka, kit, tmp_path, procs):
    """30 valid events of one user interleaved with 6 bad messages (the first 2 MB of garbage), one
    partition: the agent stays alive, applies 30/30, dead-letters 6/6 with reasons, also across a restart."""
    valid = [kit.behavior(i, 42, t=i * 1000) for i in range(30)]
    good = BEHAVIORS.encode(valid[0])
    bad = [os.urandom(2 * 1024 * 1024), b"not an event", b"", b"Lj\x09" + good[3:],
           good.replace(b'"user_id":42', b'"user_id":-1'), good[:-9]]
    stream = []
    for i, e in enumerate(valid):
        stream.append(BEHAVIORS.encode(e))
        if i % 5 == 2:
            stream.append(bad[i // 5])
    out = Output(kafka, **{"message.max.bytes": 5_000_000})
    bad_offsets = {i for i, v in enumerate(stream) if v in bad}
    half = len(stream) // 2

    def produce(values):
        for v in values:
            out.produce(kafka.topic(BEHAVIORS), value=v, key=key_of(42), partition=0)
        out.flush(30)

    produce(stream[:half])
    env = {"LUM_DATA_DIR": str(tmp_path)}
    procs.append(w := kit.ProcWorker("sequences", tmp_path / "w1.log", env))
    kit.wait_for(lambda: w.proc.poll() is not None or committed(kafka)[0] == half, timeout=60, what="first half")
    assert w.proc.poll() is None, w.text()[-3000:]  # alive: an oversized message never stops it
    assert w.stop() == 0, w.text()[-3000:]  # the restart between the two halves
    produce(stream[half:])
    procs.append(w2 := kit.ProcWorker("sequences", tmp_path / "w2.log", env))
    kit.wait_for(lambda: committed(kafka)[0] == len(stream), timeout=60, what="all committed after the restart")
    assert snapshot(kafka)[0] == expected_sequences(valid)  # 30/30 applied
    assert w2.stop() == 0, w2.text()[-3000:]
    c = reader(kafka)
    letters = [decode(DeadLetter, m.value()) for m in read_to_end(c, kafka.topic(DEAD_LETTERS))]
    c.close()
    assert sorted(x.offset for x in letters) == sorted(bad_offsets)  # 6/6, each once
    assert all(x.error and x.source_topic == kafka.topic(BEHAVIORS) for x in letters)
