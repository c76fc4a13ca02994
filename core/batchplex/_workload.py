"""Where a workload runs: its lanes (one per device, each with an executor and the workloads placed on it) and
the per-workload state the scheduler keeps (adapter, model replicas, policy, queue, statistics, fair-share time).
"""

from __future__ import annotations

import asyncio
import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._batching import RequestQueue
from ._executor import DeviceExecutor
from .adapter import Adapter
from .metrics import WorkloadStats
from .policy import BatchPolicy

__all__ = ["Lane", "Workload", "devices_of", "replicas_of"]


class Lane:
    """One device's executor: the workloads sharing it, how many of their batches are in flight and how many may be
    (``depth``). A device has one shared lane, plus one per workload with a dedicated executor (``owner``)."""

    def __init__(self, device: torch.device, depth: int, owner: str | None = None) -> None:
        self.device = device
        self.depth = depth
        self.owner = owner
        self.executor: DeviceExecutor | None = None
        self.workloads: list[Workload] = []
        self.in_flight = 0


class Workload:
    """One named stream of requests: an adapter, a model replica per device, a policy and its queue."""

    def __init__(self, name: str, adapter: Adapter, models: dict[torch.device, Callable], policy: BatchPolicy,
                 weight: float) -> None:
        self.name = name
        self.adapter = adapter
        self.unit_cost = type(adapter).cost is Adapter.cost  # every request costs 1: submit skips the call
        self.models = models
        self.postprocess_in_model = False  # the models run the adapter's postprocess (captured in their graphs)
        self.policy = policy
        self.weight = weight
        self.queue = RequestQueue(policy, name)
        self.stats = WorkloadStats()
        self.lanes: list[Lane] = []
        self.device_time = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf
        self.pump_soon = False

    def forward(self, model: Callable, inputs: Any, items: Sequence[Any]) -> Any:
        """One of this workload's models on a collated batch, then the adapter's postprocess unless the model ran
        it already: the one rule for every caller that runs a batch."""
        output = model(inputs)
        return output if self.postprocess_in_model else self.adapter.postprocess(output, inputs, items)

    @property
    def share(self) -> float:
        """Device time used per unit of weight: the fair-share key (smallest goes next)."""
        return self.device_time / self.weight

    def __repr__(self) -> str:
        return f"<Workload {self.name!r} adapter={self.adapter.name!r} devices={[str(d) for d in self.models]}>"


def devices_of(device: str | torch.device | Sequence) -> list[torch.device]:
    items = [device] if isinstance(device, (str, torch.device)) else list(device)
    if not items:
        raise ValueError("device must name at least one device")
    devices = [_indexed(torch.device(d)) for d in items]
    if len(set(devices)) != len(devices):
        raise ValueError(f"device lists a device twice: {[str(d) for d in devices]}")
    return devices


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` means the current CUDA device: name it, so threads can select it and lanes compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def replicas_of(name: str, model: Callable | Sequence[Callable], devices: list[torch.device]
              ) -> dict[torch.device, Callable]:
    if isinstance(model, Sequence):
        if len(model) != len(devices):
            raise ValueError(f"workload {name!r}: {len(model)} models for {len(devices)} devices; give one model "
                             f"per device or a single torch.nn.Module to copy")
        return dict(zip(devices, model))
    if not callable(model):
        raise TypeError(f"workload {name!r}: model must be callable, got {type(model).__name__}")
    replicas = {}
    for index, device in enumerate(devices):
        replica = model if index == 0 else copy.deepcopy(model)
        if isinstance(replica, torch.nn.Module):
            replica = replica.to(device)
        replicas[device] = replica
    return replicas
