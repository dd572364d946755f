"""`lum train` / `lum report` parse as documented without importing torch; settings errors name the variable."""

from __future__ import annotations

import argparse
import sys

import pytest

from schemas.settings import SettingsError, load
from trainers.dlrm.cli import DLRMSettings, register


def _parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bootstrap")
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command", required=True), common)
    return p


def test_commands_parse_without_importing_torch():
    had_torch = "torch" in sys.modules
    a = _parser().parse_args(["train", "--features", "lum", "--checkpoint-dir", "d", "--until-caught-up"])
    assert (a.features, a.checkpoint_dir, a.until_caught_up) == ("lum", "d", True)
    a = _parser().parse_args(["report", "d1", "d2", "--out", "x.png"])
    assert a.dirs == ["d1", "d2"] and a.out == "x.png"
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--features", "wide", "--checkpoint-dir", "d"])
    if not had_torch:
        assert "torch" not in sys.modules


def test_settings(monkeypatch):
    monkeypatch.setenv("LUM_DLRM_LUM_CONDITIONS", "scenario=home; scenario=search")
    monkeypatch.setenv("LUM_DLRM_LUM_DIM", "64")
    s = load(DLRMSettings)
    assert s.lum_conditions == ["scenario=home", "scenario=search"] and s.lum_dim == 64
    monkeypatch.setenv("LUM_DLRM_BATCH_SIZE", "0")
    with pytest.raises(SettingsError, match="LUM_DLRM_BATCH_SIZE"):
        load(DLRMSettings)


def test_gpu_check_fails_cleanly_without_cuda():
    import subprocess
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/gpu covers it")
    root = Path(__file__).resolve().parents[3]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr
