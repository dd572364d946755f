"""``lum status``: one look at a running deployment, as tables or JSON.

    lum status                                   # topics, consumer-group lag, LUM features, dead letters
    lum status runs/demo/dlrm-baseline runs/demo/dlrm-lum runs/demo/lum --json

- topics with our prefix: partitions and end offsets. The end is the high-water mark a fetch reports (a reader
  assigned at the end gets librdkafka's end-of-partition event there): right on Apache Kafka and on the embedded
  broker, whose ListOffsets answer is not (it reports the start of the last batch + 1).
- each consumer group with committed offsets on our topics: lag per topic (end - committed; a partition the
  group never committed counts from 0).
- ``lum-features``: the newest LUM model version (from the newest records of each partition) and how old the
  newest features are.
- ``dead-letters`` of the last hour, by consumer and source topic.
- for each directory given: a DLRM trainer's last durable checkpoint (``LATEST``/``meta.json``) and its last
  window's AUC / NE / log loss (``metrics.jsonl``), or a LUM pre-training directory's newest ``step-*`` checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from schemas.settings import KafkaSettings

HOUR_MS = 3600 * 1000


def register(sub, common) -> None:
    p = sub.add_parser("status", parents=[common], help="topics, consumer lag, LUM model version, dead letters, "
                       "trainers' last checkpoints")
    p.add_argument("dirs", nargs="*", metavar="CHECKPOINT_DIR", help="trainer or LUM checkpoint directories")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the cluster")
    p.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    from confluent_kafka import KafkaException

    from schemas.settings import load

    kafka = load(KafkaSettings)
    try:
        report = status(kafka, args.dirs, timeout=args.timeout)
    except KafkaException as e:
        print(f"lum status: cannot reach the cluster at {kafka.bootstrap} (LUM_KAFKA_BOOTSTRAP): {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


# --- Kafka ----------------------------------------------------------------------------------------------
def end_offsets(kafka: KafkaSettings, topics: dict[str, int], timeout: float = 15.0) -> dict[str, dict[int, int]]:
    """{topic: {partition: end offset}} for {topic: partition count}, from the fetched high-water mark."""
    from confluent_kafka import OFFSET_END, KafkaError, TopicPartition

    from .kafka.reader import reader

    tps = [TopicPartition(t, p, OFFSET_END) for t, n in topics.items() for p in range(n)]
    ends: dict[str, dict[int, int]] = {t: {} for t in topics}
    if not tps:
        return ends
    consumer = reader(kafka)
    try:
        consumer.assign(tps)
        missing, deadline = len(tps), time.monotonic() + timeout
        while missing and time.monotonic() < deadline:
            for m in consumer.consume(10000, 0.2):
                err = m.error()
                if err is not None and err.code() == KafkaError._PARTITION_EOF and m.partition() not in ends[m.topic()]:
                    ends[m.topic()][m.partition()] = m.offset()
                    missing -= 1
        for tp in tps:  # not reached in time: the cached high-water mark, when a fetch brought one
            if tp.partition not in ends[tp.topic]:
                lo, hi = consumer.get_watermark_offsets(tp, cached=True)
                ends[tp.topic][tp.partition] = hi if hi >= 0 else None
    finally:
        consumer.close()
    return ends


def _tail(kafka: KafkaSettings, topic: str, ends: dict[int, int], last: int, since_ms: int | None = None,
          timeout: float = 15.0):
    """The records of ``topic`` from ``last`` before each partition's end (or from ``since_ms``) to the end."""
    from confluent_kafka import TopicPartition

    from .kafka.reader import read_to_end, reader

    starts = {p: max(0, e - last) for p, e in ends.items() if e}
    if since_ms is not None and starts:
        consumer = reader(kafka)
        try:  # a lower bound on any broker (the embedded one answers 0): older records are skipped by the caller
            found = consumer.offsets_for_times([TopicPartition(topic, p, since_ms) for p in starts], timeout)
            starts = {tp.partition: max(starts[tp.partition], tp.offset) for tp in found if tp.offset >= 0}
        finally:
            consumer.close()
    if not starts:
        return []
    consumer = reader(kafka)
    try:
        return [m for m in read_to_end(consumer, topic, starts, idle_timeout_s=timeout)]
    finally:
        consumer.close()


