"""The refresh job on a real embedded broker: exactly the changed users are republished; a new model, everyone.

Also ``lum pretrain --source kafka`` reads the same topic (latest value per key) and records its offsets,
and ``lum refresh --once`` publishes from what it trained.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
import torch
from confluent_kafka import Consumer, Producer, TopicPartition

from deploy.cli import main as lum
from schemas.codec import decode
from schemas.events import DeadLetter, ItemEmbedding, LumFeatures
from schemas.settings import SettingsError, load
from schemas.tokenize import CONDITION_KINDS, TokenPair, UserSequence, parse_condition
from schemas.topics import DEAD_LETTERS, ITEM_EMBEDDINGS, LUM_FEATURES, USER_SEQUENCES, key_of
from trainers.lum.model import PRESETS, LumModel
from trainers.lum.pretrain import load_checkpoint, save_checkpoint
from trainers.lum.packing import Seq
from trainers.lum.refresh import RefreshSettings, condition_outputs, refresh_once

CONDITIONS = "scenario=home;scenario=search;category=7,behavior=buy"
T0 = 1_767_225_600_000


def user_sequence(user: int, n: int, salt: int = 0) -> UserSequence:
    rng = np.random.default_rng(user * 1000 + salt)
    pairs = [TokenPair(T0 + i, int(rng.integers(1, 2**62)),
                       tuple(int(x) for x in rng.integers(1, 2**62, len(CONDITION_KINDS))),
                       int(rng.integers(0, 500)), int(rng.integers(0, 20))) for i in range(n)]
    return UserSequence(user, T0 + n, pairs)


def produce_sequences(kafka, seqs: list[UserSequence], raw: list[bytes] = ()) -> None:
    p = Producer(kafka.producer_config())
    topic = kafka.topic(USER_SEQUENCES)
    for s in seqs:
        p.produce(topic, USER_SEQUENCES.encode(s), key_of(s.user_id))
    for value in raw:
        p.produce(topic, value, b"666")
    assert p.flush(30) == 0


def read_all(kafka, topic_def, start: dict[int, int] | None = None, idle_s: float = 5.0):
    """Every record of a topic after ``start`` offsets (decoded) up to the end, and the next offsets."""
    topic = kafka.topic(topic_def)
    c = Consumer(kafka.consumer_config("test-reader", **{"enable.partition.eof": True}))
    parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
    c.assign([TopicPartition(topic, p, (start or {}).get(p, 0)) for p in parts])
    out, nxt, eof, last = [], dict(start or {p: 0 for p in parts}), set(), time.monotonic()
    while len(eof) < len(parts) and time.monotonic() - last < idle_s:
        for m in c.consume(500, timeout=0.2):
            if m.error():
                eof.add(m.partition())
                continue
            out.append(decode(topic_def.value, m.value()))
            nxt[m.partition()] = m.offset() + 1
            last = time.monotonic()
    c.close()
    return out, nxt


def test_refresh_publishes_changed_users_only_and_new_versions_everyone(kafka, tmp_path, monkeypatch):
    monkeypatch.setenv("LUM_REFRESH_CONDITIONS", CONDITIONS)
    monkeypatch.setenv("LUM_REFRESH_IDLE_TIMEOUT_S", "3")
    settings = load(RefreshSettings)
    torch.manual_seed(0)
    model = LumModel(PRESETS["debug"])
    save_checkpoint(tmp_path, model, None, step=1)
    version1 = load_checkpoint(tmp_path)[2]["model_version"]

    users = {u: user_sequence(u, 5 + u % 7) for u in range(1, 21)}
    produce_sequences(kafka, list(users.values()), raw=[b"not a sequence"])
    first = refresh_once(tmp_path, kafka, settings)
    assert first["full"] and sorted(first["users"]) == list(users)
    feats, feat_off = read_all(kafka, LUM_FEATURES)
    assert sorted(f.user_id for f in feats) == list(users)
    f = feats[0]
    assert f.model_version == version1
    # The configured conditions, then (LUM_REFRESH_TOP_CATEGORIES, default 5) the user's most frequent recent
    # categories, answered in the same group-query pass exactly as if asked alone.
    names, K = [c.condition for c in f.conditions], len(CONDITIONS.split(";"))
    assert names[:K] == CONDITIONS.split(";")
    newest_first = [p.category_id for p in reversed(users[f.user_id].pairs)]
    top = [c for c, _ in Counter(newest_first).most_common(5)]
    assert names[K:] == [f"behavior=click,category={c}" for c in top]  # LUM_REFRESH_CATEGORY_BASE: the label's
    # Flagged with their category, so that consumers match each only against candidates of it; a configured
    # condition that names a category ("category=7,behavior=buy") is a shared one.
    assert [c.own_category for c in f.conditions] == [None] * K + top
    alone = condition_outputs(model.eval(), [Seq.from_user_sequence(users[f.user_id])],
                              np.array([[parse_condition(n)] for n in names]).transpose(1, 0, 2))
    assert np.allclose(np.array([c.vector for c in f.conditions]), alone[0].numpy(), atol=1e-5)
    assert {len(c.vector) for c in f.conditions} == {PRESETS["debug"].d_model}
    # Point in time: each user's features say up to which event time they have seen.
    assert {f.user_id: f.as_of_ms for f in feats} == {u: s.pairs[-1].event_time_ms for u, s in users.items()}
    items, item_off = read_all(kafka, ITEM_EMBEDDINGS)
    expected_items = {p.item_id for s in users.values() for p in s.pairs}
    assert {e.item_id for e in items} == expected_items and len(items) == len(expected_items)
    letters, _ = read_all(kafka, DEAD_LETTERS)
    assert len(letters) == 1 and isinstance(letters[0], DeadLetter) and letters[0].consumer == "lum-refresh"

    # Nothing changed: nothing published.
    assert refresh_once(tmp_path, kafka, settings)["users"] == []

    # Five users change (one twice: the latest value counts); only they are republished.
    changed = [3, 8, 11, 15, 20]
    produce_sequences(kafka, [user_sequence(u, 9, salt=1) for u in changed] + [user_sequence(8, 12, salt=2)])
    second = refresh_once(tmp_path, kafka, settings)
    assert not second["full"] and sorted(second["users"]) == changed
    new_feats, feat_off = read_all(kafka, LUM_FEATURES, feat_off)
    assert sorted(f.user_id for f in new_feats) == changed
    new_items, item_off = read_all(kafka, ITEM_EMBEDDINGS, item_off)
    assert {e.item_id for e in new_items} == {p.item_id for u in changed
                                              for p in user_sequence(u, 12 if u == 8 else 9, 2 if u == 8 else 1).pairs}
    # The vector of a changed user is the model's output for the new sequence, not a stale copy.
    old8 = next(f for f in feats if f.user_id == 8).conditions[0].vector
    assert next(f for f in new_feats if f.user_id == 8).conditions[0].vector != old8

    # A new model version republishes everyone.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    save_checkpoint(tmp_path, model, None, step=2)
    third = refresh_once(tmp_path, kafka, settings)
    assert third["full"] and sorted(third["users"]) == list(users) and third["model_version"] != version1
    all_feats, _ = read_all(kafka, LUM_FEATURES, feat_off)
    assert sorted(f.user_id for f in all_feats) == list(users)
    assert {f.model_version for f in all_feats} == {third["model_version"]}
    assert all(isinstance(e, ItemEmbedding) for e in read_all(kafka, ITEM_EMBEDDINGS, item_off)[0])


def test_pretrain_from_kafka_then_refresh_command(kafka, tmp_path, capsys):
    seqs = [user_sequence(u, 6) for u in range(1, 31)] + [user_sequence(5, 10, salt=3)]
    produce_sequences(kafka, seqs)
    rc = lum(["pretrain", "--preset", "debug", "--source", "kafka", "--out", str(tmp_path), "--max-steps", "3"])
    assert rc == 0
    assert "users=30" in capsys.readouterr().out  # 30 users evaluated, user 5 once (its latest sequence)
    meta = load_checkpoint(tmp_path)[2]
    assert sum(meta["kafka_offsets"].values()) == len(seqs)
    # ...and the refresh command publishes the trained model's features for every user.
    assert lum(["refresh", "--checkpoint", str(tmp_path), "--once"]) == 0
    feats, _ = read_all(kafka, LUM_FEATURES)
    assert sorted(f.user_id for f in feats) == list(range(1, 31))
    assert {f.model_version for f in feats} == {meta["model_version"]}


def test_bad_condition_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("LUM_REFRESH_CONDITIONS", "scenario=home;colour=red")
    with pytest.raises(SettingsError, match="LUM_REFRESH_CONDITIONS"):
        load(RefreshSettings)


def test_refresh_publishes_every_trained_item_once_per_version_and_training_range(kafka, tmp_path, monkeypatch):
    monkeypatch.setenv("LUM_REFRESH_CONDITIONS", CONDITIONS)
    monkeypatch.setenv("LUM_REFRESH_IDLE_TIMEOUT_S", "3")
    settings = load(RefreshSettings)
    torch.manual_seed(0)
    model = LumModel(PRESETS["debug"].model_copy(update={"item_id_dropout": 0.1}))
    # Trained on items 1000..1009 (none of them in the sequences read below); items 0..499 were never seen.
    vocab = (np.arange(1000, 1010), np.arange(10) % 3, np.ones(10, np.int64))
    save_checkpoint(tmp_path, model, None, step=1, items=vocab,
                    extra={"trained_from_ms": T0 - 10_000, "trained_until_ms": T0 - 1})
    produce_sequences(kafka, [user_sequence(u, 6) for u in range(1, 6)])
    assert refresh_once(tmp_path, kafka, settings)["items"] == 10
    feats, feat_off = read_all(kafka, LUM_FEATURES)
    assert {f.trained_until_ms for f in feats} == {T0 - 1}
    items, item_off = read_all(kafka, ITEM_EMBEDDINGS)
    cold = {e.category_id: e.vector for e in items if e.item_id is None}
    # Unseen items are never "present" with their own (meaningless) hashed rows ...
    assert sorted(e.item_id for e in items if e.item_id is not None) == list(range(1000, 1010))
    # ... but a model trained with item-id dropout reads them as their category: one record per category.
    assert model.cfg.item_id_dropout > 0 and sorted(cold) == [0, 1, 2]
    with torch.no_grad():
        want = model.item_vectors(torch.tensor([7, 7, 7]), torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.bool))
    np.testing.assert_allclose([cold[c] for c in (0, 1, 2)], want.numpy(), atol=1e-6)
    # Same version, new users: their features, but no item is republished.
    produce_sequences(kafka, [user_sequence(9, 4)])
    assert refresh_once(tmp_path, kafka, settings)["items"] == 0
    assert read_all(kafka, ITEM_EMBEDDINGS, item_off)[0] == []
    # A model trained without item-id dropout (or a checkpoint from before it, which loads with 0): no category
    # records, its category-only vectors were never trained.
    plain = LumModel(PRESETS["debug"])
    save_checkpoint(tmp_path, plain, None, step=2, items=vocab)
    assert refresh_once(tmp_path, kafka, settings)["items"] == 10
    assert sorted(e.item_id for e in read_all(kafka, ITEM_EMBEDDINGS, item_off)[0]) == list(range(1000, 1010))


def test_item_embeddings_of_every_served_version_survive_compaction_and_retired_ones_do_not(kafka, tmp_path,
                                                                                               monkeypatch):
    """Compaction keeps the latest value per key: each model version's item vectors have keys of their own, so
    the joiner (and the scorer), rebuilt from a compacted topic, still match users whose features are of an older
    version; the versions past the newest kept are tombstoned."""
    from schemas.events import ItemVectors
    from streaming.kafka import Output, snapshot
    from trainers.lum.refresh import retire_item_versions

    monkeypatch.setenv("LUM_REFRESH_CONDITIONS", CONDITIONS)
    monkeypatch.setenv("LUM_REFRESH_IDLE_TIMEOUT_S", "2")
    settings = load(RefreshSettings)
    torch.manual_seed(0)
    model = LumModel(PRESETS["debug"])
    vocab = (np.arange(1000, 1005), np.arange(5) % 2, np.ones(5, np.int64))
    produce_sequences(kafka, [user_sequence(1, 4)])
    versions = []
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        save_checkpoint(tmp_path, model, None, step=step, items=vocab)
        versions.append(refresh_once(tmp_path, kafka, settings)["model_version"])

    def compacted() -> ItemVectors:  # what a joiner reading the compacted topic from the start holds
        items = ItemVectors()
        for value in snapshot(kafka, kafka.topic(ITEM_EMBEDDINGS))[0].values():
            items.add(decode(ItemEmbedding, value))
        return items

    items = compacted()
    assert set(items.by_version) == set(versions) and all(len(items.by_version[v]) == 5 for v in versions)
    assert items.get(1000, versions[0]) != items.get(1000, versions[1])
    # Keep 1: the older version's records are tombstoned, the newer one's untouched; a second pass has nothing to do.
    out = Output(kafka)
    assert retire_item_versions(kafka, out, keep=1) == versions[:1]
    assert set(compacted().by_version) == set(versions[1:]) and len(compacted().by_version[versions[1]]) == 5
    assert retire_item_versions(kafka, out, keep=1) == []


@pytest.mark.slow
def test_refresh_under_torchrun_equals_one_process(kafka, tmp_path, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.setenv("LUM_REFRESH_CONDITIONS", CONDITIONS)
    monkeypatch.setenv("LUM_REFRESH_IDLE_TIMEOUT_S", "3")
    torch.manual_seed(0)
    model = LumModel(PRESETS["debug"].model_copy(update={"item_id_dropout": 0.1}))
    vocab = (np.arange(0, 500), np.arange(500) % 20, np.ones(500, np.int64))
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        save_checkpoint(d, model, None, step=1, items=vocab)
    users = {u: user_sequence(u, 3 + u % 9) for u in range(1, 26)}
    produce_sequences(kafka, list(users.values()))
    assert refresh_once(one, kafka, load(RefreshSettings))["full"]
    single, off = read_all(kafka, LUM_FEATURES)
    items1, item_off = read_all(kafka, ITEM_EMBEDDINGS)
    lum_bin = Path(sys.executable).parent / "lum"
    r = subprocess.run([str(lum_bin), "refresh", "--checkpoint", str(two), "--once", "--nproc", "2"],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                       "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on rank 1/2" in r.stderr
    double, _ = read_all(kafka, LUM_FEATURES, off)
    items2, _ = read_all(kafka, ITEM_EMBEDDINGS, item_off)
    assert sorted(f.user_id for f in double) == sorted(users)
    a = {f.user_id: f for f in single}
    for f in double:
        for c1, c2 in zip(a[f.user_id].conditions, f.conditions):
            np.testing.assert_allclose(c1.vector, c2.vector, atol=1e-5)
    ids = [sorted(e.item_id for e in x if e.item_id is not None) for x in (items1, items2)]
    assert ids[0] == ids[1] == list(range(500))
    assert sorted(e.category_id for e in items2 if e.item_id is None) == list(range(20))  # shared by the ranks
    assert json.loads((two / "refresh-state.json").read_text())["offsets"]  # rank 0 stored the offsets


def test_per_category_queries_feed_the_dlrm_own_category_match():
    """``LUM_REFRESH_TOP_CATEGORIES``: each user's most frequent recent categories, queried in one group-query
    pass, published as ``base,category=c``; the DLRM takes a candidate's own-category vector from them."""
    from schemas.events import TrainingExample
    from schemas.tokenize import parse_condition
    from trainers.dlrm.features import Featurizer
    from trainers.dlrm.model import DLRMConfig, dense_feature_names
    from trainers.lum.packing import Seq
    from trainers.lum.refresh import condition_outputs, top_category_conditions

    torch.manual_seed(0)
    model = LumModel(PRESETS["debug"]).eval()
    cats = np.array([5, 5, 9, 3, 9, 9, 5, 3])  # 5 and 9 three times each, 5 more recently
    seqs = [Seq(1, np.zeros((8, len(CONDITION_KINDS)), np.int64), np.arange(100, 108), cats),
            Seq(2, np.zeros((3, len(CONDITION_KINDS)), np.int64), np.arange(200, 203), np.array([4, 4, 4]))]
    qc, cols = top_category_conditions(seqs, "behavior=buy", 2, recent=100)
    assert cols == [[("behavior=buy,category=5", 5, 0), ("behavior=buy,category=9", 9, 1)],
                    [("behavior=buy,category=4", 4, 0)]]
    assert top_category_conditions(seqs, "any", 1, recent=2)[1][0] == [("category=3", 3, 0)]  # the last 2 only
    got = condition_outputs(model, seqs, qc)
    one = condition_outputs(model, seqs[:1], np.array([parse_condition("behavior=buy,category=5")]))
    assert torch.allclose(got[0, 0], one[0, 0], atol=1e-5)  # group query = asking that condition alone
    with pytest.raises(SettingsError, match="LUM_REFRESH_CATEGORY_BASE"):
        load(RefreshSettings, category_base="category=3")

    fz = Featurizer(DLRMConfig.preset("debug", features="lum", lum_conditions=["behavior=buy"],
                                      lum_dim=model.cfg.d_model))
    names = ["behavior=buy"] + [n for n, _, _ in cols[0]]
    vecs = [got[0, 1].tolist(), got[0, 0].tolist(), got[0, 1].tolist()]
    ex = TrainingExample(example_id="e", request_id="r", user_id=1, item_id=7, category_id=5, position=0,
                         scenario="home", event_time_ms=T0, label=1, history_items=[], history_categories=[],
                         lum_model_version="v", lum_conditions=names, lum_user=vecs, lum_item=vecs[1])
    d = fz([ex]).dense.numpy()[0]
    col = {n: i for i, n in enumerate(dense_feature_names(fz.cfg))}
    assert d[col["category_condition_present"]] == 1 and np.isclose(d[col["cos[category]"]], 1.0, atol=1e-5)
