"""Deployment files agree with the code: every docker-compose command is a real ``lum`` command line."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_compose_commands_parse_with_the_lum_cli():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    parser = build_parser()
    lum_services = {name: s for name, s in compose["services"].items() if "command" in s and name != "kafka"}
    assert {"topics", "agents", "pretrain", "refresh", "trainer-baseline", "trainer-lum"} <= set(lum_services)
    for name, service in lum_services.items():
        args = parser.parse_args(service["command"])  # exits (fails the test) on an unknown command or flag
        assert callable(args.handler), name
        assert service["environment"]["LUM_KAFKA_BOOTSTRAP"] == "kafka:9092"


def test_compose_file_is_valid_for_compose_v2():
    tool = shutil.which("docker-compose") or "/tmp/lum-compose/bin/docker-compose"
    if not Path(tool).exists():
        pytest.skip("no docker-compose binary here (make check-compose installs one)")
    subprocess.run([tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], check=True)


def test_readme_documents_every_setting():
    import importlib

    from deploy.cli import SETTINGS_CLASSES
    from schemas.settings import settings_help

    readme = (ROOT / "README.md").read_text()
    for module, name in SETTINGS_CLASSES:
        for env, _default, _doc in settings_help(getattr(importlib.import_module(module), name)):
            assert f"`{env}`" in readme, f"README lacks {env} (regenerate the table with `lum config`)"
