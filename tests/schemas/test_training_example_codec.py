"""TrainingExample v2: compact binary vectors that readers tell apart from v1 JSON (which still decodes);
non-finite or out-of-range vectors are refused at decode (a DecodeError: the consumer dead-letters them)."""

from __future__ import annotations

import math
import random
import struct

import pytest

from schemas import codec
from schemas.events import TrainingExample
from schemas.topics import TRAINING_EXAMPLES

BASE = dict(example_id="r/1", request_id="r", user_id=7, item_id=8, category_id=9, position=1, scenario="home",
            event_time_ms=1_767_225_600_000, label=1, history_items=[1, 2], history_categories=[3, 3])
LUM = dict(lum_model_version="v", lum_conditions=["scenario=home", "scenario=search"],
           lum_user=[[0.5, -1.25, 3.0], [1.0, 2.0, 4.0]], lum_item=[0.25, 0.125, -8.0])


def _v1(ex: TrainingExample) -> bytes:
    return bytes((codec.MAGIC, codec.FORMAT_JSON, 1)) + ex.model_dump_json().encode()


@pytest.mark.parametrize("fields", [BASE, BASE | LUM, BASE | {"lum_item": [1.5]}])
def test_binary_roundtrip_and_v1_json_still_decodes(fields):
    ex = TrainingExample(**fields)
    data = TRAINING_EXAMPLES.encode(ex)
    assert data[:3] == bytes((codec.MAGIC, codec.FORMAT_VECTORS, 2))
    assert TRAINING_EXAMPLES.decode(data) == ex
    assert TRAINING_EXAMPLES.decode(_v1(ex)) == ex


def test_binary_is_compact_and_exact():
    rng = random.Random(0)
    ex = TrainingExample(**BASE, lum_model_version="v", lum_conditions=["a", "b", "c"],
                         lum_user=[[rng.gauss(0, 1) for _ in range(32)] for _ in range(3)],
                         lum_item=[rng.gauss(0, 1) for _ in range(32)])
    data = TRAINING_EXAMPLES.encode(ex)
    assert len(data) < 0.6 * len(_v1(ex))
    assert TRAINING_EXAMPLES.decode(data) == ex  # float64: exact, like JSON


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_json_vectors_are_refused(bad):
    ex = TrainingExample(**BASE | LUM)
    data = _v1(ex).replace(b"0.125", bad.encode(), 1)
    with pytest.raises(codec.DecodeError, match="lum_item"):
        TRAINING_EXAMPLES.decode(data)


def test_non_finite_binary_vectors_and_corrupt_layouts_are_refused():
    ex = TrainingExample(**BASE | LUM)
    data = bytearray(TRAINING_EXAMPLES.encode(ex))
    nan = bytearray(data)
    nan[-8:] = struct.pack("<d", math.nan)
    with pytest.raises(codec.DecodeError, match="non-finite"):
        TRAINING_EXAMPLES.decode(bytes(nan))
    with pytest.raises(codec.DecodeError, match="vector bytes"):
        TRAINING_EXAMPLES.decode(bytes(data[:-2]))
    with pytest.raises(codec.DecodeError):
        TRAINING_EXAMPLES.decode(bytes(data[:9]))
    other = bytearray(data)
    other[2] = 3  # a future version: told apart, refused with the reason
    with pytest.raises(codec.DecodeError, match="version 3"):
        TRAINING_EXAMPLES.decode(bytes(other))


def test_decode_many_isolates_a_bad_message():
    good = [TrainingExample(**BASE | LUM | {"example_id": f"r/{i}"}) for i in range(5)]
    datas = [TRAINING_EXAMPLES.encode(e) for e in good]
    nan = bytearray(datas[2])
    nan[-8:] = struct.pack("<d", math.nan)
    out = codec.decode_many(TrainingExample, [datas[0], datas[1], bytes(nan), datas[3], b"garbage", _v1(good[4])])
    assert out[0] == good[0] and out[1] == good[1] and out[3] == good[3] and out[5] == good[4]
    assert isinstance(out[2], codec.DecodeError) and "non-finite" in str(out[2])
    assert isinstance(out[4], codec.DecodeError)
    assert codec.decode_many(TrainingExample, datas) == good  # the one-call path


