"""Shared fixtures: one embedded broker (Tansu) per test session, a topic factory per test, and a broker
that a test may stop and restart (``restartable_broker``: S3 storage on a local moto server).

Kafka tests run against a real broker, never a mock. Each test that asks for ``kafka`` gets its own topic
prefix, so tests share one broker without seeing each other's data.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import itertools
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from schemas.settings import KafkaSettings
from schemas.topics import ALL_TOPICS
from streaming.kafka import create_topics
from streaming.broker import EmbeddedBroker, free_port

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LUM_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
_counter = itertools.count()


def pytest_configure(config):
    # Tests share 2 cores with the broker and worker subprocesses: contended torch threads stall badly.
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if not _cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def load_benchmark():
    """load_benchmark("bench_offline") -> benchmarks/bench_offline.py as a module (the scripts are not a package;
    registered under its name, so that its dataclasses resolve their module)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """The embedded broker, started once per session on a free port; stopped at the end."""
    external = os.environ.get("LUM_TEST_BOOTSTRAP")  # run the suite against an existing cluster instead
    if external:
        yield external
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b.bootstrap


@pytest.fixture
def kafka(broker, monkeypatch) -> KafkaSettings:
    """Settings for this test: the session broker and a fresh topic prefix with every registry topic created.

    Also exported as LUM_KAFKA_* so that subprocesses started by the test (workers, CLI) see the same.
    """
    prefix = f"t{os.getpid()}-{next(_counter)}-"
    monkeypatch.setenv("LUM_KAFKA_BOOTSTRAP", broker)
    monkeypatch.setenv("LUM_KAFKA_TOPIC_PREFIX", prefix)
    settings = KafkaSettings(bootstrap=broker, topic_prefix=prefix)
    create_topics(settings, ALL_TOPICS)
    return settings


@pytest.fixture
def data_dir() -> Path:
    """../shared/data when present; tests that need it skip with a clear message otherwise."""
    if not DATA_DIR.exists():
        pytest.skip(f"real data not found at {DATA_DIR} (set LUM_TEST_DATA to the shared/data folder)")
    return DATA_DIR


@pytest.fixture
def read_topic(kafka):
    """read_topic(TOPIC, n=None) -> [(partition, offset, key, value_bytes)]: a registry topic from its start to
    its end (high-water mark of the fetched data), or its first ``n`` records."""
    from streaming.kafka import read_to_end, reader

    def read(topic, n: int | None = None):
        consumer = reader(kafka)
        out = []
        try:
            with contextlib.closing(read_to_end(consumer, kafka.topic(topic), idle_timeout_s=30)) as msgs:
                for m in msgs:
                    out.append((m.partition(), m.offset(), m.key(), m.value()))
                    if n is not None and len(out) >= n:
                        break
            return out
        finally:
            consumer.close()

    return read


class RestartableBroker:
    """The embedded broker on S3 storage (a local moto server), so that its data survives stop()/start().

    ``bootstrap`` stays the same across restarts. The moto server runs with this interpreter (moto is in
    requirements.lock); ``LUM_TEST_MOTO_PYTHON`` may name another Python that has moto.
    """

    def __init__(self, logs: Path):
        python = os.environ.get("LUM_TEST_MOTO_PYTHON", sys.executable)
        s3_port = free_port()
        self.moto = subprocess.Popen([python, "-m", "moto.server", "-p", str(s3_port)], stdout=open(logs / "moto.log", "ab"),
                                     stderr=subprocess.STDOUT)
        endpoint = f"http://127.0.0.1:{s3_port}"
        self._wait_http(endpoint, logs / "moto.log")
        # moto accepts unsigned requests: create the bucket with a plain PUT.
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/lum-test", method="PUT"), timeout=10)
        env = {"AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        self.broker = EmbeddedBroker(log_path=logs / "tansu.log", storage="s3://lum-test/", env=env)

    def _wait_http(self, url: str, log: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.moto.poll() is not None:
                pytest.fail(f"moto server exited ({self.moto.returncode}): {log.read_text()[-2000:]} "
                            "(moto comes from requirements.lock: pip install --no-deps -r requirements.lock)")
            try:
                urllib.request.urlopen(url, timeout=1)
                return
            except (OSError, http.client.HTTPException):  # not up yet (or a self-connect that read itself)
                time.sleep(0.1)
        self.moto.kill()
        pytest.fail(f"moto server did not answer on {url} within {timeout:.0f}s")

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    def start(self) -> None:
        self.broker.start()

    def stop(self) -> None:
        self.broker.stop()

    def close(self) -> None:
        self.broker.stop()
        self.moto.terminate()
        self.moto.wait(10)


@pytest.fixture
def restartable_broker(tmp_path_factory):
    """A broker of this test's own whose data survives ``stop()`` / ``start()`` (same bootstrap address)."""
    rb = RestartableBroker(tmp_path_factory.mktemp("restartable-broker"))
    try:
        rb.start()
        yield rb
    finally:
        rb.close()
