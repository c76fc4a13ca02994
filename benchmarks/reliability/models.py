"""Models and an adapter the scenarios run, each recording what it was asked to do.

`DelayModel` stands in for a device-bound model whose cost is known: output ``2 * x + 1`` after ``base_ms +
per_item_ms * batch`` of device time. On CUDA the delay is a GPU spin (``torch.cuda._sleep``), so the host
thread is free as with a real kernel; on the CPU it is ``time.sleep``, which releases the GIL the same way. It
can inject the faults the suite studies: a ``ValueError`` for poisoned values, ``torch.OutOfMemoryError`` above
a batch size (CPU stand-in), or a real CUDA out-of-memory by allocating ``hungry_bytes_per_item`` per request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from batchplex.testing import FakeAdapter

__all__ = ["AtLeast", "Call", "DelayModel", "TimedFakeAdapter", "mlp", "small_cnn", "cuda_cycles_per_ms"]

_CYCLES_PER_MS: dict[int, float] = {}


def cuda_cycles_per_ms(device: torch.device) -> float:
    """GPU clock cycles per millisecond for ``torch.cuda._sleep`` on ``device`` (measured once, cached)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CYCLES_PER_MS:
        with torch.cuda.device(index):
            cycles = 20_000_000
            torch.cuda._sleep(cycles // 10)  # warm-up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            _CYCLES_PER_MS[index] = cycles / start.elapsed_time(end)
    return _CYCLES_PER_MS[index]


@dataclass
class Call:
    """One model call: host times around it, the batch size, the first value of each row, and what happened."""

    started: float
    ended: float
    size: int
    values: list[float]
    outcome: str  # "ok", "poison", "oom"


class DelayModel:
    """``2 * x + 1`` after a known delay; optional faults; every call recorded in ``calls`` (thread-safe)."""

    def __init__(self, base_ms: float = 1.0, per_item_ms: float = 0.0, device: str | torch.device = "cpu", *,
                 poison: Sequence[float] = (), oom_above: int | None = None, hungry_bytes_per_item: int = 0,
                 record_values: bool = False) -> None:
        self.base_ms = base_ms
        self.per_item_ms = per_item_ms
        self.device = torch.device(device)
        self.poison = torch.tensor(sorted(poison), dtype=torch.float32, device=self.device) if poison else None
        self.oom_above = oom_above
        self.hungry_bytes_per_item = hungry_bytes_per_item
        self.record_values = record_values or bool(poison)
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._cycles_per_ms = cuda_cycles_per_ms(self.device) if self.device.type == "cuda" else 0.0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        n = batch.shape[0]
        values = batch.reshape(n, -1)[:, 0].tolist() if self.record_values else []
        outcome = "ok"
        try:
            if self.oom_above is not None and n > self.oom_above:
                outcome = "oom"
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected above batch size {self.oom_above}): "
                                             f"tried batch size {n}")
            if self.poison is not None:
                hit = batch[torch.isin(batch, self.poison)]
                if hit.numel():
                    outcome = "poison"
                    raise ValueError(f"poisoned values {sorted(set(hit.tolist()))}")
            if self.hungry_bytes_per_item:
                try:
                    scratch = torch.empty(n * self.hungry_bytes_per_item, dtype=torch.uint8, device=self.device)
                except torch.OutOfMemoryError:
                    outcome = "oom"
                    raise
                scratch.fill_(1)
                del scratch
            self._delay(self.base_ms + self.per_item_ms * n)
            return batch * 2 + 1
        finally:
            with self._lock:
                self.calls.append(Call(started, time.perf_counter(), n, values, outcome))

    def _delay(self, ms: float) -> None:
        if self.device.type == "cuda":
            torch.cuda._sleep(int(ms * self._cycles_per_ms))
        else:
            time.sleep(ms / 1000.0)

    def sizes(self, outcome: str | None = None) -> list[int]:
        return [call.size for call in self.calls if outcome is None or call.outcome == outcome]


class TimedFakeAdapter(FakeAdapter):
    """`FakeAdapter` that also records when each batch was collated and which values it held."""

    name = "timed-fake"

    def __init__(self, fail_on: Sequence[float] = ()) -> None:
        super().__init__(fail_on=fail_on)
        self.collations: list[tuple[float, list[float]]] = []

    def collate(self, items: Sequence[tuple], device: torch.device, batch_size: int) -> Any:
        self.collations.append((time.perf_counter(), [value for value, _ in items]))
        return super().collate(items, device, batch_size)


class AtLeast:
    """Runs ``model``, then waits until ``ms`` have passed since the call began: a fixed floor of device time.

    On a shared CPU a small model's speed swings with whatever else runs there; a floor well above its compute
    time (the way a GPU kernel's time would be) keeps the capacity, and so "70% load", steady.
    """

    def __init__(self, model: Any, ms: float) -> None:
        self.model = model
        self.ms = ms

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        output = self.model(batch)
        left = self.ms / 1000.0 - (time.perf_counter() - started)
        if left > 0:
            time.sleep(left)
        return output


def mlp(device: str | torch.device = "cpu", features: int = 256) -> torch.nn.Module:
    """The soak's tensor workload: a 2-layer MLP, ``features`` -> 1024 -> 16."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(features, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 16))
    return model.to(device).eval()


def small_cnn(device: str | torch.device = "cpu") -> torch.nn.Module:
    """The soak's second workload: a small convolutional classifier over 3x32x32 images."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
    return model.to(device).eval()
