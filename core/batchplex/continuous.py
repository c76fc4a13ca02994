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
import concurrent.futures
import itertools
import logging
import math
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ._batching import Request
from ._continuous_worker import DONE, TOKENS, Job, StepLoop, StepRecord
from .adapter import Adapter, Prepared
from .errors import (ContractError, DeadlineExceeded, InvalidRequestError, PolicyError, QueueFullError,
                     RequestFailed, RequestTooLargeError, SchedulerClosed)
from .metrics import percentile
from .policy import BatchPolicy

__all__ = ["ContinuousPolicy", "ContinuousWorkload", "StepAdapter", "StepOutput", "StepRecord", "TokenStreamer"]

log = logging.getLogger("batchplex")
_INVALID_STATE = (asyncio.InvalidStateError, concurrent.futures.InvalidStateError)
_END = object()


@dataclass(frozen=True)
class ContinuousPolicy:
    """How a continuous workload admits requests: validated once, when the policy is made.

    * ``max_active``: the most sequences in the running batch at once;
    * ``max_batch_tokens``: the token budget of one step (one per continuing sequence, plus the prompt tokens of
      the requests joining at that step); also the longest prompt a request may have;
    * ``max_queue``: the most requests waiting to join; one more is refused at once with `QueueFullError`;
    * ``priority_levels`` (higher served first) and ``priority_aging_ms`` (a request that waited this long joins
      before any fresher one, so low levels never starve);
    * ``default_timeout_s``: the deadline of requests submitted without ``timeout``;
    * ``step_log``: how many `StepRecord` the workload keeps.
    """

    max_active: int = 64
    max_batch_tokens: int = 2048
    max_queue: int = 4096
    priority_levels: int = 1
    priority_aging_ms: float = 5000.0
    default_timeout_s: float | None = None
    step_log: int = 1024

    def __post_init__(self) -> None:
        for field in ("max_active", "max_batch_tokens", "max_queue", "step_log"):
            value = getattr(self, field)
            _require(_is_int(value) and value >= 1, field, value, "an int >= 1")
        _require(self.max_batch_tokens >= self.max_active, "max_batch_tokens", self.max_batch_tokens,
                 f"at least max_active ({self.max_active}): every active sequence needs one token per step")
        _require(_is_int(self.priority_levels) and 1 <= self.priority_levels <= 16, "priority_levels",
                 self.priority_levels, "an int from 1 to 16")
        _require(_is_number(self.priority_aging_ms) and self.priority_aging_ms > 0, "priority_aging_ms",
                 self.priority_aging_ms, "a number > 0")
        if self.default_timeout_s is not None:
            _require(_is_number(self.default_timeout_s) and self.default_timeout_s > 0, "default_timeout_s",
                     self.default_timeout_s, "a number > 0 or None")

    def waiting_policy(self) -> BatchPolicy:
        """The policy of the waiting queue: one request at a time, in priority order, never waiting to batch."""
        return BatchPolicy(max_batch_size=1, max_wait_ms=0.0, max_queue=self.max_queue,
                           default_timeout_s=self.default_timeout_s, priority_levels=self.priority_levels,
                           priority_aging_ms=self.priority_aging_ms)


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
                _fail(request, SchedulerClosed(f"workload {self.name!r}: closed before this request ran "
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
                    _resolve(request, result)
                    continue
            if isinstance(payload, DeadlineExceeded) and job.admitted:
                payload.partial_output = self._partial(job)
            _fail(request, payload)

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


def _resolve(request: Request, result: Any) -> None:
    try:
        request.waiter.set_result(result)
    except _INVALID_STATE:  # the caller cancelled meanwhile
        pass


def _fail(request: Request, error: BaseException) -> None:
    try:
        request.waiter.set_exception(error)
    except _INVALID_STATE:
        pass


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise PolicyError(f"ContinuousPolicy.{field} must be {expected}, got {value!r}")
