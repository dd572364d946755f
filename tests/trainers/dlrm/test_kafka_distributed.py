"""`lum train --nproc 2` (torchrun, 2 CPU ranks, gloo) on the real embedded broker: one reader on rank 0 feeds
both ranks; SIGKILL of rank 1 mid-stream, then a restart, trains every example exactly once across the ranks,
re-delivered examples (a producer re-sending a stretch, as a restarted joiner does) are trained once, and a
message with a NaN vector goes to dead-letters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Producer

from schemas.topics import DEAD_LETTERS, TRAINING_EXAMPLES, key_of
from trainers.dlrm.synthetic import synthetic_examples
from trainers.dlrm.train import read_meta

ROOT = Path(__file__).resolve().parents[3]
N = 1600


def _produce(kafka, examples) -> None:
    p = Producer(kafka.producer_config())
    topic = kafka.topic(TRAINING_EXAMPLES)
    for ex in examples:
        p.produce(topic, key=key_of(ex.user_id), value=TRAINING_EXAMPLES.encode(ex))
    nan = examples[0].model_dump_json().replace(str(examples[0].lum_item[0]), "NaN", 1)
    p.produce(topic, key=b"1", value=bytes((0x4C, 0x6A, 1)) + nan.encode())  # a v1 JSON message with a NaN
    for ex in examples[N // 2:N // 2 + 200]:  # re-delivered: the same examples again, later in the stream
        p.produce(topic, key=key_of(ex.user_id), value=TRAINING_EXAMPLES.encode(ex))
    assert p.flush(30) == 0


def _train(ckpt: Path, log: Path, until_caught_up: bool) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LUM_DLRM_CHECKPOINT_EVERY_BATCHES": "4",
                        "LUM_DLRM_RECORD_EXAMPLE_IDS": "true", "LUM_DLRM_IDLE_TIMEOUT_S": "5",
                        "LUM_DLRM_MAX_WAIT_S": "0.5", "LUM_DLRM_GROUP_PREFIX": f"g-{os.environ['LUM_KAFKA_TOPIC_PREFIX']}"}
    cmd = [sys.executable, "-m", "deploy.cli", "train", "--nproc", "2", "--features", "lum", "--checkpoint-dir",
           str(ckpt), "--preset", "debug", "--batch-size", "16"] + (["--until-caught-up"] if until_caught_up else [])
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The torchrun worker of ``parent`` whose environment says RANK=<rank>."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                return int(d.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_ranks_kill_one_restart_trains_each_example_once(kafka, tmp_path, read_topic):
    examples = synthetic_examples(N, seed=4)
    _produce(kafka, examples)
    ckpt, log = tmp_path / "ckpt", tmp_path / "train.log"

    first = _train(ckpt, log, until_caught_up=False)
    try:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and first.poll() is None:
            meta = read_meta(ckpt) if (ckpt / "LATEST").exists() else None
            if meta and meta["step"] >= 12:
                break
            time.sleep(0.1)
        assert first.poll() is None, log.read_text()[-4000:]
        victim = _rank_pid(first.pid, 1)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        assert first.wait(120) != 0  # torchrun reports the failed rank and stops the other
    finally:
        if first.poll() is None:
            first.kill()
    killed_at = read_meta(ckpt)
    assert killed_at["world_size"] == 2 and 0 < killed_at["examples"] < N, "the kill must land mid-stream"

    second = _train(ckpt, log, until_caught_up=True)
    try:
        assert second.wait(240) == 0, log.read_text()[-4000:]
    finally:
        if second.poll() is None:
            second.kill()
    meta = read_meta(ckpt)
    trained = []
    for r in (0, 1):
        trained += (ckpt / f"trained_ids-rank{r}.log").read_text().split()
    assert Counter(trained) == Counter(ex.example_id for ex in examples)  # each exactly once, across ranks
    assert meta["examples"] == N and meta["duplicates"] == 200  # the re-sent stretch was dropped
    assert sum(meta["offsets"].values()) == N + 1 + 200  # every message, the dead letter and duplicates too
    letters = [DEAD_LETTERS.decode(v) for _, _, _, v in read_topic(DEAD_LETTERS)]
    assert any("finite" in d.error for d in letters), [d.error for d in letters]