@pytest.mark.parametrize("fields", [BASE, BASE | LUM, BASE | {"lum_item": [1.5]},
                                    BASE | LUM | {"lum_item": None, "query": 'q"\\ ünï 😀\t\n\x01</'},
                                    BASE | {"history_items": [], "history_categories": [], "example_id": "é/\u2028"}])
def test_encode_from_parts_equals_the_model_encoding(fields):
    """The joiner's encoder (no model object) writes the same bytes as encoding the model."""
    ex = TrainingExample(**fields)
    user, item = ex.lum_user, ex.lum_item
    head = {f: getattr(ex, f) for f in codec.EXAMPLE_HEAD_FIELDS}
    floats = [x for v in [*(user or []), *([item] if item else [])] for x in v]
    vectors = struct.pack(f"<{len(floats)}d", *floats)
    data = codec.encode_training_example(head, len(ex.history_items),
                                         struct.pack(f"<{2 * len(ex.history_items)}q", *ex.history_items,
                                                     *ex.history_categories),
                                         None if user is None else [len(v) for v in user],
                                         None if item is None else len(item), vectors)
    assert data == TRAINING_EXAMPLES.encode(ex)
    with pytest.raises(ValueError, match="head fields"):
        codec.encode_training_example(dict(reversed(head.items())), 0, b"", None, None, b"")


def _with_head(data: bytes, edit) -> bytes:
    """``data`` (binary layout) with its JSON head replaced by ``edit(head)``; the head length is rewritten."""
    (n,) = struct.unpack_from("<I", data, 3)
    head = edit(data[7:7 + n])
    return data[:3] + struct.pack("<I", len(head)) + head + data[7 + n:]


def _variants() -> list[bytes]:
    """Valid messages of every shape, and broken ones of every kind the decoder checks."""
    good = [TrainingExample(**BASE | LUM | {"example_id": f"r/{i}"}) for i in range(3)]
    good += [TrainingExample(**BASE), TrainingExample(**BASE | {"lum_item": [1.5, 2.5]}),
             TrainingExample(**BASE | LUM | {"lum_item": None, "query": 'q"\\ ünï 😀', "example_id": "é/\u2028"}),
             TrainingExample(**BASE | {"history_items": [], "history_categories": []}),
             TrainingExample(**BASE | LUM | {"lum_conditions": ["a"], "lum_user": [[1.0] * 5]})]
    datas = [TRAINING_EXAMPLES.encode(e) for e in good]
    d = datas[0]
    sub = lambda a, b: lambda h: h.replace(a, b, 1)  # noqa: E731
    broken = [
        _with_head(d, sub(b'"position":1', b'"position":1001')),
        _with_head(d, sub(b'"position":1', b'"position":1.0')),
        _with_head(d, sub(b'"position":1', b'"position":true')),
        _with_head(d, sub(b'"label":1', b'"label":2')),
        _with_head(d, sub(b'"label":1', b'"label":true')),
        _with_head(d, sub(b'"user_id":7', b'"user_id":-7')),
        _with_head(d, sub(b'"user_id":7', b'"user_id":9223372036854775808')),
        _with_head(d, sub(b'"scenario":"home"', b'"scenario":"ho me"')),
        _with_head(d, sub(b'"scenario":"home"', b'"scenario":7')),
        _with_head(d, sub(b'"example_id":"r/0"', b'"example_id":""')),
        _with_head(d, sub(b'"lum_conditions":["scenario=home","scenario=search"]', b'"lum_conditions":["x"]')),
        _with_head(d, sub(b'"lum_item":[0.0]', b'"lum_item":[0]')),
        _with_head(d, sub(b'"lum_item":[0.0]', b'"lum_item":[NaN]')),
        _with_head(d, sub(b'"lum_user":[[0.0],[0.0]]', b'"lum_user":[[0.0],[]]')),
        _with_head(d, sub(b'"event_time_ms":1767225600000', b'"event_time_ms":1767225600')),
        d[:-8] + struct.pack("<d", math.inf),  # non-finite vector value
        d[:-2],  # truncated vectors
        d[:9],  # truncated history
        d + b"\0" * 8,  # trailing bytes
    ]
    hist = bytearray(datas[0])  # a negative history id
    at = 7 + struct.unpack_from("<I", hist, 3)[0] + 2
    hist[at:at + 8] = struct.pack("<q", -1)
    broken.append(bytes(hist))
    # Messages that send a whole fetch to the per-message path (the column path cannot line them up).
    odd = [_with_head(d, sub(b'"request_id":"r",', b'')),  # a required field missing
           _with_head(d, sub(b'"query":null', b'"query":null,"extra":1')),  # an unknown field
           _with_head(d, sub(b'"query":null,', b'')),  # an optional field absent: still valid
           _with_head(d, lambda h: h[:-1]),  # not JSON
           _with_head(d, lambda h: b"[1]"),  # not an object
           bytes((d[0], d[1], 3)) + d[3:],  # a future version
           b"", b"garbage", _v1(good[1])]
    return datas + broken + odd, len(datas + broken)


