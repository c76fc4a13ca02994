"""`Scheduler`: accepts single requests, forms batches per workload and runs them on their devices.

The scheduler lives on one asyncio event loop. ``submit`` does only cheap work there (the adapter's ``prepare``,
stamping arrival, deadline, priority and cost, one queue append); batch formation is `RequestQueue` logic driven
by the loop's monotonic clock and at most one timer per workload; execution happens on one `DeviceExecutor` per
device (and one per workload with a dedicated executor); results come back with one thread-safe call per batch
and are handed to their own callers.

Workloads that share a device share it fairly: when the device can take another batch, the workload that has
used the least device time (divided by its ``weight``) among those with a ready batch goes next. A workload added
with ``dedicated_executor=True`` has executor threads (and CUDA streams) of its own instead, outside that share. A
workload placed on several devices has one model replica per device, and whichever device frees up first takes
its next batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import torch

from . import _gc_freeze
from ._batching import Request
from ._continuous_adapter import StepAdapter
from ._continuous_policy import ContinuousPolicy
from ._executor import BatchJob, DeviceExecutor
from ._graphs import GraphedModel
from ._host_threads import warn_if_wide_pool
from ._outcomes import fail, settle
from ._workload import Lane, Workload, devices_of, replicas_of
from .adapter import Adapter
from .continuous import ContinuousWorkload
from .errors import (
    BatchplexError,
    DeadlineExceeded,
    InvalidRequestError,
    RequestFailed,
    RequestTooLargeError,
    SchedulerClosed,
    UnknownWorkloadError,
)
from .metrics import BatchRecord
from .plugins import PluginHost
from .policy import BatchPolicy

__all__ = ["Scheduler", "Workload"]

log = logging.getLogger("batchplex")


class Scheduler:
    """Batches single requests for one or more workloads and runs them on their devices.

    Use it as ``async with Scheduler() as s:``, or call ``start()``/``close()`` from code without an event loop
    (the scheduler then runs its own loop on a background thread and callers use ``submit_nowait``).

    ``plugins`` are registered at run time next to the installed ones; ``autoload=False`` loads no installed
    plugin. ``pipeline_depth`` is how many batches per device may be in its executor at once; by default one per
    executor stage, so every stage has work: 3 on CUDA (batch k+2 collates while k+1 runs and k's results come
    back; with 2, MiniLM-L6 replayed as a CUDA graph made 39k sequences/s on an H200, with 3, 47k), 2 on the CPU.
    ``freeze_gc`` (default on) freezes the process's objects while the scheduler runs, so that full garbage
    collections do not stall every thread mid-batch (see ``batchplex._gc_freeze``).
    """

    def __init__(self, plugins: Iterable[object] = (), *, autoload: bool = True, pipeline_depth: int | None = None,
                 freeze_gc: bool = True) -> None:
        if pipeline_depth is not None and not (type(pipeline_depth) is int and pipeline_depth >= 1):
            raise ValueError(f"pipeline_depth must be an int >= 1 or None, got {pipeline_depth!r}")
        self.plugins = PluginHost(plugins, autoload)
        self.pipeline_depth = pipeline_depth
        self.freeze_gc = freeze_gc
        self._gc_held = False
        self._workloads: dict[str, Workload] = {}
        self._continuous: dict[str, ContinuousWorkload] = {}
        self._lanes: dict[tuple[torch.device, str | None], Lane] = {}  # (device, dedicated workload or None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._accepting = False
        self._handoff = threading.Lock()
        # Requests other threads handed to the loop, and those the loop has queued since: equal when none is in
        # transit. Two counters, so the loop never takes the hand-off lock (submitters hold it while they hand over).
        self._handed_over = 0  # written by submitting threads, under _handoff
        self._taken_over = 0   # written by the loop thread
        self._draining = False
        self._idle: asyncio.Event | None = None

    # ------------------------------------------------------------------ set-up
    def register_adapter(self, adapter: Adapter) -> None:
        """Make ``adapter`` available by its name to `add_workload` (no plugin needed)."""
        self.plugins.register_adapter(adapter)

    def register_plugin(self, plugin: object) -> None:
        """Register a plugin object (with ``@hookimpl`` functions) on this scheduler."""
        self.plugins.register_plugin(plugin)

    def add_workload(self, name: str, *, adapter: str | Adapter, model: Callable | Sequence[Callable],
                     policy: BatchPolicy | None = None, device: str | torch.device | Sequence = "cpu",
                     adapter_options: dict[str, Any] | None = None, weight: float = 1.0,
                     cuda_graphs: bool = False, dedicated_executor: bool = False) -> Workload:
        """Add a workload: requests submitted under ``name`` are prepared and collated by ``adapter`` and run by
        ``model`` on ``device`` (a list of devices places one replica on each: a module is deep-copied and moved,
        or pass one model per device).

        ``adapter`` is a registered adapter's name (configured with ``adapter_options``) or an adapter instance.
        ``weight`` scales the workload's fair share of a device shared with other workloads. ``cuda_graphs``
        captures the model once per input shape on CUDA devices and replays it (pair it with
        ``preferred_batch_sizes``); where a model cannot be captured, or on the CPU, it runs eagerly.

        ``dedicated_executor`` gives the workload executor threads of its own on each device (on CUDA also its own
        copy and compute streams, so its kernels run alongside the other workloads'): its batches no longer queue
        behind other workloads' in the shared collate, run and finish threads, and it leaves the device's fair
        share (``weight`` then has no effect). Why: a model whose forward blocks its thread (host syncs, as in
        torchvision's detectors) otherwise holds every other workload's launches for as long as it runs. With four
        workloads on an H200 (1 torch intra-op thread), one executor each raised the time the GPU ran kernels from
        41-43% to 62% of the wall time, NVML's utilization from 46-47% to 63-64% (``benchmarks/engine.py``, two
        runs). Continuous (generation) workloads always run on a step loop of their own. With ``cuda_graphs``
        elsewhere on the device, call `warmup` before traffic: a random op that a dedicated executor runs while
        another workload captures a graph can fail (PyTorch marks the device's random generator for the whole
        capture).
        """
        if name in self._workloads or name in self._continuous:
            raise ValueError(f"a workload named {name!r} exists already")
        if not (isinstance(weight, (int, float)) and weight > 0):
            raise ValueError(f"workload {name!r}: weight must be a number > 0, got {weight!r}")
        if isinstance(adapter, str):
            adapter = self.plugins.adapter(adapter).configure(**(adapter_options or {}))
        elif adapter_options:
            raise ValueError(f"workload {name!r}: adapter_options apply to an adapter named by string only")
        if not isinstance(adapter, Adapter):
            raise TypeError(f"workload {name!r}: adapter must be an Adapter or a registered adapter's name, "
                            f"got {type(adapter).__name__}")
        if isinstance(adapter, StepAdapter):
            return self._add_continuous(name, adapter, model, policy, device, weight, cuda_graphs)
        devices = devices_of(device)
        models = replicas_of(name, model, devices)
        if cuda_graphs:
            for dev in devices:
                models[dev] = _graphed(models[dev], dev, name, adapter)
                if models[dev].disabled_reason:
                    log.warning("workload %r: cuda_graphs ignored on %s (%s)", name, dev,
                                models[dev].disabled_reason)
        workload = Workload(name, adapter, models, policy or BatchPolicy(), weight)
        workload.postprocess_in_model = cuda_graphs and adapter.graph_postprocess
        for dev in devices:
            key = (dev, name if dedicated_executor else None)
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = Lane(dev, self.pipeline_depth or DeviceExecutor.stage_count(dev),
                                               owner=name if dedicated_executor else None)
                if self._loop is not None:
                    lane.executor = self._new_executor(lane)
            if lane.workloads:  # join at the current fair-share level: no banked credit
                workload.device_time = min(w.share for w in lane.workloads) * weight
            lane.workloads.append(workload)
            workload.lanes.append(lane)
        self._workloads[name] = workload
        warn_if_wide_pool(devices)
        return workload

    def _add_continuous(self, name: str, adapter: StepAdapter, model: Any, policy: Any, device: Any,
                        weight: float, cuda_graphs: bool) -> ContinuousWorkload:
        """A step adapter (generation) runs iteration-level batching on its own step loop."""
        if policy is not None and not isinstance(policy, ContinuousPolicy):
            raise TypeError(f"workload {name!r}: a step adapter takes a ContinuousPolicy, got "
                            f"{type(policy).__name__}")
        devices = devices_of(device)
        if len(devices) != 1 or cuda_graphs or weight != 1.0:
            raise ValueError(f"workload {name!r}: a continuous workload runs on one device with neither "
                             f"cuda_graphs nor weight; got device={[str(d) for d in devices]}, "
                             f"cuda_graphs={cuda_graphs!r}, weight={weight!r}")
        workload = self._continuous[name] = ContinuousWorkload(name, adapter, policy, model=model,
                                                                device=devices[0])
        if self._loop is not None:
            workload.start(self._loop)
        warn_if_wide_pool(devices)
        return workload

    # ------------------------------------------------------------------ life cycle
    async def __aenter__(self) -> Scheduler:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._draining = False
        for lane in self._lanes.values():
            lane.executor = self._new_executor(lane)
        for continuous in self._continuous.values():
            await asyncio.to_thread(continuous.start, self._loop)
        if self.freeze_gc and not self._gc_held:
            _gc_freeze.hold()
            self._gc_held = True
        self._accepting = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose(drain=True)

    async def aclose(self, drain: bool = True) -> None:
        """Stop accepting requests; with ``drain`` run every accepted request, else fail queued ones with
        `SchedulerClosed`. Batches already running always finish. Worker threads are joined."""
        if self._loop is None:
            return
        with self._handoff:  # from here no thread hands a request over; those handed over already still count
            self._accepting = False
            self._draining = drain
        try:
            await self._shut_down(drain)
        finally:
            if self._gc_held:
                _gc_freeze.release()
                self._gc_held = False

    async def _shut_down(self, drain: bool) -> None:
        await asyncio.gather(*(continuous.aclose(drain) for continuous in self._continuous.values()))
        if drain:
            for lane in self._lanes.values():
                self._pump(lane)
        else:
            for workload in self._workloads.values():
                for request in workload.queue.drain():
                    fail(request, SchedulerClosed(f"workload {workload.name!r}: the scheduler closed before "
                                                   f"this request ran (close(drain=False))"))
        while not self._quiet():
            self._idle.clear()
            await self._idle.wait()
        for workload in self._workloads.values():
            if workload.timer is not None:
                workload.timer.cancel()
        executors = [lane.executor for lane in self._lanes.values() if lane.executor is not None]
        await asyncio.gather(*(asyncio.to_thread(executor.close) for executor in executors))
        for lane in self._lanes.values():
            lane.executor = None
        self._loop = None

    def _quiet(self) -> bool:
        return self._taken_over == self._handed_over and all(
            lane.in_flight == 0 for lane in self._lanes.values()) and all(
            workload.queue.depth == 0 for workload in self._workloads.values())

    def start(self) -> Scheduler:
        """Run the scheduler on its own event loop in a background thread (for code without asyncio)."""
        if self._loop_thread is not None:
            raise RuntimeError("this scheduler was started already")
        loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=loop.run_forever, name="batchplex-loop", daemon=True)
        self._loop_thread.start()
        asyncio.run_coroutine_threadsafe(self.__aenter__(), loop).result()
        return self

    def close(self, drain: bool = True) -> None:
        """Stop a scheduler started with ``start()``: drain (or fail) what is queued, join every thread."""
        if self._loop_thread is None:
            raise RuntimeError("close() is for a scheduler started with start(); use `async with` otherwise")
        loop = self._loop
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self.aclose(drain), loop).result()
            loop.call_soon_threadsafe(loop.stop)
        self._loop_thread.join()
        self._loop_thread = None
        if loop is not None:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    async def submit(self, workload: str, item: Any, *, priority: int = 0, timeout: float | None = None,
                     **params: Any) -> Any:
        """Submit one request and wait for its own result.

        Raises `InvalidRequestError` (bad input), `QueueFullError` (back-pressure) or `SchedulerClosed` at once;
        later `DeadlineExceeded` (not run before ``timeout`` seconds) or `RequestFailed` (the model failed on
        this request). Cancelling the await drops the request if it has not run yet.
        """
        target = self._workloads.get(workload)
        if target is None or not self._accepting:
            return await self._submit_other(workload, item, priority, timeout, params)
        loop = self._loop
        waiter = loop.create_future()
        self._push(target, self._accept(loop, target, item, priority, timeout, params, waiter))
        return await waiter

    async def _submit_other(self, workload: str, item: Any, priority: int, timeout: float | None,
                            params: dict) -> Any:
        """`submit` off its fast path: a continuous workload, or a request refused (closed, unknown name)."""
        if workload not in self._continuous:
            self._workload(workload)  # raises SchedulerClosed or UnknownWorkloadError
        self._check_accepting()
        return await self._continuous[workload].submit(item, priority=priority, timeout=timeout, **params)

    def submit_nowait(self, workload: str, item: Any, *, priority: int = 0, timeout: float | None = None,
                      **params: Any) -> concurrent.futures.Future:
        """Submit from any thread; returns a `concurrent.futures.Future` of the result.

        Bad input raises here, in the caller's thread. Cancelling the future drops the request if it has not run.
        """
        if workload in self._continuous:
            self._check_accepting()
            return asyncio.run_coroutine_threadsafe(self.submit(workload, item, priority=priority, timeout=timeout,
                                                                **params), self._loop)
        target = self._workload(workload)
        loop = self._loop
        if loop is None:
            raise SchedulerClosed("the scheduler closed; no request is taken after close")
        future: concurrent.futures.Future = concurrent.futures.Future()
        request = self._accept(loop, target, item, priority, timeout, params, future)
        if _on_loop_thread(loop):
            self._enqueue(target, request)
            return future
        with self._handoff:  # close() flips _accepting under this lock: a request is handed over or refused
            if not self._accepting:
                raise SchedulerClosed(f"workload {workload!r}: the scheduler closed; request not taken")
            self._handed_over += 1  # counted before the loop can take it over
            try:
                loop.call_soon_threadsafe(self._take_handed_over, target, request)
            except RuntimeError:  # the loop closed without close(): nothing will take this request
                self._handed_over -= 1
                raise SchedulerClosed(f"workload {workload!r}: the scheduler's event loop is closed; "
                                      f"request not taken") from None
        return future

    def stream(self, workload: str, item: Any, *, priority: int = 0, timeout: float | None = None,
               **params: Any) -> AsyncIterator[Any]:
        """Submit to a continuous (generation) workload and iterate over its tokens as they are produced.

        Bad input raises here, at the call; later errors raise from the iteration. Leaving the loop early releases
        the sequence.
        """
        self._check_accepting()
        if workload not in self._continuous:
            known = ", ".join(sorted(self._continuous)) or "none"
            raise UnknownWorkloadError(f"no continuous workload named {workload!r} to stream from (known: {known})")
        return self._continuous[workload].stream(item, priority=priority, timeout=timeout, **params)

    async def warmup(self, workload: str, item: Any, *, batch_sizes: Sequence[int] | None = None,
                     **params: Any) -> dict[int, float]:
        """Run one batch of every size the workload can form, on each of its devices, before serving.

        Why: the first batch of a new shape is slow, and on the executor's own threads. cuDNN builds an execution
        plan per input shape, cached per thread (ResNet-50 fp16 on an H200: ~100 ms for a new batch size, so an
        eager workload at half load with sizes 1-64 had a p99 of 1.7 s; warmed, 34 ms), and ``cuda_graphs``
        captures one graph per size. Every batch here is ``item`` (a request as ``submit`` takes it, with its
        ``params``) repeated; for a workload whose shapes also depend on the request (token lengths, image sizes),
        call it once per representative request. ``batch_sizes`` defaults to every padded size the policy can
        produce (`BatchPolicy.batch_shapes`: few with ``preferred_batch_sizes``). Call it before traffic: its
        batches go to the device directly, outside the queue, the fair share and the batch statistics.

        Returns the seconds each size took (its first run). Raises `InvalidRequestError` for a bad ``item`` and
        `RequestFailed` naming the size and device when a warm-up batch fails.
        """
        if workload in self._continuous:
            raise ValueError(f"workload {workload!r} batches continuously: it has no batch sizes to warm up")
        target = self._workload(workload)
        policy = target.policy
        sizes = policy.batch_shapes if batch_sizes is None else tuple(batch_sizes)
        if not sizes or not all(type(size) is int and 1 <= size <= policy.max_batch_size for size in sizes):
            raise ValueError(f"workload {workload!r}: batch_sizes must be ints from 1 to max_batch_size "
                             f"({policy.max_batch_size}), got {batch_sizes!r}")
        loop = self._loop
        request = self._accept(loop, target, item, 0, None, params, None)  # one request stands for every row
        budget = policy.max_batch_cost
        took: dict[int, float] = {}
        for lane in target.lanes:
            # Largest first: with cuda_graphs, the sizes that carry the load get the graphs (GraphedModel keeps a few).
            for size in sorted(sizes, reverse=True):
                padded = policy.padded_size(size)
                if size > target.queue.batch_limit or (
                        budget is not None and target.adapter.padded_cost([request.cost] * size, padded) > budget):
                    continue  # a batch live traffic never forms (the cost budget, or a limit an OOM lowered)
                started = loop.time()
                job = await self._warm_batch(lane, BatchJob(target, [request] * size, padded,
                                                            target.models[lane.device]))
                took[size] = max(took.get(size, 0.0), loop.time() - started)
                error = job.batch_error or next((error for error in job.errors if error is not None), None)
                if job.oom_size:  # like a live batch: remember the limit, go on with the sizes below it
                    target.queue.memory_cap = max(1, job.oom_size // 2)
                    log.warning("workload %r: out of memory at batch size %d during warm-up; batches are now at "
                                "most %d", workload, job.oom_size, target.queue.memory_cap)
                elif error is not None:  # a batch that only ran once bisected failed at this size all the same
                    raise RequestFailed(f"workload {workload!r}: the warm-up batch of {size} on {lane.device} "
                                        f"failed: {type(error).__name__}: {error}") from error
        return took

    async def _warm_batch(self, lane: Lane, job: BatchJob) -> BatchJob:
        """Run one warm-up batch on ``lane``, counted in flight so that a closing scheduler waits for it."""
        self._check_accepting()
        job.owner = self._loop.create_future()
        lane.in_flight += 1
        try:
            lane.executor.submit(job)
            return await job.owner
        finally:
            lane.in_flight -= 1
            if lane.executor is not None:
                self._pump(lane)  # traffic that queued behind the warm-up
            if self._idle is not None and self._quiet():
                self._idle.set()

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise SchedulerClosed("the scheduler is not running: use `async with Scheduler()` or start(); "
                                  "no request is taken after close")

    def _workload(self, name: str) -> Workload:
        self._check_accepting()
        try:
            return self._workloads[name]
        except KeyError:
            known = ", ".join(sorted([*self._workloads, *self._continuous])) or "none"
            raise UnknownWorkloadError(f"no workload named {name!r} (known: {known})") from None

    def _accept(self, loop: asyncio.AbstractEventLoop, workload: Workload, item: Any, priority: int,
                timeout: float | None, params: dict, waiter: Any) -> Request:
        """Validate and prepare one request (caller's thread); bad input raises here, for this caller only."""
        policy = workload.policy
        if not (type(priority) is int and 0 <= priority < policy.priority_levels):
            workload.stats.rejected_invalid += 1
            raise InvalidRequestError(f"priority must be an int from 0 to {policy.priority_levels - 1} "
                                      f"(BatchPolicy.priority_levels={policy.priority_levels})",
                                      workload=workload.name, rule="priority level", value=priority)
        try:  # without parameters, no empty keyword dict is built per request
            prepared = workload.adapter.prepare(item, **params) if params else workload.adapter.prepare(item)
            cost = 1 if workload.unit_cost else workload.adapter.cost(prepared)
        except InvalidRequestError as error:
            workload.stats.rejected_invalid += 1
            if error.workload is None:
                error.workload = workload.name
            raise
        except Exception as error:  # an adapter that did not foresee this input: still this caller's error
            workload.stats.rejected_invalid += 1
            raise InvalidRequestError(f"adapter {workload.adapter.name!r} could not prepare this request: "
                                      f"{type(error).__name__}: {error}", workload=workload.name,
                                      rule="adapter.prepare", value=type(item).__name__) from error
        if cost > policy.max_cost:
            workload.stats.rejected_invalid += 1
            rule = "last bucket edge" if policy.bucket_edges else "max_batch_cost"
            raise RequestTooLargeError(f"request cost {cost} exceeds the {rule} ({policy.max_cost}); truncate it "
                                       f"(adapter option) or raise the policy's limit", workload=workload.name,
                                       rule=rule, value=cost)
        now = loop.time()
        if timeout is None:
            timeout = policy.default_timeout_s
            if timeout is None:
                return Request(prepared, cost, now, None, priority, waiter)
        elif not (isinstance(timeout, (int, float)) and timeout > 0):
            workload.stats.rejected_invalid += 1
            raise InvalidRequestError("timeout must be a number of seconds > 0", workload=workload.name,
                                      rule="timeout > 0", value=timeout)
        return Request(prepared, cost, now, now + timeout, priority, waiter)

    def _take_handed_over(self, workload: Workload, request: Request) -> None:
        """Queue a request another thread handed over before ``close()`` flipped the gate (loop thread).

        It was accepted, so a draining close runs it even if closing began since; a close without drain fails
        it like any queued request.
        """
        self._taken_over += 1
        try:
            if not (self._accepting or self._draining):
                raise SchedulerClosed(f"workload {workload.name!r}: the scheduler closed before this request ran "
                                      f"(close(drain=False))")
            self._push(workload, request)
            if self._draining:
                for lane in workload.lanes:
                    self._pump(lane)
        except BatchplexError as error:
            fail(request, error)
        if not self._accepting and self._quiet():  # close() is waiting for the last request in transit
            self._idle.set()

    def _enqueue(self, workload: Workload, request: Request) -> None:
        if not self._accepting:
            raise SchedulerClosed(f"workload {workload.name!r}: the scheduler is closing; request not taken")
        self._push(workload, request)

    def _push(self, workload: Workload, request: Request) -> None:
        try:
            full = workload.queue.push(request)
        except BatchplexError:
            workload.stats.rejected_full += 1
            raise
        workload.stats.submitted += 1
        if full:
            for lane in workload.lanes:
                if lane.in_flight < lane.depth:
                    self._pump(lane)  # also re-arms the timer
                    return
            if request.deadline is None:
                return  # every device is busy: the next finished batch pumps again
        elif workload.policy.dispatch_when_idle and not workload.pump_soon and any(
                lane.in_flight == 0 for lane in workload.lanes):
            workload.pump_soon = True  # after this loop turn, so requests arriving together still batch
            self._loop.call_soon(self._pump_idle, workload)
        if full or workload.queue.depth == 1 or request.deadline is not None:
            self._rearm(workload)

    # ------------------------------------------------------------------ batch formation
    def _arm(self, workload: Workload, at: float | None) -> None:
        """Make sure the workload's timer fires no later than ``at``."""
        if at is None or at >= workload.timer_at:
            return
        if workload.timer is not None:
            workload.timer.cancel()
        workload.timer_at = at
        workload.timer = self._loop.call_at(at, self._on_timer, workload)

    def _on_timer(self, workload: Workload) -> None:
        workload.timer, workload.timer_at = None, math.inf
        for lane in workload.lanes:
            self._pump(lane)
        self._expire(workload, self._loop.time())
        self._rearm(workload)

    def _pump_idle(self, workload: Workload) -> None:
        workload.pump_soon = False
        for lane in workload.lanes:
            if lane.in_flight == 0:
                self._pump(lane)

    def _rearm(self, workload: Workload) -> None:
        queue = workload.queue
        if not queue.depth:
            return
        if any(lane.in_flight < lane.depth for lane in workload.lanes):
            self._arm(workload, queue.next_event())
        else:  # the devices are busy: a finishing batch pumps again; only deadlines need the clock
            self._arm(workload, queue.tightest_deadline())

    def _expire(self, workload: Workload, now: float) -> None:
        for request in workload.queue.expire(now):
            workload.stats.timeouts += 1
            fail(request, DeadlineExceeded(
                f"workload {workload.name!r}: request waited {now - request.arrival:.3f}s in the queue, past its "
                f"timeout of {request.deadline - request.arrival:.3f}s; it did not run"))

    def _pump(self, lane: Lane) -> None:
        """Start batches on ``lane`` while it has room and one of its workloads has a ready batch."""
        now = self._loop.time()
        while lane.in_flight < lane.depth:
            chosen = None
            for workload in lane.workloads:
                queue = workload.queue
                if queue.depth:
                    self._expire(workload, now)
                    if (queue.depth and (self._go_now(workload, lane) or queue.ready(now))
                            and (chosen is None or workload.share < chosen.share)):
                        chosen = workload
            if chosen is None:
                break
            batch = chosen.queue.take(now, force=self._go_now(chosen, lane))
            self._collect_cancelled(chosen)
            if batch:
                self._dispatch(lane, chosen, batch, now)
        for workload in lane.workloads:
            self._rearm(workload)

    def _go_now(self, workload: Workload, lane: Lane) -> bool:
        """Whether a batch leaves without waiting: when draining, or on an idle device if the policy says so."""
        return self._draining or (workload.policy.dispatch_when_idle and lane.in_flight == 0)

    def _collect_cancelled(self, workload: Workload) -> None:
        seen = workload.queue.cancelled_seen
        if seen:
            workload.stats.cancelled += seen
            workload.queue.cancelled_seen = 0

    def _dispatch(self, lane: Lane, workload: Workload, batch: list[Request], now: float) -> None:
        lane.in_flight += 1
        waits = [now - request.arrival for request in batch]
        workload.stats.waits_s.extend(waits)
        padded = workload.policy.padded_size(len(batch))
        lane.executor.submit(BatchJob(workload, batch, padded, workload.models[lane.device], lane, max(waits)))

    # ------------------------------------------------------------------ results
    def _job_done(self, job: BatchJob) -> None:
        """Called from the executor's last stage: hand the batch back to the loop with one thread-safe call (a
        warm-up batch, owned by the future its `warmup` awaits, goes back to that future)."""
        if type(job.owner) is Lane:
            self._loop.call_soon_threadsafe(self._deliver, job)
        else:
            self._loop.call_soon_threadsafe(_finish_warmup, job.owner, job)

    def _deliver(self, job: BatchJob) -> None:
        workload: Workload = job.workload
        stats = workload.stats
        failed = settle(job.requests, job.results, job.errors)
        stats.completed += len(job.requests) - failed
        stats.failed += failed
        workload.device_time += job.run_s
        queue = workload.queue
        queue.deadline_margin_s = 0.8 * queue.deadline_margin_s + 0.2 * job.run_s
        if job.oom_size and job.oom_size <= queue.batch_limit:
            queue.memory_cap = max(1, job.oom_size // 2)
            log.warning("workload %r: out of memory at batch size %d; batches are now at most %d",
                        workload.name, job.oom_size, queue.memory_cap)
        lane: Lane = job.owner
        lane.in_flight -= 1
        # the adapter's cost now: a text left to its batch knows its real token count only once collated
        costs = [1] * len(job.items) if workload.unit_cost else list(map(workload.adapter.cost, job.items))
        record = BatchRecord(
            workload=workload.name, device=str(lane.device), size=len(costs), padded_size=job.padded_size,
            cost=sum(costs), padded_cost=workload.adapter.padded_cost(costs, job.padded_size),
            max_wait_s=job.waited_s, run_s=job.run_s, failed=failed, retried=job.retried,
            pipeline_s=time.perf_counter() - job.dispatched, collate_s=job.collate_s, launch_s=job.launch_s,
            finish_s=job.finish_s, device_start_s=job.device_start_s, device_end_s=job.device_end_s)
        stats.record_batch(record)
        self.plugins.batch_finished(record)
        self._pump(lane)
        if self._idle is not None and self._quiet():
            self._idle.set()

    def _new_executor(self, lane: Lane) -> DeviceExecutor:
        return DeviceExecutor(lane.device, self._job_done, label=lane.owner and f"{lane.device}-{lane.owner}")

    # ------------------------------------------------------------------ observing
    def statistics(self) -> dict[str, dict[str, Any]]:
        """Per workload: queue depth, in flight, batches, mean batch size and fill, padding waste, wait and run
        time percentiles (ms), rejections, timeouts, cancellations and failures; and where a batch's trip through
        the executor goes (``pipeline_ms`` percentiles over recent batches, ``stage_ms_mean`` per stage since the
        workload started: see `BatchRecord`)."""
        report = {}
        for name, workload in self._workloads.items():
            stats, queue = workload.stats, workload.queue
            cancelled = stats.cancelled + queue.cancelled_seen  # read-only: safe from an observer's thread
            in_flight = stats.submitted - stats.completed - stats.failed - stats.timeouts - cancelled - queue.depth
            report[name] = stats.snapshot(max_batch_size=workload.policy.max_batch_size,
                                          queue_depth=queue.depth, in_flight=max(0, in_flight))
            report[name]["cancelled"] = cancelled
            report[name]["max_batch_size_now"] = workload.queue.batch_limit
            report[name]["max_wait_ms_now"] = workload.queue.max_wait_s * 1000.0
        for name, continuous in self._continuous.items():
            report[name] = continuous.statistics()
        return report

    @property
    def workloads(self) -> dict[str, Workload]:
        return dict(self._workloads)


def _graphed(model: Callable, device: torch.device, name: str, adapter: Adapter) -> GraphedModel:
    """The workload's model graphed for ``device``, with the adapter's postprocess in the graph where it may be.

    The replayed output is handed out without a copy when the executor copies it to host memory at once and no
    host-side postprocess sees it before (one in the graph, or none): an eager postprocess might change it in place
    or wrap it where the copy to host cannot see."""
    in_graph = adapter.graph_postprocess
    postprocess = (lambda output, inputs: adapter.postprocess(output, inputs, ())) if in_graph else None
    untouched = in_graph or type(adapter).postprocess is Adapter.postprocess
    return GraphedModel(model, device, name, postprocess=postprocess,
                        clone_output=not (adapter.copy_output_to_host and untouched))


def _finish_warmup(finished: asyncio.Future, job: BatchJob) -> None:
    if not finished.done():  # its warmup() was cancelled meanwhile
        finished.set_result(job)


def _on_loop_thread(loop: asyncio.AbstractEventLoop | None) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
