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
