"""``lum agents``: starts a worker per agent, serves its Prometheus metrics (worker i on port + i), stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from schemas.metrics import scrape, total
from streaming.broker import free_port


def test_lum_agents_serves_metrics_and_stops_on_sigterm(kafka, kit, tmp_path):
    port = free_port()
    env = os.environ | {"LUM_DATA_DIR": str(tmp_path), "LUM_METRICS_PORT": str(port),
                        "LUM_AGENT_LOG_INTERVAL_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "agents", "--workers", "1"], env=env,
                            cwd=kit.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        kit.produce(kafka, [kit.behavior(i, i % 5, t=i) for i in range(40)])
        seq = {"job": "sequences", "worker": "0"}

        def caught_up(s):  # all consumed, and a lag reported (per partition read) that is 0
            lags = [v for (n, lab), v in s.items() if n == "lum_consumer_lag" and ("job", "sequences") in lab]
            return total(s, "lum_events_consumed_total", **seq) == 40 and lags and sum(lags) == 0

        m = kit.wait_for(lambda: caught_up(s := scrape(port)) and s,
                         what="sequence worker metrics: all consumed, lag 0")
        assert total(m, "lum_agent_state", name="assigned_partitions", **seq) == 4
        kit.wait_for(lambda: total(scrape(port + 1), "lum_events_consumed_total", job="joiner", worker="1",
                                   topic="behaviors") == 40, what="joiner worker metrics")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
        assert "events/s, lag" in out  # periodic throughput/lag log line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_setting_fails_at_start_naming_the_variable(kit):
    env = os.environ | {"LUM_AGENT_MAX_PAIRS": "-3"}
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "agents"], env=env, cwd=kit.ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "LUM_AGENT_MAX_PAIRS" in out.stderr + out.stdout


def test_lum_agents_restarts_a_dead_worker_with_back_off_and_loses_nothing(kafka, kit, tmp_path):
    from streaming.agents.sequences import expected_sequences, snapshot

    events = [kit.behavior(i, i % 9, t=i * 10) for i in range(120)]
    env = os.environ | {"LUM_DATA_DIR": str(tmp_path), "LUM_AGENT_BATCH_SIZE": "10",
                        "LUM_AGENT_CRASH_AT": "after_state_write:3", "LUM_AGENT_RESTART_BACKOFF_S": "0.5"}
    log = tmp_path / "agents.log"
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "agents", "--only", "sequences"], env=env,
                            cwd=kit.ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        kit.produce(kafka, events)
        kit.wait_for(lambda: snapshot(kafka)[0] == expected_sequences(events), timeout=90,
                     what="all sequences after the worker was killed and restarted")
        text = log.read_text()
        assert "sequences worker 0 exited with code -9" in text and "restarting it in 0.5s (restart 1)" in text
        assert text.count("started sequences worker 0") == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except OSError:
        return True


def test_workers_stop_when_the_supervisor_is_killed(kafka, kit, tmp_path):
    """SIGKILL of ``lum agents`` (no chance to stop its workers) must not leave them consuming on their own."""
    env = os.environ | {"LUM_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "agents", "--only", "sequences"], env=env,
                            cwd=kit.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        workers = kit.wait_for(lambda: _children(proc.pid), what="the supervisor's worker process")
        proc.kill()
        proc.wait()
        kit.wait_for(lambda: all(_gone(w) for w in workers), timeout=30, what="workers exit after the supervisor died")
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:  # do not leak a worker into the rest of the suite when the test fails
            if not _gone(w):
                os.kill(w, signal.SIGKILL)
