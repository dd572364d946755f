"""TrainingExample v4: all binary with compact history columns, told apart from v3 (int64 history), v2 (JSON head +
binary vectors) and v1 (JSON) by the header, which still decode. ``decode_columns`` decodes a fetch a column at a
time and must agree, message for message, with ``decode`` (the model, or the same DecodeError): malformed input of
every kind is refused, never a crash."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import struct
import functools
from pathlib import Path

import numpy as np
import pytest

from schemas import codec
from schemas.events import TrainingExample
from schemas.topics import TRAINING_EXAMPLES

GOLDEN = Path(__file__).parent / "golden"
T = 1_767_225_600_000
BASE = dict(example_id="r/1", request_id="r", user_id=7, item_id=8, category_id=9, position=1, scenario="home",
            event_time_ms=T, label=1, history_items=[1, 2], history_categories=[3, 3])
LUM = dict(lum_model_version="v", lum_conditions=["scenario=home", "scenario=search"],
           lum_user=[[0.5, -1.25, 3.0], [1.0, 2.0, 4.0]], lum_item=[0.25, 0.125, -8.0])
SHAPES = [BASE, BASE | LUM, BASE | {"lum_item": [1.5]},
          BASE | LUM | {"lum_item": None, "query": 'q"\\ ünï 😀\t\n\x01'},
          BASE | {"history_items": [], "history_categories": [], "example_id": "é/\u2028", "label": 0},
          BASE | {"lum_model_version": "", "lum_conditions": [], "lum_user": []}]


def _v1(ex: TrainingExample) -> bytes:
    return bytes((codec.MAGIC, codec.FORMAT_JSON, 1)) + ex.model_dump_json().encode()


def _decode_each(datas):
    out = []
    for d in datas:
        try:
            out.append(codec.decode(TrainingExample, d))
        except codec.DecodeError as e:
            out.append(e)
    return out


def _width(ids) -> int:
    """The fewest bytes of 1, 2, 4, 8 that hold every id (written out here, independently of the codec)."""
    return next(w for w in (1, 2, 4, 8) if max(ids, default=0) < 256 ** w)


def _pack(ex: TrainingExample | None = None, *, version=4, header=None, tail=b"", **edit) -> bytes:
    """The version-3 or -4 layout written out here, independently of the codec, from ``ex``'s fields with ``edit``
    applied (raw values: bytes for strings, any ints, counts and sizes that need not match; ``widths``: the v4
    history widths in bytes, by default the fewest that hold each column; ``flags``: the whole flags byte)."""
    f = (ex or TrainingExample(**BASE | LUM)).model_dump()
    enc = lambda s: s if isinstance(s, bytes) or s is None else s.encode()  # noqa: E731
    v = {k: enc(f[k]) for k in ("example_id", "request_id", "scenario", "query", "lum_model_version")}
    v["names"] = None if f["lum_conditions"] is None else [enc(c) for c in f["lum_conditions"]]
    v.update(user=f["lum_user"], item=f["lum_item"], hist=f["history_items"] + f["history_categories"])
    header = header or bytes((codec.MAGIC, codec.FORMAT_BINARY, version))
    v.update({k: f[k] for k in ("user_id", "item_id", "category_id", "event_time_ms", "position", "label")})
    v.update(edit)
    vecs = [*(v["user"] or ()), *(() if v["item"] is None else (v["item"],))]
    nh = v.get("n_history", len(v["hist"]) // 2)
    items, cats = v["hist"][:len(v["hist"]) // 2], v["hist"][len(v["hist"]) // 2:]
    wi, wc = v.get("widths", (8, 8) if version == 3 else (_width(items), _width(cats)))
    flags = v.get("flags", (v["query"] is not None) | (v["lum_model_version"] is not None) << 1
                  | (v["names"] is not None) << 2 | (v["item"] is not None) << 3
                  | (0 if version == 3 else {1: 0, 2: 1, 4: 2, 8: 3}[wi] << 4 | {1: 0, 2: 1, 4: 2, 8: 3}[wc] << 6))
    names = v["names"] or []
    strs = [v[k] or b"" for k in ("example_id", "request_id", "scenario", "query", "lum_model_version")]
    fmt = {1: "B", 2: "H", 4: "I", 8: "q"}
    dims = v.get("dims", [len(x) for x in vecs])
    head = struct.pack("<qqqqHBBHH5H", v["user_id"], v["item_id"], v["category_id"], v["event_time_ms"],
                       v["position"], v["label"], flags, nh, v.get("n_cond", len(names)),
                       *v.get("lens", [len(s) for s in strs]))
    return b"".join([header, head, struct.pack(f"<{len(names) + len(dims)}H", *map(len, names), *dims), *strs,
                     *names, struct.pack(f"<{len(items)}{fmt[wi]}", *items),
                     struct.pack(f"<{len(cats)}{fmt[wc]}", *cats),
                     v.get("vector_bytes", struct.pack(f"<{sum(map(len, vecs))}d", *[x for y in vecs for x in y])),
                     tail])


_pack_any = _pack


@pytest.mark.parametrize("fields", SHAPES)
def test_v4_roundtrip_and_layout_and_v3_still_decodes(fields):
    ex = TrainingExample(**fields)
    data = TRAINING_EXAMPLES.encode(ex)
    assert data[:3] == bytes((codec.MAGIC, codec.FORMAT_BINARY, 4)) and TrainingExample.SCHEMA_VERSION == 4
    assert data == _pack(ex)  # the documented layout, written independently
    got = TRAINING_EXAMPLES.decode(data)
    assert got == ex and TRAINING_EXAMPLES.encode(got) == data
    assert TRAINING_EXAMPLES.decode(_v1(ex)) == ex
    v3 = codec._encode_v3(ex)
    assert v3 == _pack(ex, version=3) and v3[:3] == b"Lb\x03"
    assert TRAINING_EXAMPLES.decode(v3) == ex and TRAINING_EXAMPLES.encode(TRAINING_EXAMPLES.decode(v3)) == data


# (item ids, category ids, their widths in bytes): each bound of each width.
WIDTHS = [([0, 255], [0, 0], (1, 1)), ([256, 3], [255, 255], (2, 1)), ([65535], [65536], (2, 4)),
          ([65536, 0], [7, 7], (4, 1)), ([2**32 - 1], [2**32], (4, 8)), ([2**32, 1], [2**63 - 1, 0], (8, 8)),
          ([2**63 - 1], [1], (8, 1)), ([], [], (1, 1))]


@pytest.mark.parametrize("items, cats, widths", WIDTHS)
def test_v4_history_at_each_width_decodes_like_v3_every_way(items, cats, widths):
    """Each column takes the fewest bytes that hold it (ids up to 2**63 - 1 at 8), and the v4 bytes give the same
    example as the v3 bytes through ``decode``, ``decode_many`` (both ways), ``decode_columns`` and its rows."""
    ex = TrainingExample(**BASE | LUM | {"history_items": items, "history_categories": cats})
    data, v3 = TRAINING_EXAMPLES.encode(ex), codec._encode_v3(ex)
    assert data == _pack(ex) and _pack(ex) == _pack(ex, widths=widths)
    nh = len(ex.history_items)
    assert len(v3) - len(data) == nh * (16 - sum(widths))
    for d in (data, v3):
        assert codec.decode(TrainingExample, d) == ex
        assert codec.decode_many(TrainingExample, [d]) == [ex]
        assert [x.to_model() for x in codec.decode_many(TrainingExample, [d], lazy_vectors=True)] == [ex]
        cols, errors = codec.decode_columns([d])
        assert errors == {} and cols.to_models() == [ex] and cols[0].history_items == ex.history_items
        assert cols.history_items.tolist() == ex.history_items and cols.history_categories.dtype == np.int64


def test_v4_reads_any_width_that_holds_the_ids():
    """The encoder writes the fewest bytes; a reader takes wider columns too (any width is a valid v4 message)."""
    ex = TrainingExample(**BASE)
    for widths in [(8, 8), (2, 4), (1, 8), (4, 1)]:
        data = _pack(ex, widths=widths)
        assert codec.decode(TrainingExample, data) == ex
        cols, errors = codec.decode_columns([data, TRAINING_EXAMPLES.encode(ex)])
        assert errors == {} and cols.to_models() == [ex, ex]


def _golden_models(version: int) -> list[dict]:
    """The pinned examples: the v2 file's, and for v4 one more per history width."""
    models = [c["model"] for c in json.loads((GOLDEN / "training_example_v2.json").read_text())]
    if version == 4:
        models += [BASE | {"example_id": f"w/{i}", "history_items": it, "history_categories": ct}
                   for i, (it, ct, _) in enumerate(WIDTHS)]
    return models


