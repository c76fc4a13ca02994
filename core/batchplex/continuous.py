"""Iteration-level (continuous) batching for step models: text generation and anything else that runs in steps.

With static batching every request of a batch waits for the longest one. A continuous workload re-forms its batch
at every step instead: a sequence that finished leaves at once, and a waiting request joins the running batch
between two steps (Orca's iteration-level scheduling, vLLM's and TGI's continuous batching).

The adapter contract (`StepAdapter`), per request and per step:

1. ``prepare(item, **params)`` at submit, on the caller's thread: validate the prompt and the request's parameters
   (``max_new_tokens``, sampling, ...). Bad input raises `InvalidRequestError` for that caller only.
2. ``cost(prepared)``: the tokens the request adds to the step that admits it (its prompt length). A request costing
   more than ``max_batch_tokens`` is refused at submit with `RequestTooLargeError`.
3. ``admit(prepared) -> handle``: the request joins the running batch (the adapter reserves its memory, e.g. KV
   cache blocks). ``handle`` is any hashable value the adapter recognises later.
4. ``step() -> [StepOutput(handle, new_token_ids, finished, error=None), ...]``: one iteration for every admitted
   sequence (prefill for new ones, one decode step for the others).
5. ``release(handle)``: the sequence left (finished, cancelled, timed out, or the workload closed): free its memory.
   Called exactly once per admitted handle, on the step thread, before the next step.

One worker thread per workload runs the step loop off the event loop. Between two steps it removes cancelled and
timed-out sequences (``release``), expires waiting requests whose deadline passed, and admits waiting requests in
priority order while the active cap (``max_active``) and the step's token budget (``max_batch_tokens``: one token per
continuing sequence plus the prompt tokens of the requests joining) allow. Admission is in strict order: a request
that does not fit the budget is admitted first at a later step, never overtaken by a smaller one. Each step's
tokens and outcomes reach the event loop with **one** ``call_soon_threadsafe`` (not one per token or request).

Deadlines: a request whose deadline passes while it waits fails with `DeadlineExceeded` and is never admitted. A
sequence whose deadline passes while it runs leaves the batch before the next step and fails with
`DeadlineExceeded`; ``submit`` returns no partial output, the exception carries it as ``partial_output`` (what
``StepAdapter.result`` makes of the tokens generated so far), and a stream has already yielded those tokens.
Cancelling a ``submit`` (or leaving an ``async for`` over a stream) releases the sequence before the next step.

``statistics()`` counts outcomes and reports step times, tokens per step and time to first token; `steps` is a
bounded log of `StepRecord` (which requests ran in which step) for tests and debugging.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

import torch

from ._batching import Request
from ._outcomes import fail, resolve
from ._continuous_adapter import StepAdapter, StepOutput, TokenStreamer
from ._continuous_policy import ContinuousPolicy
from ._continuous_worker import DONE, TOKENS, Job, StepLoop, StepRecord
from .errors import (DeadlineExceeded, InvalidRequestError, QueueFullError, RequestFailed, RequestTooLargeError,
                     SchedulerClosed)
from .metrics import percentile
from .policy import _is_number

__all__ = ["ContinuousPolicy", "ContinuousWorkload", "StepAdapter", "StepOutput", "StepRecord", "TokenStreamer"]

log = logging.getLogger("batchplex")
_END = object()


class ContinuousWorkload:
    """A named stream of step-model requests: one `StepAdapter`, its model on ``device``, a `ContinuousPolicy`.

    ``start(loop)`` starts the step thread and returns once the adapter is ready; ``submit`` and ``stream`` are
    called on that event loop; ``aclose`` stops it.
    """

    def __init__(self, name: str, adapter: StepAdapter, policy: ContinuousPolicy | None = None, *,
                 model: Any = None, device: str | torch.device = "cpu") -> None:
        if not isinstance(adapter, StepAdapter):
            raise TypeError(f"workload {name!r}: a continuous workload needs a StepAdapter, got "
                            f"{type(adapter).__name__}")
        self.name = name
        self.adapter = adapter
        self.policy = policy or ContinuousPolicy()
        self.model = model
        self.device = torch.device(device)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: StepLoop | None = None
        self._accepting = self._closed = False
        self._ids = itertools.count()
        self._submitted = self._rejected_full = self._rejected_invalid = 0

    # ------------------------------------------------------------------ life cycle
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the step thread on ``loop`` (default: the running loop); blocks until ``adapter.start`` returned
        and re-raises its error. Call it at set-up."""
        if self._worker is not None:
            raise RuntimeError(f"workload {self.name!r} was started already")
        self._loop = loop or asyncio.get_running_loop()
        worker = StepLoop(self.name, self.adapter, self.policy, self.model, self.device, self._loop.time,
                          self._hand_over)
        error = worker.start()
        if error is not None:
            raise error
        self._worker = worker
        self._accepting = True

    async def aclose(self, drain: bool = True) -> None:
        """Stop taking requests. ``drain``: finish every active and waiting request first; otherwise waiting ones
        fail with `SchedulerClosed` and active ones are released before the next step and fail the same way.
        `statistics` and `steps` still answer afterwards."""
        worker = self._worker
        if worker is None or self._closed:
            return
        self._closed = True
        self._accepting = False
        if not drain:
            for request in worker.abort():
                fail(request, SchedulerClosed(f"workload {self.name!r}: closed before this request ran "
                                               f"(aclose(drain=False))"))
        await asyncio.to_thread(worker.stop)

    # ------------------------------------------------------------------ requests
    async def submit(self, item: Any, *, priority: int = 0, timeout: float | None = None,
                     request_id: str | None = None, **params: Any) -> Any:
        """Generate for one request; returns ``adapter.result`` of its tokens (e.g. token ids or text).

        Raises `InvalidRequestError`/`RequestTooLargeError` (bad input), `QueueFullError` or `SchedulerClosed` at
        once; later `DeadlineExceeded` or `RequestFailed`. Cancelling the await releases the sequence.
        """
        waiter = self._running_loop().create_future()
        self._enqueue(item, priority, timeout, request_id, params, waiter, None)
        return await waiter

    def stream(self, item: Any, *, priority: int = 0, timeout: float | None = None, request_id: str | None = None,
               **params: Any) -> AsyncIterator[Any]:
        """Like `submit`, but returns at once an async iterator over the request's tokens as they are produced
        (the items of ``adapter.streamer``). Bad input raises here; later errors raise from the iteration.
        Leaving the ``async for`` early releases the sequence."""
        self._running_loop()
        sink = _Sink()
        request = self._enqueue(item, priority, timeout, request_id, params, sink, sink)
        sink.streamer = self.adapter.streamer(request.item.prepared)
        return _iterate(sink)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if not self._accepting:
            raise SchedulerClosed(f"workload {self.name!r} is not running: start() it; no request is taken after "
                                  f"aclose()")
        return self._loop

    def _enqueue(self, item: Any, priority: int, timeout: float | None, request_id: str | None, params: dict,
                 waiter: Any, sink: _Sink | None) -> Request:
        """Validate and prepare one request on the caller's thread, then queue it; bad input raises here."""
        policy = self.policy
        try:
            if not (type(priority) is int and 0 <= priority < policy.priority_levels):
                raise InvalidRequestError(f"priority must be an int from 0 to {policy.priority_levels - 1} "
                                          f"(ContinuousPolicy.priority_levels={policy.priority_levels})",
                                          rule="priority level", value=priority)
            if timeout is not None and not (_is_number(timeout) and timeout > 0):
                raise InvalidRequestError("timeout must be a number of seconds > 0", rule="timeout > 0",
                                          value=timeout)
            if request_id is not None and not isinstance(request_id, str):
                raise InvalidRequestError("request_id must be a str", rule="request_id type", value=request_id)
            prepared = self.adapter.prepare(item, **params)
            cost = self.adapter.cost(prepared)
            if cost > policy.max_batch_tokens:
                raise RequestTooLargeError(
                    f"request costs {cost} tokens, more than one step's budget (max_batch_tokens="
                    f"{policy.max_batch_tokens}); shorten the prompt or raise ContinuousPolicy.max_batch_tokens",
                    rule="max_batch_tokens", value=cost)
        except InvalidRequestError as error:
            self._rejected_invalid += 1
            if error.workload is None:
                error.workload = self.name
            raise
        now = self._loop.time()
        if timeout is None:
            timeout = policy.default_timeout_s
        deadline = now + timeout if timeout is not None else None
        job = Job(prepared, request_id or f"{self.name}-{next(self._ids)}", sink is not None)
        request = Request(job, cost, now, deadline, priority, waiter)
        try:
            self._worker.push(request)
        except QueueFullError:
            self._rejected_full += 1
            raise
        self._submitted += 1
        return request

    # ------------------------------------------------------------------ results (event loop thread)
    def _hand_over(self, events: list[tuple[Request, int, Any]]) -> None:
        """Called on the step thread: hand one step's events to the event loop with one thread-safe call."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, events)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.warning("workload %r: event loop closed; %d results dropped", self.name, len(events))

    def _deliver(self, events: list[tuple[Request, int, Any]]) -> None:
        for request, kind, payload in events:
            job: Job = request.item
            sink = request.waiter if job.streaming else None
            if kind == TOKENS:
                sink.push(payload)
                continue
            if kind == DONE:
                try:
                    if sink is not None:
                        sink.finish()
                        continue
                    result = self.adapter.result(job.prepared, job.tokens)
                except Exception as error:
                    payload = RequestFailed(f"workload {self.name!r}: adapter.result() failed for request "
                                            f"{job.request_id!r}: {error!r}")
                    payload.__cause__ = error
                else:
                    resolve(request, result)
                    continue
            if isinstance(payload, DeadlineExceeded) and job.admitted:
                payload.partial_output = self._partial(job)
            fail(request, payload)

    def _partial(self, job: Job) -> Any:
        try:
            return self.adapter.result(job.prepared, job.tokens)
        except Exception:
            return list(job.tokens)

    # ------------------------------------------------------------------ observing
    def statistics(self) -> dict[str, Any]:
        """Counters, active and waiting sequences, tokens per step, step time and time to first token (ms)."""
        worker = self._worker
        counts = worker.counts if worker is not None else {}
        windows = worker.windows() if worker is not None else {}
        steps = windows.get("step_s", [])
        tokens = windows.get("tokens", [])
        generated = windows.get("generated", [])
        return {
            "active": worker.active_count if worker is not None else 0,
            "waiting": worker.waiting_count if worker is not None else 0,
            "submitted": self._submitted,
            "rejected_full": self._rejected_full,
            "rejected_invalid": self._rejected_invalid,
            **counts,
            "tokens_per_step": sum(tokens) / len(tokens) if tokens else 0.0,
            "generated_per_step": sum(generated) / len(generated) if generated else 0.0,
            "step_ms": _percentiles(steps),
            "ttft_ms": _percentiles(windows.get("ttft_s", [])),
            "latency_ms": _percentiles(windows.get("latency_s", [])),
            "memory": worker.memory if worker is not None else {},
        }

    def steps(self) -> list[StepRecord]:
        """The most recent `StepRecord`, oldest first (at most ``policy.step_log``)."""
        return self._worker.log() if self._worker is not None else []

    def __repr__(self) -> str:
        return f"<ContinuousWorkload {self.name!r} adapter={self.adapter.name!r} device={self.device}>"


class _Sink:
    """The event-loop side of one stream: items per step, then the end or an error. Its ``done()`` tells the step
    thread that the consumer left (or that the sequence ended), exactly like a cancelled future."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.streamer: TokenStreamer | None = None
        self.closed = False

    def done(self) -> bool:
        return self.closed

    def push(self, tokens: list[int]) -> None:
        items = self.streamer.push(tokens)
        if items:
            self.queue.put_nowait(items)

    def finish(self) -> None:
        items = self.streamer.finish()
        if items:
            self.queue.put_nowait(items)
        self.queue.put_nowait(_END)
        self.closed = True

    def set_exception(self, error: BaseException) -> None:
        self.queue.put_nowait(error)
        self.closed = True


async def _iterate(sink: _Sink) -> AsyncIterator[Any]:
    try:
        while True:
            items = await sink.queue.get()
            if items is _END:
                return
            if isinstance(items, BaseException):
                raise items
            for item in items:
                yield item
    finally:
        sink.closed = True


def _percentiles(samples: list[float]) -> dict[str, float | None]:
    return {f"p{q}": None if (value := percentile(samples, q)) is None else value * 1000.0 for q in (50, 90, 99)}
