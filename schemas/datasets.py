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

Amazon reviews (``read_amazon``; a file, or a folder holding one reviews file and optionally a ``meta_*`` file),
    plain or ``.gz``, layout detected from the first record:
    2014 JSON lines (``reviewerID``, ``asin``, ``overall``, ``unixReviewTime``: the "5-core" files), 2018 JSON
    lines (the same keys plus ``verified``, ``style``...), the 2014 ratings-only CSV (``user,item,rating,timestamp``,
    no header) and 2023 JSON lines (``user_id``, ``parent_asin``, ``rating``, ``timestamp`` in ms).
    String ids become 63-bit ids by a stable hash (``stable_id``); category = the metadata's category path
    (``categories`` / ``category`` / ``main_cat`` / ``main_category``), hashed, 0 without metadata;
    behavior = "rate", rating = the stars, scenario = "amazon"; impression label: rating >= 4.

Rows are sorted by time in memory; ties within one user's second keep the file's order (Taobao) or a
stable pseudo-random order (MovieLens, Amazon), never item-id order: a held-out "last" item that is the
largest id of its second is an artifact sequence models learn. Rows are sorted by (time, user, tie) in memory (columns of machine ints: ~40 bytes a row, so the 20M
MovieLens fits in about 1 GB); files are never assumed to be ordered.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from .events import BehaviorEvent

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western", "IMAX", "(no genres listed)")
_GENRE_ID = {g.lower(): i for i, g in enumerate(GENRES)} | {"children": 4}
TAOBAO_BEHAVIORS = {"pv": "view", "cart": "cart", "fav": "fav", "buy": "buy"}


_MASK63 = (1 << 63) - 1


