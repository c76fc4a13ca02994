"""Example workloads for ``batchplex demo`` and profiling: a classifier and a detector with random weights, and
generators of realistic (and of malformed) image requests.

On CUDA the classifier takes 224x224 images in float16 and channels_last; on the CPU it takes 96x96 images in
float32, and queues are short, so that a demo on a laptop answers "queue full" early instead of draining a
long backlog. Detection requests vary in size and aspect ratio and are bucketed by
the area the model computes on.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torchvision
from batchplex import BatchPolicy
from batchplex.workloads import ExampleWorkload

__all__ = ["vision_examples"]

#: torchvision's fasterrcnn_mobilenet_v3_large_320_fpn resizes the shorter side to 320, the longer to at most 640.
DETECTOR_RESIZE = (320, 640)


def vision_examples(device: torch.device) -> list[ExampleWorkload]:
    """The ``classify`` (``image`` adapter) and ``detect`` (``detection`` adapter) examples, built for ``device``."""
    cuda = device.type == "cuda"
    side = 224 if cuda else 96
    classifier = torchvision.models.resnet18(weights=None).eval().to(device)
    if cuda:
        classifier = classifier.to(dtype=torch.float16, memory_format=torch.channels_last)
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None).eval().to(device)
    min_size = DETECTOR_RESIZE[0]
    return [
        ExampleWorkload(
            name="classify", adapter="image", model=classifier, description=f"resnet18, {side}x{side} uint8 images",
            adapter_options={"size": (side, side), "channels_last": cuda,
                             "dtype": torch.float16 if cuda else torch.float32},
            policy=BatchPolicy(max_batch_size=64 if cuda else 16, max_wait_ms=5, max_queue=1024 if cuda else 128),
            make_request=lambda rng: _image(rng, side, side), make_bad_request=_bad_image),
        ExampleWorkload(
            name="detect", adapter="detection", model=detector,
            description="fasterrcnn_mobilenet_v3_large_320_fpn, images of any size",
            adapter_options={"model_resize": DETECTOR_RESIZE},
            policy=BatchPolicy(max_batch_size=8 if cuda else 2, max_wait_ms=10, max_queue=256 if cuda else 8,
                               bucket_edges=tuple(min_size * long for long in (400, 520, 640))),
            make_request=lambda rng: _image(rng, rng.randint(64, 320), rng.randint(64, 320)),
            make_bad_request=_bad_image),
    ]


def _image(rng: random.Random, height: int, width: int) -> torch.Tensor | np.ndarray:
    """A uint8 image, as a CHW tensor or an HWC numpy array (both are common in services)."""
    pixels = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    return pixels if rng.random() < 0.5 else pixels.permute(1, 2, 0).numpy()


def _bad_image(rng: random.Random) -> object:
    """A malformed request: four channels, a NaN pixel, a batch instead of one image, or not an image at all."""
    kind = rng.randrange(4)
    if kind == 0:
        return torch.zeros(4, 32, 32, dtype=torch.uint8)
    if kind == 1:
        return torch.full((3, 32, 32), float("nan"))
    if kind == 2:
        return torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    return "image.jpg"
