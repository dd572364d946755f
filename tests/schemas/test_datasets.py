"""Readers of public logs: Amazon layouts, stable ids, tie order that carries no id signal."""

from __future__ import annotations

import gzip
import json
import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from schemas.datasets import amazon_layout, read_amazon, read_movielens, read_taobao, stable_id

T = 1_400_000_000
REVIEWS = [("A1", "B01", 5.0, T + 10), ("A1", "B02", 2.0, T), ("A2", "B01", 4.0, T + 5)]
META = [{"asin": "B01", "categories": [["Books", "Fiction", "Mystery", "Cozy"]]},
        {"asin": "B02", "categories": [["Books", "History"]]}]


def _write(path: Path, lines: list[str]) -> Path:
    data = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


LAYOUTS = {
    "2014": lambda: [json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t, "summary": "x"})
                     for u, i, r, t in REVIEWS],
    "2018": lambda: [json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t, "verified": True,
                                 "style": {"Format:": " Paperback"}}) for u, i, r, t in REVIEWS],
    "csv": lambda: [f"{u},{i},{r},{t}" for u, i, r, t in REVIEWS],
    "2023": lambda: [json.dumps({"user_id": u, "parent_asin": i, "asin": i + "x", "rating": r, "timestamp": t * 1000,
                                 "verified_purchase": True}) for u, i, r, t in REVIEWS],
}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_read_amazon_every_layout(tmp_path, layout, gz):
    ext = (".csv" if layout == "csv" else ".json") + (".gz" if gz else "")
    path = _write(tmp_path / f"reviews{ext}", LAYOUTS[layout]())
    assert amazon_layout(path) == layout
    evs = list(read_amazon(path))
    assert [e.event_time_ms for e in evs] == [T * 1000, (T + 5) * 1000, (T + 10) * 1000]  # oldest first
    assert [e.rating for e in evs] == [2.0, 4.0, 5.0]
    assert evs[0].user_id == evs[2].user_id == stable_id("amazon-user", "A1") < 2**63
    assert evs[1].item_id == evs[2].item_id == stable_id("amazon-item", "B01")
    assert {e.behavior for e in evs} == {"rate"} and {e.scenario for e in evs} == {"amazon"}
    assert all(e.category_id == 0 for e in evs)  # no metadata: category unknown
    # A folder with a meta_* file (2014 metadata is a Python literal, not JSON) supplies categories.
    folder = tmp_path / "folder"
    folder.mkdir()
    _write(folder / f"reviews{ext}", LAYOUTS[layout]())
    _write(folder / "meta_Books.json", [repr(m) for m in META])
    cats = {e.item_id: e.category_id for e in read_amazon(folder)}
    assert cats[stable_id("amazon-item", "B01")] == stable_id("amazon-category", "Books > Fiction > Mystery")
    assert cats[stable_id("amazon-item", "B02")] == stable_id("amazon-category", "Books > History")


@pytest.mark.parametrize("layout", ["2018", "2018-main-cat", "2023", "2023-main-category"])
def test_amazon_metadata_layouts_give_categories(tmp_path, layout):
    """2018 metadata (``asin``, ``category`` path, ``main_cat``) and 2023 (``parent_asin``, ``categories`` path,
    ``main_category``), gzipped as published: the path's top levels, else the main category."""
    path = {"2018": lambda a, p: {"asin": a, "category": p, "main_cat": "Books"},
            "2018-main-cat": lambda a, p: {"asin": a, "category": [], "main_cat": p[1]},
            "2023": lambda a, p: {"parent_asin": a, "categories": p, "main_category": "Books", "title": "t"},
            "2023-main-category": lambda a, p: {"parent_asin": a, "categories": [], "main_category": p[1]}}[layout]
    reviews = _write(tmp_path / "reviews.jsonl", LAYOUTS["2023" if layout.startswith("2023") else "2018"]())
    meta = _write(tmp_path / "metadata.jsonl.gz", [json.dumps(path("B01", ["Books", "Fiction", "Mystery", "Cozy"])),
                                                   json.dumps(path("B02", ["Books", "History"]))])
    cats = {e.item_id: e.category_id for e in read_amazon(reviews, meta=meta)}
    want = {"B01": "Books > Fiction > Mystery", "B02": "Books > History"} if not layout.endswith(("cat", "category")) \
        else {"B01": "Fiction", "B02": "History"}
    assert cats == {stable_id("amazon-item", a): stable_id("amazon-category", c) for a, c in want.items()}


def test_unknown_amazon_layout_names_the_file(tmp_path):
    bad = _write(tmp_path / "weird.json", [json.dumps({"user": "A1", "item": "B1"})])
    with pytest.raises(ValueError, match=r"weird\.json.*unknown Amazon layout.*reviewerID"):
        list(read_amazon(bad))
    bad_csv = _write(tmp_path / "weird.csv", ["a,b,c"])
    with pytest.raises(ValueError, match=r"weird\.csv.*expected one of"):
        list(read_amazon(bad_csv))


