"""`WorkloadSpec`: one workload of a replica's scheduler, in a form that travels to Ray's replica processes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from batchplex import BatchPolicy, Scheduler

__all__ = ["WorkloadSpec"]


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload as `Scheduler.add_workload` takes it, except that the model is a factory.

    ``model_factory(device)`` is called once inside each replica, on the device that replica owns, so weights are
    built (or loaded) where they run and never pickled. ``adapter`` is a registered adapter's name and
    ``adapter_options`` its options (they are pickled to the replicas: a tokenizer is fine, an open file is not).
    """

    name: str
    adapter: str
    model_factory: Callable[[torch.device], Any]
    adapter_options: dict[str, Any] = field(default_factory=dict)
    policy: BatchPolicy = field(default_factory=BatchPolicy)
    weight: float = 1.0

    def add_to(self, scheduler: Scheduler, device: torch.device) -> None:
        """Add this workload to ``scheduler`` with a model built for ``device``."""
        scheduler.add_workload(self.name, adapter=self.adapter, adapter_options=dict(self.adapter_options),
                               model=self.model_factory(device), policy=self.policy, device=device,
                               weight=self.weight)
