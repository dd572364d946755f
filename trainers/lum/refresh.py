"""LUM refresh (Step 2): publish condition outputs of users whose sequences changed, and item embeddings.

    lum refresh --checkpoint runs/lum --once
    LUM_REFRESH_CONDITIONS="scenario=home;scenario=search;category=17,behavior=buy" \
        lum refresh --checkpoint runs/lum --every 10

One run: load the newest checkpoint under ``--checkpoint``; read the users whose sequences changed since
the offsets the previous run stored in its state file (``refresh-state.json`` next to the checkpoints), or
every user when the model version changed (a new model republishes everyone), with their full sequences,
through the export's one reader (``streaming.kafka.sequences.changed_since``, which keeps a local fold in
``sequence-view/`` next to the state file, so a run reads only what changed); answer the configured
conditions for those users with one group-query pass per batch of users;
publish ``LumFeatures`` to ``lum-features`` (key = user id; ``trained_until_ms`` = the newest event time the
model was trained on, from the checkpoint) and, when the model version is new to this state file, the
``ItemEmbedding`` of every item the model was trained on (the checkpoint's ``items.npz``; items it never saw
get none: their hashed rows mean nothing) to ``item-embeddings`` (key ``<model version>/<item id>``), and, for a
model trained with item-id dropout, one record per category of those items (``item_id`` None, key
``<model version>/category=<id>``): the vector of any item of that category the model never saw; flush; after a
new model version, tombstone the records of every version but the ``ITEM_VERSIONS`` (4) newest
(``retire_item_versions``: compaction then keeps the vectors of each version that user features may still carry,
and only those); then store the new offsets. A crash
before the state is written repeats the run (at-least-once; the topics are compacted, so repeats are harmless).
While ``lum backfill sequences`` rebuilds the export (or if one started during the read) the run refuses
with ``BackfillRunning`` naming it, before publishing anything; ``--every`` retries at the next period.

Under torchrun (``lum refresh --nproc N``) rank 0 reads the topic and hands every rank the same users; rank r
answers users r, r+N, ... and its share of the items; rank 0 stores the offsets only after every rank has
delivered. The published vectors are those of one process.
Settings: ``LUM_REFRESH_*`` (``RefreshSettings``). Conditions are separated by ';' (a condition may
contain ',', e.g. ``category=17,behavior=buy``). ``LUM_REFRESH_TOP_CATEGORIES=N`` (default 5) also publishes, per user,
``LUM_REFRESH_CATEGORY_BASE`` refined by each of the user's N most frequent recent categories
(``behavior=buy,category=17``, flagged ``own_category``): the joiner attaches to an example only the one of
its candidate's category, which the DLRM matches against the candidate.
Metrics on ``LUM_METRICS_PORT`` (rank r: + r; ``schemas.metrics``, job ``refresh``): users and items refreshed,
refresh seconds, the served model version (``lum_model_info``) and its checkpoint's age.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.codec import DecodeError
from schemas.events import ITEM_VERSIONS, ConditionOutput, ItemEmbedding, LumFeatures
from schemas.settings import KafkaSettings
from schemas.tokenize import parse_condition
from schemas.topics import ITEM_EMBEDDINGS, LUM_FEATURES, USER_SEQUENCES, item_key, item_key_version, key_of

from .model import LumModel
from .packing import Seq, group_query_batch, inference_prefix, make_batch, pack_rows, to_tokens

log = logging.getLogger(__name__)
STATE_FILE = "refresh-state.json"
VIEW_DIR = "sequence-view"


class RefreshSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LUM_REFRESH_", extra="ignore")

    # Label-aligned by default: the joiner labels impressions by clicks, so "behavior=click" asks what the DLRM
    # predicts. One query per scenario instead got users nearly one answer on the demo's stream (scenarios come in
    # sessions: mean pairwise cosine 0.9998) and gave the DLRM nothing: AUC -0.0008 vs +0.0096 (seed 0).
    conditions: str = Field("behavior=click;behavior=view;scenario=home;scenario=search",
                            description="query conditions, ';'-separated "
                                        "(e.g. 'scenario=search;category=17,behavior=buy')")
    users_per_batch: int = Field(256, ge=1, description="users per group-query forward pass")
    idle_timeout_s: float = Field(5.0, gt=0, description="stop reading user-sequences after this idle time")
    state_file: str | None = Field(None, description="offsets of the last run (default: CHECKPOINT/refresh-state.json)")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu' or 'cuda'")
    group: str = Field("lum-refresh", description="consumer group id (offsets live in the state file)")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default); 1 on shared small hosts")
    # On the synthetic demo these queries carry the LUM's lift (AUC +0.0096 and +0.0037 on seeds 0 and 1; on seed
    # 0 without them, +0.0009 and -0.0008 for two condition lists): the shared answers are nearly one vector there.
    top_categories: int = Field(5, ge=0, le=32,
                                description="also publish CATEGORY_BASE,category=c for each user's N most frequent "
                                            "recent categories (the DLRM's own-category interest match); 0: off")
    category_base: str = Field("behavior=click", description="the condition those per-category queries refine: "
                               "the label's behavior (the joiner's clicks; 'behavior=buy' for a purchase label)")

    @field_validator("conditions")
    @classmethod
    def _parse(cls, v: str) -> str:
        names = [c.strip() for c in v.split(";") if c.strip()]
        if not names:
            raise ValueError("no conditions")
        for name in names:
            parse_condition(name)  # raises with the reason
        return v

    @field_validator("category_base")
    @classmethod
    def _parse_base(cls, v: str) -> str:
        parse_condition(v)  # raises with the reason
        if any(p.partition("=")[0].strip() == "category" for p in v.split(",")):
            raise ValueError("category_base must not fix a category (each published query adds its own)")
        return v

    def condition_list(self) -> list[str]:
        return [c.strip() for c in self.conditions.split(";") if c.strip()]


@torch.no_grad()
def condition_outputs(model: LumModel, seqs: list[Seq], conditions: np.ndarray, users_per_batch: int = 256,
                      device: str = "cpu") -> torch.Tensor:
    """Group query: (U, K, D) unit vectors, the output of each user's prefix under each of K conditions.

    ``conditions``: (K, n_kinds) for every user, or (U, K, n_kinds) per user (e.g. each user's candidate
    categories: ``category_conditions``). An items-only (SASRec-style) model answers with its output at the
    last item, the same for every condition.
    """
    cfg = model.cfg
    conditions = np.asarray(conditions, dtype=np.int64)
    K = conditions.shape[-2]
    model.eval()
    row_len = max(cfg.row_len, 2 * cfg.max_pairs + K)
    out = []
    for b in range(0, len(seqs), users_per_batch):
        part = seqs[b:b + users_per_batch]
        runs = [to_tokens(inference_prefix(s, cfg), cfg.use_conditions) for s in part]
        if cfg.use_conditions:
            conds = conditions if conditions.ndim == 2 else conditions[b:b + users_per_batch]
            batch, where = group_query_batch(runs, conds, row_len)
        else:  # the output at each user's last item
            rows = pack_rows([len(r) for r in runs], row_len)
            batch = make_batch(runs, rows, row_len)
            where = torch.zeros(len(runs), K, 2, dtype=torch.long)
            for r, members in enumerate(rows):
                t = 0
                for i in members:
                    t += len(runs[i])
                    where[i, :, 0], where[i, :, 1] = r, t - 1
        h = model(batch.to(device))  # (B, T, D)
        out.append(model.user_vectors(h[where[..., 0], where[..., 1]]).float().cpu())  # (u, K, D)
    return torch.cat(out) if out else torch.zeros(0, K, cfg.d_model)


def category_conditions(base: str, categories: list[list[int]]) -> tuple[np.ndarray, list[dict[int, int]]]:
    """Per-user query conditions for interest matching with each candidate's own category (paper 4.3).

    ``base`` (e.g. ``"behavior=liked"``) plus ``category=c`` for every category c of a user's candidates
    (the candidate categories of a batch); returns (U, K, n_kinds) conditions, padded by repeating the first,
    and per user {category: column}. Feed the conditions to ``condition_outputs`` and give each candidate
    the vector of its own category's column: cos(that vector, item vector) is the interest match.
    """
    from schemas.tokenize import CONDITION_KINDS, condition_id

    b = np.array(parse_condition(base), dtype=np.int64)
    c = CONDITION_KINDS.index("category")
    K = max(1, max((len(set(x)) for x in categories), default=1))
    out = np.tile(b, (len(categories), K, 1))
    cols: list[dict[int, int]] = []
    for u, cats in enumerate(categories):
        distinct = list(dict.fromkeys(int(x) for x in cats))
        cols.append({cat: k for k, cat in enumerate(distinct)})
        for k, cat in enumerate(distinct or [0]):
            out[u, k, c] = condition_id("category", cat)
        out[u, len(distinct):, c] = out[u, 0, c]
    return out, cols


def top_category_conditions(seqs: list[Seq], base: str, n: int, recent: int
                            ) -> tuple[np.ndarray, list[list[tuple[str, int, int]]]]:
    """Per user, ``base`` refined by each of the ``n`` most frequent categories of the last ``recent`` events
    (ties: the most recent first): (U, n', n_kinds) conditions for ``condition_outputs`` (one group-query pass)
    and per user [(condition name, category, column)], names like ``behavior=buy,category=17``: published with
    ``own_category`` set, so that the joiner and the scorer match each against candidates of its category."""
    prefix = "" if base.strip() in ("", "any", "*") else base.strip() + ","
    tops = []
    for s in seqs:
        cats = s.cats[-recent:].tolist()[::-1]  # newest first: Counter keeps first-seen order among ties
        tops.append([c for c, _ in Counter(cats).most_common(n)])
    conds, cols = category_conditions(prefix.rstrip(",") or "any", tops)
    return conds, [[(f"{prefix}category={c}", c, k) for c, k in col.items()] for col in cols]


def state_path(checkpoint: str | Path, settings: RefreshSettings) -> Path:
    if settings.state_file:
        return Path(settings.state_file)
    p = Path(checkpoint)
    return (p.parent if (p / "meta.json").exists() else p) / STATE_FILE


def refresh_once(checkpoint: str | Path, kafka: KafkaSettings, settings: RefreshSettings) -> dict:
    """One refresh; returns what it did: model_version, full (everyone republished), users, items, seconds
    (under torchrun: this rank's users and items)."""
    import torch.distributed as dist

    from streaming.kafka import DeadLetters, Output
    from trainers import launch

    from streaming.kafka.sequences import BackfillRunning, changed_since, check_no_backfill

    from .pretrain import load_checkpoint, load_items, pick_device

    t0 = time.perf_counter()
    rank, world, dev = launch.init()
    device = str(dev) if world > 1 else pick_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model, _, meta = load_checkpoint(checkpoint, device)
    version = meta["model_version"]
    names = settings.condition_list()
    conds = np.array([parse_condition(n) for n in names], dtype=np.int64)  # (K, n_kinds)

    spath = state_path(checkpoint, settings)
    topic = kafka.topic(USER_SEQUENCES)
    publisher = Output(kafka)
    shared: list = [None]
    if rank == 0:
        state = json.loads(spath.read_text()) if spath.exists() else {}
        same = state.get("model_version") == version and state.get("topic") == topic
        start = state.get("offsets") if same else None
        try:  # never from a half-rebuilt export: a backfill running before or during the read refuses the run
            backfill = check_no_backfill(kafka)
            # The export's one reader; a local fold next to the state file makes incremental reads cost the deltas only.
            seqs, offsets = changed_since(kafka, start, spath.parent / VIEW_DIR,
                                          DeadLetters(publisher, kafka, "lum-refresh"), settings.idle_timeout_s)
            check_no_backfill(kafka, backfill)
            users = sorted((Seq.from_user_sequence(s) for s in seqs.values() if s.pairs), key=lambda s: s.user_id)
            as_of = {s.user_id: max(p.event_time_ms for p in s.pairs) for s in seqs.values() if s.pairs}
            shared = [(same, offsets, users, as_of)]
        except BackfillRunning as e:
            shared = [e]
    if world > 1:
        dist.broadcast_object_list(shared, 0)
    if isinstance(shared[0], BackfillRunning):  # every rank stops, nothing published, offsets not stored
        raise shared[0]
    same, offsets, users, as_of = shared[0]
    mine = users[rank::world]
    log.info("refresh %s: %d changed users, %d on rank %d/%d (%s)", version, len(users), len(mine), rank, world,
             "incremental" if same else "full: new model")

    now = int(time.time() * 1000)
    trained_until = meta.get("trained_until_ms")
    feat_topic, item_topic = kafka.topic(LUM_FEATURES), kafka.topic(ITEM_EMBEDDINGS)
    last_log = time.perf_counter()
    top = settings.top_categories if model.cfg.use_conditions else 0  # an items-only model answers no categories
    for b in range(0, len(mine), settings.users_per_batch):
        chunk = mine[b:b + settings.users_per_batch]
        per_cat: list[list[ConditionOutput]] = [[] for _ in chunk]
        if top:
            # One group-query pass answers the shared conditions and each user's category queries together.
            qc, cols = top_category_conditions(chunk, settings.category_base, top, model.cfg.max_pairs)
            both = np.concatenate([np.broadcast_to(conds, (len(chunk), *conds.shape)), qc], axis=1)
            out = condition_outputs(model, chunk, both, settings.users_per_batch, device).tolist()  # (u, K + n, D)
            K = len(names)
            vecs = [v[:K] for v in out]
            per_cat = [[ConditionOutput(condition=name, vector=v[K + k], own_category=cat) for name, cat, k in col
                        if name not in names] for col, v in zip(cols, out)]
        else:
            vecs = condition_outputs(model, chunk, conds, settings.users_per_batch, device).tolist()  # (u, K, D)
        for seq, v, extra in zip(chunk, vecs, per_cat):
            msg = LumFeatures(user_id=seq.user_id, model_version=version, computed_at_ms=now,
                              as_of_ms=as_of[seq.user_id], trained_until_ms=trained_until,
                              conditions=[*(ConditionOutput(condition=n, vector=x) for n, x in zip(names, v)),
                                          *extra])
            publisher.produce(feat_topic, LUM_FEATURES.encode(msg), key_of(seq.user_id))
        if time.perf_counter() - last_log > 10:
            last_log = time.perf_counter()
            done = b + len(chunk)
            log.info("refresh: %d/%d users, %.0f users/s", done, len(mine), done / (last_log - t0))

    vocab = load_items(checkpoint)
    if vocab is not None:  # every item of the model version, once per version
        ids, cats = (vocab[0][rank::world], vocab[1][rank::world]) if not same else (np.zeros(0, np.int64),) * 2
    else:  # an older checkpoint without its item list: the items of the sequences read
        log.warning("%s has no items.npz: publishing embeddings of the items in the sequences read", meta["path"])
        items: dict[int, int] = {}
        for s in mine:
            items.update(zip(s.items.tolist(), s.cats.tolist()))  # last category seen wins
        ids = np.fromiter(items.keys(), np.int64, len(items))
        cats = np.fromiter(items.values(), np.int64, len(items))
    # A model trained with item-id dropout reads an item it never saw as its category: one record per category
    # of its items serves every new item of it (the joiner's fallback within the same model version).
    cold = np.zeros(0, np.int64)
    if model.cfg.item_id_dropout > 0 and not same and vocab is not None:
        cold = np.unique(vocab[1])[rank::world]
    # One pass over both: the items (id known), then the categories (no id: the category alone).
    all_ids, all_cats = np.concatenate([ids, np.zeros_like(cold)]), np.concatenate([cats, cold])
    known = np.arange(len(all_ids)) < len(ids)
    with torch.no_grad():
        for b in range(0, len(all_ids), 4096):
            i_b, c_b, k_b = all_ids[b:b + 4096], all_cats[b:b + 4096], known[b:b + 4096]
            vecs = model.item_vectors(*(torch.as_tensor(x, device=device) for x in (i_b, c_b, k_b)))
            for i, c, k, v in zip(i_b.tolist(), c_b.tolist(), k_b.tolist(), vecs.float().cpu().tolist()):
                msg = ItemEmbedding(item_id=i if k else None, category_id=c, model_version=version, vector=v,
                                    computed_at_ms=now)
                publisher.produce(item_topic, ITEM_EMBEDDINGS.encode(msg), item_key(version, i if k else None, c))
    failed = torch.zeros(1)
    try:
        publisher.flush()
    except RuntimeError:
        failed[0] = 1
        if world == 1:
            raise
        log.exception("rank %d: delivery failed", rank)
    if world > 1:
        dist.all_reduce(failed)  # offsets advance only when every rank delivered
        if failed[0]:
            raise RuntimeError(f"{int(failed[0])} rank(s) failed to deliver; offsets not stored")

    retired: list[str] = []
    if rank == 0 and not same:
        try:  # housekeeping: a failure costs storage, not correctness (the joiner keeps the newest versions)
            retired = retire_item_versions(kafka, publisher)
        except Exception:
            log.exception("retiring item-embedding versions failed (retried when a new model version is published)")
    if rank == 0:
        spath.parent.mkdir(parents=True, exist_ok=True)
        tmp = spath.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model_version": version, "topic": topic, "updated_at_ms": now,
                                   "offsets": offsets}))
        tmp.replace(spath)
    launch.barrier()
    dt = time.perf_counter() - t0
    log.info("refresh done: %d users, %d items, %d categories for new items, %d conditions%s in %.1fs (%.0f users/s)",
             len(mine), len(ids), len(cold), len(names), f" + up to {top} own categories" if top else "", dt,
             len(mine) / dt if dt else 0)
    return {"model_version": version, "full": not same, "users": [s.user_id for s in mine], "items": len(ids),
            "seconds": dt, "saved_at": meta.get("saved_at"), "retired_versions": retired}


