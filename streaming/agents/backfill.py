"""``lum backfill sequences``: rebuild the sequence agent's state and export from ``behaviors``.

    lum backfill sequences [--from TIME]      # refuses while the sequence agents' group has members

Refuses while the agents' consumer group has live members, then runs the sequence agent's own logic
(``SequenceLogic``) over every ``behaviors`` partition, keeping events whose payload (event) time is at
or after TIME (default: all) into fresh state stores where the agents keep theirs, writes a new export base
(``streaming.kafka.sequences.publish_reset``: every rebuilt user's full sequence to ``user-sequences``, a
tombstone for users that had a sequence but no event since TIME, and markers past every older delta),
and sets the agent group's offsets to the end of what it read, so that ``lum agents`` continues from there.
From its start to its end it marks the export as being rebuilt (``streaming.kafka.sequences.mark_backfill``):
``lum refresh`` refuses to read it meanwhile, and after an interrupted backfill until one completes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from confluent_kafka import TopicPartition

from schemas.codec import DecodeError
from schemas.progress import progress

from schemas.settings import KafkaSettings
from schemas.topics import BEHAVIORS

from ..kafka import DeadLetters, Output, group_consumer, partitions_of, read_to_end, reader
from .runtime import Crash
from ..kafka.sequences import export_users, mark_backfill, publish_reset
from .sequences import SequenceLogic, read_sequences
from .settings import AgentSettings
from .store import Record, RocksStore
from .worker import KafkaEmit, state_identity

log = logging.getLogger(__name__)


def backfill_sequences(settings: KafkaSettings, cfg: AgentSettings, from_ms: int | None = None,
                       max_future_ms: int | None = None) -> dict[str, int]:
    from ..replay import MAX_FUTURE_MS, check_group_idle, records_after, start_offsets

    group = settings.topic_prefix + cfg.sequences_group
    check_group_idle(settings, group)
    started_ms = int(time.time() * 1000)
    mark_backfill(settings, started_ms, finished=False)  # readers (lum refresh) refuse the export until the end
    out = Output(settings)
    emit = KafkaEmit(out, settings, DeadLetters(out, settings, "backfill-sequences"), Crash())
    logic = SequenceLogic.from_settings(cfg)
    src = settings.topic(BEHAVIORS)
    root = Path(cfg.data_dir) / "sequences" / (settings.topic_prefix + cfg.sequences_group)
    old_users, delta_ends = export_users(settings)  # user -> partition of users with a sequence now
    consumer = reader(settings)
    starts = start_offsets(consumer, src, from_ms, MAX_FUTURE_MS if max_future_ms is None else max_future_ms)
    parts = partitions_of(consumer, src)
    identity = state_identity(settings, consumer, [src])
    consumer.close()
    ends = {p: starts.get(p, 0) for p in parts}
    stores = {}
    for p in parts:
        stores[p] = store = RocksStore(root / f"p{p}", identity | {"partition": p})
        logic.reset(store)
        logic.stores[p] = store
    kept = 0
    batch: dict[int, list[Record]] = {p: [] for p in parts}

    def apply(p: int) -> None:
        logic.process(p, batch[p], emit)
        stores[p].commit({})
        batch[p].clear()

    consumer = reader(settings)
    with progress("backfill sequences", records_after(settings, src, starts), "records") as bar:
        for m in read_to_end(consumer, src, starts):
            ends[m.partition()] = m.offset() + 1  # where the agents resume: everything read, kept or not
            bar.update(1)
            if from_ms is not None:
                try:
                    if BEHAVIORS.decode(m.value()).event_time_ms < from_ms:  # payload (event) time selects
                        continue
                except DecodeError:
                    pass  # the agent's own logic dead-letters it below
            kept += 1
            bar.note(kept=kept)
            b = batch[m.partition()]
            b.append(Record(BEHAVIORS.name, m.partition(), m.offset(), m.timestamp()[1], m.key(), m.value()))
            if len(b) >= cfg.batch_size:
                apply(m.partition())
                out.flush()
    consumer.close()
    for p in parts:
        if batch[p]:
            apply(p)
    out.flush()
    tombstones = users = 0

    def counted(rows):  # the rebuilt users, counted as they are published (one read of each store)
        nonlocal users
        for row in rows:
            users += 1
            yield row

    for p in parts:  # the new base: every rebuilt user, tombstones for users without events since from_ms
        mine = [u for u, q in old_users.items() if q == p]
        have = {u for u, _ in read_sequences(stores[p], mine)}
        gone = [u for u in mine if u not in have]
        publish_reset(settings, out, p, counted(read_sequences(stores[p])), gone, delta_ends.get(p, 0))
        tombstones += len(gone)
    for p in parts:
        stores[p].commit({BEHAVIORS.name: ends[p]})
    committer = group_consumer(settings, group)
    committer.commit(offsets=[TopicPartition(src, p, o) for p, o in ends.items()], asynchronous=False)
    committer.close()
    for store in stores.values():
        store.close()
    mark_backfill(settings, started_ms, finished=True)
    log.info("backfill: %d users rebuilt, %d tombstones, offsets %s", users, tombstones, ends)
    return {"users": users, "tombstones": tombstones, "events": kept}
