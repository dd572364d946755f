"""A quiet console: library noise only with LUM_LOG_LEVEL=DEBUG, librdkafka through Python logging, and a
broker start that makes no client fail to connect first."""

import logging
import os
import subprocess
import sys
from pathlib import Path

from schemas.logs import setup_logging
from streaming.broker import broker_binary, free_port

ROOT = Path(__file__).resolve().parents[1]


def _fbgemm_style_record() -> logging.LogRecord:
    # fbgemm-gpu logs every table's arguments with logging.info() on the root logger, from its own files.
    return logging.LogRecord("root", logging.INFO, "/venv/site-packages/fbgemm_gpu/split_table_batched.py", 1670,
                             "[TBE=abc] Contents: ...", None, None)


def test_fbgemm_info_hidden_unless_debug(capsys):
    try:
        setup_logging("INFO")
        logging.getLogger().handle(_fbgemm_style_record())
        logging.getLogger("lum.test").info("our own line")
        err = capsys.readouterr().err
        assert "our own line" in err and "TBE=abc" not in err
        setup_logging("DEBUG")
        logging.getLogger().handle(_fbgemm_style_record())
        assert "TBE=abc" in capsys.readouterr().err
    finally:
        setup_logging("WARNING")


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=os.environ | (env or {}))


def test_librdkafka_lines_go_through_python_logging():
    code = f"""
from confluent_kafka import Consumer
from schemas.logs import setup_logging
from schemas.settings import KafkaSettings
setup_logging("INFO")
c = Consumer(KafkaSettings(bootstrap="127.0.0.1:{free_port()}").consumer_config("quiet-test"))
c.subscribe(["nothing"])
c.poll(1.5)
c.close()
"""
    err = _run(code).stderr
    assert "%3|" not in err and "%6|" not in err, err  # librdkafka's own stderr format
    assert "ERROR librdkafka: FAIL" in err and "Connection refused" in err, err  # an error is still shown, once formatted


def test_embedded_broker_start_prints_nothing(tmp_path):
    # A broker that takes a moment to listen (as under load): the readiness wait must not try a client first.
    slow = tmp_path / "slow-tansu"
    slow.write_text(f"#!/bin/sh\nsleep 1.5\nexec {broker_binary()} \"$@\"\n")
    slow.chmod(0o755)
    code = "from streaming.broker import EmbeddedBroker\nwith EmbeddedBroker() as b: print('ready', b.bootstrap)"
    done = _run(code, {"CALF_TANSU_BIN": str(slow)})
    assert done.returncode == 0, done.stderr
    assert "ready" in done.stdout
    assert "Connection refused" not in done.stderr and "FAIL" not in done.stderr, done.stderr


def test_log_level_is_checked_before_or_after_the_command():
    for argv in (["--log-level", "nope", "config"], ["config", "--log-level", "nope"]):
        done = subprocess.run([sys.executable, "-m", "deploy.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode != 0 and "LUM_LOG_LEVEL" in done.stderr, argv
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "config"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=os.environ | {"LUM_LOG_LEVEL": "loud"})
    assert done.returncode != 0 and "LUM_LOG_LEVEL" in done.stderr
