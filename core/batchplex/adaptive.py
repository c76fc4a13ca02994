"""Online adaptation (opt-in): move a workload's batch-size limit and wait to meet a latency objective.

Use it when the right batch size is unknown or changes at run time (another tenant on the GPU, a model swap, a
load that comes and goes). `AdaptiveBatching` is a plugin: registered on a scheduler, it sees every finished
batch (the ``batch_finished`` hook) and sets the workload's live knobs, ``queue.max_batch_size`` and
``queue.max_wait_s``, never above the policy's ``max_batch_size`` and ``max_wait_ms`` nor the queue's memory cap::

    adaptive = AdaptiveBatching(scheduler, {"vision": LatencyObjective(ms=60)})
    scheduler.register_plugin(adaptive)

The decisions are made by `LatencyController`, pure logic over the observed ``(batch size, run time)`` pairs, in
the manner of Clipper's AIMD: a batch that ran over the target cuts the limit multiplicatively; otherwise the limit
may grow. Plain additive growth climbs past the target again and again (a sawtooth whose every tooth is a late
batch), so growth is model-guided: a line ``run = a + b * size`` fitted to the recent batches (the one with the
largest residual left out: one stall is not a tail) plus a margin, the objective's quantile of the recent
prediction errors (each batch's run minus what the line said before it). The limit grows to the largest size the
line and margin keep within the target, at most twice the largest size seen (no far extrapolation).

Only a late batch lowers the limit, so an outlier in the fit cannot collapse it. A late batch slower than line and
margin predicted means the workload changed (a slower model, another tenant on the device) or the host stalled:
the line is refitted from that batch on. A late batch they allowed for is the noise's tail: growth stays below its
size until a window of batches has run on time, so the limit does not climb straight back into it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UnknownWorkloadError
from .hookspecs import hookimpl
from .metrics import BatchRecord, percentile
from .policy import BatchPolicy

__all__ = ["LatencyObjective", "Knobs", "LatencyController", "AdaptiveBatching"]


@dataclass(frozen=True)
class LatencyObjective:
    """What to keep under ``ms`` milliseconds at the ``quantile``-th percentile.

    ``kind="request"``: a request's end-to-end latency, about its wait for a batch + the run of the batch ahead
    of it in the device pipeline + its own batch's run; each batch may run ``ms / (pipeline_depth + 1)`` and the
    wait gets what is left. ``kind="batch"``: one batch's run time (what ``BatchRecord.run_s`` measures); the
    wait is left as the policy sets it.
    """

    ms: float
    kind: str = "request"
    quantile: float = 99.0

    def __post_init__(self) -> None:
        if not (isinstance(self.ms, (int, float)) and math.isfinite(self.ms) and self.ms > 0):
            raise ValueError(f"LatencyObjective.ms must be a number > 0, got {self.ms!r}")
        if self.kind not in ("request", "batch"):
            raise ValueError(f"LatencyObjective.kind must be 'request' or 'batch', got {self.kind!r}")
        if not 0 < self.quantile <= 100:
            raise ValueError(f"LatencyObjective.quantile must be in (0, 100], got {self.quantile!r}")


@dataclass(frozen=True)
class Knobs:
    """A decision: the batch-size limit and the wait (None: leave the wait alone)."""

    max_batch_size: int
    max_wait_s: float | None


class LatencyController:
    """The decision logic for one workload: feed it each finished batch with `observe`, apply the `Knobs` it
    returns. Pure: no clock, no scheduler; the same observations give the same decisions.

    ``start_batch_size`` is the first limit (1: start small, as a slow start would); ``decrease`` the factor a
    late batch cuts the limit by; ``window`` how many recent batches the line and the margin are drawn from (and
    how many on-time batches lift the ceiling a noisy late batch set).
    """

    def __init__(self, objective: LatencyObjective, policy: BatchPolicy, *, pipeline_depth: int = 2,
                 start_batch_size: int = 1, decrease: float = 0.75, window: int = 64) -> None:
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be in (0, 1), got {decrease!r}")
        if pipeline_depth < 1 or window < 3:
            raise ValueError(f"pipeline_depth must be >= 1 and window >= 3, got {pipeline_depth!r} and {window!r}")
        self.objective = objective
        self.policy = policy
        self.pipeline_depth = pipeline_depth
        self.decrease = decrease
        self.limit = max(1, min(start_batch_size, policy.max_batch_size))
        self._seen: deque[tuple[int, float]] = deque(maxlen=window)
        self._errors: deque[float] = deque(maxlen=window)  # kept when the line starts afresh: noise stays noise
        self._fitted: tuple[float, float] | None = None  # the line through _seen, until _seen changes
        self._ceiling: float = math.inf  # the smallest size that ran late lately: growth stays below it
        self._on_time_streak = 0
        self.max_wait_s = self._wait() if objective.kind == "request" else None

    @property
    def run_target_s(self) -> float:
        """How long one batch may run: the whole objective for ``batch``, a share of it for ``request``."""
        share = 1 if self.objective.kind == "batch" else self.pipeline_depth + 1
        return self.objective.ms / 1000.0 / share

    def observe(self, size: int, run_s: float, memory_cap: int | None = None) -> Knobs:
        """Take one finished batch (its padded size and run time) and decide the knobs for the next ones."""
        cap = min(self.policy.max_batch_size, memory_cap or self.policy.max_batch_size)
        if run_s > self.run_target_s:
            self._late(size, run_s)
        else:
            self._on_time(size, run_s, cap)
        self.limit = max(1, min(self.limit, cap))
        if self.objective.kind == "request":
            self.max_wait_s = self._wait()
        return Knobs(self.limit, self.max_wait_s)

    def _late(self, size: int, run_s: float) -> None:
        if size <= self.policy.padded_size(self.limit):  # not a batch formed before the last cut
            self.limit = math.floor(self.decrease * self.limit)
        self._on_time_streak = 0
        if run_s > self.expected_run_s(size):  # slower than the line said: the workload changed, or a stall
            self._seen.clear()
            self._ceiling = math.inf
        else:  # the tail the margin allowed for: stay below this size for a while
            self._ceiling = min(self._ceiling, size)
            self._record_error(size, run_s)
        self._add(size, run_s)

    def _on_time(self, size: int, run_s: float, cap: int) -> None:
        self._on_time_streak += 1
        if self._on_time_streak >= self._seen.maxlen:  # a window of on-time batches: probe the late size again
            self._ceiling = math.inf
        self._record_error(size, run_s)
        self._add(size, run_s)
        largest_seen = max(s for s, _ in self._seen)
        below_late = min(cap, self._ceiling - 1)
        self.limit = max(self.limit, min(self._largest_fitting(below_late), 2 * largest_seen))

    def _record_error(self, size: int, run_s: float) -> None:
        if len(self._seen) >= 2:
            a, b = self._line()
            self._errors.append(run_s - a - b * size)

    def _add(self, size: int, run_s: float) -> None:
        self._seen.append((size, run_s))
        self._fitted = None

    def expected_run_s(self, size: int) -> float:
        """The fitted run time of a batch of ``size`` plus the margin (0 before any batch)."""
        if not self._seen:
            return 0.0
        a, b = self._line()
        return a + b * size + self._margin()

    def _wait(self) -> float:
        run = self.expected_run_s(self.policy.padded_size(self.limit))
        budget = self.objective.ms / 1000.0 - self.pipeline_depth * run
        return max(0.0, min(self.policy.max_wait_s, budget))

    def _line(self) -> tuple[float, float]:
        """``(a, b)`` fitted to the batches seen, the one with the largest residual left out (from three on)."""
        if self._fitted is None:
            points = list(self._seen)
            a, b = _least_squares(points)
            if len(points) >= 3:
                del points[max(range(len(points)), key=lambda i: points[i][1] - a - b * points[i][0])]
                a, b = _least_squares(points)
            self._fitted = (a, b)
        return self._fitted

    def _margin(self) -> float:
        """The objective's quantile of the recent prediction errors (each batch's run minus what the line said
        before it), the largest left out; 0 without errors yet."""
        errors = sorted(self._errors)[:-1]
        return max(0.0, percentile(errors, self.objective.quantile) or 0.0)

    def _largest_fitting(self, cap: int) -> int:
        """The largest limit (<= cap) whose padded batches the fitted line keeps within the run target; 1 if none."""
        a, b = self._line()
        room = self.run_target_s - a - self._margin()
        if b <= 0:
            best = cap
        else:
            best = min(cap, math.floor(room / b)) if room > 0 else 0
        preferred = [s for s in self.policy.preferred_batch_sizes if s <= best]
        if self.policy.preferred_batch_sizes and best <= self.policy.preferred_batch_sizes[-1]:
            best = preferred[-1] if preferred else 0
        return max(1, best)


def _least_squares(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ``run = a + b * size``; through the origin (a = 0) when the sizes do not spread or the line
    would be falling or negative at size 0 (then it overestimates larger sizes, the safe side)."""
    n = len(points)
    mean_s = sum(s for s, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    spread = sum((s - mean_s) ** 2 for s, _ in points)
    if spread > 0:
        b = sum((s - mean_s) * (r - mean_r) for s, r in points) / spread
        a = mean_r - b * mean_s
        if b > 0 and a >= 0:
            return a, b
    return 0.0, sum(s * r for s, r in points) / sum(s * s for s, _ in points)


class AdaptiveBatching:
    """Plugin that adapts the live knobs of the workloads named in ``objectives`` (a `LatencyObjective` or a
    number of milliseconds for a p99 request objective). Register it with ``scheduler.register_plugin``.

    The workloads must exist already. ``decisions`` keeps the latest decisions (time from ``clock``, workload,
    batch size, run time, limit, wait) for plots and logs. Batches that were split after a failure are skipped:
    their run time is not a batch's.
    """

    def __init__(self, scheduler: Any, objectives: Mapping[str, LatencyObjective | float], *,
                 clock: Callable[[], float] = time.monotonic, history: int = 10_000, **controller_options: Any
                 ) -> None:
        self.clock = clock
        self.decisions: deque[dict[str, Any]] = deque(maxlen=history)
        self.controllers: dict[str, LatencyController] = {}
        self._queues = {}
        workloads = scheduler.workloads
        for name, objective in objectives.items():
            if name not in workloads:
                raise UnknownWorkloadError(f"adaptive batching: no workload named {name!r} (known: "
                                           f"{', '.join(sorted(workloads)) or 'none'}); add it first")
            if not isinstance(objective, LatencyObjective):
                objective = LatencyObjective(ms=objective)
            workload = workloads[name]
            depth = max(lane.depth for lane in workload.lanes)
            controller = LatencyController(objective, workload.policy, pipeline_depth=depth, **controller_options)
            self.controllers[name] = controller
            self._queues[name] = workload.queue
            self._apply(name, Knobs(controller.limit, controller.max_wait_s))

    @hookimpl
    def batch_finished(self, record: BatchRecord) -> None:
        controller = self.controllers.get(record.workload)
        if controller is None or record.retried:
            return
        knobs = controller.observe(record.padded_size, record.run_s, self._queues[record.workload].memory_cap)
        self._apply(record.workload, knobs)
        self.decisions.append({"t": self.clock(), "workload": record.workload, "size": record.size,
                               "run_s": record.run_s, "limit": knobs.max_batch_size,
                               "max_wait_s": self._queues[record.workload].max_wait_s})

    def _apply(self, name: str, knobs: Knobs) -> None:
        queue = self._queues[name]
        queue.max_batch_size = knobs.max_batch_size
        if knobs.max_wait_s is not None:
            queue.max_wait_s = knobs.max_wait_s