@pytest.mark.parametrize("version", [3, 4])
def test_golden_bytes(version):
    """Pinned bytes of each binary version: v4 is what the encoder writes, v3 what the old one wrote (still read)."""
    golden = GOLDEN / f"training_example_v{version}.json"
    enc = TRAINING_EXAMPLES.encode if version == 4 else codec._encode_v3
    got = [{"model": m, "hex": enc(TrainingExample(**m)).hex()} for m in _golden_models(version)]
    if os.environ.get("LUM_REGEN_GOLDEN"):
        golden.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n")
    assert got == json.loads(golden.read_text()), f"the v{version} layout changed: bump TrainingExample.SCHEMA_VERSION"


@pytest.mark.parametrize("version", [2, 3, 4])
def test_golden_bytes_decode_to_the_same_model_one_by_one_and_in_columns(version):
    """Version-2 bytes written by the v2 encoder (and pinned v3, v4 bytes) decode to the same model either way,
    alone and in one fetch with the other versions' bytes."""
    cases = json.loads((GOLDEN / f"training_example_v{version}.json").read_text())
    models = [TrainingExample(**c["model"]) for c in cases]
    datas = [bytes.fromhex(c["hex"]) for c in cases]
    assert all(d[1] == (codec.FORMAT_VECTORS if version == 2 else codec.FORMAT_BINARY) and d[2] == version
               for d in datas)
    assert _decode_each(datas) == models
    cols, errors = codec.decode_columns(datas)
    assert errors == {} and cols.to_models() == models
    assert codec.decode_many(TrainingExample, datas) == models
    assert [x.to_model() for x in codec.decode_many(TrainingExample, datas, lazy_vectors=True)] == models
    everything = [(TrainingExample(**c["model"]), bytes.fromhex(c["hex"])) for v in (2, 3, 4)
                  for c in json.loads((GOLDEN / f"training_example_v{v}.json").read_text())]
    cols, errors = codec.decode_columns([d for _, d in everything])
    assert errors == {} and cols.to_models() == [m for m, _ in everything]