def retire_item_versions(kafka: KafkaSettings, publisher, keep: int = ITEM_VERSIONS) -> list[str]:
    """Tombstone the ``item-embeddings`` records of every model version but the ``keep`` newest (by their newest
    record's timestamp: a run's publish time, as ``computed_at_ms``), so that compaction drops them. Two reads of
    the topic (the versions, then the retired versions' live keys): run when a new model version has been
    published. Keys written before keys named the version are judged by their latest value's version. Returns
    the versions whose records were tombstoned now, oldest first."""
    from streaming.kafka import read_to_end, reader

    topic = kafka.topic(ITEM_EMBEDDINGS)

    def records():
        consumer = reader(kafka)
        try:
            for m in read_to_end(consumer, topic):
                key, value = m.key(), m.value()
                version = item_key_version(key)
                if version is None and value:
                    try:
                        version = ITEM_EMBEDDINGS.decode(value).model_version
                    except DecodeError:
                        pass  # the joiner dead-letters it; nothing to retire
                yield key, value, version, m.timestamp()[1]
        finally:
            consumer.close()

    newest: dict[str, int] = {}
    for _, value, version, ts in records():
        if value and version is not None:
            newest[version] = max(newest.get(version, 0), ts)
    order = sorted(newest, key=newest.__getitem__)
    retired = set(order[:max(len(order) - keep, 0)])
    if not retired:
        return []
    live: dict[bytes, str] = {}  # key -> the retired version its latest value belongs to
    for key, value, version, _ in records():
        if item_key_version(key) is not None and version not in retired:
            continue
        if value and version in retired:
            live[key] = version
        else:  # a tombstone, or an unversioned key now holding a kept version
            live.pop(key, None)
    for key in live:
        publisher.produce(topic, None, key)
    publisher.flush()
    tombstoned = set(live.values())
    done = [v for v in order if v in tombstoned]
    if done:
        log.info("item-embeddings: %d records of %d retired model versions tombstoned (%s); %d newest kept",
                 len(live), len(done), ", ".join(done), keep)
    return done


