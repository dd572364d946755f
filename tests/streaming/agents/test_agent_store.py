"""The state-store contract (``streaming.agents.store``), for both implementations."""

from __future__ import annotations

from pathlib import Path

import pytest

from streaming.agents.store import MemoryStore, RocksStore

ID = {"cluster": "c1", "topics": "behaviors", "partition": 0}


@pytest.fixture(params=["memory", "rocks"])
def make(request, tmp_path):
    def make(identity=ID):
        return MemoryStore() if request.param == "memory" else RocksStore(tmp_path / "p0", identity)
    return make


def test_staged_writes_are_read_back_but_not_scanned_until_commit(make):
    s = make()
    s.put(b"a", b"1")
    s.put(b"b", b"2")
    assert s.get(b"a") == b"1" and s.get_many([b"b", b"x"]) == [b"2", None]
    assert list(s.scan()) == [] and s.positions() == {}
    s.commit({"behaviors": 10})
    assert list(s.scan()) == [(b"a", b"1"), (b"b", b"2")] and s.positions() == {"behaviors": 10}
    s.delete(b"a")
    assert s.get(b"a") is None and list(s.scan()) == [(b"a", b"1"), (b"b", b"2")]
    s.discard()  # a failed batch: its writes never happen
    assert s.get(b"a") == b"1"
    s.put(b"c", b"3")
    s.delete(b"a")
    s.commit({"impressions": 4})
    assert list(s.scan()) == [(b"b", b"2"), (b"c", b"3")]
    assert s.positions() == {"behaviors": 10, "impressions": 4}
    s.close()


def test_scan_prefix_in_key_order(make):
    s = make()
    for k in (b"u\x02", b"h\x01", b"u\x01", b"v", b"u"):
        s.put(k, k)
    s.commit({})
    assert [k for k, _ in s.scan(b"u")] == [b"u", b"u\x01", b"u\x02"]
    s.reset()
    assert list(s.scan()) == [] and s.positions() == {}
    s.close()


def test_rocks_state_survives_reopen_and_is_discarded_for_another_identity(tmp_path, caplog):
    s = RocksStore(tmp_path / "p0", ID)
    s.put(b"k", b"v")
    s.commit({"behaviors": 7})
    s.put(b"lost", b"never committed")
    s.close()
    s = RocksStore(tmp_path / "p0", ID)
    assert s.get(b"k") == b"v" and s.get(b"lost") is None and s.positions() == {"behaviors": 7}
    assert not s.discarded_on_open
    s.close()
    s = RocksStore(tmp_path / "p0", ID | {"topic_id": "recreated"})
    assert s.discarded_on_open and s.get(b"k") is None and s.positions() == {}
    assert "discarding" in caplog.text
    s.close()


def test_rocks_discards_a_database_without_identity(tmp_path):
    from rocksdict import Options, Rdict

    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    db = Rdict(str(tmp_path / "old"), options=opts)
    db.put(b"\x00offset", (5).to_bytes(8, "big"))  # the previous layout
    db.close()
    s = RocksStore(tmp_path / "old", ID)
    assert s.discarded_on_open and s.positions() == {} and list(s.scan()) == []
    s.close()


def test_memory_emit_records_sends_and_dead_letters():
    from schemas.topics import USER_SEQUENCES
    from streaming.agents.store import MemoryEmit, Record

    e = MemoryEmit()
    e.send(USER_SEQUENCES, b"v", key=b"1", partition=2)
    r = Record("behaviors", 0, 5, 0, None, b"junk")
    e.dead_letter(r, ValueError("bad"))
    assert e.sent == [("user-sequences", b"1", b"v", 2)] and e.dead == [(r, "bad")]


def test_rocks_stores_of_a_process_share_one_bounded_memory_budget(tmp_path):
    """Four stores (a worker's partitions) written well past the budget: their memtables stay within the
    write-buffer budget per store (two memtables of half of it at most; a flush is triggered when all together
    reach it) and the shared cache (data, index and filter blocks) within the memory budget plus the memtables'
    charge, instead of growing per store with the data."""
    import os

    from streaming.agents.store import rocks_memory

    memory_mb, write_buffer_mb = 6, 2
    stores = [RocksStore(tmp_path / f"p{p}", ID | {"partition": p}, sync=False, memory_mb=memory_mb,
                         write_buffer_mb=write_buffer_mb) for p in range(4)]
    peak = {"memtables": 0, "table_readers": 0, "cache": 0}
    for batch in range(40):  # 4 stores x 40 batches x 200 KB = 32 MB written, 5x the budget
        for s in stores:
            keys = [f"u{batch:03d}-{i:04d}".encode() for i in range(200)]
            s.update({k: os.urandom(1000) for k in keys})
            s.commit({"behaviors": batch})
            assert all(v is not None for v in s.get_many(keys[::7]))  # reads fill the block cache
            s.get_many([f"u{b:03d}-0001".encode() for b in range(batch)])  # older blocks too
        peak = {k: max(v, peak[k]) for k, v in rocks_memory(stores).items()}
    for s in stores:
        s.close()
    assert peak["memtables"] <= 1.1 * len(stores) * (write_buffer_mb << 20), peak
    assert peak["cache"] <= 1.1 * (memory_mb << 20) + peak["memtables"], peak
    assert peak["table_readers"] < 1 << 20, peak  # index and filter blocks are in the cache, not beside it


def test_a_store_with_an_empty_memtable_is_never_blocked_by_the_others_memory(tmp_path):
    """Two stores fill the shared memtable budget, then a store with nothing in memory writes. With write
    stalls on, RocksDB waits for memory only the first stores' flushes would free and hangs for good (holding
    the GIL: hence a subprocess); the budget must be soft."""
    import subprocess
    import sys

    code = f"""
import os
from streaming.agents.store import RocksStore
stores = [RocksStore({str(tmp_path)!r} + f"/p{{p}}", {{"partition": p}}, sync=False, memory_mb=8, write_buffer_mb=2)
          for p in range(4)]
for p, kb in ((0, 920), (2, 920), (3, 300), (1, 50)):
    stores[p].update({{f"{{p}}-{{i}}".encode(): os.urandom(1000) for i in range(kb)}})
    stores[p].commit({{"behaviors": 1}})
print("written")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[3])
    assert r.returncode == 0 and "written" in r.stdout, r.stderr
