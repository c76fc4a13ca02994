"""The step loop of a continuous workload: one thread that admits, steps and releases sequences.

Only this thread touches the adapter's running state and the set of active sequences. The waiting queue (a
`RequestQueue`) is shared with the event loop, which pushes new requests: both sides hold ``_cond`` around it.
Everything a step decided (tokens for streams, finished and failed requests) goes back as one list of events
through ``hand_over``, which the workload turns into one ``call_soon_threadsafe``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._batching import Request, RequestQueue
from .errors import ContractError, DeadlineExceeded, RequestFailed, SchedulerClosed

if TYPE_CHECKING:
    import torch

    from ._continuous_adapter import StepAdapter
    from ._continuous_policy import ContinuousPolicy

__all__ = ["DONE", "FAILED", "TOKENS", "Job", "StepLoop", "StepRecord"]

log = logging.getLogger("batchplex")
TOKENS, DONE, FAILED = 0, 1, 2
WINDOW = 8192
Event = tuple[Request, int, Any]


class Job:
    """A request's own state in a continuous workload (it is the queued `Request`'s ``item``)."""

    __slots__ = ("prepared", "request_id", "streaming", "tokens", "admitted")

    def __init__(self, prepared: Any, request_id: str, streaming: bool) -> None:
        self.prepared = prepared
        self.request_id = request_id
        self.streaming = streaming
        self.tokens: list[int] = []  # appended by the step thread until the request ends, then read by the loop
        self.admitted = False


@dataclass(frozen=True)
class StepRecord:
    """One step: which requests ran in it (``active``, after ``admitted`` joined), which ended with it
    (``finished``), which were released just before it (``left``: cancelled or timed out), its token budget use
    (``tokens``: one per continuing sequence plus joining prompts), the tokens it generated, its duration, and the
    adapter's memory figures right after it (finished sequences released)."""

    index: int
    active: tuple[str, ...]
    admitted: tuple[str, ...]
    finished: tuple[str, ...]
    left: tuple[str, ...]
    tokens: int
    generated: int
    seconds: float
    memory: dict[str, Any]


