"""benchmarks/soak.py smoke run: it samples, prints its table and verdicts, and leaves no process behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert set(last["alive"]) == {"agents", "producer", "trainer", "broker"}
    assert {n for n in last["rss"] if "/" not in n} == set(last["alive"])
    assert {"agents/sequences-0", "agents/joiner-1"} <= set(last["rss"]), last["rss"]  # each worker apart
    assert all(last["alive"].values()), last["alive"]
    assert last["events"] > 0 and last["rss"]["agents"] > 0
    # every child (they all inherit LUM_DATA_DIR under the work dir) and the broker are gone
    assert _ours(str(work)) == []
    host, port = report["config"]["bootstrap"].split(":")
    with socket.socket() as s:
        assert s.connect_ex((host, int(port))) != 0


@pytest.fixture(scope="module")
def soak(load_benchmark):
    return load_benchmark("soak")


def test_a_steady_climb_in_lag_fails_the_lag_verdict(soak):
    """Lag that climbs steadily but evenly stays under the peak rule (1.25 x q3 peak + 5 s of events); the
    slope rule must still call it falling behind, while a flat saw-tooth passes."""
    series = (*soak.GROUPS, soak.POSITION)

    def samples(lag_at):
        return [{"t_s": float(t), "lag": {g: lag_at(t) for g in series}, "rss": {}, "alive": {}}
                for t in range(0, 241, 10)]

    def lag_ok(vs):
        return {v["goal"].split(": ", 1)[1]: v["ok"] for v in vs if v["goal"].startswith("lag")}

    rate = 4000.0
    climbing = lag_ok(soak.verdicts(samples(lambda t: 600 * t), 240, rate))  # +600/s: 15% of the rate
    flat = lag_ok(soak.verdicts(samples(lambda t: 5000 + (3000 if t % 20 else 0)), 240, rate))
    # the trainer's committed lag is judged on its peaks only (checkpoint saw-tooth); its own lag carries the slope
    assert climbing == {g: g == soak.TRAINER for g in series}
    assert flat == {g: True for g in series}


def test_trainer_checkpoint_saw_tooth_is_not_a_trend(soak):
    """The trainer commits at checkpoints (every 60 s): sampled every 10-25 s, its committed lag's slope over
    the last half follows where samples fell on the teeth (the soak measured +60/s with the trainer caught up).
    It passes when its own lag stays flat, and fails when its own lag climbs, or is never reported."""
    # (t, committed lag) sampled from that soak's trainer (1,947 events/s; checkpoints every 60 s)
    committed = [(23, 9250), (35, 31200), (46, 45040), (59, 56580), (72, 69820), (86, 10550), (99, 24980),
                 (115, 38050), (131, 54600), (145, 9552), (157, 22762), (175, 35982), (193, 53582), (209, 10070),
                 (225, 26350), (238, 42360), (263, 0), (283, 22240), (300, 43070), (325, 0), (341, 23064),
                 (359, 38554), (378, 0), (398, 14810), (424, 34020), (449, 354), (469, 25784), (488, 44134),
                 (504, 3568), (530, 19538), (549, 44728), (575, 4440), (595, 30120), (616, 44580)]

    def samples(position):
        return [{"t_s": float(t), "lag": {soak.GROUPS[0]: 0, soak.GROUPS[1]: 0, soak.TRAINER: y}
                | ({soak.POSITION: position(t)} if position else {}), "rss": {}, "alive": {}} for t, y in committed]

    def trainer_ok(position):
        return all(v["ok"] for v in soak.verdicts(samples(position), 616, 1947.0)
                   if v["goal"].startswith(f"lag bounded: {soak.TRAINER}"))
    assert trainer_ok(lambda t: 512 * (t % 2))
    assert not trainer_ok(lambda t: 200 * t)
    assert not trainer_ok(None)


def test_rss_growth_is_judged_per_process_from_minute_two(soak):
    """Warm-up growth before 2 minutes is not judged; growth after it is, for each process on its own (a
    growing worker fails even when its supervisor, or the tree's sum, would hide it)."""
    MB = soak.MB

    def rss(t):
        return {"agents": 50 * MB, "agents/joiner-1": (100 + (t if t < 120 else 120)) * MB,  # warm-up only
                "agents/sequences-0": (100 + max(0, t - 120) / 4) * MB,  # +25% after minute 2
                "trainer": 400 * MB}
    samples = [{"t_s": float(t), "lag": {g: 0 for g in soak.GROUPS}, "rss": rss(t),
                "alive": {"agents": True, "trainer": True}} for t in range(0, 301, 10)]
    ok = {v["goal"].split(": ", 1)[1]: v["ok"] for v in soak.verdicts(samples, 300, 1000.0) if "RSS" in v["goal"]}
    assert ok == {"agents": True, "agents/joiner-1": True, "agents/sequences-0": False, "trainer": True}


def test_joiner_cpu_per_event_is_its_workers_cpu_per_event_consumed(soak):
    """CPU per event: the joiner workers' CPU seconds between samples over the events they consumed (produced -
    lag), not the supervisor's or another agent's CPU."""

    def sample(t, events, lag, cpu):
        return {"t_s": t, "events": events, "lag": {g: lag for g in soak.GROUPS},
                "cpu_s": {"agents": 99.0 * t, "agents/joiner-1": cpu, "agents/sequences-0": 50.0 * t}}
    samples = [sample(0, 1000, 1000, 1.0), sample(10, 21_000, 1000, 2.0), sample(20, 41_000, 11_000, 2.5)]
    assert soak.cpu_per_event(samples) == [(10, 50.0), (20, 50.0)]  # 1 s / 20,000 events; 0.5 s / 10,000
