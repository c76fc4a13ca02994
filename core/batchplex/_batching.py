"""Batch formation: pure logic over one workload's queued requests and an injected ``now``.

Nothing here reads a clock, sleeps or touches a device: the scheduler passes ``now`` (the event loop's monotonic
clock; tests pass a fake one) and asks two questions, "when must I look again?" (`next_event`) and "give me the
next batch" (`take`). Requests live in one FIFO per (bucket, priority level). A bucket is ready when it is full
(``max_batch_size`` requests or a spent cost budget), when its **oldest** request has waited ``max_wait_ms``, or
when waiting longer would run past the tightest deadline in it.

Cancelled and expired requests are removed lazily: they are skipped when they reach the head of their FIFO, so
cancelling costs the caller nothing and the queue never searches.
"""

from __future__ import annotations

import heapq
import itertools
import math
import weakref
from collections import deque
from typing import Any

from .errors import QueueFullError
from .policy import BatchPolicy

__all__ = ["Request", "RequestQueue", "QUEUED", "TAKEN", "DONE"]

QUEUED, TAKEN, DONE = 0, 1, 2
_sequence = itertools.count()


class Request:
    """One accepted request: the prepared item, its cost and timing, and the future its caller awaits."""

    __slots__ = ("item", "cost", "arrival", "deadline", "priority", "waiter", "state", "bucket", "__weakref__")

    def __init__(self, item: Any, cost: int, arrival: float, deadline: float | None, priority: int,
                 waiter: Any) -> None:
        self.item = item
        self.cost = cost
        self.arrival = arrival
        self.deadline = deadline
        self.priority = priority
        self.waiter = waiter
        self.state = QUEUED
        self.bucket = 0

    def __repr__(self) -> str:
        return f"<Request cost={self.cost} priority={self.priority} state={self.state}>"


def _queued(request: Request | None) -> bool:
    """Still waiting in the queue: not taken, expired, drained or cancelled by its caller."""
    return request is not None and request.state == QUEUED and not request.waiter.done()


class _Bucket:
    """FIFOs of one cost range, one per priority level (index = level, higher served first)."""

    __slots__ = ("levels", "live", "entries", "max_cost")

    def __init__(self, levels: int) -> None:
        self.levels = [deque() for _ in range(levels)]
        self.live = 0        # queued requests not known to be done (a cancelled one counts until seen)
        self.entries = 0     # everything in the FIFOs, dead entries included
        self.max_cost = 0    # the largest cost queued since the bucket was last empty


