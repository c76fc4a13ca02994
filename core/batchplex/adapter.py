"""The adapter contract: what a workload plugin implements so the core can batch its requests.

An adapter owns its workload's data. The core calls it at four moments:

1. ``prepare(item, **params)`` at submit, on the caller's thread, once per request: validate and turn the raw
   request into a cheap-to-collate form (tokenize one text, flatten one request's sparse features). Raise
   `InvalidRequestError` for bad input: only that caller sees it.
2. ``cost(prepared)`` right after, for bucketing and budgets (tokens, pixels; 1 when every request costs the same).
3. ``collate(items, device, batch_size)`` on the device executor: build the model's input for the whole batch on
   ``device``, vectorized, padded up to ``batch_size >= len(items)`` rows when the policy asks for fixed sizes.
4. ``split(output, items)`` after the model ran (and after ``postprocess`` on the device): one result per item, in
   order. Padding rows beyond ``len(items)`` are dropped here.

The core checks the contract around these calls (`check_split`) and names both numbers when it is broken.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Generic, TypeVar

import torch

from .errors import ContractError

__all__ = ["Adapter", "check_split"]

Prepared = TypeVar("Prepared")


class Adapter(Generic[Prepared]):
    """Base class of workload adapters. Subclasses set ``name`` and implement ``prepare``, ``collate``, ``split``.

    A registered adapter is a prototype: each workload gets its own instance from ``configure(**options)``, so
    buffers and options are never shared between workloads.
    """

    name: ClassVar[str] = ""
    #: Copy the model's output to host memory before ``split`` (False keeps results on the device).
    copy_output_to_host: bool = True
    #: ``postprocess`` reads only the output and the inputs (never ``items``) and launches only device work of
    #: fixed shapes: with ``cuda_graphs`` the graphed model runs it, captured in its graph (and eagerly where it
    #: runs eagerly: on the CPU, after a failed capture, past its graph limit), always with ``items=()``.
    graph_postprocess: bool = False

    def configure(self, **options: Any) -> Adapter[Prepared]:
        """A fresh instance for one workload, built with ``options`` (the ``adapter_options`` of `add_workload`)."""
        return type(self)(**options)

    def prepare(self, item: Any, **params: Any) -> Prepared:
        """Validate one request and return its prepared form. Raise `InvalidRequestError` for bad input."""
        raise NotImplementedError(f"adapter {self.name!r} must implement prepare()")

    def cost(self, prepared: Prepared) -> int:
        """The request's cost for bucketing and ``max_batch_cost`` (e.g. its length in tokens)."""
        return 1

    def padded_cost(self, costs: Sequence[int], batch_size: int) -> int:
        """What a batch with these costs really computes on, padding included (for budgets and waste)."""
        return batch_size * max(costs)

    def collate(self, items: Sequence[Prepared], device: torch.device, batch_size: int) -> Any:
        """Build the model input for ``items`` on ``device``, padded up to ``batch_size`` rows."""
        raise NotImplementedError(f"adapter {self.name!r} must implement collate()")

    def postprocess(self, output: Any, inputs: Any, items: Sequence[Prepared]) -> Any:
        """Reduce the model output on the device before it is copied to the host (e.g. masked mean pooling)."""
        return output

    def split(self, output: Any, items: Sequence[Prepared]) -> Sequence[Any]:
        """One result per item, in the order of ``items``."""
        raise NotImplementedError(f"adapter {self.name!r} must implement split()")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} adapter {self.name!r}>"


def check_split(adapter_name: str, results: object, expected: int) -> Sequence[Any]:
    """The contract check around ``split``: it must return a sequence with one result per request."""
    if not isinstance(results, Sequence):
        raise ContractError(
            f"adapter {adapter_name!r}: split() must return a sequence of {expected} results, "
            f"got {type(results).__name__}")
    if len(results) != expected:
        raise ContractError(
            f"adapter {adapter_name!r}: split() returned {len(results)} results for a batch of {expected} "
            f"requests; it must return exactly one per request (drop padding rows)")
    return results