def run(checkpoint: str, once: bool, every_minutes: float | None, kafka: KafkaSettings,
        settings: RefreshSettings) -> int:
    import os

    from schemas import metrics
    from trainers import launch

    rank = int(os.environ.get("RANK", 0))  # under torchrun: one endpoint per rank, LUM_METRICS_PORT + rank
    metrics.serve(offset=rank)
    rec = metrics.Recorder("refresh", rank)

    def refresh() -> None:  # users refreshed, served model version and its checkpoint's age
        r = refresh_once(checkpoint, kafka, settings)
        rec.refreshed(r["model_version"], len(r["users"]), r["items"], r["seconds"], r.get("saved_at"))

    from streaming.kafka.sequences import BackfillRunning

    if once or not every_minutes:
        try:
            refresh()
        except BackfillRunning as e:
            print(f"lum refresh: refusing: {e}", file=sys.stderr)
            return 1
        finally:
            launch.shutdown()
        return 0
    while True:
        try:
            refresh()
        except BackfillRunning as e:  # wait for the backfill: the next period reads the rebuilt export
            log.warning("lum refresh: refusing: %s Retrying at the next period.", e)
        except Exception:  # a periodic job outlives one failed run (broker away, checkpoint being written)
            log.exception("refresh failed; retrying at the next period")
        log.info("next refresh in %.1f min", every_minutes)
        time.sleep(every_minutes * 60)
