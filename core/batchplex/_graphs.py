"""CUDA graphs for fixed batch shapes (opt-in): capture a model once per input shape, replay it afterwards.

A replayed graph launches the whole forward pass as one unit, which removes the per-kernel launch cost that
dominates small batches (ResNet-50 at batch 1 on an H200: 3.3 ms eager, 0.9 ms replayed). Graphs need static
shapes, so they pay off with ``preferred_batch_sizes`` (every batch padded up to one of a few sizes).

Each distinct input signature (shapes and dtypes of every input tensor) gets one graph, up to ``max_graphs``;
later signatures run eagerly. A model that cannot be captured (host syncs, data-dependent control flow, CPU
tensors) runs eagerly from then on, and the reason is logged once.

A workload's adapter can have its ``postprocess`` captured in the same graph (`Adapter.graph_postprocess`): under
load every host-side op of the executor's run stage waits for the GIL, which the event loop holds most of the
time, so folding masked mean pooling's seven ops into the replay shortens the run stage, the pipeline's slowest.
For the same reason the replayed output is handed out as is when the executor copies it to host memory right away
on the same stream and no host-side postprocess sees it first (``clone_output=False``): the copy is ordered before
the next replay overwrites it.

Capture runs with ``capture_error_mode="thread_local"``: the executor's other threads keep copying and waiting on
events while one workload captures, and the default global mode would turn their calls into capture errors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .collate import map_tensors, opaque_leaves

__all__ = ["GraphedModel", "capture_graph"]

log = logging.getLogger("batchplex")


def _signature(inputs: Any) -> tuple:
    parts: list[tuple] = []
    map_tensors(lambda t: parts.append((tuple(t.shape), t.dtype, t.device)), inputs)
    return tuple(parts)


class GraphedModel:
    """Wraps ``model`` for one CUDA device: replays a captured graph per input signature, eager otherwise.

    ``postprocess(output, inputs)``, when given, runs after the model, in the graph or eagerly alike (with
    ``cuda_graphs=True`` the scheduler passes the adapter's here when `Adapter.graph_postprocess` allows; in a
    GraphedModel you pass as ``model`` it is part of the model, and the adapter's postprocess still follows).
    ``clone_output=False`` returns the graph's own output buffers, which the next replay overwrites: only for a
    caller that consumes them on the current stream before it replays again, from the one thread that replays.
    A second thread (the executor's bisection of a failed batch) calls `eager` instead.
    """

    def __init__(self, model: Callable[[Any], Any], device: torch.device, name: str = "", max_graphs: int = 8,
                 warmup: int = 3, postprocess: Callable[[Any, Any], Any] | None = None,
                 clone_output: bool = True) -> None:
        self.model = model
        self.postprocess = postprocess
        self.clone_output = clone_output
        self.device = device
        self.name = name
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.disabled_reason: str | None = None if device.type == "cuda" else f"device {device} is not CUDA"
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Any, Any]] = {}
        self._pool = None

    @property
    def captured_signatures(self) -> list[tuple]:
        return list(self._graphs)

    def __call__(self, inputs: Any) -> Any:
        if self.disabled_reason is not None:
            return self.eager(inputs)
        signature = _signature(inputs)
        entry = self._graphs.get(signature)
        if entry is None and (not signature or opaque_leaves(inputs)):
            self.disabled_reason = ("the inputs hold objects a graph cannot refill between replays "
                                    f"({', '.join(sorted({type(x).__name__ for x in opaque_leaves(inputs)}))})"
                                    if signature else "the inputs hold no tensors")
            log.warning("workload %r: CUDA graphs off, running eagerly (%s)", self.name, self.disabled_reason)
            return self.eager(inputs)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return self.eager(inputs)
            entry = self._capture(signature, inputs)
            if entry is None:
                return self.eager(inputs)
        graph, static_inputs, static_output = entry
        _copy_into(static_inputs, inputs)
        graph.replay()
        # the next replay overwrites static_output: hand out a copy, ordered on the same stream, unless told not to
        return map_tensors(torch.Tensor.clone, static_output) if self.clone_output else static_output

    def eager(self, inputs: Any) -> Any:
        """The model and the postprocess without any graph: safe to run beside replays on another thread."""
        output = self.model(inputs)
        return output if self.postprocess is None else self.postprocess(output, inputs)

    def _capture(self, signature: tuple, inputs: Any) -> tuple | None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        static_inputs = map_tensors(torch.Tensor.clone, inputs)
        self.eager(static_inputs)  # a model or postprocess error is this batch's (bisected), not the graph's
        try:
            graph, static_output = capture_graph(lambda: self.eager(static_inputs), self.device, pool=self._pool,
                                                 warmup=self.warmup)
        except Exception as error:  # any capture failure: run eagerly from now on, say why once
            self.disabled_reason = f"{type(error).__name__}: {error}"
            log.warning("workload %r: CUDA graph capture failed, running eagerly (%s)", self.name,
                        self.disabled_reason)
            return None
        self._graphs[signature] = (graph, static_inputs, static_output)
        log.info("workload %r: captured a CUDA graph for input signature %s", self.name, signature)
        return graph, static_inputs, static_output


def capture_graph(run: Callable[[], Any], device: torch.device, *, pool: Any = None,
                  warmup: int = 1) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture ``run()`` as a CUDA graph on ``device``; the graph and the output it replays into.

    ``warmup`` eager runs on a side stream come first (lazy initialisations, cuBLAS workspaces and the like, must
    not happen under capture). When capture fails, the CUDA random generator's capture mark is cleared before the
    error is raised (`_end_random_capture`), so random ops elsewhere in the process keep working.
    """
    stream = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    try:
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                run()
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            output = run()
        stream.wait_stream(side)
    except Exception:
        torch.cuda.synchronize(device)
        try:
            _end_random_capture(device)
        except Exception as repair_error:  # the caller runs eagerly; random ops may fail, say so
            log.warning("could not clear the CUDA random generator's capture mark after a failed capture (%s: %s); "
                        "random operations on %s may fail", type(repair_error).__name__, repair_error, device)
        raise
    return graph, output


def _end_random_capture(device: torch.device) -> None:
    """Clear the CUDA random generator's capture mark that a failed capture leaves behind.

    A capture that fails never reaches the generator's capture epilogue, so PyTorch keeps the default generator
    marked as capturing, and every later random op on the device (sampling in another workload, dropout, a
    ``randint``) fails with "Offset increment outside graph capture". One trivial capture that succeeds runs the
    epilogue and clears the mark. A random op that another thread runs on the device while any capture is under
    way can still fail: PyTorch's generator is marked for the whole capture.
    """
    side = torch.cuda.Stream(device)
    with torch.cuda.device(device), torch.cuda.stream(side):
        scratch = torch.zeros(1, device=device)
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=side, capture_error_mode="thread_local"):
            scratch.add_(1)
    side.synchronize()


def _copy_into(static: Any, fresh: Any) -> None:
    """Refill the graph's static inputs with one ``_foreach_copy_`` call: one release of the GIL for all of them
    instead of one per input tensor (under load each release costs a wait for the GIL)."""
    static_tensors: list[torch.Tensor] = []
    map_tensors(static_tensors.append, static)
    fresh_tensors: list[torch.Tensor] = []
    map_tensors(fresh_tensors.append, fresh)
    torch._foreach_copy_(static_tensors, fresh_tensors, non_blocking=True)
