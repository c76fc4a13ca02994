"""The two data moves of a ranking batch: transposing jagged segments, and staging host tensors for the device.

Jagged data here is a grid of segments (one id list per sample and feature) stored row by row: ``lengths`` holds
the segment lengths row-major, ``values`` the segments back to back. Requests arrive sample-major (rows are
samples), a `KeyedJaggedTensor` is key-major (rows are features), so a batch is turned with one
``fbgemm::permute_1D_sparse_data`` call whose permutation depends only on the grid's shape and is cached.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from batchplex.collate import host_buffer, to_device

from ._torchrec import load

__all__ = ["transpose_segments", "stage"]


@functools.lru_cache(maxsize=64)
def _transpose_permutation(rows: int, cols: int) -> torch.Tensor:
    """Segment order of the transposed grid: entry ``c * rows + r`` is segment ``r * cols + c`` (read-only)."""
    return torch.arange(rows * cols, dtype=torch.int32).view(rows, cols).t().contiguous().view(-1)


def transpose_segments(lengths: torch.Tensor, values: torch.Tensor, weights: torch.Tensor | None, rows: int,
                       cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Turn a ``rows x cols`` grid of segments into its ``cols x rows`` transpose: (lengths, values, weights).

    One fbgemm call on host tensors (the CPU build of fbgemm has no CUDA kernels, so this never runs on a GPU).
    """
    return load().permute_1d(_transpose_permutation(rows, cols), lengths, values, weights, values.numel())


def stage(parts: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Move host tensors of one dtype to ``device`` as a single pinned buffer and a single non-blocking copy.

    Returns views of the device buffer shaped like ``parts``. On the CPU the parts are returned unchanged (they
    are fresh tensors already, so a copy would only cost time).
    """
    if device.type == "cpu":
        return list(parts)
    sizes = [part.numel() for part in parts]
    staged = host_buffer((sum(sizes),), parts[0].dtype, device)
    torch.cat([part.reshape(-1) for part in parts], out=staged)
    moved = to_device(staged, device)
    return [chunk.view(part.shape) for chunk, part in zip(moved.split(sizes), parts)]
