"""Building blocks adapters use to collate batches and split outputs, the same on CUDA and on the CPU.

Host staging buffers come from `torch.empty(..., pin_memory=True)`: PyTorch's caching host allocator keeps
pinned blocks for reuse (no ``cudaHostAlloc`` on the hot path after warm-up) and records an event on every
``non_blocking`` copy out of a block, so a block is handed out again only after its copy finished. On the CPU the
buffers are plain tensors and the "copy" is the identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["on_host", "host_buffer", "to_device", "copy_to_pinned_host", "stack_to_device", "split_rows", "map_tensors",
           "opaque_leaves"]


def on_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached on the host; returned as is when it is there already.

    For ``prepare``, which runs on the event loop: ``tensor.detach().cpu()`` is two dispatcher calls even when
    both are no-ops, and each one releases the GIL and must take it back. Under load, with executor threads
    holding the GIL, each such round trip kept the loop waiting for about 0.1 ms (H200 host).
    """
    if tensor.is_cpu and not tensor.requires_grad:
        return tensor
    return tensor.detach().cpu()


def host_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised host tensor to stage a batch in: pinned when it is bound for a CUDA device."""
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=device.type == "cuda")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a staged host tensor to ``device`` without blocking the host (no-op on the CPU)."""
    if tensor.device == device or device.type == "cpu":
        return tensor
    return tensor.to(device, non_blocking=True)


def copy_to_pinned_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start copying a CUDA tensor into pinned host memory without blocking (host tensors pass through).

    The copy is ordered on the current stream: wait on an event recorded after it before reading the result.
    """
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def stack_to_device(tensors: Sequence[torch.Tensor], device: torch.device, batch_size: int | None = None
                    ) -> torch.Tensor:
    """Stack same-shape tensors into one host buffer (zero rows pad it to ``batch_size``) and move it once."""
    n = len(tensors)
    rows = batch_size or n
    if rows == n and device.type == "cpu":  # nothing to pad, pin or move: one op instead of three
        return torch.stack(tuple(tensors))
    first = tensors[0]
    staged = host_buffer((rows, *first.shape), first.dtype, device)
    torch.stack(tuple(tensors), out=staged[:n])
    if rows > n:
        staged[n:].zero_()
    return to_device(staged, device)


def split_rows(output: Any, n: int) -> list[Any]:
    """Cut a batched output into its first ``n`` rows: tensors, and tuples/lists/dicts of tensors, keep their shape.

    One ``unbind`` per tensor; the rows are views of the batch output (no per-row copy).
    """
    if isinstance(output, torch.Tensor):
        return list((output if len(output) == n else output[:n]).unbind(0))
    if isinstance(output, Mapping):
        columns = {key: split_rows(value, n) for key, value in output.items()}
        return [{key: column[i] for key, column in columns.items()} for i in range(n)]
    if isinstance(output, (tuple, list)):
        columns = [split_rows(value, n) for value in output]
        return [type(output)(column[i] for column in columns) if isinstance(output, tuple) else
                [column[i] for column in columns] for i in range(n)]
    raise TypeError(f"split_rows() cannot split a {type(output).__name__}; return tensors (or tuples/dicts of them)")


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor in a nest of tuples, lists, dicts (Hugging Face outputs included) and
    dataclasses; other objects pass through unchanged (see `opaque_leaves`)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        mapped = {key: map_tensors(fn, value) for key, value in obj.items()}
        try:
            return type(obj)(mapped)
        except TypeError:
            return mapped
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, value) for value in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(fn, getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def opaque_leaves(obj: Any) -> list[Any]:
    """Objects inside a nest that `map_tensors` cannot see into (e.g. a torchrec ``KeyedJaggedTensor``)."""
    if isinstance(obj, (torch.Tensor, str, bytes, int, float, bool, type(None), torch.dtype, torch.device)):
        return []
    if isinstance(obj, Mapping):
        return [leaf for value in obj.values() for leaf in opaque_leaves(value)]
    if isinstance(obj, (tuple, list)):
        return [leaf for value in obj for leaf in opaque_leaves(value)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [leaf for f in dataclasses.fields(obj) for leaf in opaque_leaves(getattr(obj, f.name))]
    return [obj]
