"""The Faust runtime's own parts: App settings from KafkaSettings, the host's batch rules, ``lum agents --runtime
faust`` (the logic's behaviour on both runtimes is in test_runtimes.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from schemas.settings import KafkaSettings
from schemas.topics import BEHAVIORS, IMPRESSIONS
from streaming.agents.faust_runtime import Host, faust_settings
from streaming.agents.store import MemoryStore


def test_faust_settings_come_from_kafka_settings(tmp_path):
    k = KafkaSettings(bootstrap="a:9092,b:9093", profile="embedded")
    conf = faust_settings(k, "g", tmp_path)
    assert conf["broker"] == "kafka://a:9092;kafka://b:9093" and conf["id"] == "g"
    assert conf["broker_session_timeout"] == 6.0  # the embedded profile's session timeout, in seconds
    assert conf["processing_guarantee"] == "at_least_once" and conf["broker_credentials"] is None
    kafka = KafkaSettings(bootstrap="a:9092", profile="kafka", security_protocol="SASL_PLAINTEXT",
                          sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p")
    conf = faust_settings(kafka, "g", tmp_path)
    assert "broker_session_timeout" not in conf  # Faust's default against Apache Kafka
    creds = conf["broker_credentials"]
    assert (creds.username, creds.password, str(creds.mechanism.value)) == ("u", "p", "SCRAM-SHA-512")


class Logic:
    """Records what the host asks of it; fails on a record whose value is b"boom"."""

    name, inputs = "test", (IMPRESSIONS, BEHAVIORS)

    def __init__(self, starts):
        self.starts, self.calls, self.stores = starts, [], {}

    def assign(self, partition, store, committed, emit, read):
        self.calls.append(("assign", partition, dict(committed)))
        self.stores[partition] = store
        return self.starts.get(partition, {t: off or 0 for t, off in committed.items()})

    def process(self, partition, records, emit):
        self.calls.append(("process", partition, [(r.topic, r.offset) for r in records]))
        for r in records:
            self.stores[partition].put(r.key, r.value)
            if r.value == b"boom":
                raise RuntimeError("bug")

    def revoke(self, partition):
        self.calls.append(("revoke", partition))


class Out:
    def __init__(self, calls):
        self.calls = calls

    def flush(self, timeout=None):
        self.calls.append(("flush",))


def msg(topic, p, off, value=b"v"):
    return SimpleNamespace(topic=topic, partition=p, offset=off, timestamp=1.5, key=f"{topic}{off}".encode(),
                           value=value)


@pytest.fixture
def host():
    kafka = KafkaSettings(topic_prefix="x-")
    logic = Logic(starts={1: {"impressions": 0, "behaviors": 5}})  # partition 1's store is ahead on behaviors
    stores = {}
    emit = SimpleNamespace(dead=SimpleNamespace(total=0))
    h = Host(logic, kafka, Out(logic.calls), emit, lambda p: stores.setdefault(p, MemoryStore()), "x-group")
    h.committed = lambda p: {"impressions": None, "behaviors": 3 if p == 1 else None}
    h.assignment = lambda: {(t, p) for t in ("x-impressions", "x-behaviors") for p in (0, 1)}
    return h, logic, stores


def test_host_batch_commits_stores_with_positions_then_flushes(host):
    h, logic, stores = host
    n = h.process_messages([msg("x-behaviors", 1, 3), msg("x-behaviors", 1, 4), msg("x-impressions", 1, 0),
                            msg("x-behaviors", 1, 5), msg("x-behaviors", 0, 0), msg("x-behaviors", 2, 0)])
    # partition 2 is not assigned here: dropped; offsets 3 and 4 are below what partition 1's logic resumes at
    assert n == 3 and h.skipped == 3
    assert logic.calls == [("assign", 1, {"impressions": None, "behaviors": 3}),
                           ("process", 1, [("impressions", 0), ("behaviors", 5)]),
                           ("assign", 0, {"impressions": None, "behaviors": None}),
                           ("process", 0, [("behaviors", 0)]), ("flush",)]
    assert stores[1].positions() == {"impressions": 1, "behaviors": 6} and stores[0].positions() == {"behaviors": 1}
    assert stores[1].get(b"x-behaviors5") == b"v"
    h.revoke([1])
    assert logic.calls[-1] == ("revoke", 1) and 1 not in h.stores


def test_a_failed_batch_commits_nothing_and_propagates(host):
    h, logic, stores = host
    h.process_messages([msg("x-behaviors", 0, 0)])
    with pytest.raises(RuntimeError, match="bug"):
        h.process_messages([msg("x-behaviors", 0, 1), msg("x-behaviors", 0, 2, b"boom")])
    assert stores[0].positions() == {"behaviors": 1} and stores[0].get(b"x-behaviors1") is None  # discarded
    assert logic.calls[-1] != ("flush",)  # outputs of the failed batch are not flushed as done


def test_lum_agents_runtime_faust_serves_metrics_and_stops_on_sigterm(kafka, kit, tmp_path):
    from schemas.metrics import scrape, total
    from streaming.broker import free_port

    port = free_port()
    env = os.environ | {"LUM_DATA_DIR": str(tmp_path), "LUM_METRICS_PORT": str(port),
                        "LUM_AGENT_LOG_INTERVAL_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "agents", "--runtime", "faust", "--only",
                             "sequences"], env=env, cwd=kit.ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        kit.produce(kafka, [kit.behavior(i, i % 5, t=i) for i in range(40)])
        job = {"job": "sequences", "worker": "0"}

        def caught_up(s):  # all consumed, and a lag reported (per partition read) that is 0
            lags = [v for (n, lab), v in s.items() if n == "lum_consumer_lag" and ("job", "sequences") in lab]
            return total(s, "lum_events_consumed_total", **job) == 40 and lags and sum(lags) == 0

        m = kit.wait_for(lambda: caught_up(s := scrape(port)) and s, timeout=90,
                         what="faust worker metrics: all consumed, lag 0")
        assert total(m, "lum_agent_state", name="assigned_partitions", **job) == 4
        assert total(m, "lum_sequences_published_total", **job) >= 5
        time.sleep(2.5)  # a periodic log line (every LUM_AGENT_LOG_INTERVAL_S = 1 s) after the last batch
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out[-3000:]
        assert "events/s, lag" in out  # the periodic log line, as the batch worker writes it
    finally:
        if proc.poll() is None:  # the supervisor and its workers: they share its new session's group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
