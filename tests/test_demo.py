"""The main job end to end, small: every stage runs, the summary and plot appear, nothing is left running."""

import os
import re
import subprocess
import sys
import time


def _ours(marker: bytes) -> list[int]:
    """Processes whose environment holds ``marker``: every process the demo started inherits it."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def test_demo_runs_every_stage_and_cleans_up(tmp_path):
    out = tmp_path / "demo"
    env = os.environ | {"LUM_DEMO_OUT": str(out), "LUM_DEMO_USERS": "200", "LUM_DEMO_ITEMS": "400",
                        "LUM_DEMO_WARMUP_EVENTS": "4000", "LUM_DEMO_STREAM_EVENTS": "6000", "LUM_DEMO_RATE": "0",
                        "LUM_DEMO_LUM_STEPS": "40", "LUM_DEMO_MINUTES": "5",
                        "LUM_DLRM_PRESET": "debug"}  # the stages, not the model size: 1M-row tables cost ~40 s
    env.pop("LUM_KAFKA_BOOTSTRAP", None)  # its own embedded broker
    env.pop("LUM_KAFKA_TOPIC_PREFIX", None)
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "demo"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("== warm-up stream", "== pre-train LUM", "== refresh LUM features", "== live stream",
                  "== DLRM trainers, last round", "== summary"):
        assert stage in done.stdout
    assert "| DLRM baseline |" in done.stdout and "| DLRM lum |" in done.stdout
    assert re.search(r"conditions' answers agree: mean pairwise cosine -?\d\.\d{4} ", done.stdout)  # not n/a
    assert (out / "auc.png").stat().st_size > 10_000
    time.sleep(1)
    assert _ours(f"LUM_DEMO_OUT={out}".encode()) == [], "the demo left processes running"