def test_encode_from_parts_equals_the_model_encoding():
    """The joiner's encoder (no model object) writes the same bytes as encoding the model."""
    for fields in SHAPES:
        ex = TrainingExample(**fields)
        user, item = ex.lum_user, ex.lum_item
        head = {f: getattr(ex, f) for f in codec.EXAMPLE_HEAD_FIELDS}
        floats = [x for v in [*(user or []), *([item] if item else [])] for x in v]
        for items, cats, (wi, wc) in WIDTHS:
            code = {1: 0, 2: 1, 4: 2, 8: 3}
            assert (codec.history_width(items), codec.history_width(cats)) == (code[wi], code[wc])
            assert codec.history_widths(np.array(items + cats, dtype=np.int64)).tolist() == \
                [codec.history_width([x]) for x in items + cats]
            fmt = {1: "B", 2: "H", 4: "I", 8: "q"}
            data = codec.encode_training_example(head, len(items), struct.pack(f"<{len(items)}{fmt[wi]}", *items)
                                                 + struct.pack(f"<{len(cats)}{fmt[wc]}", *cats),
                                                 None if user is None else [len(v) for v in user],
                                                 None if item is None else len(item),
                                                 struct.pack(f"<{len(floats)}d", *floats),
                                                 widths=(code[wi], code[wc]))
            want = ex.model_copy(update={"history_items": items, "history_categories": cats})
            assert data == TRAINING_EXAMPLES.encode(want) and TRAINING_EXAMPLES.decode(data) == want
    with pytest.raises(ValueError, match="head fields"):
        codec.encode_training_example(dict(reversed(head.items())), 0, b"", None, None, b"", widths=(0, 0))
    with pytest.raises(ValueError, match="width codes"):
        codec.encode_training_example(head, 0, b"", None, None, b"", widths=(4, 0))