def group_lag(kafka: KafkaSettings, ends: dict[str, dict[int, int]], timeout: float = 15.0) -> list[dict]:
    from confluent_kafka import ConsumerGroupTopicPartitions

    from .kafka.admin import _admin

    admin = _admin(kafka)
    listed = admin.list_consumer_groups(request_timeout=timeout).result(timeout)
    names = sorted(g.group_id for g in listed.valid)
    rows = []
    for gid in names:
        try:
            fut = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(gid)], request_timeout=timeout)
            tps = next(iter(fut.values())).result(timeout).topic_partitions
        except Exception as e:  # noqa: BLE001 — one unreadable group must not hide the others
            rows.append({"group": gid, "error": str(e)})
            continue
        committed: dict[str, dict[int, int]] = {}
        for tp in tps:
            if tp.topic in ends and tp.offset >= 0:
                committed.setdefault(tp.topic, {})[tp.partition] = tp.offset
        for topic, offs in sorted(committed.items()):
            lag = {p: max(0, (e or 0) - offs.get(p, 0)) for p, e in ends[topic].items()}
            rows.append({"group": gid, "topic": _short(kafka, topic), "lag": sum(lag.values()),
                         "partitions": {str(p): v for p, v in sorted(lag.items())}})
    return rows


def lum_features(kafka: KafkaSettings, ends: dict[int, int], now_ms: int, timeout: float = 15.0) -> dict | None:
    from schemas.topics import LUM_FEATURES

    newest = None
    for m in _tail(kafka, kafka.topic(LUM_FEATURES), ends, last=20, timeout=timeout):
        try:
            f = LUM_FEATURES.decode(m.value())
        except ValueError:
            continue
        if newest is None or f.computed_at_ms > newest.computed_at_ms:
            newest = f
    if newest is None:
        return None
    return {"model_version": newest.model_version, "computed_at_ms": newest.computed_at_ms,
            "age_s": round((now_ms - newest.computed_at_ms) / 1000, 1)}


def dead_letters(kafka: KafkaSettings, ends: dict[int, int], now_ms: int, timeout: float = 15.0) -> dict:
    from schemas.topics import DEAD_LETTERS

    since = now_ms - HOUR_MS
    counts: dict[str, int] = {}
    total = 0
    for m in _tail(kafka, kafka.topic(DEAD_LETTERS), ends, last=100_000, since_ms=since, timeout=timeout):
        try:
            d = DEAD_LETTERS.decode(m.value())
        except ValueError:
            continue
        if d.failed_at_ms < since:
            continue
        total += 1
        key = f"{d.consumer} <- {_short(kafka, d.source_topic)}"
        counts[key] = counts.get(key, 0) + 1
    return {"last_hour": total, "by_consumer": dict(sorted(counts.items()))}


def _short(kafka: KafkaSettings, topic: str) -> str:
    p = kafka.topic_prefix
    return topic[len(p):] if p and topic.startswith(p) else topic


# --- Checkpoint directories -------------------------------------------------------------------------------
def checkpoint(directory: str | Path, now: float) -> dict:
    """The newest durable checkpoint of a directory: ``LATEST`` names it (DLRM trainers), else the newest
    ``step-*`` (LUM pre-training); a DLRM directory also has ``metrics.jsonl`` with its windows."""
    d = Path(directory)
    row: dict = {"dir": str(d)}
    latest = d / "LATEST"
    steps = sorted(p for p in d.glob("step-*") if (p / "meta.json").exists())
    path = d / latest.read_text().strip() if latest.exists() else (steps[-1] if steps else None)
    if path is None:
        row["error"] = "no checkpoint (neither LATEST nor step-*/meta.json)"
        return row
    meta = _json(path / "meta.json") or {}
    stamp = path / "meta.json" if (path / "meta.json").exists() else (latest if latest.exists() else path)
    saved = meta["saved_at_ms"] / 1000 if "saved_at_ms" in meta else meta.get("saved_at", stamp.stat().st_mtime)
    metrics = d / "metrics.jsonl"
    row |= {"kind": "dlrm" if metrics.exists() else "lum" if "model_version" in meta else "checkpoint",
            "checkpoint": path.name, "step": meta.get("step"), "saved_at": saved, "age_s": round(now - saved, 1)}
    if "examples" in meta:
        row["examples"] = meta["examples"]
    if "model_version" in meta:
        row["model_version"] = meta["model_version"]
    if metrics.exists():
        row |= _last_window(metrics)
    return row


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_window(path: Path) -> dict:
    """The newest event-time window's last row (a later row for a window supersedes an earlier one)."""
    best = None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:  # a line cut by a crash mid-write
            continue
        if r.get("kind") == "window" and (best is None or r["window_start_ms"] >= best["window_start_ms"]):
            best = r
    if best is None:
        return {}
    return {"window_start_ms": best["window_start_ms"], "window_n": best.get("n"), "auc": best.get("auc"),
            "ne": best.get("ne"), "logloss": best.get("logloss")}


