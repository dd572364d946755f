"""`lum train` against the real embedded broker: SIGKILL mid-stream and restart trains every example exactly
once (counting only what is inside the durable model state), a bad message goes to dead-letters, offsets are
committed to what the checkpoint covers, and --until-caught-up exits at the end of the topic. The Kafka adapter:
bad messages inside a fetch go to dead-letters with their own offsets; its decoder process ends with the trainer
(a failed step, SIGKILL) and ignores stop signals; decoded examples cross the process boundary intact."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.topics import DEAD_LETTERS, TRAINING_EXAMPLES, key_of
from trainers.dlrm.features import Featurizer, resolve_lum_dims
from trainers.dlrm.kafka_source import KafkaExamples
from trainers.dlrm.model import DLRMConfig
from trainers.dlrm.synthetic import synthetic_examples
from trainers.dlrm.train import Trainer, read_meta

ROOT = Path(__file__).resolve().parents[3]
N = 3000


def _produce(kafka, examples, bad_at: int) -> None:
    p = Producer(kafka.producer_config())
    topic = kafka.topic(TRAINING_EXAMPLES)
    for i, ex in enumerate(examples):
        p.produce(topic, key=key_of(ex.user_id), value=TRAINING_EXAMPLES.encode(ex))
        if i == bad_at:
            p.produce(topic, key=b"7", value=b"not a training example")
    assert p.flush(30) == 0


def _trainer(ckpt: Path, until_caught_up: bool, log: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT), "LUM_DLRM_CHECKPOINT_EVERY_BATCHES": "5",
                        "LUM_DLRM_RECORD_EXAMPLE_IDS": "true", "LUM_DLRM_IDLE_TIMEOUT_S": "5",
                        "LUM_DLRM_MAX_WAIT_S": "0.5", "LUM_DLRM_GROUP_PREFIX": f"g-{os.environ['LUM_KAFKA_TOPIC_PREFIX']}"}
    cmd = [sys.executable, "-m", "deploy.cli", "train", "--features", "lum", "--checkpoint-dir", str(ckpt),
           "--preset", "debug", "--batch-size", "16"] + (["--until-caught-up"] if until_caught_up else [])
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _read_all(kafka, topic: str, expect: int, timeout: float = 30) -> list:
    c = Consumer(kafka.consumer_config(f"reader-{time.time_ns()}"))
    c.assign([TopicPartition(topic, p, 0) for p in range(TRAINING_EXAMPLES.partitions if "train" in topic else 1)])
    out, deadline = [], time.monotonic() + timeout
    while len(out) < expect and time.monotonic() < deadline:
        out += [m for m in c.consume(1000, timeout=0.5) if m.error() is None]
    c.close()
    return out


@pytest.mark.timeout(240)
def test_sigkill_restart_trains_each_example_exactly_once(kafka, tmp_path):
    examples = synthetic_examples(N, seed=3)
    _produce(kafka, examples, bad_at=N // 2)
    ckpt, log = tmp_path / "ckpt", tmp_path / "trainer.log"

    first = _trainer(ckpt, until_caught_up=False, log=log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            meta = read_meta(ckpt) if (ckpt / "LATEST").exists() else None
            if meta and meta["step"] >= 40:
                time.sleep(0.1)  # a few more batches: trained, not yet checkpointed when the kill lands
                break
            time.sleep(0.05)
        assert first.poll() is None, log.read_text()[-3000:]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    killed_at = read_meta(ckpt)
    assert 0 < killed_at["examples"] < N, "the kill must land mid-stream"

    second = _trainer(ckpt, until_caught_up=True, log=log)
    try:
        assert second.wait(150) == 0, log.read_text()[-3000:]
    finally:
        if second.poll() is None:
            second.kill()

    meta = read_meta(ckpt)
    trained = (ckpt / "trained_ids-rank0.log").read_text().split()
    assert Counter(trained) == Counter(ex.example_id for ex in examples)  # each exactly once, none missing
    assert meta["examples"] == N  # the model state's own counter agrees
    overall = [json.loads(l) for l in (ckpt / "metrics.jsonl").read_text().splitlines()][-1]
    assert overall["kind"] == "overall" and overall["n"] == N  # progressive metrics rolled back with the model

    # Offsets: the checkpoint covers the whole topic (N examples + 1 bad message) and the group committed them.
    assert sum(meta["offsets"].values()) == N + 1
    c = Consumer(kafka.consumer_config(f"g-{kafka.topic_prefix}-lum"))
    parts = c.committed([TopicPartition(kafka.topic(TRAINING_EXAMPLES), p) for p in range(TRAINING_EXAMPLES.partitions)],
                        timeout=30)
    c.close()
    assert {tp.partition: tp.offset for tp in parts if tp.offset >= 0} == {int(p): o for p, o in meta["offsets"].items()}

    letters = _read_all(kafka, kafka.topic(DEAD_LETTERS), 1)
    decoded = [DEAD_LETTERS.decode(m.value()) for m in letters]
    assert len(decoded) >= 1 and all(d.source_topic == kafka.topic(TRAINING_EXAMPLES) for d in decoded)
    assert {d.consumer for d in decoded} == {f"dlrm-trainer:g-{kafka.topic_prefix}-lum"}


# ------------------------------------------------------------------ the adapter and its decoder process


def _nan_binary(ex) -> bytes:
    data = bytearray(TRAINING_EXAMPLES.encode(ex))
    data[-8:] = struct.pack("<d", math.nan)  # the last value of the item vector
    return bytes(data)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("decoder_process", [True, False])
def test_bad_messages_mid_fetch_go_to_dead_letters_with_their_offsets(kafka, read_topic, decoder_process):
    examples = synthetic_examples(40, seed=6)
    p = Producer(kafka.producer_config())
    topic = kafka.topic(TRAINING_EXAMPLES)
    key = key_of(examples[0].user_id)  # one partition: the bad messages sit between good ones in one fetch
    for i, ex in enumerate(examples):
        p.produce(topic, key=key, value=TRAINING_EXAMPLES.encode(ex))
        if i == 10:
            p.produce(topic, key=key, value=b"not a training example")
        if i == 25:
            p.produce(topic, key=key, value=_nan_binary(examples[0]))
    assert p.flush(30) == 0
    src = KafkaExamples(kafka, f"g-{kafka.topic_prefix}-bad", batch_size=16, until_caught_up=True,
                        idle_timeout_s=5, decoder_process=decoder_process)
    try:
        batches = list(src)
    finally:
        src.close()
    (part,) = {p for b in batches for p, _ in b.sources}
    got = [(ex.example_id, o) for b in batches for ex, (_, o) in zip(b.examples, b.sources)]
    assert [e for e, _ in got] == [ex.example_id for ex in examples]  # in order, each once
    assert [o for _, o in got] == list(range(11)) + list(range(12, 27)) + list(range(28, 42))
    assert batches[-1].offsets[part] == 42  # the bad messages' offsets advance too
    assert all(len(b.examples) <= 16 for b in batches)
    for b in batches:  # a batch's offsets cover exactly the messages up to its last example (or dead letter)
        if b.sources:
            assert b.offsets[part] in (b.sources[-1][1] + 1, b.sources[-1][1] + 2)
    letters = [DEAD_LETTERS.decode(v) for _, _, _, v in read_topic(DEAD_LETTERS)]
    assert sorted((d.partition, d.offset) for d in letters) == [(part, 11), (part, 27)]
    reasons = {d.offset: d.error for d in letters}
    assert "header" in reasons[11] and "non-finite" in reasons[27], reasons
    if decoder_process:
        assert src.decoder.proc.poll() is not None  # the child ended with the iteration


@pytest.mark.timeout(120)
def test_decoder_process_ends_when_the_trainer_fails(kafka, tmp_path, monkeypatch):
    examples = synthetic_examples(64, seed=7)
    p = Producer(kafka.producer_config())
    for ex in examples:
        p.produce(kafka.topic(TRAINING_EXAMPLES), key=key_of(ex.user_id), value=TRAINING_EXAMPLES.encode(ex))
    assert p.flush(30) == 0
    trainer = Trainer(DLRMConfig.preset("debug", features="lum"), tmp_path / "ckpt")

    def fail(batch, **kw):
        if batch.examples:
            raise RuntimeError("step failed")

    monkeypatch.setattr(trainer, "train_batch", fail)
    src = KafkaExamples(kafka, f"g-{kafka.topic_prefix}-fail", batch_size=16, idle_timeout_s=5, decoder_process=True)
    try:
        with pytest.raises(RuntimeError, match="step failed"):
            trainer.fit(src, on_durable=src.commit)
        assert src.decoder is not None and src.decoder.proc.poll() is not None  # gone before fit returned
    finally:
        src.close()


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True  # exited; its new parent has not reaped it yet
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(60)
def test_decoder_process_ignores_stop_signals_and_dies_with_its_trainer():
    script = ("import sys, time; from trainers.dlrm.decoder import DecoderProcess; d = DecoderProcess(); "
              "d.submit([b'x']); d.result(); print(d.proc.pid, flush=True); sys.stdin.readline(); "
              "d.submit([b'x']); print(type(d.result()[1][0]).__name__, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        os.kill(child, signal.SIGTERM)  # e.g. a stop signal sent to the whole group: the trainer decides
        os.kill(child, signal.SIGINT)
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "DecodeError"  # still serving
        parent.kill()  # SIGKILL: no clean-up code runs in the trainer
        parent.wait(10)
        assert _gone(child, 10), "the decoder process outlived its trainer"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_decoded_fetch_crosses_the_process_boundary_intact():
    from schemas.codec import DecodeError
    from trainers.dlrm.decoder import DecoderProcess
    from trainers.dlrm.dedup import RecentIds

    examples = synthetic_examples(50, seed=8)
    values = [TRAINING_EXAMPLES.encode(ex) for ex in examples] + [b"junk", _nan_binary(examples[1])]
    cfg = resolve_lum_dims(DLRMConfig.preset("debug", features="lum"), examples)
    dec = DecoderProcess()
    try:
        dec.submit(values)
        cols, errors, keys, features = dec.result()
        assert features is None  # not told a model config yet
        dec.featurize_with(cfg)
        dec.submit(values)
        *_, features = dec.result()
    finally:
        dec.close()
    _assert_same_features(features.batch(), Featurizer(cfg)(examples))
    assert features.collisions["item"]["distinct_ids"] > 0  # the child's collision figures travel along
    assert keys == [RecentIds.key(ex.example_id) for ex in examples]  # the dedup keys come with the columns
    assert sorted(errors) == [50, 51] and all(isinstance(e, DecodeError) for e in errors.values())
    assert "non-finite" in str(errors[51])
    assert cols.to_models() == examples
    # What the featurizer reads: the vectors' float64 values in wire order, the histories, the conditions.
    want = [x for ex in examples for v in [*(ex.lum_user or ()), *([ex.lum_item] if ex.lum_item else [])] for x in v]
    assert cols.vectors.tolist() == want
    assert cols.history_items.tolist() == [x for ex in examples for x in ex.history_items]
    assert cols.lum_conditions == [ex.lum_conditions for ex in examples]


class _Msg:
    def __init__(self, p: int, o: int):
        self.p, self.o = p, o

    def partition(self) -> int:
        return self.p

    def offset(self) -> int:
        return self.o


def test_a_fetch_the_decoder_process_cannot_featurize_comes_back_unfeaturized():
    """The decoder process stays up; the trainer featurizes that batch itself (and reports what fails there)."""
    from trainers.dlrm.decoder import decode_fetch

    class Broken:
        def columns(self, cols):
            raise ValueError("boom")

    examples = synthetic_examples(20, seed=4)
    cols, errors, keys, features = decode_fetch([TRAINING_EXAMPLES.encode(ex) for ex in examples], Broken())
    assert features is None and not errors and cols.to_models() == examples and len(keys) == 20


def _assert_same_features(got, want) -> None:
    assert torch.equal(got.dense, want.dense) and torch.equal(got.labels, want.labels)
    assert got.example_ids == want.example_ids and (got.event_time_ms == want.event_time_ms).all()
    assert got.sparse.keys() == want.sparse.keys()
    assert torch.equal(got.sparse.lengths(), want.sparse.lengths())
    assert torch.equal(got.sparse.values(), want.sparse.values())
    assert got.columns.versions == want.columns.versions and got.columns.odd == want.columns.odd


def _accounting(fetches: list[list[tuple[int, int, object]]], batch_size: int, featurizer=None):
    """Batches of ``KafkaExamples._take`` over decoded fetches of (partition, offset, example or DecodeError),
    without a broker."""
    from schemas.codec import DecodeError, ExampleColumns
    from trainers.dlrm.dedup import RecentIds
    from trainers.dlrm.kafka_source import _Fetch

    src = object.__new__(KafkaExamples)  # only the accounting state
    src.batch_size, src.positions, src.consumed, src.rec = batch_size, {}, 0, None
    src._parts, src._n, src._sources, src._keys, src._features, src._batch_t0 = [], 0, [], [], [], 0.0
    src.dead = type("Dead", (), {"send_message": lambda self, msg, err: None})()
    out = []
    for f in fetches:
        parts, offs = [p for p, _, _ in f], [o for _, o, _ in f]
        fetch = _Fetch([_Msg(p, o) for p, o in zip(parts, offs)], parts, offs, [o + 1 for o in offs], [None] * len(f))
        errors = {k: r for k, (_, _, r) in enumerate(f) if isinstance(r, DecodeError)}
        cols = ExampleColumns.from_examples([r for _, _, r in f if not isinstance(r, DecodeError)])
        features = featurizer.columns(cols) if featurizer is not None and len(cols) else None
        out += list(src._take(fetch, (cols, errors, RecentIds.keys(cols.example_id), features)))
    return out, src


@pytest.mark.parametrize("bad", [False, True])
def test_batches_cut_inside_fetches_carry_the_offsets_of_what_they_took(bad):
    """Each batch's offsets are, per partition, one past the last message taken up to it (dead letters included);
    the same whether a fetch holds bad messages or not."""
    from schemas.codec import DecodeError
    from trainers.dlrm.dedup import RecentIds

    fetches, i = [], 0
    exs = synthetic_examples(30, seed=3)
    for size in (5, 7, 1, 6):
        f = []
        for _ in range(size):
            p = i % 3  # interleaved partitions, offsets rising in each
            ex = DecodeError("x") if bad and i in (4, 11) else exs[i].model_copy(update={"example_id": f"e{i}"})
            f.append((p, 100 + i // 3, ex))
            i += 1
        fetches.append(f)
    batches, src = _accounting(fetches, batch_size=4)
    cfg = resolve_lum_dims(DLRMConfig.preset("debug", features="lum"), exs)
    featurized, _ = _accounting(fetches, batch_size=4, featurizer=Featurizer(cfg))  # as the decoder process does
    for a, b in zip(batches, featurized, strict=True):  # features cut and joined with their examples
        assert a.features is None
        _assert_same_features(b.features, Featurizer(cfg)(a.examples))
    flat = [m for f in fetches for m in f]
    good = [m for m in flat if not isinstance(m[2], DecodeError)]
    ids = lambda rs: [r.example_id for r in rs]  # noqa: E731
    assert [e for b in batches for e in b.examples.example_id] == ids(r for _, _, r in good[:len(batches) * 4])
    assert all(len(b.examples) == 4 for b in batches)
    for b in batches:
        last = flat.index(next(m for m in good if m[2].example_id == b.examples.example_id[-1]))
        want: dict[int, int] = {}
        for p, o, _ in flat[:last + 1]:
            want[p] = o + 1
        assert b.offsets == want
        assert b.sources == [(p, o) for p, o, r in good if r.example_id in b.examples.example_id]
        assert b.examples.to_models() == [r for _, _, r in good if r.example_id in b.examples.example_id]
        assert b.keys == RecentIds.keys(b.examples.example_id)  # each example's dedup key, cut with it
    assert src.consumed == len(flat)
    assert src.positions == {p: max(o for q, o, _ in flat if q == p) + 1 for p in range(3)}
