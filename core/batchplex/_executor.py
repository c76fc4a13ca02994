"""The device executor: runs batches for one device off the event loop, pipelined in three stages (two on the CPU).

    collate thread            run thread                        finish thread
    adapter.collate  ──▶  model(inputs) on the compute     ──▶  wait for the batch's event, adapter.split,
    H2D on the copy       stream (waits on the copy's           isolate failures, hand the batch back
    stream, record event  event), postprocess, D2H into         (one thread-safe call per batch)
                          pinned memory, record event

While batch k runs, batch k+1 is collated and copied, and batch k-1's results are split and delivered. The finish
thread spins on its batch's event (CUDA's default with fewer GPUs than cores) rather than sleeping on a blocking
one. Measured on an H200: blocking cut the finish threads' CPU from 0.15-0.76 of a core to 0.06-0.09 with the same
throughput (one executor per workload: graphed ResNet-50 + MiniLM, and the four-workload mix), but added 0.2 ms to
every request (graphed ResNet-50 at half load, three alternating rounds: p50 5.93-5.97 -> 6.15-6.18 ms) for the
wake-up. The host has the cores; the requests would pay the latency.

On the CPU there are no streams or events: the same stages run, synchronously within each stage, so CI exercises
the same code; a CPU run is finished when the model returns, so there the run thread also finishes the batch (two
threads: batch k+1 is still collated while batch k runs, and each batch makes one thread hop less).

When a batch raises, the finish stage bisects it (collate + run + split again on each half) until the failing
request(s) are alone, so only they fail. An out-of-memory error is handled the same way: the halves are retried,
and the job reports the size that failed so the scheduler can lower its batch limit.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ._device_clock import device_clock
from ._graphs import GraphedModel
from .adapter import check_split
from .collate import copy_to_pinned_host, map_tensors
from .errors import BatchplexError, ContractError, RequestFailed

__all__ = ["BatchJob", "DeviceExecutor"]

_STOP = object()


class BatchJob:
    """One batch on its way through a device executor, and what came of it."""

    __slots__ = ("workload", "requests", "items", "padded_size", "model", "owner", "waited_s", "inputs", "output",
                 "error", "copied", "started", "ended", "run_s", "results", "errors", "oom_size", "retried",
                 "batch_error", "dispatched", "collate_s", "launch_s", "finish_s", "clock_generation",
                 "device_start_s", "device_end_s")

    def __init__(self, workload: Any, requests: list, padded_size: int, model: Callable, owner: Any = None,
                 waited_s: float = 0.0) -> None:
        self.workload = workload
        self.requests = requests
        self.items = [request.item for request in requests]  # the prepared items, gathered once per batch
        self.padded_size = padded_size
        self.model = model
        self.owner = owner  # whatever the submitter needs back with the finished job (the scheduler: its lane)
        self.waited_s = waited_s
        self.inputs: Any = None
        self.output: Any = None
        self.error: BaseException | None = None
        self.copied: Any = None
        self.started: Any = None
        self.ended: Any = None
        self.run_s = 0.0
        self.results: list[Any] = []
        self.errors: list[BaseException | None] = []
        self.oom_size = 0
        self.retried = False
        self.batch_error: BaseException | None = None  # what failed the whole batch before it was bisected
        # Host clock (perf_counter): when the batch left the queue, and the time spent inside each stage.
        self.dispatched = time.perf_counter()
        self.collate_s = self.launch_s = self.finish_s = 0.0
        # When the model work began and ended on the device's clock (`DeviceClock`); None if the run failed.
        self.clock_generation = 0
        self.device_start_s: float | None = None
        self.device_end_s: float | None = None


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class DeviceExecutor:
    """Pipelined worker threads for one device (three on CUDA, two on the CPU); ``on_done(job)`` is called from
    the thread of the last stage. ``label`` names the threads (default: the device)."""

    def __init__(self, device: torch.device, on_done: Callable[[BatchJob], None], label: str | None = None) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._on_done = on_done
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(device)
            self._compute_stream = torch.cuda.Stream(device)
            self._clock = device_clock(device)
            stages = (self._collate_stage, self._run_stage, self._finish_stage)
        else:
            stages = (self._collate_stage, self._run_and_finish_stage)
        self._queues = [queue.SimpleQueue() for _ in stages]
        self._threads = [threading.Thread(target=self._serve, args=(i, stage), daemon=True,
                                          name=f"batchplex-{label or device}-{stage.__name__.strip('_')}")
                         for i, stage in enumerate(stages)]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def stage_count(device: torch.device) -> int:
        """How many batches the executor of ``device`` works on at once: one per stage."""
        return 3 if device.type == "cuda" else 2

    def submit(self, job: BatchJob) -> None:
        self._queues[0].put(job)

    def close(self) -> None:
        """Stop after the batches already submitted; waits for the threads."""
        self._queues[0].put(_STOP)
        for thread in self._threads:
            thread.join()

    def _serve(self, index: int, stage: Callable[[BatchJob], None]) -> None:
        inbox = self._queues[index]
        outbox = self._queues[index + 1] if index + 1 < len(self._queues) else None
        if self.cuda:
            torch.cuda.set_device(self.device)
        with torch.inference_mode():
            while (job := inbox.get()) is not _STOP:
                try:
                    stage(job)
                except BaseException as error:  # never let a worker die: the job must still come back
                    self._fail_whole(job, error)
                    if outbox is None:
                        self._on_done(job)
                if outbox is not None:
                    outbox.put(job)
        if outbox is not None:
            outbox.put(_STOP)

    # ------------------------------------------------------------------ stages
    def _collate_stage(self, job: BatchJob) -> None:
        adapter = job.workload.adapter
        entered = time.perf_counter()
        try:
            if self.cuda:
                with torch.cuda.stream(self._copy_stream):
                    job.inputs = adapter.collate(job.items, self.device, job.padded_size)
                    job.copied = torch.cuda.Event()
                    job.copied.record(self._copy_stream)
            else:
                job.inputs = adapter.collate(job.items, self.device, job.padded_size)
        except Exception as error:  # isolated by the finish stage
            job.error = error
        job.collate_s = time.perf_counter() - entered

    def _run_stage(self, job: BatchJob) -> None:
        if job.error is not None:
            return
        entered = time.perf_counter()
        try:
            if self.cuda:
                stream = self._compute_stream
                job.clock_generation = self._clock.generation()
                with torch.cuda.stream(stream):
                    stream.wait_event(job.copied)
                    job.started = torch.cuda.Event(enable_timing=True)
                    job.ended = torch.cuda.Event(enable_timing=True)
                    job.started.record(stream)
                    job.output = self._forward(job.workload, job.model, job.inputs, job.items)
                    job.ended.record(stream)
            else:
                job.output = self._forward(job.workload, job.model, job.inputs, job.items)
                job.run_s = time.perf_counter() - entered
                job.device_start_s, job.device_end_s = entered, entered + job.run_s
        except Exception as error:
            job.error = error
        job.launch_s = time.perf_counter() - entered

    def _finish_stage(self, job: BatchJob) -> None:
        adapter = job.workload.adapter
        n = len(job.requests)
        entered = time.perf_counter()
        if job.error is None:
            try:
                if self.cuda:
                    job.ended.synchronize()
                    job.run_s = job.started.elapsed_time(job.ended) / 1000.0
                    self._place_on_device_clock(job)
                job.results = list(check_split(adapter.name, adapter.split(job.output, job.items), n))
                job.errors = [None] * n
            except Exception as error:
                job.error = error
        # The inputs were allocated on the copy stream and read on the compute stream: they stay referenced until
        # the batch's event completed, so the caching allocator cannot hand their memory out early (this replaces
        # record_stream, which nested tensors and torchrec containers do not all support).
        if self.cuda and job.error is not None:
            self._compute_stream.synchronize()  # a failed launch may still have kernels reading the inputs
        job.inputs = None
        job.output = None
        if job.error is not None:
            self._isolate(job)
        job.finish_s = time.perf_counter() - entered
        self._on_done(job)

    def _place_on_device_clock(self, job: BatchJob) -> None:
        """Set the batch's span on the device's clock; a measurement only, so a failure leaves it unset."""
        try:
            start = self._clock.seconds(job.clock_generation, job.started)
        except (KeyError, RuntimeError):  # the anchor was dropped (a batch in flight for minutes), or CUDA refused
            return
        job.device_start_s, job.device_end_s = start, start + job.run_s

    def _run_and_finish_stage(self, job: BatchJob) -> None:
        """The CPU's last stage: nothing runs asynchronously, so a thread of its own to finish would only add a
        hand-off (and a wait for the GIL) per batch."""
        self._run_stage(job)
        self._finish_stage(job)

    @staticmethod
    def _fail_whole(job: BatchJob, error: BaseException) -> None:
        """A stage broke outside the model and the adapter (a bug, not a request's fault): fail the batch."""
        job.error = error
        job.results = [None] * len(job.requests)
        job.errors = [error] * len(job.requests)

    def _forward(self, workload: Any, model: Callable, inputs: Any, items: list) -> Any:
        """Run the model and the adapter's on-device postprocessing; start the copy to pinned host memory."""
        output = workload.forward(model, inputs, items)
        if workload.adapter.copy_output_to_host and self.cuda:
            output = map_tensors(copy_to_pinned_host, output)
        return output

    # ------------------------------------------------------------------ failures
    def _isolate(self, job: BatchJob) -> None:
        """Bisect a failed batch so that only the failing requests fail; retry halves after out-of-memory."""
        n = len(job.requests)
        job.retried = True
        job.results = [None] * n
        job.errors = [None] * n
        error = job.error
        if isinstance(error, ContractError):
            job.errors = [error] * n
            return
        if is_out_of_memory(error):
            job.oom_size = n

        def solve(lo: int, hi: int, failure: BaseException) -> None:
            if hi - lo == 1:
                job.errors[lo] = _per_request_error(job.workload.name, failure)
                return
            mid = (lo + hi) // 2
            for a, b in ((lo, mid), (mid, hi)):
                try:
                    job.results[a:b] = self._run_alone(job, a, b)
                except Exception as sub_error:
                    if is_out_of_memory(sub_error):
                        job.oom_size = min(job.oom_size or b - a, b - a)
                    solve(a, b, sub_error)

        solve(0, n, error)
        job.batch_error = error
        job.error = None

    def _run_alone(self, job: BatchJob, lo: int, hi: int) -> list[Any]:
        """Collate, run and split ``requests[lo:hi]`` synchronously (used only while isolating a failure).

        This runs on the finish thread while the run thread goes on replaying: a graphed model runs eagerly here,
        since two threads refilling and replaying one graph would swap each other's inputs and outputs."""
        workload = job.workload
        adapter = workload.adapter
        model = job.model.eager if isinstance(job.model, GraphedModel) else job.model
        items = job.items[lo:hi]
        padded = workload.policy.padded_size(len(items))
        if self.cuda:
            with torch.cuda.stream(self._compute_stream):
                output = self._forward(workload, model, adapter.collate(items, self.device, padded), items)
            self._compute_stream.synchronize()
        else:
            output = self._forward(workload, model, adapter.collate(items, self.device, padded), items)
        return list(check_split(adapter.name, adapter.split(output, items), len(items)))


def _per_request_error(workload: str, failure: BaseException) -> BaseException:
    if isinstance(failure, BatchplexError):
        if getattr(failure, "workload", False) is None:  # e.g. bad input an adapter found only with its batch
            failure.workload = workload
        return failure
    error = RequestFailed(f"workload {workload!r}: running this request failed: {type(failure).__name__}: "
                          f"{failure}")
    error.__cause__ = failure
    return error
