"""batchplex-vision: image adapters for batchplex, found through the entry point ``vision`` (group ``batchplex``).

* ``image``: fixed-size images (classification and any fixed-input image model), transported as uint8 and
  normalized on the device, one output row per request (`ImageAdapter`);
* ``detection``: images of any size, handed to the model as a list of on-device float images, one dict of boxes,
  labels and scores per request in the image's own coordinates (`DetectionAdapter`).

Installing the distribution is all it takes: ``Scheduler().add_workload(..., adapter="image", ...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import batchplex
import torch
from batchplex.workloads import ExampleWorkload

from ._examples import vision_examples
from .classification import IMAGENET_MEAN, IMAGENET_STD, ImageAdapter
from .detection import DetectionAdapter, model_area

__all__ = ["ImageAdapter", "DetectionAdapter", "IMAGENET_MEAN", "IMAGENET_STD", "model_area", "register_adapters",
           "example_workloads"]


@batchplex.hookimpl
def register_adapters(register: Callable[[batchplex.Adapter], None]) -> None:
    """Register the ``image`` and ``detection`` adapters (called by batchplex when it loads this plugin)."""
    register(ImageAdapter())
    register(DetectionAdapter())


@batchplex.hookimpl
def example_workloads(device: torch.device) -> list[ExampleWorkload]:
    """Offer the ``classify`` and ``detect`` example workloads (random weights) to ``batchplex demo``."""
    return vision_examples(device)