class RequestQueue:
    """All queued requests of one workload under one `BatchPolicy`."""

    def __init__(self, policy: BatchPolicy, workload: str = "") -> None:
        self.policy = policy
        self.workload = workload
        # Read on every push: copied from the (frozen) policy once.
        self._max_queue = policy.max_queue
        self._budget = policy.max_batch_cost
        self._bucket_edges = policy.bucket_edges
        # Live knobs, starting from the policy: an online tuner may move both; out-of-memory errors lower the cap.
        self._max_batch_size = self._memory_cap = self.batch_limit = policy.max_batch_size
        self.max_wait_s = policy.max_wait_s
        self.deadline_margin_s = 0.0  # expected run time of a batch: leave early enough to meet deadlines
        self._buckets = [_Bucket(policy.priority_levels) for _ in range(policy.bucket_count)]
        # (deadline, arrival order, weak reference): a finished request is not kept alive by the heap until it
        # surfaces
        self._deadlines: list[tuple[float, int, weakref.ref]] = []
        self.depth = 0
        self.cancelled_seen = 0
        self._refusals = 0

    # ``batch_limit``, the most requests the next batch may hold (the current target, never above the memory
    # cap), is read on every push: it is a plain attribute, recomputed whenever either knob is set.
    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self._max_batch_size = value
        self._update_batch_limit()

    @property
    def memory_cap(self) -> int:
        return self._memory_cap

    @memory_cap.setter
    def memory_cap(self, value: int) -> None:
        self._memory_cap = value
        self._update_batch_limit()

    def _update_batch_limit(self) -> None:
        self.batch_limit = max(1, min(self._max_batch_size, self._memory_cap))

    # ---------------------------------------------------------------- arrivals
    def push(self, request: Request) -> bool:
        """Queue an accepted request; True when its bucket is now full (dispatch without waiting).

        Raises `QueueFullError` when ``max_queue`` requests are queued already.
        """
        if self.depth >= self._max_queue:
            self._refuse()
        cost = request.cost
        if self._bucket_edges:
            request.bucket = self.policy.bucket_of(cost)
        bucket = self._buckets[request.bucket]
        bucket.levels[request.priority].append(request)
        bucket.live += 1
        bucket.entries += 1
        if cost > bucket.max_cost:
            bucket.max_cost = cost
        self.depth += 1
        if request.deadline is not None:
            self._watch_deadline(request)
        if bucket.entries > 2 * self._max_queue + 64:
            self._compact()
        return self._full(bucket)

    def _refuse(self) -> None:
        """The queue holds ``max_queue`` requests: raise `QueueFullError` unless dropping dead entries made room."""
        self._refusals += 1
        if self._refusals >= max(1, self.depth // 16):  # amortized: a refusal stays O(1) on average
            self._refusals = 0
            self._compact()
        if self.depth >= self._max_queue:
            raise QueueFullError(
                f"workload {self.workload!r}: queue is full ({self.depth} of max_queue={self._max_queue} "
                f"requests waiting); retry later or raise BatchPolicy.max_queue")

    def _watch_deadline(self, request: Request) -> None:
        heapq.heappush(self._deadlines, (request.deadline, next(_sequence), weakref.ref(request)))
        if len(self._deadlines) > 2 * self.depth + 64:  # drop entries of finished requests (amortized)
            self._deadlines = [entry for entry in self._deadlines if _queued(entry[2]())]
            heapq.heapify(self._deadlines)

    def _full(self, bucket: _Bucket) -> bool:
        return bucket.live >= self.batch_limit or (
            self._budget is not None and self.policy.padded_size(bucket.live) * bucket.max_cost >= self._budget)

    # ---------------------------------------------------------------- time
    def expire(self, now: float) -> list[Request]:
        """Remove and return queued requests whose deadline is ``<= now`` (they fail; they never run)."""
        expired = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            request = heapq.heappop(heap)[2]()
            if _queued(request):
                request.state = DONE
                self._forget(request)
                expired.append(request)
        return expired

    def next_event(self) -> float | None:
        """The earliest time a bucket becomes ready or a deadline expires; None when nothing is queued."""
        if not self.depth:
            return None
        wait = self.max_wait_s
        event = math.inf
        for bucket in self._buckets:
            head = self._oldest(bucket)
            if head is not None:
                event = min(event, head.arrival + wait)
        deadline = self.tightest_deadline()
        if deadline is not None:
            event = min(event, deadline - self.deadline_margin_s)
        return None if event == math.inf else event

    def ready(self, now: float) -> bool:
        return self._pick_bucket(now, force=False) is not None

    # ---------------------------------------------------------------- batches
    def take(self, now: float, force: bool = False) -> list[Request]:
        """The next batch from the readiest bucket (empty when none is ready). ``force`` ignores the wait."""
        bucket = self._pick_bucket(now, force)
        if bucket is None:
            return []
        batch = self._take_from(bucket, now)
        if not bucket.live:
            bucket.max_cost = 0
        return batch

    def _pick_bucket(self, now: float, force: bool) -> _Bucket | None:
        wait = self.max_wait_s
        deadline = self.tightest_deadline()
        urgent_bucket = -1
        if deadline is not None and deadline - self.deadline_margin_s <= now:
            urgent_bucket = self._deadlines[0][2]().bucket
        best, best_key = None, None
        for index, bucket in enumerate(self._buckets):
            head = self._oldest(bucket)
            if head is None:
                continue
            if force or index == urgent_bucket or head.arrival + wait <= now or self._full(bucket):
                key = (-self._top_level(bucket), head.arrival)
                if best_key is None or key < best_key:
                    best, best_key = bucket, key
        return best

    def _take_from(self, bucket: _Bucket, now: float) -> list[Request]:
        limit = self.batch_limit
        budget = self._budget
        if budget is None and len(bucket.levels) == 1:
            return self._take_fifo(bucket, limit)
        aging = self.policy.priority_aging_ms / 1000.0
        single_level = len(bucket.levels) == 1
        batch: list[Request] = []
        largest = 0
        while len(batch) < limit:
            fifo = bucket.levels[0] if single_level else self._next_level(bucket, now - aging)
            if fifo is None:
                break
            request = self._live_head(fifo, bucket)
            if request is None:
                if single_level:
                    break
                continue
            if budget is not None and batch:
                grown = max(largest, request.cost)
                if self.policy.padded_size(len(batch) + 1) * grown > budget:
                    break
            fifo.popleft()
            bucket.entries -= 1
            bucket.live -= 1
            self.depth -= 1
            request.state = TAKEN
            largest = max(largest, request.cost)
            batch.append(request)
        return batch

    def _take_fifo(self, bucket: _Bucket, limit: int) -> list[Request]:
        """The common case (one priority level, no budget): pop up to ``limit`` live requests in one pass."""
        fifo = bucket.levels[0]
        batch: list[Request] = []
        popped = 0
        while fifo and len(batch) < limit:
            request = fifo.popleft()
            popped += 1
            if request.state != QUEUED:  # expired: already forgotten
                continue
            if request.waiter.done():  # the caller cancelled while it was queued
                request.state = DONE
                self._forget(request)
                self.cancelled_seen += 1
                continue
            request.state = TAKEN
            batch.append(request)
        bucket.entries -= popped
        bucket.live -= len(batch)
        self.depth -= len(batch)
        return batch

    # ---------------------------------------------------------------- helpers
    def _live_head(self, fifo: deque, bucket: _Bucket) -> Request | None:
        """Drop dead entries from the front of ``fifo``; return its first live request (None if none)."""
        while fifo:
            head = fifo[0]
            if head.state == QUEUED:
                if not head.waiter.done():
                    return head
                head.state = DONE  # the caller cancelled while it was queued
                self._forget(head)
                self.cancelled_seen += 1
            fifo.popleft()
            bucket.entries -= 1
        return None

    def _next_level(self, bucket: _Bucket, aged_before: float) -> deque | None:
        """The FIFO to serve next: the oldest head that waited past the aging limit, else the highest level."""
        top, aged, aged_arrival = None, None, math.inf
        for fifo in reversed(bucket.levels):
            head = self._live_head(fifo, bucket)
            if head is None:
                continue
            if top is None:
                top = fifo
            if head.arrival <= aged_before and head.arrival < aged_arrival:
                aged, aged_arrival = fifo, head.arrival
        return aged if aged is not None else top

    def _oldest(self, bucket: _Bucket) -> Request | None:
        oldest = None
        if bucket.live:
            for fifo in bucket.levels:
                head = self._live_head(fifo, bucket)
                if head is not None and (oldest is None or head.arrival < oldest.arrival):
                    oldest = head
        return oldest

    def _top_level(self, bucket: _Bucket) -> int:
        for level in range(len(bucket.levels) - 1, -1, -1):
            if bucket.levels[level]:
                return level
        return 0

    def tightest_deadline(self) -> float | None:
        heap = self._deadlines
        while heap:
            if _queued(heap[0][2]()):
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def _forget(self, request: Request) -> None:
        self._buckets[request.bucket].live -= 1
        self.depth -= 1

    def _compact(self) -> None:
        """Drop dead entries everywhere (cancelled callers included) so they stop counting against the bound."""
        for bucket in self._buckets:
            for level, fifo in enumerate(bucket.levels):
                kept = deque()
                for request in fifo:
                    if request.state == QUEUED and request.waiter.done():
                        request.state = DONE
                        self._forget(request)
                        self.cancelled_seen += 1
                    elif request.state == QUEUED:
                        kept.append(request)
                bucket.entries -= len(fifo) - len(kept)
                bucket.levels[level] = kept

    def drain(self) -> list[Request]:
        """Remove and return every live queued request (closing without draining)."""
        left = []
        for bucket in self._buckets:
            for fifo in bucket.levels:
                while (request := self._live_head(fifo, bucket)) is not None:
                    fifo.popleft()
                    bucket.entries -= 1
                    request.state = DONE
                    self._forget(request)
                    left.append(request)
        return left
