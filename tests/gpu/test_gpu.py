"""GPU-only checks (``gpu`` marker: skipped without CUDA): FlexAttention outputs on the GPU match the CPU
reference for packed and group-query batches, and the DLRM trains with its tables on the GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

pytestmark = pytest.mark.gpu


def test_flex_attention_on_gpu_matches_cpu_reference():
    import torch

    import gpu_check

    assert gpu_check.check_outputs(torch.device("cuda", 0)) == []


def test_dlrm_trains_with_gpu_tables():
    import torch

    import gpu_check

    r = gpu_check.bench_dlrm(torch.device("cuda", 0), batches=2, B=1024)
    assert r["examples_per_s"] > 0
