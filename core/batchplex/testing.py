"""Tools for testing adapters and code that uses batchplex: a fake adapter, the adapter contract check, a log of
finished batches and TorchScript set up as batchplex advises (`scripting`).

Plugin authors run `check_adapter` against their own adapter with a few sample requests and a model: it checks
that ``prepare``/``cost``/``collate``/``split`` keep the contract and that every request's result, batched with
the others (and padded, if asked), equals its result run alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .adapter import Adapter, check_split
from .collate import split_rows, stack_to_device
from .errors import InvalidRequestError
from .hookspecs import hookimpl
from .metrics import BatchRecord

__all__ = ["BatchLog", "FakeAdapter", "check_adapter", "assert_same_result", "scripting", "wait_until"]


@contextlib.contextmanager
def scripting() -> Iterator[None]:
    """TorchScript set up as batchplex advises for scripted models (see the README's "Several workloads on one
    GPU"): TorchScript's fusers off for the whole block (its default fuser fails on torchvision's detectors on CUDA,
    and it reads the process-wide flags whenever it optimizes), and torch 2.14's deprecation warning for
    ``torch.jit.script`` silenced. Script the model and serve it inside the block."""
    with warnings.catch_warnings(), torch.jit.fuser("none"):
        warnings.filterwarnings("ignore", message=".*torch.jit.script. is deprecated", category=FutureWarning)
        yield


class BatchLog:
    """A plugin that keeps the `BatchRecord` of every finished batch, in the order they finished: register it with
    ``Scheduler(plugins=[log])`` and read ``log.records`` (clear it to start a measured window)."""

    def __init__(self) -> None:
        self.records: list[BatchRecord] = []

    @hookimpl
    def batch_finished(self, record: BatchRecord) -> None:
        self.records.append(record)


class FakeAdapter(Adapter[tuple]):
    """Requests are numbers; a batch is a float tensor of shape (batch, 1); results are the model's rows.

    ``fail_on`` holds request values whose collation raises (an adapter-level fault), ``cost_of`` maps a value to
    its cost (default 1), and every call is counted so tests can assert what ran.
    """

    name = "fake"

    def __init__(self, fail_on: Sequence[float] = (), cost_of: Callable[[float], int] | None = None) -> None:
        self.fail_on = set(fail_on)
        self.cost_of = cost_of
        self.collated_batches: list[list[float]] = []

    def prepare(self, item: Any, **params: Any) -> tuple:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise InvalidRequestError(f"a fake request must be a number, got {type(item).__name__}",
                                      rule="number", value=item)
        return (float(item), params)

    def cost(self, prepared: tuple) -> int:
        return self.cost_of(prepared[0]) if self.cost_of else 1

    def collate(self, items: Sequence[tuple], device: torch.device, batch_size: int) -> torch.Tensor:
        values = [value for value, _ in items]
        self.collated_batches.append(values)
        poisoned = self.fail_on.intersection(values)
        if poisoned:
            raise ValueError(f"fake adapter refuses to collate {sorted(poisoned)}")
        rows = [torch.tensor([value]) for value in values]
        return stack_to_device(rows, device, batch_size)

    def split(self, output: Any, items: Sequence[tuple]) -> list[Any]:
        return split_rows(output, len(items))


def assert_same_result(batched: Any, alone: Any, *, rtol: float = 1e-5, atol: float = 1e-6, where: str = "") -> None:
    """Compare two results of the same structure (tensors compared with tolerances)."""
    if isinstance(alone, torch.Tensor):
        assert isinstance(batched, torch.Tensor), f"{where}: expected a tensor, got {type(batched).__name__}"
        assert batched.shape == alone.shape, f"{where}: shape {tuple(batched.shape)} != {tuple(alone.shape)}"
        torch.testing.assert_close(batched.cpu(), alone.cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
    elif isinstance(alone, dict):
        assert set(batched) == set(alone), f"{where}: keys {sorted(batched)} != {sorted(alone)}"
        for key in alone:
            assert_same_result(batched[key], alone[key], rtol=rtol, atol=atol, where=f"{where}[{key!r}]")
    elif isinstance(alone, (list, tuple)):
        assert len(batched) == len(alone), f"{where}: length {len(batched)} != {len(alone)}"
        for index, (b, a) in enumerate(zip(batched, alone)):
            assert_same_result(b, a, rtol=rtol, atol=atol, where=f"{where}[{index}]")
    else:
        assert batched == alone, f"{where}: {batched!r} != {alone!r}"


def check_adapter(adapter: Adapter, samples: Sequence[Any], model: Callable, *, device: str | torch.device = "cpu",
                  pad_to: int | None = None, rtol: float = 1e-5, atol: float = 1e-6) -> list[Any]:
    """Check ``adapter`` against the contract with ``samples`` and ``model``; return the batched results.

    Asserts that it has a name, that ``cost`` is a non-negative int, that ``split`` returns one result per
    request (the core's own check), and that each batched result equals the sample run alone.
    """
    device = torch.device(device)
    assert isinstance(adapter, Adapter), f"{adapter!r} is not a batchplex.Adapter"
    assert adapter.name, f"{type(adapter).__name__} has no name"
    assert len(samples) >= 2, "check_adapter needs at least two samples to form a batch"
    prepared = [adapter.prepare(sample) for sample in samples]
    for item in prepared:
        cost = adapter.cost(item)
        assert isinstance(cost, int) and cost >= 0, f"cost() must return an int >= 0, got {cost!r}"
    batch_size = max(pad_to or 0, len(prepared))
    with torch.inference_mode():
        batched = _run(adapter, prepared, model, device, batch_size)
        for index, item in enumerate(prepared):
            alone = _run(adapter, [item], model, device, 1)[0]
            assert_same_result(batched[index], alone, rtol=rtol, atol=atol, where=f"{adapter.name} sample {index}")
    return batched


def _run(adapter: Adapter, items: list, model: Callable, device: torch.device, batch_size: int) -> list[Any]:
    inputs = adapter.collate(items, device, batch_size)
    output = adapter.postprocess(model(inputs), inputs, items)
    return list(check_split(adapter.name, adapter.split(output, items), len(items)))


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, poll: float = 0.001) -> None:
    """Wait on the event loop until ``predicate()`` holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"condition not reached within {timeout} s"
        await asyncio.sleep(poll)