# --- The whole report -------------------------------------------------------------------------------------
def status(kafka: KafkaSettings, dirs: list[str] | tuple[str, ...] = (), timeout: float = 15.0) -> dict:
    from schemas.topics import DEAD_LETTERS, LUM_FEATURES

    from .kafka.admin import _admin

    now = time.time()
    now_ms = int(now * 1000)
    md = _admin(kafka).list_topics(timeout=timeout)
    ours = {n: len(t.partitions) for n, t in md.topics.items()
            if n.startswith(kafka.topic_prefix) and not n.startswith("__")}
    ends = end_offsets(kafka, ours, timeout)
    topics = [{"topic": _short(kafka, n), "partitions": ours[n],
               "end_offsets": {str(p): e for p, e in sorted(ends[n].items())},
               "messages": sum(e or 0 for e in ends[n].values())} for n in sorted(ours)]
    features = kafka.topic(LUM_FEATURES)
    letters = kafka.topic(DEAD_LETTERS)
    return {
        "bootstrap": kafka.bootstrap, "topic_prefix": kafka.topic_prefix, "at_ms": now_ms,
        "topics": topics,
        "groups": group_lag(kafka, ends, timeout),
        "lum_features": lum_features(kafka, ends[features], now_ms, timeout) if features in ends else None,
        "dead_letters": dead_letters(kafka, ends[letters], now_ms, timeout) if letters in ends else None,
        "checkpoints": [checkpoint(d, now) for d in dirs],
    }


def _f(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list]) -> list[str]:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]


def render(r: dict) -> str:
    out = [f"cluster {r['bootstrap']}" + (f" (topic prefix {r['topic_prefix']})" if r["topic_prefix"] else ""), ""]
    out += _table(["topic", "partitions", "messages", "end offsets"],
                  [[t["topic"], t["partitions"], t["messages"], " ".join(f"{p}:{e}" for p, e in t["end_offsets"].items())]
                   for t in r["topics"]])
    out.append("")
    groups = [g for g in r["groups"] if "error" not in g]
    out += _table(["consumer group", "topic", "lag", "per partition"],
                  [[g["group"], g["topic"], g["lag"], " ".join(f"{p}:{v}" for p, v in g["partitions"].items())]
                   for g in groups]) if groups else ["consumer groups: none with committed offsets on these topics"]
    out += [f"consumer group {g['group']}: {g['error']}" for g in r["groups"] if "error" in g]
    f = r["lum_features"]
    out += ["", f"LUM features: model {f['model_version']}, newest computed {f['age_s']:.0f}s ago" if f
            else "LUM features: none published yet"]
    d = r["dead_letters"]
    if d is not None:
        out.append(f"dead letters, last hour: {d['last_hour']}"
                   + "".join(f"\n  {k}: {v}" for k, v in d["by_consumer"].items()))
    if r["checkpoints"]:
        out.append("")
        out += _table(["checkpoint dir", "kind", "last checkpoint", "age", "step", "window AUC", "window NE",
                       "window log loss"],
                      [[c["dir"], c.get("kind", "-"), c.get("checkpoint", c.get("error", "-")),
                        f"{c['age_s']:.0f}s" if "age_s" in c else "-", c.get("step", "-"), _f(c.get("auc")),
                        _f(c.get("ne")), _f(c.get("logloss"))] for c in r["checkpoints"]])
    return "\n".join(out)
