"""schemas.metrics: the Recorder's figures reach a real /metrics endpoint and read back with the client's parser."""

import socket
import time

import pytest

from schemas import metrics
from schemas.metrics import MetricsSettings, Recorder
from streaming.broker import free_port


def test_defaults_bind_localhost_and_are_off(monkeypatch):
    monkeypatch.delenv("LUM_METRICS_HOST", raising=False)
    monkeypatch.delenv("LUM_METRICS_PORT", raising=False)
    assert MetricsSettings().host == "127.0.0.1"
    assert metrics.serve() is None  # port 0: no endpoint


def test_recorded_figures_are_scraped(monkeypatch):
    port = free_port()
    monkeypatch.setenv("LUM_METRICS_PORT", str(port - 2))
    assert metrics.serve(offset=2) == port  # worker 2 of a job: port + index
    rec = Recorder("test-joiner", worker=3)
    rec.consumed("impressions", 1, 250)
    rec.lag("impressions", 1, 42)
    rec.dead_letter("impressions", ValueError("bad json at byte 7"))
    rec.dead_letter("impressions", "DecodeError: unknown format")
    with rec.batch():
        time.sleep(0.01)
    rec.examples(emitted=9, late=2)
    rec.state(open_windows=17)
    rec.trained(512)
    rec.window(auc=0.71, ne=0.93, logloss=0.39)
    rec.checkpointed(time.time() - 30)

    s = metrics.scrape(port)
    job = {"job": "test-joiner", "worker": "3"}
    assert metrics.total(s, "lum_events_consumed_total", topic="impressions", partition="1", **job) == 250
    assert metrics.total(s, "lum_consumer_lag", **job) == 42
    assert metrics.total(s, "lum_dead_letters_total", reason="ValueError", **job) == 1
    assert metrics.total(s, "lum_dead_letters_total", reason="DecodeError", **job) == 1
    assert metrics.total(s, "lum_batch_seconds_count", **job) == 1
    assert metrics.total(s, "lum_batch_seconds_sum", **job) >= 0.01
    assert metrics.total(s, "lum_examples_emitted_total", **job) == 9
    assert metrics.total(s, "lum_agent_state", name="open_windows", **job) == 17
    assert 0 < metrics.total(s, "lum_first_batch_timestamp_seconds", **job) <= metrics.total(
        s, "lum_last_batch_timestamp_seconds", **job) <= time.time()
    assert metrics.total(s, "lum_examples_late_total", **job) == 2
    assert metrics.total(s, "lum_trainer_examples_total", **job) == 512
    assert metrics.total(s, "lum_trainer_window_ne", **job) == pytest.approx(0.93)
    assert 30 <= metrics.total(s, "lum_checkpoint_age_seconds", **job) < 60
    assert {name for name, _ in s if name.startswith("lum_")} <= metrics.NAMES


def test_served_model_version_is_one_series_that_follows_refreshes():
    port = free_port()
    metrics.serve(port=port)
    rec = Recorder("test-refresh")
    rec.refreshed("small-100-aaaa", users=10, items=5, seconds=1.5, model_saved_at=time.time() - 600)
    rec.refreshed("small-200-bbbb", users=3, seconds=0.5)
    s = metrics.scrape(port)
    versions = [dict(lab)["model_version"] for name, lab in s if name == "lum_model_info"
                and dict(lab)["job"] == "test-refresh"]
    assert versions == ["small-200-bbbb"]
    assert metrics.total(s, "lum_refresh_users_total", job="test-refresh") == 13
    assert metrics.total(s, "lum_refresh_seconds_count", job="test-refresh") == 2
    assert metrics.total(s, "lum_model_age_seconds", job="test-refresh") >= 600
    assert metrics.total(s, "lum_refresh_age_seconds", job="test-refresh") < 60


def test_port_in_use_fails_naming_the_setting():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit, match="LUM_METRICS_PORT"):
            metrics.serve(port=taken.getsockname()[1])


def test_dead_letter_reasons_stay_low_cardinality():
    assert metrics.reason_of(KeyError("user 123")) == "KeyError"
    assert metrics.reason_of("DecodeError: empty message") == "DecodeError"
    assert metrics.reason_of("value for user 123456 is not valid") == "other"


def test_scrape_of_a_closed_port_is_empty():
    assert metrics.scrape(free_port()) == {}


def test_agent_figures_turn_cumulative_counts_into_counters():
    port = free_port()
    metrics.serve(port=port)
    rec = Recorder("test-agent")
    rec.agent_figures({"examples_total": 5, "late_clicks_total": 1, "open_windows": 30})
    rec.agent_figures({"examples_total": 12, "late_clicks_total": 1, "open_windows": 4})
    s = metrics.scrape(port)
    assert metrics.total(s, "lum_examples_emitted_total", job="test-agent") == 12
    assert metrics.total(s, "lum_examples_late_total", job="test-agent") == 1
    assert metrics.total(s, "lum_agent_state", job="test-agent", name="open_windows") == 4
