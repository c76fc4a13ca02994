"""The built-in plugin: the generic ``tensor`` adapter, registered exactly like an installed plugin's adapters.

A ``tensor`` request is one sample (a tensor or anything `torch.as_tensor` takes) of a fixed shape; a batch is the
samples stacked along a new first dimension, and the model's output is split back one row per request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .adapter import Adapter
from .collate import split_rows, stack_to_device
from .errors import InvalidRequestError
from .hookspecs import hookimpl
from .policy import BatchPolicy
from .workloads import ExampleWorkload

__all__ = ["TensorAdapter"]

_STRIDED = torch.strided  # read per request: a module global, not two attribute lookups


class TensorAdapter(Adapter[torch.Tensor]):
    """Same-shape tensors stacked into one batch tensor.

    ``shape`` and ``dtype`` fix what a request must look like; left out, the first request's shape and dtype fix
    them for the workload. ``allow_nonfinite=False`` refuses NaN/inf in floating-point requests.
    """

    name = "tensor"

    def __init__(self, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None,
                 allow_nonfinite: bool = False) -> None:
        self.shape = tuple(shape) if shape is not None else None
        self.dtype = dtype
        self.allow_nonfinite = allow_nonfinite

    def prepare(self, item: Any, **params: Any) -> torch.Tensor:
        if params:
            raise InvalidRequestError(f"the tensor adapter takes no request parameters, got {sorted(params)}",
                                      rule="no parameters", value=sorted(params))
        if not isinstance(item, torch.Tensor):
            try:
                item = torch.as_tensor(item)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise InvalidRequestError(f"a tensor request must be a tensor or array-like, got "
                                          f"{type(item).__name__} ({exc})", rule="tensor-like", value=type(item))
        # is_meta, not device.type: reading .device builds a device object, ~7x the cost of the flag
        if item.layout is not _STRIDED or item.is_nested or item.is_meta:
            raise InvalidRequestError(f"a tensor request must be a dense tensor with data, got layout "
                                      f"{item.layout}{' (nested)' if item.is_nested else ''} on {item.device}",
                                      rule="dense tensor", value=str(item.layout))
        shape = item.shape  # a torch.Size, a tuple: compared as is, converted only to keep or report it
        if self.shape is None:
            self.shape = tuple(shape)
        if shape != self.shape:
            raise InvalidRequestError(f"request shape {tuple(shape)} differs from the workload's shape "
                                      f"{self.shape}", rule="same shape", value=tuple(shape))
        if self.dtype is None:
            self.dtype = item.dtype
        if item.dtype is not self.dtype:  # dtypes are singletons
            raise InvalidRequestError(f"request dtype {item.dtype} differs from the workload's dtype {self.dtype}",
                                      rule="same dtype", value=item.dtype)
        if not self.allow_nonfinite and item.is_floating_point() and not _all_finite(item):
            raise InvalidRequestError("request holds NaN or infinite values (allow_nonfinite=False)",
                                      rule="finite values", value=_first_nonfinite(item))
        return item

    def collate(self, items: Sequence[torch.Tensor], device: torch.device, batch_size: int) -> torch.Tensor:
        return stack_to_device(items, device, batch_size)

    def split(self, output: Any, items: Sequence[torch.Tensor]) -> list[Any]:
        return split_rows(output, len(items))


def _all_finite(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 1:  # one scalar: a Python check is ~10x cheaper than a tensor op
        return math.isfinite(tensor.item())
    return bool(torch.isfinite(tensor).all())


def _first_nonfinite(tensor: torch.Tensor) -> float:
    flat = tensor.detach().reshape(-1)
    return float(flat[~torch.isfinite(flat)][0]) if flat.numel() else math.nan


@hookimpl
def register_adapters(register: Callable[[Adapter], None]) -> None:
    register(TensorAdapter())


@hookimpl
def example_workloads(device: torch.device) -> list[ExampleWorkload]:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 16))
    return [ExampleWorkload(
        name="mlp", adapter="tensor", adapter_options={"shape": (256,), "dtype": torch.float32},
        model=mlp.to(device).eval(), make_request=lambda rng: torch.randn(256),
        make_bad_request=lambda rng: torch.randn(rng.choice((255, 257))),
        policy=BatchPolicy(max_batch_size=64, max_wait_ms=5), description="a 2-layer MLP on 256 features")]
