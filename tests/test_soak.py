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
