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