def test_movielens_ties_are_not_in_item_id_order(tmp_path):
    # One user rates 30 movies in the same second: the file lists them in id order. The held-out "last" item
    # must not be the largest id of that second (an artifact a sequence model learns).
    lines = [f"1\t{i}\t4\t881250949" for i in range(1, 31)] + ["1\t99\t3\t881250000"]
    _write(tmp_path / "u.data", lines)
    _write(tmp_path / "u.item", [f"{i}|T|01-Jan-1995||u|" + "|".join(["0"] * 18 + ["1"]) for i in range(1, 100)])
    items = [e.item_id for e in read_movielens(tmp_path)]
    assert items[0] == 99 and sorted(items[1:]) == list(range(1, 31))
    assert items[1:] != sorted(items[1:])
    assert items == [e.item_id for e in read_movielens(tmp_path)]  # stable


def test_taobao_ties_keep_log_order(tmp_path):
    # pv then buy of the same item in one second: the log's order, not (item, behavior) order.
    _write(tmp_path / "UserBehavior.csv", ["1,50,3,pv,1511544070", "1,20,3,pv,1511544070", "1,50,3,buy,1511544070"])
    assert [(e.item_id, e.behavior) for e in read_taobao(tmp_path)] == [(50, "view"), (20, "view"), (50, "buy")]


def test_taobao_rows_are_held_as_columns(tmp_path):
    """The whole log is held to sort it by time: as columns (~50 bytes a row), not a tuple per row (~290), so
    that the full UserBehavior.csv (100M rows) fits in memory."""
    n = 100_000
    rng = np.random.default_rng(0)
    u, i, c, t = (rng.integers(1, hi, n) for hi in (5_000, 10**6, 5_000, 10**6))
    with open(tmp_path / "UserBehavior.csv", "w") as f:
        f.writelines(f"{a},{b},{d},pv,{1_511_500_000 + e}\n" for a, b, d, e in zip(u, i, c, t))
    tracemalloc.start()
    try:
        events = read_taobao(tmp_path)
        first = next(events)  # every row is read and sorted before the first comes out
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first.event_time_ms == (1_511_500_000 + int(t.min())) * 1000
    assert peak / n < 120, f"{peak / n:.0f} bytes a row"
    assert sum(1 for _ in events) == n - 1


def test_rows_that_are_not_valid_events_are_skipped_and_named(tmp_path, caplog):
    # A time in 1970 and a negative id (the full Taobao log has rows like these): skipped, counted, named.
    # A time beyond 64 bits cannot even be held for the sort: skipped before it.
    _write(tmp_path / "UserBehavior.csv", ["1,50,3,pv,1511544070", "1,20,3,pv,0", "-2,20,3,pv,1511544071",
                                           "1,70,3,pv,99999999999999999999", "1,60,3,buy,1511544072"])
    with caplog.at_level(logging.WARNING, logger="schemas.datasets"):
        assert [e.item_id for e in read_taobao(tmp_path)] == [50, 60]
    text = caplog.text
    assert "tb-2: event_time_ms" in text and "tb-3: user_id" in text and "skipped 2 of 4 rows" in text
    assert "skipped 1 rows with numbers beyond 64 bits" in text


def test_a_malformed_movielens_line_names_its_file_and_line(tmp_path):
    _write(tmp_path / "ratings.csv", ["userId,movieId,rating,timestamp", "1,2,4.0,1100000000", "1,3,oops,1100000001"])
    _write(tmp_path / "movies.csv", ["movieId,title,genres", "2,A,Drama", "3,B,Comedy"])
    with pytest.raises(ValueError, match=r"ratings.csv:3: expected user,item,rating,timestamp"):
        list(read_movielens(tmp_path))


def test_lum_produce_amazon(kafka, tmp_path, capsys, read_topic):
    from deploy.cli import main as lum
    from schemas.topics import BEHAVIORS

    path = _write(tmp_path / "reviews.csv.gz", LAYOUTS["csv"]())
    (tmp_path / "elsewhere").mkdir()  # not beside the reviews: only --meta finds it
    meta = _write(tmp_path / "elsewhere" / "meta.json.gz", [repr(m) for m in META])
    assert lum(["produce", "amazon", str(path), "--meta", str(meta)]) == 0
    assert "events=3" in capsys.readouterr().out
    cats = {BEHAVIORS.decode(v).category_id for *_, v in read_topic(BEHAVIORS)}
    assert cats == {stable_id("amazon-category", c) for c in ("Books > Fiction > Mystery", "Books > History")}