def _text(rng: random.Random, lo: int, hi: int, alphabet: str) -> str:
    n = rng.choice([lo, hi, rng.randint(lo, hi)])
    return "".join(rng.choice(alphabet) for _ in range(n))


_UNI = "abcXYZ09/=_-. é€😀\u2028\x00\"\\"


def _random_example(rng: random.Random, i: int) -> TrainingExample:
    nh = rng.choice([0, 1, 5, 256])
    k = rng.choice([None, 0, 1, 3])
    d = rng.choice([1, 4, 32])
    bits, cbits = rng.choice([8, 9, 16, 17, 32, 33, 63]), rng.choice([8, 20, 63])  # every history width
    f = dict(example_id=_text(rng, 1, 256, _UNI), request_id=_text(rng, 1, 128, _UNI),
             user_id=rng.choice([0, 2**63 - 1, rng.getrandbits(63)]), item_id=rng.getrandbits(63),
             category_id=rng.getrandbits(20), position=rng.choice([0, 1000, rng.randint(0, 1000)]),
             scenario=_text(rng, 1, 64, "azAZ09_.:-"), query=rng.choice([None, _text(rng, 1, 256, _UNI)]),
             event_time_ms=rng.choice([631_152_000_000, 4_102_444_800_000, T + i]), label=rng.randint(0, 1),
             history_items=[rng.getrandbits(bits) for _ in range(nh)], history_categories=[rng.getrandbits(cbits)] * nh,
             lum_model_version=rng.choice([None, "", _text(rng, 0, 128, _UNI)]),
             lum_conditions=None if k is None else [_text(rng, 0, 128, _UNI) for _ in range(k)],
             lum_user=None if k is None else [[rng.gauss(0, 1) for _ in range(rng.choice([d, d, 2]))]
                                              for _ in range(k)],
             lum_item=rng.choice([None, [rng.gauss(0, 1) for _ in range(d)], [-0.0] * 1024]))
    return TrainingExample(**f)


