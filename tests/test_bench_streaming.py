"""The streaming benchmark's Faust no-op child against the embedded broker."""

from __future__ import annotations

import pytest

from schemas.topics import BEHAVIORS


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_streaming")


def test_faust_noop_rate_leaves_no_data_directory_behind(bench, kafka, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # wherever the benchmark is started from
    before = set(bench.ROOT.glob("bench-faust-*"))
    bench.produce_behaviors(kafka, 300, 50)
    rate = bench.faust_rate("--faust-child", kafka.bootstrap, kafka.topic(BEHAVIORS), "300")
    assert rate > 0
    # Faust's "{app id}-data" directory went with the child's throwaway working directory.
    assert set(bench.ROOT.glob("bench-faust-*")) == before
    assert not list(tmp_path.glob("bench-faust-*"))


def test_two_workers_rate_is_taken_while_both_run(bench):
    """Worker B's first batch comes 1 s after A's; each does 50k events/s while it runs, both for 2 s. The
    measured rate is the two together (100k/s, 2x one), not the span from A's start to B's end (~67k/s)."""
    samples = []
    for i in range(16):  # every 0.2 s from t = 0
        t = 0.2 * i
        done = [min(max(round(50_000 * (t - start)), 0), 100_000) for start in (0.0, 1.0)]
        samples.append((t, done, [d / 60_000 for d in done], 0.05 * t, 0.1 * t))
    run = bench.while_all_run(samples, [100_000, 100_000])
    assert run["rate"] == pytest.approx(100_000)
    assert run["overlap_s"] == pytest.approx(0.6)  # the samples at 1.2 .. 1.8 s: both started, neither done
    assert run["cores"]["workers"] == pytest.approx(100_000 / 60_000)
    assert run["cores"]["broker"] == pytest.approx(0.05)
    assert run["cores"]["idle"] == pytest.approx(0.1)
    # Too short an overlap is not measured (the benchmark then reports the span).
    assert bench.while_all_run(samples[:8], [100_000, 100_000])["rate"] is None
