"""Fixtures of the vision plugin's tests: small torchvision models with seeded random weights, built once."""

import asyncio

import pytest
import torch
import torchvision


@pytest.fixture(autouse=True)
def exact_float32():
    """Full float32 convolutions on CUDA (cuDNN uses TF32 by default, ~1e-3 relative error) so that batched and
    alone results compare at the tolerances the tests state; restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def resnet():
    """resnet18 with random weights in eval mode (tests move it to their device)."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="session")
def detector():
    """fasterrcnn_mobilenet_v3_large_320_fpn with random weights, keeping every box (score threshold 0) so
    there are boxes to compare, at most 10 per image."""
    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0, box_detections_per_img=10).eval()


@pytest.fixture
def submit_all():
    """Submit items concurrently to one workload; returns the results in order."""
    async def run(scheduler, workload, items):
        return await asyncio.gather(*(scheduler.submit(workload, item) for item in items))
    return run


@pytest.fixture
def device(device):
    """The shared ``device`` fixture with an explicit CUDA index: batchplex's executor threads call
    ``torch.cuda.set_device``, which recent torch refuses for a bare ``cuda`` device."""
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device