def _malformed(version: int = 4) -> list[bytes]:
    """Broken version-``version`` (3 or 4) messages, one of each kind the decoder checks."""
    ex = TrainingExample(**BASE | LUM)
    _pack = functools.partial(_pack_any, version=version)
    good = _pack(ex)
    nan = bytearray(good)
    nan[-8:] = struct.pack("<d", math.nan)
    neg = {"widths": (8, 8)} if version == 4 else {}  # a negative id only fits 8 bytes
    if version == 4:  # the flags byte's width bits (3 + 8 * 4 + 2 + 1: after the ids, time, position and label)
        wide, narrow = bytearray(good), bytearray(_pack(widths=(2, 1)))
        wide[38] |= 0x10  # the items said 2 bytes wide, written at 1; then the reverse
        narrow[38] &= 0xCF
        width_errors = [bytes(wide), bytes(narrow), _pack(flags=0xCE)]  # and the categories said 8 bytes wide
    else:
        width_errors = [_pack(header=b"Lb\x04")]  # v3 bytes under the v4 header
    return [
        _pack(user_id=-7), _pack(item_id=-1), _pack(category_id=-(2**63)),  # ids: non-negative
        _pack(event_time_ms=1_767_225_600), _pack(event_time_ms=4_102_444_800_001),  # seconds, not ms; far future
        _pack(position=1001), _pack(label=2),
        _pack(flags=0x1F), _pack(flags=0x80),  # unknown flag bits
        _pack(query=b""),  # a query present is not empty
        _pack(lens=[3, 1, 4, 0, 2]), _pack(flags=0x0E, lens=[3, 1, 4, 2, 1], query=b"qq"),  # lengths off
        _pack(flags=0x0D),  # model-version bytes without its flag
        _pack(flags=0x0B),  # conditions and user vectors without the flag
        _pack(flags=0x06, item=None, user=None, names=[b"a"], dims=[]),  # conditions, no vectors
        _pack(example_id=b""), _pack(example_id=b"x" * 257), _pack(example_id="é".encode() * 257),
        _pack(request_id=b""), _pack(request_id=b"r" * 129), _pack(scenario=b""), _pack(scenario=b"s" * 65),
        _pack(scenario=b"ho me"), _pack(scenario="hé".encode()), _pack(scenario=b"home\n"),
        _pack(query=b"q" * 257), _pack(lum_model_version=b"m" * 129), _pack(names=[b"n" * 129, b"b"]),
        _pack(example_id=b"\xff"), _pack(request_id=b"\xc3"), _pack(query=b"\xed\xa0\x80"),  # not UTF-8; surrogate
        _pack(lum_model_version=b"\x80"), _pack(names=[b"ok", b"\xe2\x82"]),
        _pack(example_id=b"r\xc3", request_id=b"\xa9r"),  # a character split across two fields: each is invalid
        _pack(names=[b"\xc3", b"\xa9"]),
        _pack(hist=[1, -2, 3, 3], **neg), _pack(hist=[1, 2, 3, -1], **neg),  # negative history ids
        _pack(n_history=257, hist=[1] * 514), _pack(n_history=3),  # too long; count and data disagree
        _pack(n_cond=65, names=[b"c"] * 65, user=[[1.0]] * 65),
        _pack(dims=[3, 0, 3]), _pack(dims=[1025, 3, 3], vector_bytes=b"\0" * 8 * 1031), _pack(dims=[2, 4, 4]),
        bytes(nan), good[:-8] + struct.pack("<d", -math.inf),  # non-finite values
        good[:-1], good + b"\0", good[:60], good[:55], good[:20], good[:3],  # truncated, trailing bytes
        *width_errors, _pack(header=b"Lb\x05"), _pack(header=b"Lb\x02"), _pack(header=b"Lv\x03"),
        _pack(header=b"Lj\x03"), _pack(header=b"Xb\x03"), b"", None, b"L", b"garbage",
    ]


@pytest.mark.parametrize("version", [3, 4])
def test_malformed_messages_are_refused_alike_alone_and_in_a_fetch(version):
    bad = _malformed(version)
    expected = _decode_each(bad)
    assert all(isinstance(e, codec.DecodeError) for e in expected), [
        (i, e) for i, e in enumerate(expected) if not isinstance(e, codec.DecodeError)]
    good = [TRAINING_EXAMPLES.encode(TrainingExample(**s | {"example_id": f"g{i}"})) for i, s in enumerate(SHAPES)]
    datas = good + bad
    cols, errors = codec.decode_columns(datas)
    assert sorted(errors) == list(range(len(good), len(datas)))
    assert {i - len(good): str(e) for i, e in errors.items()} == {i: str(e) for i, e in enumerate(expected)}
    assert cols.to_models() == _decode_each(good)
    for d, e in zip(bad, expected):  # each alone
        c, err = codec.decode_columns([d])
        assert len(c) == 0 and str(err[0]) == str(e)


