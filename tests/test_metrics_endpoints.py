"""Each long-running job, started as an operator starts it with ``LUM_METRICS_PORT`` set, serves its ``lum_``
metrics: scraped over HTTP and read with prometheus_client's parser (``schemas.metrics.scrape``), against the
real embedded broker."""

from __future__ import annotations

import importlib.util
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


def _streaming_helpers():
    """tests/streaming/conftest.py's event helpers (its ``kit`` fixture is out of this directory's reach)."""
    spec = importlib.util.spec_from_file_location("_streaming_helpers", ROOT / "tests" / "streaming" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kit = _streaming_helpers()


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


@pytest.mark.timeout(240)
@pytest.mark.parametrize("runtime", ["worker", "faust"])
def test_agent_workers_serve_their_metrics(kafka, tmp_path, runtime):
    """``lum agents`` on either runtime: the sequence worker on the port, the joiner on port + 1, with the same
    names and labels; the demo reads the same."""
    from deploy.demo import agent_figures
    from schemas.topics import BEHAVIORS

    b, imp = kit.behavior, kit.impression
    port, log = free_port(), tmp_path / "agents.log"
    proc = _lum("agents", "--workers", "1", "--runtime", runtime, log=log,
                env={"LUM_DATA_DIR": str(tmp_path / "state"), "LUM_METRICS_PORT": str(port),
                     "LUM_JOIN_WINDOW_MS": "1000", "LUM_AGENT_ALLOWED_LATENESS_MS": "0"})
    seq, join = {"job": "sequences", "worker": "0"}, {"job": "joiner", "worker": "1"}
    try:
        # 40 views, a click at t=500, a view at t=50 s (the watermark passes r3's window) and one bad message.
        behaviors = [b(i, i % 5, t=i) for i in range(40)]
        behaviors += [b(40, 3, 500, item=7, behavior="click", request_id="r3"), b(41, 3, 50_000, item=8)]
        kit.produce(kafka, behaviors, raw=[(BEHAVIORS, b"3", b"not an event", None)])
        _wait_scrape(port + 1, lambda s: metrics.total(s, "lum_events_consumed_total", **join) == 43, proc, log)
        # Impressions of the closed window: the joiner emits them at once, labelled with the click it saw.
        kit.produce(kafka, [imp("r3", 3, 7, 400), imp("r3", 3, 6, 400)])
        j = _wait_scrape(port + 1, lambda s: metrics.total(s, "lum_examples_emitted_total", **join) == 2, proc, log)
        s = _wait_scrape(port, lambda s: metrics.total(s, "lum_events_consumed_total", **seq) == 43
                         and any(n == "lum_consumer_lag" for n, _ in s), proc, log)
    finally:
        _stop(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]

    assert metrics.total(s, "lum_events_consumed_total", topic="behaviors", **seq) == 43
    assert metrics.total(s, "lum_consumer_lag", **seq) == 0
    assert metrics.total(s, "lum_sequences_published_total", **seq) > 0
    assert metrics.total(s, "lum_dead_letters_total", topic="behaviors", **seq) == 1
    assert metrics.total(s, "lum_batch_seconds_count", **seq) >= 1
    first, last = (metrics.total(s, f"lum_{w}_batch_timestamp_seconds", **seq) for w in ("first", "last"))
    assert time.time() - 240 < first <= last <= time.time()

    assert metrics.total(j, "lum_events_consumed_total", topic="impressions", **join) == 2
    assert metrics.total(j, "lum_dead_letters_total", topic="behaviors", **join) == 1
    assert metrics.total(j, "lum_agent_state", name="positives_total", **join) == 1
    assert metrics.total(j, "lum_examples_late_total", **join) == 0

    figures = agent_figures(s | j)  # what `lum demo` prints, from the same scrapes
    assert figures["sequences"]["events_total"] == 43 and figures["sequences"]["lag"] == 0
    assert figures["joiner"]["examples_total"] == 2 and figures["joiner"]["positives_total"] == 1


@pytest.mark.timeout(240)
def test_refresh_serves_its_metrics(kafka, tmp_path):
    """``lum refresh --every``: users refreshed, the served model version and the age of its checkpoint."""
    import numpy as np
    import torch

    from schemas.tokenize import CONDITION_KINDS, TokenPair, UserSequence
    from schemas.topics import USER_SEQUENCES
    from trainers.lum.model import PRESETS, LumModel
    from trainers.lum.pretrain import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "lum", LumModel(PRESETS["debug"]), None, step=1)
    meta = load_checkpoint(tmp_path / "lum")[2]
    rng = np.random.default_rng(0)
    out = Output(kafka)
    for user in range(1, 21):
        pairs = [TokenPair(1_767_225_600_000 + i, int(rng.integers(1, 2**62)),
                           tuple(int(x) for x in rng.integers(1, 2**62, len(CONDITION_KINDS))),
                           int(rng.integers(0, 500)), int(rng.integers(0, 20))) for i in range(5)]
        seq = UserSequence(user, 1_767_225_600_000 + 5, pairs)
        out.produce(kafka.topic(USER_SEQUENCES), USER_SEQUENCES.encode(seq), key_of(user))
    out.flush(30)

    port, log = free_port(), tmp_path / "refresh.log"
    proc = _lum("refresh", "--checkpoint", str(tmp_path / "lum"), "--every", "0.02", log=log,
                env={"LUM_METRICS_PORT": str(port), "LUM_REFRESH_CONDITIONS": "scenario=home;scenario=search",
                     "LUM_REFRESH_IDLE_TIMEOUT_S": "3"})
    job = {"job": "refresh", "worker": "0"}
    try:
        # The first run publishes everyone (a new model); later runs find nothing changed.
        s = _wait_scrape(port, lambda s: metrics.total(s, "lum_refresh_seconds_count", **job) >= 2, proc, log)
    finally:
        _stop(proc)
    assert metrics.total(s, "lum_refresh_users_total", **job) == 20
    assert metrics.total(s, "lum_model_info", model_version=meta["model_version"], **job) == 1
    assert metrics.total(s, "lum_model_info", **job) == 1  # one version served
    assert 0 < metrics.total(s, "lum_model_age_seconds", **job) < 240
    assert metrics.total(s, "lum_model_saved_timestamp_seconds", **job) == pytest.approx(meta["saved_at"], abs=1e-3)
    assert 0 <= metrics.total(s, "lum_refresh_age_seconds", **job) < 60


def test_scrape_of_a_port_that_echoes_its_request_is_not_up_yet():
    """A connect to an unused local ephemeral port can connect to itself and read its own request back
    ("GET /metrics HTTP/1.1" as a status line); a poll that waits for a job to come up must see "not up"."""
    import socket
    import threading

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def echo():
            conn, _ = server.accept()
            with conn:
                conn.sendall(conn.recv(65536))

        threading.Thread(target=echo, daemon=True).start()
        assert metrics.scrape(server.getsockname()[1]) == {}
