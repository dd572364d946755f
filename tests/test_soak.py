"""benchmarks/soak.py smoke run: it samples, prints its table and verdicts, and leaves no process behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ours(marker: str) -> list[int]:
    """Processes whose command line or environment mentions ``marker`` (the soak's work directory)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        for f in ("cmdline", "environ"):
            try:
                if marker.encode() in Path(f"/proc/{d}/{f}").read_bytes():
                    found.append(int(d))
                    break
            except OSError:
                pass
    return found


def test_soak_smoke_stops_everything(tmp_path):
    work, out = tmp_path / "work", tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "0.15", "--rate", "200",
                        "--sample-s", "3", "--workdir", str(work), "--json", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: a goal missed; a smoke run judges nothing
    assert "--- end:" in r.stdout and "verdicts:" in r.stdout and "lum-joiner" in r.stdout, r.stdout
    report = json.loads(out.read_text())
    assert len(report["samples"]) >= 3
    last = report["samples"][-1]
    assert set(last["rss"]) == {"agents", "producer", "trainer", "broker"}
    assert all(last["alive"].values()), last["alive"]
    assert last["events"] > 0 and last["rss"]["agents"] > 0
    # every child (they all inherit LUM_DATA_DIR under the work dir) and the broker are gone
    assert _ours(str(work)) == []
    host, port = report["config"]["bootstrap"].split(":")
    with socket.socket() as s:
        assert s.connect_ex((host, int(port))) != 0


def test_a_steady_climb_in_lag_fails_the_lag_verdict():
    """Lag that climbs steadily but evenly stays under the peak rule (1.25 x q3 peak + 5 s of events); the
    slope rule must still call it falling behind, while a flat saw-tooth passes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    GROUPS, verdicts = soak.GROUPS, soak.verdicts

    def samples(lag_at):
        return [{"t_s": float(t), "lag": {g: lag_at(t) for g in GROUPS}, "rss": {}, "alive": {}}
                for t in range(0, 241, 10)]

    rate = 4000.0
    climbing = verdicts(samples(lambda t: 600 * t), 240, rate)  # +600/s: 15% of the rate
    flat = verdicts(samples(lambda t: 5000 + (3000 if t % 20 else 0)), 240, rate)
    assert [v["ok"] for v in climbing if v["goal"].startswith("lag")] == [False] * len(GROUPS)
    assert [v["ok"] for v in flat if v["goal"].startswith("lag")] == [True] * len(GROUPS)