def test_columns_agree_with_one_by_one_decoding_on_random_examples():
    """Random examples (every optional field absent or present, bounds, multi-byte text, vectors of mixed sizes,
    history ids of every width), with v3, v2, v1 and broken messages among them, in shuffled fetches: the columns
    give each example exactly as ``decode`` does (vector bytes included), and each refusal with ``decode``'s reason."""
    rng = random.Random(0)
    exs = [_random_example(rng, i) for i in range(300)]
    datas = [TRAINING_EXAMPLES.encode(e) for e in exs]
    bad = _malformed(3) + _malformed(4)
    datas += [codec._encode_v3(e) for e in exs[:40]] + [codec._encode_v2(e) for e in exs[:20]]
    datas += [_v1(e) for e in exs[20:30]] + bad
    expected = _decode_each(datas)
    assert sum(isinstance(e, codec.DecodeError) for e in expected) == len(bad)
    for trial in range(4):
        order = list(range(len(datas)))
        rng.shuffle(order)
        batch = order[:rng.randint(1, len(order))] if trial else order
        cols, errors = codec.decode_columns([datas[i] for i in batch])
        rows = iter(range(len(cols)))
        for j, i in enumerate(batch):
            want = expected[i]
            if isinstance(want, codec.DecodeError):
                assert str(errors[j]) == str(want), (i, errors.get(j), want)
                continue
            r = next(rows)
            got = cols[r]
            assert got.to_model() == want
            vecs = [x for v in [*(want.lum_user or ()), *([want.lum_item] if want.lum_item else [])] for x in v]
            raw = struct.pack(f"<{len(vecs)}d", *vecs)
            assert cols.vectors[cols.vec_off[r]:cols.vec_off[r + 1]].tobytes() == raw
            assert (cols.user_id[r], cols.label[r], cols.scenario[r], cols.query[r], cols.lum_conditions[r]) == \
                (want.user_id, want.label, want.scenario, want.query, want.lum_conditions)
        assert next(rows, None) is None


def test_a_clean_fetch_takes_the_column_path(monkeypatch):
    """v4 of mixed widths and v3 in one fetch: all in the column pass."""
    rng = random.Random(1)
    exs = [_random_example(rng, i) for i in range(50)]
    datas = [TRAINING_EXAMPLES.encode(e) for e in exs] + [codec._encode_v3(e) for e in exs[:10]]
    assert len({(d[2], d[38] >> 4) for d in datas}) > 4
    want = _decode_each(datas)
    monkeypatch.setattr(codec, "_decode_one", lambda *a: pytest.fail("per-message path used"))
    cols, errors = codec.decode_columns(datas)
    assert errors == {} and cols.to_models() == want


def test_columns_slice_take_concat_and_pickle_like_their_rows():
    rng = random.Random(2)
    exs = [_random_example(rng, i) for i in range(40)]
    cols, _ = codec.decode_columns([TRAINING_EXAMPLES.encode(e) for e in exs])
    assert cols[5:17].to_models() == exs[5:17] and cols[::3].to_models() == exs[::3]
    assert cols.take([9, 2, 2]).to_models() == [exs[9], exs[2], exs[2]]
    assert codec.ExampleColumns.concat([cols[:10], cols[10:10], cols[10:]]).to_models() == exs
    assert (cols[:3] + [cols[0]]).to_models() == exs[:3] + exs[:1]  # padding rows at world size > 1
    assert pickle.loads(pickle.dumps(cols)).to_models() == exs
    assert codec.ExampleColumns.from_examples(exs).to_models() == exs
    assert len(codec.ExampleColumns.empty()) == 0 and cols[-1].to_model() == exs[-1]
    with pytest.raises(IndexError):
        cols[40]
    assert isinstance(cols.vectors, np.ndarray) and cols.vectors.dtype == np.float64
