"""One clock per CUDA device for placing batches on the device's timeline (`BatchRecord.device_start_s`).

Batches of workloads with executors of their own run on different streams; to see how they overlap, their CUDA
timing events must be read against one common zero. ``Event.elapsed_time`` returns float32 milliseconds, so
measured against one zero for the life of the process they would coarsen as it runs: 0.25 ms steps after an hour,
2 ms after five, on batches that take 1-5 ms. The clock therefore re-anchors itself about every ``every_s``
seconds: it records a new anchor event, and once that has completed, adds its distance from the previous anchor
in float64. A batch is read against the anchor that was current when its run stage started: the host recorded
the batch's events after that anchor had completed, so they lie after it on the device and no elapsed time is
negative.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["DeviceClock", "device_clock"]

_KEPT_ANCHORS = 8  # a batch in flight longer than this many re-anchorings is left without a span


class DeviceClock:
    """Seconds on one device's clock. ``new_event`` and ``stream`` default to CUDA timing events recorded on the
    device's current stream; tests pass stand-ins."""

    def __init__(self, device: torch.device, every_s: float = 30.0, *,
                 new_event: Callable[[], Any] | None = None, stream: Callable[[], Any] | None = None,
                 now: Callable[[], float] = time.monotonic) -> None:
        self._new_event = new_event or (lambda: torch.cuda.Event(enable_timing=True))
        self._stream = stream or (lambda: torch.cuda.current_stream(device))
        self._now = now
        self._every_s = every_s
        self._lock = threading.Lock()
        first = self._new_event()
        first.record(self._stream())
        first.synchronize()
        self._generation = 0
        self._anchors: dict[int, tuple[Any, float]] = {0: (first, 0.0)}  # generation -> (event, seconds)
        self._anchored_at = now()
        self._pending: Any = None

    def generation(self) -> int:
        """The anchor to read a batch against: call it before recording the batch's first event."""
        with self._lock:
            try:
                self._advance()
            except RuntimeError:  # CUDA refused: a measurement only, so keep the current anchor and retry later
                self._pending = None
                self._anchored_at = self._now()
            return self._generation

    def _advance(self) -> None:
        """Adopt the pending anchor once it has completed; record a new one when the current one is old."""
        if self._pending is not None and self._pending.query():
            anchor, seconds = self._anchors[self._generation]
            self._generation += 1
            self._anchors[self._generation] = (self._pending, seconds + anchor.elapsed_time(self._pending) / 1e3)
            self._anchors.pop(self._generation - _KEPT_ANCHORS, None)
            self._pending = None
            self._anchored_at = self._now()
        elif self._pending is None and self._now() - self._anchored_at >= self._every_s:
            self._pending = self._new_event()
            self._pending.record(self._stream())

    def seconds(self, generation: int, event: Any) -> float:
        """When ``event`` (recorded after `generation` returned ``generation``, and completed) happened.

        Raises KeyError when that anchor is no longer kept."""
        with self._lock:
            anchor, seconds = self._anchors[generation]
        return seconds + anchor.elapsed_time(event) / 1e3


_clocks: dict[torch.device, DeviceClock] = {}
_clocks_lock = threading.Lock()


def device_clock(device: torch.device) -> DeviceClock:
    """The process's clock for ``device``, shared by every executor on it."""
    with _clocks_lock:
        clock = _clocks.get(device)
        if clock is None:
            clock = _clocks[device] = DeviceClock(device)
        return clock
