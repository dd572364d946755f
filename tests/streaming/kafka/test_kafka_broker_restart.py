"""The broker stops and restarts mid-stream (S3 storage, so its data survives): while a producer and a
sequence agent (a worker subprocess, as ``lum agents`` runs it) keep going, nothing is lost."""

import threading
import time

import pytest

from schemas.settings import KafkaSettings
from schemas.topics import BEHAVIORS, key_of
from streaming.agents.sequences import expected_sequences, snapshot
from streaming.kafka import Output, create_topics


@pytest.mark.slow
def test_broker_restart_mid_stream_loses_nothing(restartable_broker, kit, procs, tmp_path, monkeypatch):
    rb = restartable_broker
    kafka = KafkaSettings(bootstrap=rb.bootstrap, topic_prefix="restart-")
    monkeypatch.setenv("LUM_KAFKA_BOOTSTRAP", rb.bootstrap)
    monkeypatch.setenv("LUM_KAFKA_TOPIC_PREFIX", kafka.topic_prefix)
    create_topics(kafka)
    worker = kit.ProcWorker("sequences", tmp_path / "worker.log", {"LUM_DATA_DIR": str(tmp_path / "state")})
    procs.append(worker)

    events = [kit.behavior(i, i % 60, t=i * 10, item=i % 300) for i in range(1200)]
    go = threading.Event()
    errors: list[BaseException] = []

    def produce():  # a third, then (once the agent is up) a steady stream that runs through the outage
        try:
            out = Output(kafka, **{"linger.ms": 20})
            for i, e in enumerate(events):
                out.produce(kafka.topic(BEHAVIORS), BEHAVIORS.encode(e), key_of(e.user_id))
                if i == len(events) // 3:
                    out.flush(60)
                    go.wait(120)
                elif i > len(events) // 3 and i % 40 == 0:
                    out.poll(0)
                    time.sleep(0.1)  # ~400 events/s: the rest takes ~2 s, the outage 2 s
            out.flush(120)  # raises DeliveryError if anything was lost
        except BaseException as e:  # surfaced below
            errors.append(e)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    kit.wait_for(lambda: len(snapshot(kafka)[0]) >= 30, timeout=120, what="the agent publishing sequences")
    go.set()
    time.sleep(0.5)
    rb.stop()  # mid-stream: the producer keeps producing into its queue, the worker keeps polling
    time.sleep(2)
    rb.start()
    producer.join(180)
    assert not producer.is_alive() and not errors, errors
    want = expected_sequences(events)
    kit.wait_for(lambda: snapshot(kafka)[0] == want, timeout=180, what="every event in the users' sequences")
    assert worker.proc.poll() is None, worker.text()[-3000:]