def stable_id(kind: str, value: str) -> int:
    """A string id as a 63-bit id: the same on every machine and run (blake2b of kind and value)."""
    digest = hashlib.blake2b(f"{kind}\x00{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def tie_order(user: int, item: int) -> int:
    """Order of a user's events within one timestamp: a fixed pseudo-random mix, unrelated to id order."""
    z = (user * 0x9E3779B97F4A7C15 + item * 0xC2B2AE3D27D4EB4F + 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


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
    rows = sorted(_movielens_rows(path, layout), key=lambda r: (r[3], r[0], tie_order(r[0], r[1])))
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
            rows.append((int(rec[4]), int(rec[0]), line_no, int(rec[1]), int(rec[2]), rec[3]))
    rows.sort()  # (time, user, line): ties keep the log's order
    for n, (t, u, line_no, i, c, b) in enumerate(rows):
        if limit and n >= limit:
            return
        yield BehaviorEvent(event_id=f"tb-{line_no}", user_id=u, item_id=i, category_id=c,
                            behavior=TAOBAO_BEHAVIORS[b], scenario="taobao", event_time_ms=t * 1000)  # type: ignore[arg-type]


# --- Amazon reviews ----------------------------------------------------------------------------------
AMAZON_LAYOUTS = {
    "2014": "JSON lines with reviewerID, asin, overall, unixReviewTime",
    "2018": "JSON lines as 2014 plus verified/style/vote",
    "2023": "JSON lines with user_id, parent_asin (or asin), rating, timestamp (ms)",
    "csv": "ratings CSV without header: user,item,rating,timestamp (seconds)",
}


def _open_any(path: Path) -> io.TextIOBase:
    return gzip.open(path, "rt", encoding="utf-8", newline="") if path.suffix == ".gz" else \
        open(path, encoding="utf-8", newline="")


def _json_record(line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return ast.literal_eval(line)  # the 2014 metadata files are Python dict literals, not JSON


def amazon_files(path: str | Path) -> tuple[Path, Path | None]:
    """(reviews file, metadata file or None) for a file or a folder (metadata: a ``meta_*`` file beside it)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        meta = [p for p in files if p.name.lower().startswith("meta")]
        reviews = [p for p in files if p not in meta and any(p.name.lower().endswith(x) for x in
                                                           (".json", ".json.gz", ".jsonl", ".jsonl.gz", ".csv",
                                                            ".csv.gz"))]
        if len(reviews) != 1:
            raise FileNotFoundError(f"{path}: expected exactly one Amazon reviews file (.json[l][.gz] or .csv[.gz]) "
                                    f"besides meta_* files, found {[p.name for p in reviews]}")
        return reviews[0], (meta[0] if meta else None)
    if not path.exists():
        raise FileNotFoundError(path)
    return path, None


def amazon_layout(path: str | Path) -> str:
    """"2014", "2018", "2023" or "csv", from the first non-empty line of the reviews file."""
    path = Path(path)
    with _open_any(path) as fh:
        line = next((ln for ln in fh if ln.strip()), "")
    expected = "; ".join(f"{k}: {v}" for k, v in AMAZON_LAYOUTS.items())
    if line.lstrip().startswith("{"):
        try:
            rec = _json_record(line)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"{path}: first record is not JSON ({e}); expected one of: {expected}") from None
        if {"reviewerID", "asin", "overall", "unixReviewTime"} <= rec.keys():
            return "2018" if {"verified", "style", "vote"} & rec.keys() else "2014"
        if {"user_id", "rating", "timestamp"} <= rec.keys() and ({"parent_asin", "asin"} & rec.keys()):
            return "2023"
        raise ValueError(f"{path}: unknown Amazon layout, first record has keys {sorted(rec)}; expected one of: "
                         f"{expected}")
    f = next(csv.reader([line]), [])
    if len(f) == 4:
        try:
            float(f[2]), int(float(f[3]))
            return "csv"
        except ValueError:
            pass
    raise ValueError(f"{path}: unknown Amazon layout, first line {line[:120]!r}; expected one of: {expected}")


def _category_name(rec: dict) -> str | None:
    """A metadata record's category: a mid-level node of its category path, else its main category."""
    for key in ("categories", "category"):
        v = rec.get(key)
        if v and isinstance(v, list):
            path = v[0] if isinstance(v[0], list) else v  # 2014: list of paths; 2018/2023: one path
            path = [str(x) for x in path if str(x).strip()]
            if path:
                return " > ".join(path[:3])  # top 3 levels: specific enough, not one category per item
    for key in ("main_cat", "main_category"):
        if rec.get(key):
            return str(rec[key])
    return None


def amazon_categories(meta: str | Path) -> dict[str, int]:
    """asin (or parent_asin) -> category id from a metadata file (JSON lines, plain or .gz)."""
    out: dict[str, int] = {}
    meta = Path(meta)
    with _open_any(meta) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = _json_record(line)
            except (ValueError, SyntaxError):
                raise ValueError(f"{meta}:{line_no}: not a JSON metadata record") from None
            asin = rec.get("parent_asin") or rec.get("asin")
            name = _category_name(rec)
            if asin and name:
                out[str(asin)] = stable_id("amazon-category", name)
    return out


def _amazon_rows(path: Path, layout: str) -> Iterator[tuple[str, str, float, int]]:
    """(user, item, rating, time in seconds) per review."""
    with _open_any(path) as fh:
        if layout == "csv":
            for line_no, f in enumerate(csv.reader(fh), 1):
                if len(f) != 4:
                    raise ValueError(f"{path}:{line_no}: expected user,item,rating,timestamp; got {f!r}")
                yield f[0], f[1], float(f[2]), int(float(f[3]))
            return
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = _json_record(line)
                if layout == "2023":
                    yield r["user_id"], r.get("parent_asin") or r["asin"], float(r["rating"]), int(r["timestamp"]) // 1000
                else:
                    yield r["reviewerID"], r["asin"], float(r["overall"]), int(r["unixReviewTime"])
            except (KeyError, ValueError, SyntaxError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: bad {layout} Amazon record ({e!r})") from None


def read_amazon(path: str | Path, meta: str | Path | None = None, limit: int = 0) -> Iterator[BehaviorEvent]:
    """All reviews of an Amazon file (or folder with an optional ``meta_*`` file) as "rate" behaviors, oldest first."""
    reviews, found_meta = amazon_files(path)
    layout = amazon_layout(reviews)
    meta = meta or found_meta
    cats = amazon_categories(meta) if meta else {}
    rows = [(t, stable_id("amazon-user", u), stable_id("amazon-item", i), i, r) for u, i, r, t in
            _amazon_rows(reviews, layout)]
    rows.sort(key=lambda x: (x[0], x[1], tie_order(x[1], x[2])))
    for n, (t, u, i, asin, r) in enumerate(rows):
        if limit and n >= limit:
            return
        yield BehaviorEvent(event_id=f"az-{u}-{i}-{t}", user_id=u, item_id=i, category_id=cats.get(asin, 0),
                            behavior="rate", scenario="amazon", rating=min(max(r, 0.0), 10.0),
                            event_time_ms=t * 1000)


def is_positive(event: BehaviorEvent) -> bool:
    """The impression label a source's behavior implies (ratings: >= 4; Taobao: cart/fav/buy)."""
    if event.behavior == "rate":
        return (event.rating or 0) >= 4
    return event.behavior in ("cart", "fav", "buy", "click")
