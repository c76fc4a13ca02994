"""`StepAdapter`: the contract of adapters for step models (see `batchplex.continuous` for how they are run)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .adapter import Adapter, Prepared
from .errors import ContractError

if TYPE_CHECKING:
    from ._continuous_policy import ContinuousPolicy

__all__ = ["StepAdapter", "StepOutput", "TokenStreamer"]


class StepOutput(NamedTuple):
    """What one step produced for one sequence. A plain ``(handle, new_token_ids, finished)`` tuple also works."""

    handle: Hashable
    tokens: Sequence[int]
    finished: bool
    error: str | BaseException | None = None


class TokenStreamer:
    """Turns one stream's token ids into the items it yields (here: the ids themselves). Lives on the event loop."""

    def push(self, new_tokens: Sequence[int]) -> list[Any]:
        """The items to yield for the tokens one step produced."""
        return list(new_tokens)

    def finish(self) -> list[Any]:
        """The items still held back when the sequence ends (e.g. an incomplete multi-byte character)."""
        return []


class StepAdapter(Adapter[Prepared]):
    """Base class of adapters for step models, run by a `ContinuousWorkload` (see the module docstring).

    It is a `batchplex.Adapter`, so step adapters are registered, found by name and configured exactly like batch
    adapters (``register_adapters`` hook, ``add_workload(adapter="name", adapter_options=...)``); the batch-only
    methods ``collate``/``split`` refuse to run. Every method but ``prepare``/``cost``/``streamer``/``result`` is
    called on the workload's step thread only, so the adapter needs no lock for its running state.
    """

    def start(self, model: Any, device: torch.device, policy: ContinuousPolicy) -> None:
        """Take ``model`` onto ``device`` and allocate what the steps need, sized by ``policy`` (step thread, once)."""
        raise NotImplementedError(f"step adapter {self.name!r} must implement start()")

    def admit(self, prepared: Prepared) -> Hashable:
        """Add one request to the running batch; return its handle."""
        raise NotImplementedError(f"step adapter {self.name!r} must implement admit()")

    def step(self) -> Sequence[StepOutput | tuple]:
        """Run one iteration for every admitted sequence; one `StepOutput` per sequence that made progress."""
        raise NotImplementedError(f"step adapter {self.name!r} must implement step()")

    def release(self, handle: Hashable) -> None:
        """Forget the sequence ``handle`` and free its memory (finished, cancelled or timed out)."""
        raise NotImplementedError(f"step adapter {self.name!r} must implement release()")

    def close(self) -> None:
        """Free everything ``start`` allocated (step thread, once, after the last step)."""

    def memory(self) -> dict[str, Any]:
        """Memory figures for `ContinuousWorkload.statistics` (e.g. the free fraction of a KV cache)."""
        return {}

    def result(self, prepared: Prepared, tokens: list[int]) -> Any:
        """What ``submit`` returns for a sequence that generated ``tokens`` (event loop thread)."""
        return tokens

    def streamer(self, prepared: Prepared) -> TokenStreamer:
        """The `TokenStreamer` of one ``stream`` (event loop thread)."""
        return TokenStreamer()

    def collate(self, items: Sequence[Prepared], device: torch.device, batch_size: int) -> Any:
        raise ContractError(f"adapter {self.name!r} is a step adapter: run it in a continuous workload")

    def split(self, output: Any, items: Sequence[Prepared]) -> Sequence[Any]:
        raise ContractError(f"adapter {self.name!r} is a step adapter: run it in a continuous workload")
