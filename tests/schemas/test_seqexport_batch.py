"""Batch encoders give the bytes of their one-record counterparts (the export and the store stay byte-identical)."""

from __future__ import annotations

import numpy as np
import pytest

import schemas.tokenize as tk
from schemas import seqexport as sx


@pytest.mark.parametrize("cap", [1, 127, 128, 1024, 100_000])
def test_deltas_in_one_pass_equal_encode_delta(cap):
    rng = np.random.default_rng(cap)
    sizes = np.concatenate((np.ones(300, dtype=np.int64), rng.integers(0, 9, 200), [20, 64, 65, 200]))
    rng.shuffle(sizes)
    n = int(sizes.sum())
    rows = rng.integers(-2**63, 2**63 - 1, (n, sx.ROW), dtype=np.int64, endpoint=True)  # every width, signs
    rows[::3] = rng.integers(-300, 300, (len(rows[::3]), sx.ROW))  # repeated values: dictionaries, ties
    rows[1::3, 0] = 1_767_225_600_000 + np.arange(len(rows[1::3])) // 2
    rows[5] = 0
    users = rng.integers(0, 2**63 - 1, len(sizes))
    users[::2] = rng.integers(0, 1000, len(users[::2]))
    users[7] = 0
    ends = np.cumsum(sizes)
    starts = ends - sizes
    want = [sx.encode_delta(int(u), rows[a:b], cap) for u, a, b in zip(users.tolist(), starts, ends)]
    assert sx.encode_deltas(users, rows, starts, ends, cap) == want
    assert sx.encode_deltas(users[:0], rows[:0], starts[:0], ends[:0], cap) == []


def test_append_rows_equals_encoding_the_concatenation_for_current_and_older_records(monkeypatch):
    rng = np.random.default_rng(0)
    old = rng.integers(0, 2**62, (5, tk.ROW_WIDTH))
    new = rng.integers(0, 2**62, (2, tk.ROW_WIDTH))
    prefix = b"Ls\x01"
    record = prefix + tk.encode_rows(7, old)
    assert tk.append_rows(record, 7, new, skip=3) == prefix + tk.encode_rows(7, np.concatenate((old, new)))
    assert (tk.record_rows(record, 3) == old).all()
    assert tk.append_rows(prefix + tk.encode_rows(7, old[:0]), 7, new, 3) == prefix + tk.encode_rows(7, new)
    # A record of an older tokenizer version (one kind fewer) is decoded, not copied.
    monkeypatch.setitem(tk.KINDS_BY_VERSION, 0, tk.KINDS_BY_VERSION[tk.TOKENIZER_VERSION] - 1)
    short = np.delete(old, tk.ROW_WIDTH - 3, axis=1)  # the last condition kind missing
    older = tk._SEQ_HEADER.pack(b"LSEQ", 1, 0, len(tk.CONDITION_KINDS) - 1, 7, 0, 5) + short.tobytes()
    assert tk.record_rows(older) is None
    widened = np.insert(short, tk.ROW_WIDTH - 3, tk.ANY, axis=1)
    assert tk.append_rows(older, 7, new) == tk.encode_rows(7, np.concatenate((widened, new)))


def test_record_rows_and_append_of_many_records_equal_their_one_record_counterparts(monkeypatch):
    rng = np.random.default_rng(1)
    prefix = b"Ls\x01"
    stored = [rng.integers(-2**62, 2**62, (n, tk.ROW_WIDTH)) for n in (3, 0, 1, 7)]
    records = [prefix + tk.encode_rows(10 + i, r) for i, r in enumerate(stored)]
    monkeypatch.setitem(tk.KINDS_BY_VERSION, 0, tk.KINDS_BY_VERSION[tk.TOKENIZER_VERSION] - 1)
    older = prefix + tk._SEQ_HEADER.pack(b"LSEQ", 1, 0, len(tk.CONDITION_KINDS) - 1, 9, 0, 1)
    older += bytes(8 * (tk.ROW_WIDTH - 1))  # a record of an older tokenizer version (one kind fewer)
    bad = records[0][:-8]  # a truncated record
    many = [records[0], None, older, records[1], bad, records[2], records[3]]
    rows, counts = tk.record_rows_many(many, 3)
    assert counts.tolist() == [3, 0, -1, 0, -1, 1, 7]
    assert [tk.record_rows(r, 3) is None for r in many if r is not None] == [False, True, False, True, False, False]
    assert (rows == np.concatenate(stored)).all()
    new = rng.integers(-2**62, 2**62, (4, tk.ROW_WIDTH))
    got = tk.append_row_many([records[0], None, records[1], records[3]], [10, 5, 11, 13], new, 3, prefix)
    assert got == [tk.append_rows(records[0], 10, new[:1], 3), prefix + tk.encode_rows(5, new[1:2]),
                   tk.append_rows(records[1], 11, new[2:3], 3), tk.append_rows(records[3], 13, new[3:], 3)]
