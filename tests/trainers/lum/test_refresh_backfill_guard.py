"""``lum refresh`` never reads the sequence export while ``lum backfill sequences`` is rebuilding it."""

from __future__ import annotations

import pytest
import torch

import streaming.agents.backfill as backfill_mod
import streaming.kafka.sequences as export
from deploy.cli import main as lum
from schemas.events import BehaviorEvent
from schemas.settings import load
from schemas.topics import BEHAVIORS, LUM_FEATURES, key_of
from streaming.agents.backfill import backfill_sequences
from streaming.agents.settings import AgentSettings
from streaming.kafka import Output, read_to_end, reader
from trainers.lum.model import PRESETS, LumModel
from trainers.lum.pretrain import save_checkpoint
from trainers.lum.refresh import STATE_FILE, RefreshSettings, refresh_once


T0 = 1_767_225_600_000


def produce_behaviors(kafka, n: int) -> None:
    out = Output(kafka)
    for i in range(n):
        e = BehaviorEvent(event_id=f"g{i}", user_id=i % 7, item_id=i, category_id=i % 3, behavior="view",
                          scenario="home", event_time_ms=T0 + i * 1000)
        out.produce(kafka.topic(BEHAVIORS), BEHAVIORS.encode(e), key_of(e.user_id))
    out.flush()


def features(kafka) -> list:
    c = reader(kafka)
    try:
        return [m.value() for m in read_to_end(c, kafka.topic(LUM_FEATURES), idle_timeout_s=10)]
    finally:
        c.close()


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("LUM_REFRESH_IDLE_TIMEOUT_S", "3")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "lum", LumModel(PRESETS["debug"]), None, step=1)
    return tmp_path / "lum"


def test_refresh_refuses_while_a_backfill_rebuilds_the_export_and_runs_after_it(kafka, tmp_path, checkpoint,
                                                                               monkeypatch, capsys):
    produce_behaviors(kafka, 40)
    cfg = load(AgentSettings, data_dir=tmp_path / "agents")
    seen = []
    publish_reset = backfill_mod.publish_reset

    def in_the_middle(*args, **kw):  # the backfill has replayed, and is writing the new base
        if not seen:
            with pytest.raises(export.BackfillRunning, match="lum backfill sequences"):
                refresh_once(checkpoint, kafka, load(RefreshSettings))
            seen.append(lum(["refresh", "--checkpoint", str(checkpoint), "--once"]))
        return publish_reset(*args, **kw)

    monkeypatch.setattr(backfill_mod, "publish_reset", in_the_middle)
    assert backfill_sequences(kafka, cfg)["users"] == 7
    assert seen == [1]
    err = capsys.readouterr().err
    assert "refusing" in err and "lum backfill sequences" in err and export.BACKFILL_GROUP in err
    assert not (checkpoint / STATE_FILE).exists() and features(kafka) == []  # nothing used
    # Finished: the refresh reads the rebuilt export.
    assert sorted(refresh_once(checkpoint, kafka, load(RefreshSettings))["users"]) == list(range(7))


def test_an_interrupted_backfill_keeps_refresh_off_until_one_completes(kafka, tmp_path, checkpoint, monkeypatch):
    produce_behaviors(kafka, 20)
    cfg = load(AgentSettings, data_dir=tmp_path / "agents")

    def crash(*args, **kw):
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(backfill_mod, "publish_reset", crash)
        with pytest.raises(RuntimeError, match="killed"):
            backfill_sequences(kafka, cfg)
    with pytest.raises(export.BackfillRunning, match="run it again"):
        refresh_once(checkpoint, kafka, load(RefreshSettings))
    backfill_sequences(kafka, cfg)
    assert sorted(refresh_once(checkpoint, kafka, load(RefreshSettings))["users"]) == list(range(7))


def test_a_backfill_starting_during_the_read_discards_the_run(kafka, checkpoint, monkeypatch):
    produce_behaviors(kafka, 10)
    changed_since = export.changed_since

    def read_while_a_backfill_starts(kafka_, *args, **kw):
        got = changed_since(kafka_, *args, **kw)
        export.mark_backfill(kafka_, 1_800_000_000_000, finished=False)
        return got

    monkeypatch.setattr(export, "changed_since", read_while_a_backfill_starts)
    with pytest.raises(export.BackfillRunning):
        refresh_once(checkpoint, kafka, load(RefreshSettings))
    assert not (checkpoint / STATE_FILE).exists()
    export.mark_backfill(kafka, 1_800_000_000_000, finished=True)
    assert export.backfill_state(kafka) == (1_800_000_000_000,) * 2  # finished: refresh runs again
    assert refresh_once(checkpoint, kafka, load(RefreshSettings))["full"] and (checkpoint / STATE_FILE).exists()
