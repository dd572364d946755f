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

Rows are sorted by (time, user, tie) in memory, as columns of machine numbers (~40 bytes a row: the 20M
MovieLens takes about 1 GB, the full Taobao log's 100M rows about 4 GB); files are never assumed to be ordered.
Ties within one user's second keep the file's order (Taobao) or a stable pseudo-random order (MovieLens,
Amazon), never item-id order: a held-out "last" item that is the largest id of its second is an artifact
sequence models learn. Reading shows progress, and says how many rows it read and how long the sort took.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import json
import logging
import time
import zlib
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from .events import BehaviorEvent
from .progress import progress

log = logging.getLogger(__name__)

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


def _time_ordered(rows: Iterable[tuple], types: str, keys: int, what: str) -> Iterator[tuple]:
    """``rows`` (one value per ``types`` letter: array typecodes) sorted by their first ``keys`` values, equal
    keys in input order. Held as one array per column, not a tuple per row (~290 bytes a row as tuples)."""
    t0 = time.monotonic()
    cols = [array(t) for t in types]
    appends = [c.append for c in cols]
    n = skipped = 0
    with progress(f"read {what}", unit="rows") as bar:
        for row in rows:
            try:
                for append, v in zip(appends, row):
                    append(v)
            except OverflowError:  # not an event either: skipped like the rows _events refuses
                for c in cols:
                    del c[n:]
                skipped += 1
                if skipped <= 3:
                    log.warning("%s: skipping a row with a number beyond 64 bits: %s", what, row)
                continue
            n += 1
            if n % 100_000 == 0:
                bar.update(100_000)
        bar.update(n % 100_000)
    if skipped:
        log.warning("%s: skipped %d rows with numbers beyond 64 bits", what, skipped)
    arrays = [np.frombuffer(c, dtype=c.typecode) for c in cols]
    order = np.lexsort(arrays[:keys][::-1])  # stable: the last key given is the primary one
    log.info("%s: %d rows read and sorted by time in %.1fs", what, len(order), time.monotonic() - t0)
    chunk = 1 << 13
    for start in range(0, len(order), chunk):
        idx = order[start:start + chunk]
        yield from zip(*(a[idx].tolist() for a in arrays))


def _events(rows: Iterable[dict], what: str, limit: int = 0) -> Iterator[BehaviorEvent]:
    """BehaviorEvents from field dicts (at most ``limit``; 0: all). A row that is not a valid event (a time
    outside 1990-2100, a negative id: public logs hold a few) is skipped and counted, with warnings naming
    the first ones, instead of ending a read of millions of rows."""
    skipped, examples, n = 0, [], 0
    for fields in rows:
        if limit and n >= limit:
            break
        try:
            event = BehaviorEvent(**fields)
        except ValidationError as e:
            skipped += 1
            if len(examples) < 3:
                err = e.errors()[0]
                examples.append(f"{fields['event_id']}: {'.'.join(map(str, err['loc']))}: {err['msg']}")
                log.warning("%s: skipping a row that is not a valid event (%s)", what, examples[-1])
            continue
        n += 1
        yield event
    if skipped:
        log.warning("%s: skipped %d of %d rows that are not valid events, e.g. %s", what, skipped, skipped + n,
                    "; ".join(examples))


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


_ML_RATINGS = {"100k": ("u.data", "\t", 0), "dat": ("ratings.dat", "::", 0), "csv": ("ratings.csv", ",", 1)}


def _movielens_rows(path: Path, layout: str) -> Iterator[tuple[int, int, int, int, float]]:
    """(time, user, tie order, item, rating) per rating line."""
    name, sep, header = _ML_RATINGS[layout]
    for line_no, line in enumerate(_open(path / name), 1):
        if line_no <= header or not line.strip():
            continue
        try:
            u, i, r, t = line.strip().split(sep)
            u, i = int(u), int(i)
            yield int(t), u, tie_order(u, i), i, float(r)
        except ValueError:
            raise ValueError(f"{path / name}:{line_no}: expected user{sep}item{sep}rating{sep}timestamp; "
                             f"got {line[:120]!r}") from None


def read_movielens(path: str | Path, limit: int = 0) -> Iterator[BehaviorEvent]:
    """All ratings of a MovieLens folder as "rate" behaviors, oldest first."""
    path = Path(path)
    layout = movielens_layout(path)
    cats = movielens_items(path)
    rows = _time_ordered(_movielens_rows(path, layout), "qqQqd", 3, f"{path}")
    yield from _events(({"event_id": f"ml-{u}-{i}-{t}", "user_id": u, "item_id": i, "category_id": cats.get(i, 0),
                         "behavior": "rate", "scenario": "movielens", "rating": r, "event_time_ms": t * 1000}
                        for t, u, _, i, r in rows), f"{path}", limit)


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
    codes = {b: n for n, b in enumerate(TAOBAO_BEHAVIORS)}
    names = list(TAOBAO_BEHAVIORS.values())

    def rows() -> Iterator[tuple[int, int, int, int, int, int]]:
        with (gzip.open(f, "rt", newline="") if f.suffix == ".gz" else open(f, newline="")) as fh:
            for line_no, rec in enumerate(csv.reader(fh), 1):
                try:
                    u, i, c, b, t = rec  # ValueError unless exactly 5 fields
                    yield int(t), int(u), line_no, int(i), int(c), codes[b]
                except (KeyError, ValueError):
                    raise ValueError(f"{f}:{line_no}: expected user,item,category,pv|cart|fav|buy,time; "
                                     f"got {rec!r}") from None

    # (time, user, line): ties keep the log's order
    yield from _events(({"event_id": f"tb-{line_no}", "user_id": u, "item_id": i, "category_id": c,
                         "behavior": names[b], "scenario": "taobao", "event_time_ms": t * 1000}
                        for t, u, line_no, i, c, b in _time_ordered(rows(), "qqqqqb", 3, f"{f}")), f"{f}", limit)


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

    def rows() -> Iterator[tuple[int, int, int, int, int, float]]:
        for u, i, r, t in _amazon_rows(reviews, layout):
            uid, iid = stable_id("amazon-user", u), stable_id("amazon-item", i)
            yield t, uid, tie_order(uid, iid), iid, cats.get(i, 0), r

    yield from _events(({"event_id": f"az-{u}-{i}-{t}", "user_id": u, "item_id": i, "category_id": c,
                         "behavior": "rate", "scenario": "amazon", "rating": min(max(r, 0.0), 10.0),
                         "event_time_ms": t * 1000}
                        for t, u, _, i, c, r in _time_ordered(rows(), "qqQqqd", 3, f"{reviews}")), f"{reviews}", limit)


def is_positive(event: BehaviorEvent) -> bool:
    """The impression label a source's behavior implies (ratings: >= 4; Taobao: cart/fav/buy)."""
    if event.behavior == "rate":
        return (event.rating or 0) >= 4
    return event.behavior in ("cart", "fav", "buy", "click")