def test_batch_decoding_agrees_with_the_model_message_by_message():
    """``decode_many(lazy_vectors=True)`` validates a fetch column by column; every message must still come out
    exactly as ``decode`` gives it (the same example, or a DecodeError with the same reason), whatever else the
    fetch holds."""
    datas, lined_up = _variants()
    expected = []
    for data in datas:
        try:
            expected.append(codec.decode(TrainingExample, data))
        except codec.DecodeError as e:
            expected.append(e)
    assert len(set(datas)) == len(datas)  # every edit applied
    assert sum(isinstance(e, codec.DecodeError) for e in expected) >= 20
    rng = random.Random(0)
    for trial in range(4):  # whole fetches, shuffled, and each message alone
        order = list(range(len(datas)))
        rng.shuffle(order)
        for batch in ([order] if trial else [[i] for i in order]) + [[i for i in order if i < lined_up]]:
            out = codec.decode_many(TrainingExample, [datas[i] for i in batch], lazy_vectors=True)
            for i, got in zip(batch, out):
                want = expected[i]
                if isinstance(want, codec.DecodeError):
                    assert isinstance(got, codec.DecodeError) and str(got) == str(want), (i, got, want)
                elif datas[i][1] == codec.FORMAT_JSON:  # version 1 comes back as the model
                    assert got == want
                else:
                    assert isinstance(got, codec.LazyVectors), (i, got)
                    assert got.to_model() == want
                    assert got.__pydantic_private__.get("_lum_f64", b"") == \
                        (want.__pydantic_private__ or {}).get("_lum_f64", b"")
                    assert (got.history_items, got.lum_conditions, got.lum_user) == \
                        (want.history_items, want.lum_conditions, want.lum_user)


def test_batch_decoding_of_a_clean_fetch_takes_the_column_path(monkeypatch):
    """The column path accepts a fetch of valid messages on its own (nothing falls back to per-message)."""
    datas = _variants()[0][:8]
    monkeypatch.setattr(codec, "_decode_one", lambda *a: pytest.fail("per-message path used"))
    monkeypatch.setattr(codec, "_list_adapter", lambda *a: pytest.fail("per-message path used"))
    out = codec.decode_many(TrainingExample, datas * 3, lazy_vectors=True)
    assert all(isinstance(x, codec.LazyVectors) for x in out)
