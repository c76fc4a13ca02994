"""Shared by the vision benchmarks: synthetic image requests and the detector's resize.

Measuring and writing results is `harness`'s job (the machine, the command and the date on every result).
"""

from __future__ import annotations

import random

import torch

#: fasterrcnn_mobilenet_v3_large_320_fpn resizes to a shorter side of 320 and a longer side of at most 640.
DETECTOR_RESIZE = (320, 640)


def uint8_image(rng: random.Random, height: int, width: int) -> torch.Tensor:
    """A random uint8 CHW image, seeded from ``rng`` (requests are made before the timed window)."""
    generator = torch.Generator().manual_seed(rng.getrandbits(32))
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
