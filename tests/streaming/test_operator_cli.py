"""The operator commands as users run them: ``lum broker`` (Ctrl-C stops it), ``lum topics``, ``lum produce``."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from schemas.topics import ALL_TOPICS, BEHAVIORS
from streaming.broker import free_port

LUM = [sys.executable, "-m", "deploy.cli"]


def _lum(*args: str, env: dict | None = None, timeout: float = 120) -> str:
    done = subprocess.run([*LUM, *args], capture_output=True, text=True, timeout=timeout, env=os.environ | (env or {}))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_help_lists_the_commands():
    out = _lum("--help")
    for command in ("broker", "topics", "produce", "config"):
        assert command in out


def test_broker_starts_prints_bootstrap_and_stops_on_ctrl_c():
    port = free_port()
    proc = subprocess.Popen([*LUM, "broker", "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"LUM_KAFKA_BOOTSTRAP=127.0.0.1:{port}" in line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    with socket.socket() as s:  # the broker process is gone: nothing listens there any more
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_topics_and_produce_commands(broker):
    env = {"LUM_KAFKA_TOPIC_PREFIX": f"cli{os.getpid()}-"}
    created = _lum("topics", "create", "--bootstrap", broker, env=env)
    assert created.count("created") == len(ALL_TOPICS)
    assert _lum("topics", "create", "--bootstrap", broker, env=env).count("exists") == len(ALL_TOPICS)
    listed = _lum("topics", "list", "--bootstrap", broker, env=env)
    assert f"cli{os.getpid()}-{BEHAVIORS.name} " in listed
    described = json.loads(_lum("topics", "describe", "--bootstrap", broker, env=env))
    assert {d["topic"] for d in described} == {f"cli{os.getpid()}-{t.name}" for t in ALL_TOPICS}
    out = _lum("produce", "synthetic", "--users", "20", "--items", "50", "--events", "500", "--bootstrap", broker,
               env=env)
    assert "events=500" in out


def test_bad_setting_fails_at_start_up_naming_it():
    done = subprocess.run([*LUM, "topics", "list"], capture_output=True, text=True, timeout=60,
                          env=os.environ | {"LUM_KAFKA_BOOTSTRAP": "no-port-here"})
    assert done.returncode != 0
    assert "LUM_KAFKA_BOOTSTRAP" in done.stderr and "host:port" in done.stderr


def test_malformed_or_insecure_kafka_settings_fail_cleanly_naming_them():
    for env, name in (({"LUM_KAFKA_EXTRA": "{not json"}, "LUM_KAFKA_EXTRA"),
                      ({"LUM_KAFKA_EXTRA": '{"security.protocol": "PLAINTEXT"}'}, "LUM_KAFKA_EXTRA"),
                      ({"LUM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "LUM_KAFKA_SASL_PASSWORD": "pw-do-not-show"},
                       "LUM_KAFKA_SASL_MECHANISM")):
        done = subprocess.run([*LUM, "topics", "list"], capture_output=True, text=True, timeout=60,
                              env=os.environ | env)
        assert done.returncode != 0
        assert name in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "pw-do-not-show" not in done.stderr + done.stdout
