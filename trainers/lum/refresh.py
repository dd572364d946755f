"""LUM refresh (Step 2): publish condition outputs of users whose sequences changed, and item embeddings.

    lum refresh --checkpoint runs/lum --once
    LUM_REFRESH_CONDITIONS="scenario=home;scenario=search;category=17,behavior=buy" \
        lum refresh --checkpoint runs/lum --every 10

One run: load the newest checkpoint under ``--checkpoint``; read ``user-sequences`` from the offsets the
previous run stored in its state file (``refresh-state.json`` next to the checkpoints), or from the
beginning when the model version changed (a new model republishes everyone); keep the latest sequence per
user; answer the configured conditions for those users with one group-query pass per batch of users;
publish ``LumFeatures`` to ``lum-features`` (key = user id) and the ``ItemEmbedding`` of every item in the
sequences read to ``item-embeddings``; flush; then store the new offsets. A crash before the state is
written repeats the run (at-least-once; the topics are compacted, so repeats are harmless).
Settings: ``LUM_REFRESH_*`` (``RefreshSettings``). Conditions are separated by ';' (a condition may
contain ',', e.g. ``category=17,behavior=buy``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.events import ConditionOutput, ItemEmbedding, LumFeatures
from schemas.settings import KafkaSettings
from schemas.tokenize import parse_condition
from schemas.topics import ITEM_EMBEDDINGS, LUM_FEATURES, USER_SEQUENCES, key_of

from .model import LumModel
from .packing import Seq, group_query_batch, to_tokens, truncate_prefix

log = logging.getLogger(__name__)
STATE_FILE = "refresh-state.json"


class RefreshSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LUM_REFRESH_", extra="ignore")

    conditions: str = Field("scenario=home;scenario=search;scenario=detail",
                            description="query conditions, ';'-separated "
                                        "(e.g. 'scenario=search;category=17,behavior=buy')")
    users_per_batch: int = Field(256, ge=1, description="users per group-query forward pass")
    idle_timeout_s: float = Field(5.0, gt=0, description="stop reading user-sequences after this idle time")
    state_file: str | None = Field(None, description="offsets of the last run (default: CHECKPOINT/refresh-state.json)")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu' or 'cuda'")
    group: str = Field("lum-refresh", description="consumer group id (offsets live in the state file)")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default); 1 on shared small hosts")

    @field_validator("conditions")
    @classmethod
    def _parse(cls, v: str) -> str:
        names = [c.strip() for c in v.split(";") if c.strip()]
        if not names:
            raise ValueError("no conditions")
        for name in names:
            parse_condition(name)  # raises with the reason
        return v

    def condition_list(self) -> list[str]:
        return [c.strip() for c in self.conditions.split(";") if c.strip()]


@torch.no_grad()
def condition_outputs(model: LumModel, seqs: list[Seq], conditions: np.ndarray, users_per_batch: int = 256,
                      device: str = "cpu") -> torch.Tensor:
    """Group query: (U, K, D) unit vectors, the output of each user's prefix under each of K conditions."""
    cfg = model.cfg
    if not cfg.use_conditions:
        raise ValueError("an items-only model cannot answer condition queries")
    model.eval()
    row_len = max(cfg.row_len, 2 * cfg.max_pairs + len(conditions))
    out = []
    for b in range(0, len(seqs), users_per_batch):
        runs = [to_tokens(truncate_prefix(s, cfg.max_pairs)) for s in seqs[b:b + users_per_batch]]
        batch, where = group_query_batch(runs, conditions, row_len)
        h = model(batch.to(device))  # (B, T, D)
        out.append(model.user_vectors(h[where[..., 0], where[..., 1]]).float().cpu())  # (u, K, D)
    return torch.cat(out) if out else torch.zeros(0, len(conditions), cfg.d_model)


def state_path(checkpoint: str | Path, settings: RefreshSettings) -> Path:
    if settings.state_file:
        return Path(settings.state_file)
    p = Path(checkpoint)
    return (p.parent if (p / "meta.json").exists() else p) / STATE_FILE


