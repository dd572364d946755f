"""Each long-running job, started as an operator starts it with ``LUM_METRICS_PORT`` set, serves its ``lum_``
metrics: scraped over HTTP and read with prometheus_client's parser (``schemas.metrics.scrape``), against the
real embedded broker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schemas import metrics
from schemas.topics import TRAINING_EXAMPLES, key_of
from streaming.broker import free_port
from streaming.kafka import Output

ROOT = Path(__file__).resolve().parents[1]


def _wait_scrape(port: int, ready, proc: subprocess.Popen, log: Path, timeout: float = 120) -> dict:
    """Scrape until ``ready(samples)``; fails with the job's log if it exits or the time runs out."""
    deadline, s = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"job exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        s = metrics.scrape(port)
        if s and ready(s):
            return s
        time.sleep(0.3)
    lum = {k: v for k, v in s.items() if k[0].startswith("lum_")}
    raise AssertionError(f"metrics not ready after {timeout:.0f}s: {lum}\n{log.read_text()[-3000:]}")


def _lum(*args: str, log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deploy.cli", *args], cwd=ROOT,
                            env=os.environ | {"PYTHONPATH": str(ROOT)} | env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.timeout(240)
def test_dlrm_trainer_serves_its_metrics(kafka, tmp_path):
    from trainers.dlrm.synthetic import synthetic_examples

    n = 600
    out = Output(kafka)
    topic = kafka.topic(TRAINING_EXAMPLES)
    for ex in synthetic_examples(n, seed=5):
        out.produce(topic, value=TRAINING_EXAMPLES.encode(ex), key=key_of(ex.user_id))
    out.produce(topic, value=b"not a training example", key=b"7")
    out.flush(30)

    port, log = free_port(), tmp_path / "train.log"
    proc = _lum("train", "--features", "lum", "--checkpoint-dir", str(tmp_path / "ckpt"), "--preset", "debug",
                "--batch-size", "64", log=log,
                env={"LUM_METRICS_PORT": str(port), "LUM_DLRM_CHECKPOINT_EVERY_BATCHES": "3",
                     "LUM_DLRM_CHECKPOINT_EVERY_S": "1", "LUM_DLRM_MAX_WAIT_S": "0.5",
                     "LUM_DLRM_GROUP_PREFIX": f"g-{kafka.topic_prefix}"})
    job = {"job": "dlrm-lum", "worker": "0"}
    try:
        s = _wait_scrape(port, lambda s: metrics.total(s, "lum_trainer_examples_total", **job) == n
                         and metrics.total(s, "lum_consumer_lag", **job) == 0
                         and metrics.total(s, "lum_trainer_window_auc", **job) > 0
                         and metrics.total(s, "lum_checkpoint_last_timestamp_seconds", **job) > 0, proc, log)
    finally:
        _stop(proc)
    assert metrics.total(s, "lum_events_consumed_total", topic="training-examples", **job) == n + 1
    assert metrics.total(s, "lum_dead_letters_total", topic="training-examples", reason="DecodeError", **job) == 1
    assert 0 <= metrics.total(s, "lum_checkpoint_age_seconds", **job) < 120
    assert 0 < metrics.total(s, "lum_trainer_window_auc", **job) < 1
    assert metrics.total(s, "lum_trainer_window_logloss", **job) > 0
    assert metrics.total(s, "lum_trainer_window_ne", **job) > 0
