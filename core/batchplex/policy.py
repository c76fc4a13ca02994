"""`BatchPolicy`: how one workload's requests are grouped into batches.

Every strategy of the classic batching playbook is a field here, validated once when the policy is made:

* dynamic batching: a batch leaves when it holds ``max_batch_size`` requests, or ``max_wait_ms`` after the
  **oldest** waiting request arrived, whichever comes first. The wait is kept by an event-loop timer, and
  asyncio's epoll selector rounds a timeout up to whole milliseconds: a batch may leave up to about 1 ms late
  (``benchmarks/half_load_floor.py``: the oldest request's wait had a p99 of 3.1 ms with ``max_wait_ms=2`` at
  light load), and later when the loop falls behind under load;
* static batching and CUDA-graph friendly sizes: ``preferred_batch_sizes`` pads a batch of ``n`` requests up to
  the smallest preferred size ``>= n`` (`BatchPolicy.static` makes a fixed-size policy);
* sequence-length bucketing: ``bucket_edges`` keeps one queue per length range, so a batch only mixes requests of
  similar cost; a request above the last edge is refused at submit (adapters truncate before that by option);
* a cost budget: ``max_batch_cost`` bounds the padded cost of a batch (``padded size x largest cost``, e.g. padded
  tokens);
* priorities: ``priority_levels`` levels, higher served first; a request that waited ``priority_aging_ms`` is
  served before any fresher one, so low levels never starve;
* deadlines and back-pressure: ``default_timeout_s`` and ``max_queue``;
* ``dispatch_when_idle`` (opt-in): while a device has nothing to do, a batch leaves at once with whatever arrived
  in the same event-loop turn instead of waiting ``max_wait_ms`` (lower latency at low load; batches still grow
  when the device is busy, because requests queue behind the running batch).
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

from .errors import PolicyError

__all__ = ["BatchPolicy"]


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    preferred_batch_sizes: tuple[int, ...] = ()
    bucket_edges: tuple[int, ...] = ()
    max_batch_cost: int | None = None
    max_queue: int = 4096
    default_timeout_s: float | None = None
    priority_levels: int = 1
    priority_aging_ms: float | None = None
    dispatch_when_idle: bool = False

    def __post_init__(self) -> None:
        _require(_is_int(self.max_batch_size) and self.max_batch_size >= 1,
                 "max_batch_size", self.max_batch_size, "an int >= 1")
        _require(_is_number(self.max_wait_ms) and self.max_wait_ms >= 0,
                 "max_wait_ms", self.max_wait_ms, "a finite number >= 0")
        object.__setattr__(self, "preferred_batch_sizes", _sorted_positive_ints(
            "preferred_batch_sizes", self.preferred_batch_sizes))
        object.__setattr__(self, "bucket_edges", _sorted_positive_ints("bucket_edges", self.bucket_edges))
        if self.preferred_batch_sizes:
            largest = self.preferred_batch_sizes[-1]
            _require(largest <= self.max_batch_size, "preferred_batch_sizes", self.preferred_batch_sizes,
                     f"sizes <= max_batch_size ({self.max_batch_size}); raise max_batch_size or drop {largest}")
        if self.max_batch_cost is not None:
            _require(_is_int(self.max_batch_cost) and self.max_batch_cost >= 1,
                     "max_batch_cost", self.max_batch_cost, "an int >= 1 or None")
            if self.bucket_edges:
                _require(self.bucket_edges[-1] <= self.max_batch_cost, "max_batch_cost", self.max_batch_cost,
                         f"at least the last bucket edge ({self.bucket_edges[-1]}) so every bucket can run")
        _require(_is_int(self.max_queue) and self.max_queue >= 1, "max_queue", self.max_queue, "an int >= 1")
        if self.default_timeout_s is not None:
            _require(_is_number(self.default_timeout_s) and self.default_timeout_s > 0,
                     "default_timeout_s", self.default_timeout_s, "a number > 0 or None")
        _require(_is_int(self.priority_levels) and 1 <= self.priority_levels <= 16,
                 "priority_levels", self.priority_levels, "an int from 1 to 16")
        _require(isinstance(self.dispatch_when_idle, bool), "dispatch_when_idle", self.dispatch_when_idle,
                 "True or False")
        if self.priority_aging_ms is None:
            object.__setattr__(self, "priority_aging_ms", max(100.0, 20 * self.max_wait_ms))
        _require(_is_number(self.priority_aging_ms) and self.priority_aging_ms > 0,
                 "priority_aging_ms", self.priority_aging_ms, "a number > 0")

    @classmethod
    def static(cls, batch_size: int, *, max_wait_ms: float = 5.0, **fields: object) -> BatchPolicy:
        """Static batching: every batch is padded up to exactly ``batch_size`` (predictable shapes and memory)."""
        return cls(max_batch_size=batch_size, preferred_batch_sizes=(batch_size,), max_wait_ms=max_wait_ms,
                   **fields)  # type: ignore[arg-type]

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @functools.cached_property
    def max_cost(self) -> float:
        """The largest cost one request may have: the last bucket edge, else the whole budget, else unbounded.

        Cached (the policy is frozen): every submit compares against it."""
        if self.bucket_edges:
            return self.bucket_edges[-1]
        return self.max_batch_cost if self.max_batch_cost is not None else math.inf

    def bucket_of(self, cost: float) -> int:
        """Index of the smallest bucket whose edge is >= cost (0 when there are no buckets)."""
        return bisect.bisect_left(self.bucket_edges, cost) if self.bucket_edges else 0

    @property
    def bucket_count(self) -> int:
        return max(1, len(self.bucket_edges))

    def padded_size(self, n: int) -> int:
        """The batch size a batch of ``n`` requests is padded up to (``n`` without a preferred size above it)."""
        sizes = self.preferred_batch_sizes
        if sizes and n <= sizes[-1]:
            return sizes[bisect.bisect_left(sizes, n)]
        return n

    @functools.cached_property
    def batch_shapes(self) -> tuple[int, ...]:
        """Every batch size this policy can hand a model, after padding: what a warm-up must run once."""
        return tuple(sorted({self.padded_size(n) for n in range(1, self.max_batch_size + 1)}))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sorted_positive_ints(field: str, values: object) -> tuple[int, ...]:
    try:
        items = tuple(values)  # type: ignore[arg-type]
    except TypeError:
        raise PolicyError(f"BatchPolicy.{field} must be a sequence of ints, got {values!r}") from None
    _require(all(_is_int(v) and v >= 1 for v in items), field, values, "positive ints")
    _require(list(items) == sorted(set(items)), field, values, "strictly increasing values")
    return items


def _require(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise PolicyError(f"BatchPolicy.{field} must be {expected}, got {value!r}")