class StepLoop:
    """The worker of one `ContinuousWorkload` (see the module docstring)."""

    def __init__(self, name: str, adapter: StepAdapter, policy: ContinuousPolicy, model: Any,
                 device: torch.device, clock: Callable[[], float], hand_over: Callable[[list[Event]], None]
                 ) -> None:
        self.name = name
        self._adapter = adapter
        self._policy = policy
        self._model = model
        self._device = device
        self._clock = clock
        self._hand_over = hand_over
        self._cond = threading.Condition()
        self._queue = RequestQueue(policy.waiting_policy(), name)
        self._active: dict[Hashable, Request] = {}
        self._held: Request | None = None  # the next request to admit: it did not fit the last step's budget
        self._closing = self._aborting = False
        self._stopped: BaseException | None = None
        self._records: deque[StepRecord] = deque(maxlen=policy.step_log)
        self._windows = {key: deque(maxlen=WINDOW) for key in ("step_s", "tokens", "generated", "ttft_s",
                                                               "latency_s")}
        self.counts = {"admitted": 0, "completed": 0, "failed": 0, "cancelled": 0, "timeouts": 0, "steps": 0,
                       "generated_tokens": 0}
        self.memory: dict[str, Any] = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"batchplex-steps-{name}", daemon=True)

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> BaseException | None:
        """Start the thread; wait until the adapter started. Returns its error, if any (the thread has ended)."""
        self._thread.start()
        self._ready.wait()
        if self._stopped is not None:
            self._thread.join()
        return self._stopped

    def push(self, request: Request) -> None:
        """Queue a request (event loop thread); raises `QueueFullError` when ``max_queue`` requests wait."""
        with self._cond:
            if self._stopped is not None:
                raise SchedulerClosed(f"workload {self.name!r}: the step loop stopped after an error "
                                      f"({self._stopped!r}); no request is taken")
            self._queue.push(request)
            self._cond.notify()

    def abort(self) -> list[Request]:
        """Closing without draining: return the waiting requests; active ones are released before the next step."""
        with self._cond:
            self._aborting = True
            self._cond.notify()
            return self._queue.drain()

    def stop(self) -> None:
        """Finish what is active and waiting (unless aborted), close the adapter and join the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def waiting_count(self) -> int:
        return self._queue.depth + (self._held is not None)

    def windows(self) -> dict[str, list[float]]:
        return {key: list(values) for key, values in self._windows.items()}

    def log(self) -> list[StepRecord]:
        return list(self._records)

    # ------------------------------------------------------------------ the step thread
    def _run(self) -> None:
        try:
            self._adapter.start(self._model, self._device, self._policy)
            self.memory = self._adapter.memory()
        except BaseException as error:
            self._stopped = error
            self._ready.set()
            return
        self._ready.set()
        try:
            while self._iterate():
                pass
        except BaseException as error:  # a fault outside step(): fail every request left, take no more
            log.exception("workload %r: the step loop failed", self.name)
            self._crash(error)
        finally:
            try:
                self._adapter.close()
            except Exception:
                log.exception("workload %r: adapter.close() failed", self.name)

    def _iterate(self) -> bool:
        """Release leavers, admit joiners, run one step, hand the events over. False once the loop must end."""
        events: list[Event] = []
        with self._cond:
            while not (self._active or self._held or self._queue.depth or self._closing or self._aborting):
                self._cond.wait()
            now = self._clock()
            for request in self._queue.expire(now):
                self.counts["timeouts"] += 1
                events.append((request, FAILED, DeadlineExceeded(
                    f"workload {self.name!r}: request {request.item.request_id!r} waited {now - request.arrival:.3f}s,"
                    f" past its timeout of {request.deadline - request.arrival:.3f}s; it never ran")))
            aborting = self._aborting
        if aborting:
            self._leave_all(events, lambda request: SchedulerClosed(
                f"workload {self.name!r}: closed while request {request.item.request_id!r} ran "
                f"(aclose(drain=False)); it left the batch"))
            self._send(events)
            return False
        left = self._leave(now, events)
        with self._cond:
            joining = self._take(now)
            self.counts["cancelled"] += self._queue.cancelled_seen
            self._queue.cancelled_seen = 0
            done = self._closing and not (self._active or joining or self._held or self._queue.depth)
        tokens = len(self._active) + sum(request.cost for request in joining)
        admitted = self._admit(joining, events)
        if self._active:
            self._step(admitted, left, tokens, events)
        elif left or joining:  # sequences left (or failed to join) and no step followed: memory changed anyway
            self.memory = self._adapter.memory()
        self._send(events)
        return not done

    def _take(self, now: float) -> list[Request]:
        """Waiting requests that join this step, in priority order, within the active cap and the token budget."""
        room = self._policy.max_active - len(self._active)
        budget = self._policy.max_batch_tokens - len(self._active)
        joining = []
        while room > 0:
            if self._held is not None:
                request, self._held = self._held, None
            else:
                taken = self._queue.take(now, force=True)
                if not taken:
                    break
                request = taken[0]
            if request.cost > budget:
                self._held = request
                break
            joining.append(request)
            room -= 1
            budget -= request.cost
        return joining

    def _leave(self, now: float, events: list[Event]) -> tuple[str, ...]:
        """Release active sequences whose caller cancelled or whose deadline passed; drop such a held request."""
        left = []
        for handle, request in list(self._active.items()):
            cancelled = request.waiter.done()
            if not cancelled and (request.deadline is None or request.deadline > now):
                continue
            del self._active[handle]
            self._release(handle)
            left.append(request.item.request_id)
            if cancelled:
                self.counts["cancelled"] += 1
                continue
            self.counts["timeouts"] += 1
            events.append((request, FAILED, DeadlineExceeded(
                f"workload {self.name!r}: request {request.item.request_id!r} ran past its timeout of "
                f"{request.deadline - request.arrival:.3f}s after {len(request.item.tokens)} tokens; it left the "
                f"batch (the tokens so far are the error's partial_output)")))
        held = self._held
        if held is not None and (held.waiter.done() or (held.deadline is not None and held.deadline <= now)):
            self._held = None
            if held.waiter.done():
                self.counts["cancelled"] += 1
            else:
                self.counts["timeouts"] += 1
                events.append((held, FAILED, DeadlineExceeded(
                    f"workload {self.name!r}: request {held.item.request_id!r} waited {now - held.arrival:.3f}s, "
                    f"past its timeout of {held.deadline - held.arrival:.3f}s; it never ran")))
        return tuple(left)

    def _admit(self, joining: list[Request], events: list[Event]) -> tuple[str, ...]:
        admitted = []
        for request in joining:
            job: Job = request.item
            if request.waiter.done():
                self.counts["cancelled"] += 1
                continue
            try:
                handle = self._adapter.admit(job.prepared)
                if handle in self._active:
                    raise ContractError(f"adapter {self._adapter.name!r}: admit() returned handle {handle!r}, "
                                        f"which an active sequence has already")
            except Exception as error:
                self._fail(request, f"adapter.admit() failed: {error!r}", error, events)
                continue
            job.admitted = True
            self._active[handle] = request
            self.counts["admitted"] += 1
            admitted.append(job.request_id)
        return tuple(admitted)

    def _step(self, admitted: tuple[str, ...], left: tuple[str, ...], tokens: int, events: list[Event]) -> None:
        active = tuple(request.item.request_id for request in self._active.values())
        started = time.perf_counter()
        try:
            finished, generated = self._collect(self._adapter.step(), events)
        except Exception as error:  # a step cannot be split: every sequence in it fails, alone or not
            log.warning("workload %r: step failed with %r; failing its %d sequences", self.name, error,
                        len(self._active))
            finished, generated = (), 0
            for handle, request in list(self._active.items()):
                del self._active[handle]
                self._release(handle)
                self._fail(request, f"the step failed: {error!r}", error, events)
        seconds = time.perf_counter() - started
        self.memory = self._adapter.memory()
        index = self.counts["steps"]
        self.counts["steps"] = index + 1
        self.counts["generated_tokens"] += generated
        self._records.append(StepRecord(index, active, admitted, finished, left, tokens, generated, seconds,
                                        self.memory))
        self._windows["step_s"].append(seconds)
        self._windows["tokens"].append(tokens)
        self._windows["generated"].append(generated)

    def _collect(self, outputs: Any, events: list[Event]) -> tuple[tuple[str, ...], int]:
        """Apply one step's outputs: append tokens, end finished or failed sequences. Outputs for handles that are
        no longer active (released meanwhile) are ignored."""
        now = self._clock()
        finished = []
        generated = 0
        for output in outputs:
            if not (isinstance(output, tuple) and len(output) in (3, 4)):
                raise ContractError(f"adapter {self._adapter.name!r}: step() must return (handle, new_token_ids, "
                                    f"finished[, error]) tuples, got {output!r}")
            handle, new, ended, *error = output
            request = self._active.get(handle)
            if request is None:
                continue
            job: Job = request.item
            if new:
                if not job.tokens:
                    self._windows["ttft_s"].append(now - request.arrival)
                job.tokens.extend(new)
                generated += len(new)
                if job.streaming:
                    events.append((request, TOKENS, list(new)))
            failure = error[0] if error else None
            if failure is None and not ended:
                continue
            del self._active[handle]
            self._release(handle)
            finished.append(job.request_id)
            if failure is not None:
                self._fail(request, f"generation failed: {failure}",
                           failure if isinstance(failure, BaseException) else None, events)
                continue
            self.counts["completed"] += 1
            self._windows["latency_s"].append(now - request.arrival)
            events.append((request, DONE, None))
        return tuple(finished), generated

    # ------------------------------------------------------------------ helpers
    def _release(self, handle: Hashable) -> None:
        try:
            self._adapter.release(handle)
        except Exception:
            log.exception("workload %r: adapter.release(%r) failed", self.name, handle)

    def _fail(self, request: Request, why: str, cause: BaseException | None, events: list[Event]) -> None:
        self.counts["failed"] += 1
        error = RequestFailed(f"workload {self.name!r}: request {request.item.request_id!r}: {why}")
        error.__cause__ = cause
        events.append((request, FAILED, error))

    def _leave_all(self, events: list[Event], make_error: Callable[[Request], BaseException]) -> None:
        for handle, request in list(self._active.items()):
            del self._active[handle]
            self._release(handle)
            self.counts["cancelled"] += 1
            events.append((request, FAILED, make_error(request)))
        if self._held is not None:
            events.append((self._held, FAILED, make_error(self._held)))
            self._held = None

    def _crash(self, error: BaseException) -> None:
        with self._cond:
            self._stopped = error
            waiting = self._queue.drain()

        def failed(request: Request) -> BaseException:
            failure = RequestFailed(f"workload {self.name!r}: the step loop failed ({error!r}); request "
                                    f"{request.item.request_id!r} did not finish")
            failure.__cause__ = error
            return failure

        events = [(request, FAILED, failed(request)) for request in waiting]
        self._leave_all(events, failed)
        self._send(events)

    def _send(self, events: list[Event]) -> None:
        if events:
            self._hand_over(events)
