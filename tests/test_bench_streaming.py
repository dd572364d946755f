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


def test_io_floor_does_one_state_read_write_and_output_per_user_and_dead_letters_bad_input(bench):
    """The floor row's claim: the agent's decode (bad input dead-lettered) and, per user of a batch, one state
    read, one state write and one output: the I/O any agent pays, with none of the sequence logic."""
    from streaming.agents.sequences import user_key
    from streaming.agents.store import MemoryEmit, MemoryStore, Record

    class Emit(MemoryEmit):  # the worker's emit has send_many
        def send_many(self, topic, values, keys, partition=None):
            for value, key in zip(values, keys):
                self.send(topic, value, key, partition)

    class CountingStore(MemoryStore):
        def __init__(self):
            super().__init__()
            self.reads = []

        def _read_many(self, keys):
            self.reads += keys
            return super()._read_many(keys)

    events = list(bench.behaviors(40, 7))
    records = [Record(BEHAVIORS.name, 0, i, 0, b"k", BEHAVIORS.encode(e)) for i, e in enumerate(events)]
    records.insert(5, Record(BEHAVIORS.name, 0, 99, 0, b"k", b"not an event"))
    floor, store, emit = bench.IoFloor(), CountingStore(), Emit()
    floor.assign(0, store, {}, emit, lambda topic, p: [])
    floor.process(0, records, emit)
    store.commit({BEHAVIORS.name: 41})
    users = sorted({e.user_id for e in events})
    assert sorted(store.reads) == sorted(user_key(u) for u in users)
    assert sorted(k for k, _ in store.scan()) == sorted(user_key(u) for u in users)
    assert len(emit.sent) == len(users) and {s[1] for s in emit.sent} == {str(u).encode() for u in users}
    assert [(r.offset, "not an event" in r.value.decode()) for r, _ in emit.dead] == [(99, True)]
