"""The least an asyncio batcher can do: a reference floor for ``benchmarks/scheduler_overhead.py``, not a peer.

One list of ``(item, future)`` pairs; a full batch runs at once, otherwise one ``call_later`` timer, started by
the first request that finds none running; the batch function runs inline on the event loop and results are set
by position. No validation, priorities, deadlines, cancellation handling, back-pressure, statistics or error
isolation: what is left is the cost every asyncio batcher pays (a future per request, one task wake-up per
result).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any


class InlineFloorBatcher:
    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch_size: int,
                 max_wait_ms: float) -> None:
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000.0
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self._max_batch_size:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._max_wait_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._pending[:self._max_batch_size]
        del self._pending[:self._max_batch_size]
        for (_, future), result in zip(batch, self._run_batch([item for item, _ in batch])):
            future.set_result(result)
        if self._pending:  # the rest waits from its own oldest arrival
            self._timer = asyncio.get_running_loop().call_later(self._max_wait_s, self._flush)
