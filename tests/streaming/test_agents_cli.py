"""``lum agents``: starts a worker per agent, exposes throughput and lag as Prometheus text, stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

from streaming.broker import free_port


def scrape(port: int) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()}


def test_lum_agents_serves_metrics_and_stops_on_sigterm(kafka, kit, tmp_path):
    port = free_port()
    env = os.environ | {"LUM_DATA_DIR": str(tmp_path), "LUM_AGENT_METRICS_PORT": str(port),
                        "LUM_AGENT_LOG_INTERVAL_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "agents", "--workers", "1"], env=env,
                            cwd=kit.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        kit.produce(kafka, [kit.behavior(i, i % 5, t=i) for i in range(40)])
        seq_key = 'lum_agent_events_total{agent="sequences",worker="0"}'
        lag_key = 'lum_agent_lag{agent="sequences",worker="0",topic="%sbehaviors"}' % kafka.topic_prefix
        m = kit.wait_for(lambda: (s := scrape(port)).get(seq_key) == 40 and s.get(lag_key) == 0 and s,
                         what="sequence worker metrics: all consumed, lag 0")
        assert m['lum_agent_assigned_partitions{agent="sequences",worker="0"}'] == 4
        j = kit.wait_for(lambda: scrape(port + 1).get('lum_agent_events_total{agent="joiner",worker="1"}') == 40,
                         what="joiner worker metrics")
        assert j
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
