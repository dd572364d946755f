"""The Grafana dashboard and the Prometheus config agree with the code and with docker-compose.yml."""

import json
import re
from pathlib import Path

import yaml

from schemas import metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "lum-stream.json"


def _exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_every_dashboard_query_names_metrics_the_code_exports():
    exprs = _exprs()
    assert exprs
    for expr in exprs:
        names = set(re.findall(r"\blum_[a-z_]+", expr))
        assert names, f"query without a lum_ metric: {expr}"
        unknown = names - metrics.NAMES
        assert not unknown, f"{expr}: {sorted(unknown)} not exported by schemas.metrics"


def test_dashboard_shows_what_operators_watch():
    joined = " ".join(_exprs())
    for metric in ("lum_consumer_lag", "lum_events_consumed_total", "lum_dead_letters_total",
                   "lum_refresh_last_timestamp_seconds", "lum_trainer_window_auc", "lum_trainer_window_ne",
                   "lum_trainer_examples_total", "lum_checkpoint_last_timestamp_seconds"):
        assert metric in joined, metric


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/lum.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert (ROOT / mounts[path]).resolve() == DASHBOARD.parent.resolve()
    source = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    ds = source["datasources"][0]
    dash = json.loads(DASHBOARD.read_text())
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {ds["uid"]}
    assert ds["url"].split("//")[1].split(":")[0] in compose["services"]


def test_prometheus_scrapes_every_long_running_service():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    port = int(compose["x-lum"]["environment"]["LUM_METRICS_PORT"])
    for name, service in compose["services"].items():
        command = service.get("command") or []
        if command[:1] in (["agents"], ["refresh"], ["train"]) and "--once" not in command:
            workers = int(command[command.index("--workers") + 1]) * 2 if "--workers" in command else 1
            for i in range(workers):  # sequence and joiner workers: port + i each
                assert f"{name}:{port + i}" in targets, f"{name} worker {i} is not scraped"
    assert compose["x-lum"]["environment"]["LUM_METRICS_HOST"] == "0.0.0.0"  # reachable from the prometheus container
