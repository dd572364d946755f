"""The README documents every environment variable the code reads: every field of every settings class (found
by importing the packages, not from a list) and every variable read directly through ``os.environ``/``getenv``."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from pydantic_settings import BaseSettings

from schemas.settings import settings_help

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "streaming", "trainers", "deploy")
# Reads, not writes: os.environ.get("X"), os.environ["X"] (not followed by "="), getenv("X"), "X" in os.environ.
READS = (r"""os\.environ\.get\(\s*["']([A-Z][A-Z0-9_]*)["']""",
         r"""os\.environ\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\](?!\s*=[^=])""",
         r"""getenv\(\s*["']([A-Z][A-Z0-9_]*)["']""",
         r"""["']([A-Z][A-Z0-9_]*)["']\s+(?:not\s+)?in\s+os\.environ""")


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def _settings_classes() -> set[type[BaseSettings]]:
    for pkg in PACKAGES:
        for mod in pkgutil.walk_packages([str(ROOT / pkg)], prefix=pkg + "."):
            importlib.import_module(mod.name)
    found, todo = set(), list(BaseSettings.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.split(".")[0] in PACKAGES:
            found.add(cls)
    return found


def test_every_settings_class_is_listed_by_lum_config():
    from deploy.cli import SETTINGS_CLASSES

    listed = {(m, n) for m, n in SETTINGS_CLASSES}
    missing = {(c.__module__, c.__name__) for c in _settings_classes()} - listed
    assert not missing, f"add to deploy.cli.SETTINGS_CLASSES (and the README): {sorted(missing)}"


def test_readme_documents_every_setting():
    readme = _readme()
    classes = _settings_classes()
    assert len(classes) >= 8
    for cls in classes:
        for env, _default, _doc in settings_help(cls):
            assert f"`{env}`" in readme, f"README lacks {env} of {cls.__name__} (regenerate with `lum config`)"


def test_readme_documents_every_variable_read_directly():
    readme = _readme()
    read: dict[str, str] = {}
    for path in [*ROOT.glob("schemas/**/*.py"), *ROOT.glob("streaming/**/*.py"), *ROOT.glob("trainers/**/*.py"),
                 *ROOT.glob("deploy/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/**/*.py")]:
        if path.name == "test_readme.py":  # its own examples
            continue
        text = path.read_text()
        for pattern in READS:
            for name in re.findall(pattern, text):
                read.setdefault(name, str(path.relative_to(ROOT)))
    assert "CALF_TANSU_BIN" in read  # the scan finds what it should
    undocumented = {n: where for n, where in read.items() if f"`{n}`" not in readme}
    assert not undocumented, f"README lacks these environment variables (read in): {undocumented}"


def test_scan_tells_reads_from_writes():
    text = 'os.environ["A_READ"]; os.environ["NOT_READ"] = "1"; os.environ.get("B_READ"); "C_READ" in os.environ'
    names = {n for p in READS for n in re.findall(p, text)}
    assert names == {"A_READ", "B_READ", "C_READ"}
