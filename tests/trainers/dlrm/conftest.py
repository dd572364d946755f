"""One torch thread for these tests: the 2 CI cores are shared, and OpenMP spin-waiting with 2 threads makes
DLRM steps 10-30x slower under contention (benchmarks/bench_dlrm.py)."""

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
