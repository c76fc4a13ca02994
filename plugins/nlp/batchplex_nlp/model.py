"""`HFModel`: calls a Hugging Face model the way the scheduler calls a model, with one argument.

The scheduler runs ``model(inputs)`` with the adapter's collated batch as its one positional argument; the text
adapter's batch is a dict of tensors, and a Hugging Face model wants them as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["HFModel"]


class HFModel(torch.nn.Module):
    """Wraps ``model`` so that ``HFModel(model)(batch)`` is ``model(**batch)``; puts it in eval mode (no dropout).

    It is a ``torch.nn.Module``, so the scheduler moves it to the workload's device and copies it per device.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> Any:
        return self.model(**batch)
