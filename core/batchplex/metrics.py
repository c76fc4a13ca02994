"""Per-workload statistics: counters, recent wait and run times, and the record each finished batch leaves.

Counters are updated on the event-loop thread only, so they need no lock. Percentiles are computed over a window
of recent samples when `statistics()` is read, never on the request path.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchRecord", "BusyTracker", "WorkloadStats", "busy_time", "percentile"]

WINDOW = 8192


@dataclass(frozen=True)
class BatchRecord:
    """What one finished batch did; handed to ``batch_finished`` observers.

    ``run_s`` is device time (CUDA events; the model's wall time on the CPU). The host-clock fields show where a
    batch's trip through the executor went: ``pipeline_s`` from leaving the queue to its results reaching the
    event loop, and the time inside each stage (``collate_s``; ``launch_s``, the run stage, which on CUDA only
    queues the work; ``finish_s``, waiting for the device, splitting and any bisection). Under load the stages
    also wait for the GIL, and ``pipeline_s`` minus the three is time spent queued between stages.

    ``device_start_s`` and ``device_end_s`` place the model work on the device's clock (seconds from a zero shared
    by every executor of a CUDA device, from CUDA events; ``time.perf_counter`` on the CPU), None for a batch whose
    run failed (its bisection's reruns are not timed). Batches of workloads with executors of their own overlap on
    the device: there the union of these spans, not the sum of ``run_s``, is the device time of model work
    (`busy_time`, which also says what a span includes).
    """

    workload: str
    device: str
    size: int
    padded_size: int
    cost: int
    padded_cost: int
    max_wait_s: float
    run_s: float
    failed: int
    retried: bool
    pipeline_s: float = 0.0
    collate_s: float = 0.0
    launch_s: float = 0.0
    finish_s: float = 0.0
    device_start_s: float | None = None
    device_end_s: float | None = None


class BusyTracker:
    """The busy seconds of one device, fed one batch span at a time: the running union of the spans.

    Batches finish in another order than they started, and those of workloads with executors of their own overlap,
    so a running maximum would miscount. The tracker keeps the merged spans of the last ``horizon_s`` seconds and
    adds only what a new span covers beyond them: a few microseconds per batch. A span reaching further back than
    the horizon is counted in full over that stretch (no batch runs that long).
    """

    def __init__(self, horizon_s: float = 10.0) -> None:
        self.busy_s = 0.0
        self._horizon_s = horizon_s
        self._starts: list[float] = []  # merged spans, disjoint and sorted: both lists are ascending
        self._ends: list[float] = []

    def add(self, start: float, end: float) -> float:
        """Count the span ``[start, end]``; returns the seconds it added to the union."""
        starts, ends = self._starts, self._ends
        first = bisect.bisect_left(ends, start)  # the merged spans [first, last) touch or overlap [start, end]
        last = bisect.bisect_right(starts, end)
        covered = sum(min(e, end) - max(s, start) for s, e in zip(starts[first:last], ends[first:last]))
        added = max(0.0, end - start - covered)  # never below 0 through rounding
        self.busy_s += added
        if first < last:
            start, end = min(start, starts[first]), max(end, ends[last - 1])
        starts[first:last] = [start]
        ends[first:last] = [end]
        forgotten = bisect.bisect_left(ends, ends[-1] - self._horizon_s)
        if forgotten:
            del starts[:forgotten], ends[:forgotten]
        return added


def busy_time(records: Iterable[BatchRecord]) -> float:
    """Seconds the device spent on model work for ``records``: the union of their device spans, so overlapping
    batches count once. Batches whose run failed (no span) are left out.

    A span runs from an event recorded before the forward to one after it, so the device's waits for the host
    inside a forward (an eager model's launches, host syncs) count as busy: this is the device time of model work,
    not the time its kernels kept the SMs busy. Raises ValueError for records of several devices (each has its
    own clock)."""
    records = list(records)
    devices = sorted({r.device for r in records})
    if len(devices) > 1:
        raise ValueError(f"busy_time() takes the records of one device (each has its own clock), got {devices}")
    tracker = BusyTracker(horizon_s=math.inf)
    for record in records:
        if record.device_start_s is not None:
            tracker.add(record.device_start_s, record.device_end_s)
    return tracker.busy_s


def percentile(samples: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``samples`` by the nearest-rank method; None when empty."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class WorkloadStats:
    """Running totals for one workload."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    rejected_full: int = 0
    rejected_invalid: int = 0
    timeouts: int = 0
    cancelled: int = 0
    batches: int = 0
    retried_batches: int = 0
    items: int = 0
    padded_items: int = 0
    cost: int = 0
    padded_cost: int = 0
    run_s_total: float = 0.0
    collate_s_total: float = 0.0
    launch_s_total: float = 0.0
    finish_s_total: float = 0.0
    waits_s: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    runs_s: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    pipelines_s: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def record_batch(self, record: BatchRecord) -> None:
        self.batches += 1
        self.retried_batches += record.retried
        self.items += record.size
        self.padded_items += record.padded_size
        self.cost += record.cost
        self.padded_cost += record.padded_cost
        self.run_s_total += record.run_s
        self.runs_s.append(record.run_s)
        self.pipelines_s.append(record.pipeline_s)
        self.collate_s_total += record.collate_s
        self.launch_s_total += record.launch_s
        self.finish_s_total += record.finish_s

    def snapshot(self, *, max_batch_size: int, queue_depth: int, in_flight: int) -> dict[str, Any]:
        waits = list(self.waits_s)
        runs = list(self.runs_s)
        pipelines = list(self.pipelines_s)
        mean_size = self.items / self.batches if self.batches else 0.0
        return {
            "queue_depth": queue_depth,
            "in_flight": in_flight,
            "submitted": self.submitted,
            "completed": self.completed,
            "failed": self.failed,
            "rejected_full": self.rejected_full,
            "rejected_invalid": self.rejected_invalid,
            "timeouts": self.timeouts,
            "cancelled": self.cancelled,
            "batches": self.batches,
            "retried_batches": self.retried_batches,
            "mean_batch_size": mean_size,
            "mean_batch_fill": mean_size / max_batch_size if self.batches else 0.0,
            "padding_waste": 1 - self.cost / self.padded_cost if self.padded_cost else 0.0,
            "device_time_s": self.run_s_total,
            "wait_ms": {f"p{q}": _ms(percentile(waits, q)) for q in (50, 90, 99)},
            "run_ms": {f"p{q}": _ms(percentile(runs, q)) for q in (50, 90, 99)},
            "pipeline_ms": {f"p{q}": _ms(percentile(pipelines, q)) for q in (50, 90, 99)},
            "stage_ms_mean": {stage: _ms(total / self.batches) if self.batches else None for stage, total in
                              (("collate", self.collate_s_total), ("launch", self.launch_s_total),
                               ("finish", self.finish_s_total))},
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
