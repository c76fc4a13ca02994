"""The dynamic batcher of the batching-strategies chapter (its ``DynamicBatcher`` sketch), kept as written.

Used by ``benchmarks/scheduler_overhead.py`` as the "hand-rolled asyncio batcher" peer. Its semantics are kept:

* one ``deque`` of ``(request, future)`` pairs;
* the wait timer is started by the request that finds the queue empty (``len(self.queue) == 1``), so the wait is
  counted from the first request of a batch, and a full batch does **not** leave early: every batch waits
  ``max_wait_ms``;
* the model runs inline on the event loop (``results = model(batch_requests)``), no thread, no executor;
* results are handed out by position (``zip(batch_futures, results)``), one ``set_result`` per request;
* the timer task is created with ``asyncio.create_task`` and no reference is kept (as in the chapter);
* nothing handles a model error or a cancelled caller (a failing batch leaves its callers waiting forever, and a
  cancelled caller makes ``set_result`` raise ``InvalidStateError`` inside the timer task).

Fixed, only so that it runs at all:

1. ``model`` was a free global of the chapter; it is passed to the constructor.
2. Liveness: when more than ``max_batch_size`` requests are queued, ``_process_batch`` takes one batch and leaves
   the rest with no timer; newer requests never find the queue at length 1 again, so nothing ever starts another
   timer and every caller hangs (with 1,024 closed-loop callers it stalls after the first batch). After a batch,
   a new timer is started when requests are left, the chapter's own remedy (``_process_after_wait``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any


class DynamicBatcher:
    def __init__(self, model: Callable[[list[Any]], Sequence[Any]], max_batch_size: int = 32,
                 max_wait_ms: float = 10) -> None:
        self.model = model  # fix 1: the chapter's free global ``model``
        self.queue: deque = deque()
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0

    async def add_request(self, request: Any) -> Any:
        future = asyncio.Future()
        self.queue.append((request, future))

        # Start batch timer on first request
        if len(self.queue) == 1:
            asyncio.create_task(self._process_after_wait())

        return await future

    async def _process_after_wait(self) -> None:
        await asyncio.sleep(self.max_wait)
        await self._process_batch()

    async def _process_batch(self) -> None:
        batch_requests = []
        batch_futures = []

        while self.queue and len(batch_requests) < self.max_batch_size:
            req, future = self.queue.popleft()
            batch_requests.append(req)
            batch_futures.append(future)

        # Run batched inference
        results = self.model(batch_requests)

        # Distribute results
        for future, result in zip(batch_futures, results):
            future.set_result(result)

        if self.queue:  # fix 2: requests left behind get a timer of their own
            asyncio.create_task(self._process_after_wait())
