"""The joiner's changelog carries values, not indexes, and one outbox record per batch (fewer produce calls per
event); a rebuild derives the indexes again and behaves as the original store."""

from __future__ import annotations

from schemas.topics import TRAINING_EXAMPLES, key_of
from streaming.agents.join_logic import JoinKeys
from streaming.agents.store import MemoryStore

from test_join_logic import HOUR, W, Harness, beh, click, feats, imp


def _index_keys(store: MemoryStore) -> set[bytes]:
    return {k for k in store.data if k[:1] in (JoinKeys.CLOSING, JoinKeys.FORGET)}


def test_changelog_leaves_out_the_indexes_and_a_rebuild_derives_them():
    cfg = dict(retention_ms=20 * W, state_horizon_ms=40 * HOUR, max_watermark_step_ms=100 * W)
    first = Harness(**cfg)
    first.batch(imp("r1", 1, 11, 1000), imp("r2", 2, 12, 1000), beh(1, 1, 900), feats(2, "m1", 500),
                click(2, 3, 1500, "r9", 19))  # r9/19: a click before its impression (early)
    first.batch(imp("r3", 1, 13, 3 * W), click(3, 1, 2000, "r1", 11))
    first.tick(1000 + W + 10)  # r1/11 and r2/12 close; r3/13 stays open
    sent = {r.key[:1] for r in first.changelog()}
    assert not sent & {JoinKeys.CLOSING, JoinKeys.FORGET, JoinKeys.ACTIVITY}, sent

    moved = Harness(store=MemoryStore(), committed=first.store.positions(), changelog_records=first.changelog(), **cfg)
    assert _index_keys(moved.store) == _index_keys(first.store)
    newest = {}  # eviction reads each user's newest activity entry: the rebuild has exactly those
    for k in first.store.data:
        if k[:1] == JoinKeys.ACTIVITY:
            bucket, user = JoinKeys.parse_activity(k)
            newest[user] = max(newest.get(user, 0), bucket)
    assert {JoinKeys.parse_activity(k) for k in moved.store.data if k[:1] == JoinKeys.ACTIVITY} == \
           {(b, u) for u, b in newest.items()}
    assert {k: v for k, v in moved.store.data.items() if k[:1] not in b"wrx"} == \
           {k: v for k, v in first.store.data.items() if k[:1] not in b"wrx"}
    for h in (first, moved):
        h.batch(imp("r9", 3, 19, 3 * W + 5))  # the early click counts in both
        h.tick(5 * W)
    assert moved.labels() == {"r3/13": 0, "r9/19": 1}
    assert {k: v for k, v in first.labels().items() if k in ("r3/13", "r9/19")} == moved.labels()


def test_outbox_is_one_changelog_record_per_batch_and_resent_with_user_keys():
    h = Harness()
    h.batch(*[imp(f"r{i}", i, 11, 1000) for i in range(60)])
    before = len(h.changelog())
    h.tick(1000 + W, deliver=False)  # 60 windows close; the process dies before the flush
    outbox = [r for r in h.changelog()[before:] if r.key[:1] == JoinKeys.OUTBOX]
    assert len(outbox) == 1 and outbox[0].value is not None
    again = Harness(store=h.store)
    resent = [(k, TRAINING_EXAMPLES.decode(v)) for name, k, v, _ in again.emit.sent if name == TRAINING_EXAMPLES.name]
    assert len(resent) == 60 and all(k == key_of(ex.user_id) for k, ex in resent)


def test_an_outbox_of_the_layout_before_chunks_is_still_resent():
    h = Harness()
    h.batch(imp("r1", 7, 11, 1000))
    h.tick(1000 + W)
    ex = h.sent(TRAINING_EXAMPLES)[0]
    h.store.put(JoinKeys.outbox("r1/11"), ex)  # an outbox written by the previous layout, not yet delivered
    h.store.commit({})
    again = Harness(store=h.store)
    assert [(k, v) for name, k, v, _ in again.emit.sent if name == TRAINING_EXAMPLES.name] == [(key_of(7), ex)]
    again.tick(1000 + 2 * W)
    assert not list(again.store.scan(JoinKeys.OUTBOX))