def refresh_once(checkpoint: str | Path, kafka: KafkaSettings, settings: RefreshSettings) -> dict:
    """One refresh; returns what it did: model_version, full (everyone republished), users, items, seconds."""
    from streaming.kafka import DeadLetters, Output

    from .data import read_user_sequences
    from .pretrain import load_checkpoint, pick_device

    t0 = time.perf_counter()
    device = pick_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model, _, meta = load_checkpoint(checkpoint, device)
    version = meta["model_version"]
    names = settings.condition_list()
    conds = np.array([parse_condition(n) for n in names], dtype=np.int64)  # (K, n_kinds)

    spath = state_path(checkpoint, settings)
    state = json.loads(spath.read_text()) if spath.exists() else {}
    topic = kafka.topic(USER_SEQUENCES)
    same = state.get("model_version") == version and state.get("topic") == topic
    start = {int(p): o for p, o in state.get("offsets", {}).items()} if same else None
    publisher = Output(kafka)
    seqs, offsets = read_user_sequences(kafka, start, settings.idle_timeout_s, settings.group,
                                        DeadLetters(publisher, kafka, "lum-refresh"))
    users = [Seq.from_user_sequence(s) for s in seqs.values() if s.pairs]
    as_of = {s.user_id: max(p.event_time_ms for p in s.pairs) for s in seqs.values() if s.pairs}
    log.info("refresh %s: %d changed users (%s)", version, len(users), "incremental" if same else "full: new model")

    now = int(time.time() * 1000)
    feat_topic, item_topic = kafka.topic(LUM_FEATURES), kafka.topic(ITEM_EMBEDDINGS)
    last_log = time.perf_counter()
    for b in range(0, len(users), settings.users_per_batch):
        chunk = users[b:b + settings.users_per_batch]
        vecs = condition_outputs(model, chunk, conds, settings.users_per_batch, device).tolist()  # (u, K, D)
        for seq, v in zip(chunk, vecs):
            msg = LumFeatures(user_id=seq.user_id, model_version=version, computed_at_ms=now,
                              as_of_ms=as_of[seq.user_id],
                              conditions=[ConditionOutput(condition=n, vector=x) for n, x in zip(names, v)])
            publisher.produce(feat_topic, LUM_FEATURES.encode(msg), key_of(seq.user_id))
        if time.perf_counter() - last_log > 10:
            last_log = time.perf_counter()
            done = b + len(chunk)
            log.info("refresh: %d/%d users, %.0f users/s", done, len(users), done / (last_log - t0))

    items: dict[int, int] = {}
    for s in users:
        items.update(zip(s.items.tolist(), s.cats.tolist()))  # last category seen wins
    ids = np.fromiter(items.keys(), np.int64, len(items))
    cats = np.fromiter(items.values(), np.int64, len(items))
    with torch.no_grad():
        for b in range(0, len(ids), 4096):
            vecs = model.item_vectors(torch.as_tensor(ids[b:b + 4096], device=device),
                                      torch.as_tensor(cats[b:b + 4096], device=device)).float().cpu().tolist()
            for i, c, v in zip(ids[b:b + 4096].tolist(), cats[b:b + 4096].tolist(), vecs):
                msg = ItemEmbedding(item_id=i, category_id=c, model_version=version, vector=v, computed_at_ms=now)
                publisher.produce(item_topic, ITEM_EMBEDDINGS.encode(msg), key_of(i))
    publisher.flush()

    spath.parent.mkdir(parents=True, exist_ok=True)
    tmp = spath.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model_version": version, "topic": topic, "updated_at_ms": now,
                               "offsets": {str(p): o for p, o in offsets.items()}}))
    tmp.replace(spath)
    dt = time.perf_counter() - t0
    log.info("refresh done: %d users, %d items, %d conditions in %.1fs (%.0f users/s)", len(users), len(ids),
             len(names), dt, len(users) / dt if dt else 0)
    return {"model_version": version, "full": not same, "users": [s.user_id for s in users], "items": len(ids),
            "seconds": dt}


def run(checkpoint: str, once: bool, every_minutes: float | None, kafka: KafkaSettings,
        settings: RefreshSettings) -> int:
    if once or not every_minutes:
        refresh_once(checkpoint, kafka, settings)
        return 0
    while True:
        try:
            refresh_once(checkpoint, kafka, settings)
        except Exception:  # a periodic job outlives one failed run (broker away, checkpoint being written)
            log.exception("refresh failed; retrying at the next period")
        log.info("next refresh in %.1f min", every_minutes)
        time.sleep(every_minutes * 60)
