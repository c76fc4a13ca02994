"""Shared pytest set-up for the core's and the plugins' tests.

Tests marked ``gpu`` need CUDA and are skipped cleanly without it; ``devices`` parametrizes a test over the CPU
and, where present, the first CUDA device, so every CUDA path has a CPU twin that runs in CI.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """The CPU, and the first CUDA device when there is one."""
    return torch.device(request.param)
