"""What every reliability scenario runs inside, and the measuring tools the scenarios share.

`run` executes a scenario on a `ProbeLoop`: an asyncio loop whose futures report a second resolution (a result
set on a future that already had one is a result handed out twice), and whose exception handler records what
asyncio would otherwise only log (``InvalidStateError`` in a callback, "exception was never retrieved"). Log
records at WARNING and above from ``batchplex`` and ``asyncio`` are collected too. When the scenario returns,
`run` lists tasks still pending and threads whose names start with ``batchplex-``, and adds all of it to the
scenario's result under ``"probe"``.

Callers go through `call`, which sorts every outcome into one kind of `KINDS` and checks results with a
scenario-given predicate, so a result handed to the wrong caller shows up as ``"wrong"``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import platform
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import batchplex
from batchplex.metrics import percentile

__all__ = ["KINDS", "ProbeLoop", "run", "Outcome", "Tally", "WindowedTally", "call", "classify", "open_loop", "settle",
           "RssSampler", "rss_mb", "machine", "summary_ms", "batchplex_threads"]

#: Every outcome a caller can see. "wrong": a result that is not the caller's; "untyped": an exception that is
#: not a batchplex error (a bug: callers are promised typed errors); "contract": an adapter contract error.
KINDS = ("ok", "wrong", "invalid", "full", "timeout", "failed", "closed", "cancelled", "contract", "untyped")


class CheckedFuture(asyncio.Future):
    """A loop future that counts an attempt to resolve it after it was resolved already (not cancelled)."""

    def set_result(self, result: Any) -> None:
        self._check_second()
        super().set_result(result)

    def set_exception(self, exception: BaseException) -> None:
        self._check_second()
        super().set_exception(exception)

    def _check_second(self) -> None:
        if self.done() and not self.cancelled():
            self.get_loop().second_resolutions += 1


class ProbeLoop(asyncio.SelectorEventLoop):
    """An event loop that makes `CheckedFuture`s and records every context its exception handler receives."""

    def __init__(self) -> None:
        super().__init__()
        self.second_resolutions = 0
        self.errors: list[str] = []
        self.set_exception_handler(self._record)

    def create_future(self) -> asyncio.Future:
        return CheckedFuture(loop=self)

    def _record(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(f"{context.get('message')}: {context.get('exception')!r}")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.levelname}: {record.getMessage()}")


def batchplex_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("batchplex-"))


def run(scenario: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run ``scenario`` on a fresh `ProbeLoop`; return its result with a ``"probe"`` entry added."""
    records = _Records()
    loggers = [logging.getLogger("batchplex"), logging.getLogger("asyncio")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with asyncio.Runner(loop_factory=ProbeLoop) as runner:
            result, leftover = runner.run(_then_list_tasks(scenario))
            gc.collect()  # "exception was never retrieved" is reported when such a future is collected
            runner.run(asyncio.sleep(0))
            loop = runner.get_loop()
            errors, second = list(loop.errors), loop.second_resolutions
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    result["probe"] = {"loop_errors": errors, "second_resolutions": second, "log_records": records.lines,
                       "leftover_tasks": leftover, "leftover_threads": batchplex_threads()}
    return result


async def _then_list_tasks(scenario: Awaitable[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    result = await scenario
    await asyncio.sleep(0)
    me = asyncio.current_task()
    return result, [repr(task) for task in asyncio.all_tasks() if task is not me]


# ---------------------------------------------------------------------------------------------- callers
@dataclass
class Outcome:
    """What one caller saw: its kind (one of `KINDS`), when it submitted, how long it waited, and the error."""

    kind: str
    started: float
    latency_s: float
    error: BaseException | None = None
    tag: Any = None


@dataclass
class Tally:
    """Outcomes of many callers: counts per kind, and one example message per error kind."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.kind] += 1
        self.outcomes.append(outcome)
        if outcome.error is not None and outcome.kind not in self.examples:
            self.examples[outcome.kind] = f"{type(outcome.error).__name__}: {outcome.error}"

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def latencies(self, kind: str = "ok", since: float = -1.0, until: float = float("inf")) -> list[float]:
        return [o.latency_s for o in self.outcomes if o.kind == kind and since <= o.started < until]

    def as_dict(self) -> dict[str, Any]:
        return {"counts": {kind: self.counts.get(kind, 0) for kind in KINDS}, "total": self.total,
                "examples": dict(sorted(self.examples.items()))}


#: Latency histogram bin edges (seconds): 480 log-spaced bins from 0.1 ms to 100 s, about 3% wide.
_EDGES = np.geomspace(1e-4, 100.0, 481)


class WindowedTally(Tally):
    """Counts, and per time window a histogram of the latencies of served requests, without keeping each
    outcome: for long runs, where a list of outcomes would itself grow the memory being watched.

    A request belongs to window ``floor((started - origin) / window_s)``; windows before 0 (warm-up) are dropped.
    """

    def __init__(self, origin: float, window_s: float) -> None:
        super().__init__()
        self.origin = origin
        self.window_s = window_s
        self.histograms: dict[int, np.ndarray] = {}

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.kind] += 1
        if outcome.error is not None and outcome.kind not in self.examples:
            self.examples[outcome.kind] = f"{type(outcome.error).__name__}: {outcome.error}"
        window = int((outcome.started - self.origin) // self.window_s)
        if outcome.kind == "ok" and window >= 0:
            histogram = self.histograms.setdefault(window, np.zeros(len(_EDGES) + 1, dtype=np.int64))
            histogram[np.searchsorted(_EDGES, outcome.latency_s)] += 1

    def window_ms(self, window: int) -> dict[str, float | None]:
        """p50/p90/p99/max (upper edge of the bin holding them, in ms) and n of one window's served requests."""
        histogram = self.histograms.get(window)
        n = int(histogram.sum()) if histogram is not None else 0
        if not n:
            return {"p50": None, "p90": None, "p99": None, "max": None, "n": 0}
        cumulative = np.cumsum(histogram)
        upper = np.append(_EDGES, np.inf)

        def edge(rank: int) -> float:
            return round(float(upper[np.searchsorted(cumulative, rank)]) * 1000.0, 3)

        out = {f"p{q}": edge(max(1, math.ceil(q / 100 * n))) for q in (50, 90, 99)}
        out["max"] = edge(n)
        out["n"] = n
        return out


def classify(error: BaseException) -> str:
    """The outcome kind of an exception a caller received."""
    for kind, types in (("cancelled", asyncio.CancelledError), ("invalid", batchplex.InvalidRequestError),
                        ("full", batchplex.QueueFullError), ("timeout", batchplex.DeadlineExceeded),
                        ("failed", batchplex.RequestFailed), ("closed", batchplex.SchedulerClosed),
                        ("contract", batchplex.BatchplexError)):
        if isinstance(error, types):
            return kind
    return "untyped"


async def call(scheduler: batchplex.Scheduler, workload: str, item: Any, check: Callable[[Any], bool],
               tally: Tally, tag: Any = None, **submit_kwargs: Any) -> Outcome:
    """Submit one request as one caller; record and return its outcome (cancellation included)."""
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        result = await scheduler.submit(workload, item, **submit_kwargs)
    except BaseException as caught:  # noqa: BLE001 - every outcome is recorded, cancellation included
        error = caught
        kind = classify(caught)
    else:
        kind = "ok" if check(result) else "wrong"
    outcome = Outcome(kind, started, time.perf_counter() - started, _without_frames(error), tag)
    tally.add(outcome)
    return outcome


def _without_frames(error: BaseException | None) -> BaseException | None:
    """Drop the tracebacks of a kept error and its causes: their frames would keep requests (and memory) alive."""
    seen = error
    while seen is not None:
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__
    return error


async def open_loop(rate: Callable[[float], float], duration_s: float,
                    launch: Callable[[], Awaitable[Any]], tick_s: float = 0.002) -> set[asyncio.Task]:
    """Start ``launch()`` as a task at ``rate(elapsed)`` per second for ``duration_s`` (open loop: arrivals do
    not wait for answers). Returns the tasks still running when the time is up."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task] = set()
    start = last = loop.time()
    owed = 0.0
    while (now := loop.time()) < start + duration_s:
        owed += rate(now - start) * (now - last)
        last = now
        while owed >= 1.0:
            owed -= 1.0
            task = asyncio.ensure_future(launch())
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.sleep(tick_s)
    return set(pending)


async def settle(tasks: set[asyncio.Task] | list[asyncio.Task], timeout_s: float) -> int:
    """Wait at most ``timeout_s`` for ``tasks``; cancel and count those that did not finish (hung callers)."""
    tasks = [task for task in tasks if not task.done()]
    if not tasks:
        return 0
    _, hung = await asyncio.wait(tasks, timeout=timeout_s)
    for task in hung:
        task.cancel()
    if hung:
        await asyncio.wait(hung, timeout=1.0)
    return len(hung)


# ---------------------------------------------------------------------------------------------- measuring
def rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux ``/proc/self/status``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status")


class RssSampler:
    """Samples `rss_mb` every ``interval_s`` on a thread of its own (``with RssSampler() as rss: ...``)."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="reliability-rss", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.samples.append((time.perf_counter(), rss_mb()))
            if self._stop.wait(self.interval_s):
                return

    def between(self, since: float, until: float = float("inf")) -> list[float]:
        return [mb for t, mb in self.samples if since <= t < until]


def summary_ms(latencies_s: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max of latencies given in seconds, in milliseconds."""
    out = {f"p{q}": _ms(percentile(latencies_s, q)) for q in (50, 90, 99)}
    out["max"] = _ms(max(latencies_s)) if latencies_s else None
    out["n"] = len(latencies_s)
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What ran it: CPU model and cores, GPU name (for a CUDA device), Python, torch and the OS."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.device(device)
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "python": platform.python_version(), "torch": torch.__version__, "os": platform.platform()}
