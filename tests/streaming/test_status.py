"""``lum status`` against a running embedded deployment: the real broker, a sequence agent, published LUM
features, dead letters from bad input, and trainer / LUM checkpoint directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from schemas.events import ConditionOutput, LumFeatures
from schemas.settings import load
from schemas.topics import BEHAVIORS, LUM_FEATURES, key_of
from streaming.agents.settings import AgentSettings
from streaming.kafka import Output
from streaming.status import status


def _lum_status(kit, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "status", "--json", *args], cwd=kit.ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "%3|" not in done.stderr  # no raw librdkafka lines
    return json.loads(done.stdout)


def _features(kafka, version: str, users: range, at_ms: int) -> None:
    out = Output(kafka)
    for u in users:
        f = LumFeatures(user_id=u, model_version=version, computed_at_ms=at_ms,
                        conditions=[ConditionOutput(condition="scenario=home", vector=[0.1, 0.2])])
        out.produce(kafka.topic(LUM_FEATURES), LUM_FEATURES.encode(f), key_of(u))
    out.flush()


def _checkpoint_dirs(tmp_path):
    dlrm = tmp_path / "dlrm-lum"
    (dlrm / "ckpt-000000040-1").mkdir(parents=True)
    saved_ms = int(time.time() * 1000) - 120_000
    (dlrm / "ckpt-000000040-1" / "meta.json").write_text(json.dumps({"step": 40, "examples": 20480,
                                                                       "saved_at_ms": saved_ms}))
    (dlrm / "LATEST").write_text("ckpt-000000040-1")
    rows = [{"kind": "window", "window_start_ms": 0, "auc": 0.60, "ne": 0.99, "logloss": 0.5, "n": 10},
            {"kind": "window", "window_start_ms": 3_600_000, "auc": 0.65, "ne": 0.97, "logloss": 0.45, "n": 10},
            {"kind": "overall", "auc": 0.7},
            {"kind": "window", "window_start_ms": 3_600_000, "auc": 0.71, "ne": 0.95, "logloss": 0.41, "n": 20}]
    (dlrm / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "wind')  # cut line
    lum = tmp_path / "lum"
    (lum / "step-00000500").mkdir(parents=True)
    (lum / "step-00000500" / "meta.json").write_text(json.dumps({"step": 500, "model_version": "debug-500-abcd",
                                                                   "saved_at": time.time() - 60}))
    return dlrm, lum


def test_status_of_a_running_deployment(kafka, kit, tmp_path):
    bad = [(BEHAVIORS, b"1", b"not an event", None)]
    kit.produce(kafka, [kit.behavior(i, i % 5, t=i) for i in range(40)], raw=bad)
    _features(kafka, "debug-100-aaaa", range(5), at_ms=int(time.time() * 1000) - 600_000)
    _features(kafka, "debug-500-abcd", range(3), at_ms=int(time.time() * 1000) - 5_000)
    cfg = load(AgentSettings, data_dir=tmp_path / "state", log_interval_s=1)
    group = kafka.topic_prefix + cfg.sequences_group

    def lag_of(report, topic="behaviors"):
        rows = [g for g in report["groups"] if g.get("group") == group and g.get("topic") == topic]
        return rows[0]["lag"] if rows else None

    with kit.ThreadWorker("sequences", kafka, cfg):
        kit.wait_for(lambda: lag_of(status(kafka, timeout=10)) == 0, timeout=90, what="sequence agent lag 0")
    kit.produce(kafka, [kit.behavior(100 + i, i % 5, t=100 + i) for i in range(10)])  # arrives while it is stopped

    dlrm, lum = _checkpoint_dirs(tmp_path)
    report = _lum_status(kit, str(dlrm), str(lum), str(tmp_path / "empty"))

    topics = {t["topic"]: t for t in report["topics"]}
    assert topics["behaviors"]["partitions"] == 4 and topics["behaviors"]["messages"] == 51
    assert sum(topics["sequence-deltas"]["end_offsets"].values()) >= 5  # the agent exported every user (deltas)
    assert topics["lum-features"]["messages"] == 8
    assert lag_of(report) == 10
    assert report["lum_features"]["model_version"] == "debug-500-abcd"
    assert 0 <= report["lum_features"]["age_s"] < 120
    assert report["dead_letters"]["last_hour"] == 1
    assert list(report["dead_letters"]["by_consumer"].values()) == [1]
    d, m, empty = report["checkpoints"]
    assert "no checkpoint" in empty["error"]
    assert (d["kind"], d["step"], d["auc"], d["ne"], d["logloss"]) == ("dlrm", 40, 0.71, 0.95, 0.41)
    assert 110 <= d["age_s"] < 300
    assert (m["kind"], m["model_version"]) == ("lum", "debug-500-abcd")

    table = subprocess.run([sys.executable, "-m", "deploy.cli", "status", str(dlrm)], cwd=kit.ROOT,
                           capture_output=True, text=True, timeout=120).stdout
    assert "debug-500-abcd" in table and "0.7100" in table and "0.9500" in table and group in table


def test_status_without_a_cluster_says_so(kit):
    from streaming.broker import free_port

    done = subprocess.run([sys.executable, "-m", "deploy.cli", "status", "--timeout", "2"], cwd=kit.ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LUM_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    assert done.returncode == 1
    assert "cannot reach the cluster" in done.stderr and "LUM_KAFKA_BOOTSTRAP" in done.stderr
    assert "Traceback" not in done.stderr and "%3|" not in done.stderr
