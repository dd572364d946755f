"""The joiner's examples carry their history in TrainingExample v4's compact layout: each column at the fewest bytes
that hold that example's window (not the user's whole history), the same bytes as encoding the model."""

from __future__ import annotations

from schemas import codec
from schemas.events import BehaviorEvent
from schemas.topics import TRAINING_EXAMPLES

from test_join_logic import T0, W, Harness, imp

# Item ids (and category ids) of one user's behaviors, one per 100 ms: windows of 3 see 1-, 2-, 4- and 8-byte ids.
ITEMS = [5, 7, 300, 9, 8, 70_000, 3, 2, 1, 2**40, 4, 4, 2**63 - 1, 6, 6, 6]
CATS = [1, 1, 1, 256, 1, 1, 2**33, 1, 1, 1, 1, 1, 1, 1, 1, 1]


def test_each_example_s_history_takes_the_fewest_bytes_of_its_own_window():
    h = Harness(history_len=3)
    behs = [BehaviorEvent(event_id=f"e{i}", user_id=1, item_id=it, category_id=c, behavior="view", scenario="home",
                          event_time_ms=T0 + 100 * (i + 1)) for i, (it, c) in enumerate(zip(ITEMS, CATS))]
    # Impressions between behaviors (the window: the 3 before it), and a user with only small ids.
    imps = [imp("r", 1, 50 + k, 100 * k + 50) for k in range(len(ITEMS) + 2)]
    h.batch(*behs, *imps, imp("s", 2, 7, 500))
    h.tick(100 * len(ITEMS) + 50 + 2 * W)
    datas = h.sent(TRAINING_EXAMPLES)
    assert len(datas) == len(imps) + 1
    seen = set()
    for d in datas:
        ex = TRAINING_EXAMPLES.decode(d)
        assert d[:3] == b"Lb\x04" and d == TRAINING_EXAMPLES.encode(ex)  # the fewest bytes: the model's encoding
        if ex.user_id == 2:
            assert ex.history_items == [] and d[38] >> 4 == 0
            continue
        k = min(ex.item_id - 50, len(ITEMS))
        before = list(zip(ITEMS, CATS))[max(0, k - 3):k]  # behavior i is at 100 (i + 1): the first k are before
        assert ex.history_items == [i for i, _ in before] and ex.history_categories == [c for _, c in before]
        widths = (d[38] >> 4 & 3, d[38] >> 6)
        assert widths == (codec.history_width(ex.history_items), codec.history_width(ex.history_categories))
        seen.add(widths)
    assert {w for w, _ in seen} == {0, 1, 2, 3} and {c for _, c in seen} == {0, 1, 3}  # every width was exercised
