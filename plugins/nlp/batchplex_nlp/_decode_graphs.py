"""CUDA graphs of `BlockEngine`'s decode forward: one per (batch bucket, length bucket), all captured at start.

A decode step of a Hugging Face model launches a few hundred small kernels from Python (per layer: norms,
projections, rotary embedding, the cache's scatter and gather, attention); replaying a captured graph launches them
all at once, so the step's host time no longer grows with the model's depth. Everything the forward reads lives
in static buffers: the step's token ids, positions and table rows (copied into ``meta`` before each replay), the
block tables and the KV pools; cache indices and the attention mask are computed inside the graph from those.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from batchplex import capture_graph

__all__ = ["DecodeGraphs"]

#: ``forward(ids [B, 1], positions [B, 1], rows [B], length) -> logits [B, vocab]``
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class DecodeGraphs:
    """Captures and replays ``forward`` for padded batches; ``padding`` is the (id, position, row) of a padding
    row, whose forward touches nothing a sequence owns (graphs are captured on padding rows only)."""

    def __init__(self, forward: Forward, max_batch: int, padding: tuple[int, int, int], device: torch.device) -> None:
        self._forward = forward
        self._device = device
        self._padding = torch.tensor(padding, device=device)[:, None]
        self._meta = torch.zeros(3, max_batch, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()  # shared: graphs replay one at a time

    def __len__(self) -> int:
        return len(self._graphs)

    def capture(self, batch: int, length: int) -> None:
        meta = self._meta[:, :batch]
        meta.copy_(self._padding.expand(-1, batch))

        self._graphs[batch, length] = capture_graph(
            lambda: self._forward(meta[0, :, None], meta[1, :, None], meta[2], length), self._device, pool=self._pool)

    def replay(self, meta: torch.Tensor, length: int) -> torch.Tensor:
        """The logits of the batch ``meta`` (``[3, batch]`` ids, positions, rows, on the host) over ``length``
        cached positions; overwritten by the next replay."""
        self._meta[:, :meta.shape[1]].copy_(meta, non_blocking=True)
        graph, logits = self._graphs[meta.shape[1], length]
        graph.replay()
        return logits
