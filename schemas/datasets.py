"""Readers of public interaction logs into ``BehaviorEvent``s, in event-time order.

Used by the replay producers (``lum produce movielens|taobao``) and by the trainers' offline sources
(``lum pretrain --source movielens:PATH``), so that both map a data set to conditions the same way.

MovieLens (every published layout, detected from the files in PATH):
    100K ``u.data`` + ``u.item``; 1M/10M ``ratings.dat`` + ``movies.dat`` (``::``); 20M/25M/latest
    ``ratings.csv`` + ``movies.csv`` (header). Plain or ``.gz``.
    user_id, item_id = the file's ids; category_id = the movie's first listed genre (ids in ``GENRES``
    order, new genre names get a stable id >= 100); behavior = "rate"; rating = the rating;
    scenario = "movielens". Impression label (``lum produce --impressions``, offline benchmark):
    rating >= 4 is a positive.
Taobao UserBehavior (``UserBehavior.csv``, no header: user, item, category, behavior, unix time):
    behavior pv -> "view", cart -> "cart", fav -> "fav", buy -> "buy"; category_id = the file's category;
    scenario = "taobao". Impression label: a page view (pv) is an impression; it is positive when the same
    user carts, favourites or buys that item later in the log.

Rows are sorted by (time, user, item) in memory (columns of machine ints: ~40 bytes a row, so the 20M
MovieLens fits in about 1 GB); files are never assumed to be ordered.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path

from .events import BehaviorEvent

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western", "IMAX", "(no genres listed)")
_GENRE_ID = {g.lower(): i for i, g in enumerate(GENRES)} | {"children": 4}
TAOBAO_BEHAVIORS = {"pv": "view", "cart": "cart", "fav": "fav", "buy": "buy"}


def genre_id(name: str) -> int:
    key = name.strip().lower()
    return _GENRE_ID[key] if key in _GENRE_ID else 100 + zlib.crc32(key.encode()) % 100_000


def _open(path: Path) -> io.TextIOBase:
    for p in (path, path.with_name(path.name + ".gz")):
        if p.exists():
            if p.suffix == ".gz":
                return gzip.open(p, "rt", encoding="latin-1", newline="")
            return open(p, encoding="latin-1", newline="")
    raise FileNotFoundError(path)


def _exists(path: Path) -> bool:
    return path.exists() or path.with_name(path.name + ".gz").exists()


def movielens_layout(path: str | Path) -> str:
    """"100k", "dat" (1M/10M) or "csv" (20M/25M/latest), from the files present in ``path``."""
    path = Path(path)
    for layout, name in (("100k", "u.data"), ("dat", "ratings.dat"), ("csv", "ratings.csv")):
        if _exists(path / name):
            return layout
    raise FileNotFoundError(f"{path}: no MovieLens ratings file (u.data, ratings.dat or ratings.csv, optionally .gz)")


def movielens_items(path: str | Path) -> dict[int, int]:
    """item_id -> category_id (first listed genre) for a MovieLens folder."""
    path, layout = Path(path), movielens_layout(path)
    cats: dict[int, int] = {}
    if layout == "100k":
        for line in _open(path / "u.item"):
            f = line.rstrip("\n").split("|")
            if len(f) >= 24:
                flags = f[5:24]
                cats[int(f[0])] = next((i for i, x in enumerate(flags) if x == "1"), 0)
    elif layout == "dat":
        for line in _open(path / "movies.dat"):
            f = line.rstrip("\n").split("::")
            if len(f) >= 3:
                cats[int(f[0])] = genre_id(f[2].split("|")[0])
    else:
        reader = csv.reader(_open(path / "movies.csv"))
        next(reader, None)
        for f in reader:
            if len(f) >= 3:
                cats[int(f[0])] = genre_id(f[2].split("|")[0])
    return cats


def _movielens_rows(path: Path, layout: str) -> Iterator[tuple[int, int, float, int]]:
    if layout == "100k":
        for line in _open(path / "u.data"):
            u, i, r, t = line.split("\t")
            yield int(u), int(i), float(r), int(t)
    elif layout == "dat":
        for line in _open(path / "ratings.dat"):
            u, i, r, t = line.strip().split("::")
            yield int(u), int(i), float(r), int(t)
    else:
        reader = csv.reader(_open(path / "ratings.csv"))
        next(reader, None)
        for u, i, r, t in reader:
            yield int(u), int(i), float(r), int(t)


def read_movielens(path: str | Path, limit: int = 0) -> Iterator[BehaviorEvent]:
    """All ratings of a MovieLens folder as "rate" behaviors, oldest first."""
    path = Path(path)
    layout = movielens_layout(path)
    cats = movielens_items(path)
    rows = sorted(_movielens_rows(path, layout), key=lambda r: (r[3], r[0], r[1]))
    for n, (u, i, r, t) in enumerate(rows):
        if limit and n >= limit:
            return
        yield BehaviorEvent(event_id=f"ml-{u}-{i}-{t}", user_id=u, item_id=i, category_id=cats.get(i, 0),
                            behavior="rate", scenario="movielens", rating=r, event_time_ms=t * 1000)


def taobao_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in ("UserBehavior.csv", "UserBehavior.csv.gz", "UserBehavior.sample.csv.gz",
                     "UserBehavior.sample.csv"):
            if (path / name).exists():
                return path / name
        raise FileNotFoundError(f"{path}: no UserBehavior.csv[.gz] inside")
    return path


def read_taobao(path: str | Path, limit: int = 0) -> Iterator[BehaviorEvent]:
    """All rows of a Taobao UserBehavior file as behaviors, oldest first."""
    f = taobao_file(path)
    rows = []
    with (gzip.open(f, "rt", newline="") if f.suffix == ".gz" else open(f, newline="")) as fh:
        for line_no, rec in enumerate(csv.reader(fh), 1):
            if len(rec) != 5 or rec[3] not in TAOBAO_BEHAVIORS:
                raise ValueError(f"{f}:{line_no}: expected user,item,category,pv|cart|fav|buy,time; got {rec!r}")
            rows.append((int(rec[4]), int(rec[0]), int(rec[1]), int(rec[2]), rec[3], line_no))
    rows.sort()
    for n, (t, u, i, c, b, line_no) in enumerate(rows):
        if limit and n >= limit:
            return
        yield BehaviorEvent(event_id=f"tb-{line_no}", user_id=u, item_id=i, category_id=c,
                            behavior=TAOBAO_BEHAVIORS[b], scenario="taobao", event_time_ms=t * 1000)  # type: ignore[arg-type]


def is_positive(event: BehaviorEvent) -> bool:
    """The impression label a source's behavior implies (MovieLens: rating >= 4; Taobao: cart/fav/buy)."""
    if event.behavior == "rate":
        return (event.rating or 0) >= 4
    return event.behavior in ("cart", "fav", "buy", "click")
