"""Shared measurement code for batchplex's benchmarks: model-only ceilings, saturating and open-loop load,
and the machine description every result file carries.

Timings on a GPU synchronise the device before reading the host clock; latencies are end to end (submit to
result, as the caller sees them).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from batchplex.metrics import BusyTracker

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, str]:
    """The card (or CPU), software versions, the command line and the date: stamped on every result."""
    if torch.cuda.is_available():
        card = torch.cuda.get_device_name(0)
    else:
        card = _cpu_name()
    return {"machine": card, "cpus": str(os.cpu_count()), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": str(torch.get_num_threads()),
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or "unknown")


def graph_batch_sizes(batch: int, count: int = 4) -> tuple[int, ...]:
    """The preferred batch sizes of a graphed run: ``batch`` and the ``count - 1`` halvings below it (64: 8, 16,
    32, 64).

    Why several: with ``batch`` alone every batch is padded to it, so at half load (batches half full) the device
    runs full-size batches for half the requests and is as busy as at full load; queues then form and the
    latency is that of a saturated device."""
    return tuple(sorted({max(1, batch >> shift) for shift in range(count)}))


def add_torch_threads_option(parser: argparse.ArgumentParser, cpu_default: int | None = None) -> None:
    """``--torch-threads``: torch's intra-op CPU threads for the run (set by `apply_torch_threads`); without it, 1
    on CUDA and ``cpu_default`` on the CPU (None: torch's own, as CPU models need the threads)."""
    on_cpu = "torch's own" if cpu_default is None else cpu_default
    parser.add_argument("--torch-threads", type=int,
                        help=f"torch intra-op threads (default: 1 with --device cuda, as the README advises for "
                             f"serving on GPUs; {on_cpu} on the CPU)")
    parser.set_defaults(cpu_torch_threads=cpu_default)


def apply_torch_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op threads before anything runs: ``--torch-threads``, else 1 on CUDA (the executor's
    host-side tensor work runs on that pool, and a wide one slows it: README, "On GPUs, give torch few CPU
    threads"), else the CPU default given to `add_torch_threads_option`. Results stamp the count."""
    threads = args.torch_threads or (1 if args.device == "cuda" else args.cpu_torch_threads)
    if threads:
        torch.set_num_threads(threads)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], Any], device: torch.device, *, warmup: int = 5, repeats: int = 30) -> dict[str, float]:
    """Median, 10th and 90th percentile milliseconds of ``run()``, the device synchronised after each run."""
    with torch.inference_mode():
        for _ in range(warmup):
            run()
        synchronize(device)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            synchronize(device)
            times.append(time.perf_counter() - started)
    times.sort()
    return {"median_ms": statistics.median(times) * 1e3, "p10_ms": times[len(times) // 10] * 1e3,
            "p90_ms": times[len(times) * 9 // 10] * 1e3}


def model_only(run: Callable[[], Any], items_per_call: int, device: torch.device, *, warmup: int = 5,
               repeats: int = 30) -> dict[str, float]:
    """Throughput of ``run()`` alone (inputs already on the device): items/s and median ms per call."""
    median_ms = timed(run, device, warmup=warmup, repeats=repeats)["median_ms"]
    return {"items_per_s": items_per_call / (median_ms / 1e3), "ms_per_call": median_ms}


def request_pool(make_request: Callable[[random.Random], Any], concurrency: int) -> list[Any]:
    """The requests a closed loop of ``concurrency`` submitters cycles through (`saturate`), made once, before any
    window: making them (a random image or ranking request costs up to milliseconds) holds the event loop, and in a
    window that several workloads share it stalled every other one's submits and results (on a 2-core host, 256
    DLRM requests took 0.9 s to make)."""
    rng = random.Random(0)
    return [make_request(rng) for _ in range(min(256, concurrency * 2))]


async def saturate(scheduler: Any, workload: str, pool: Sequence[Any], *, concurrency: int, duration_s: float,
                   items_per_request: int = 1) -> dict[str, float]:
    """Closed loop: ``concurrency`` submitters each await a result and submit again, for ``duration_s``, cycling
    through ``pool`` (`request_pool`)."""
    loop = asyncio.get_running_loop()
    done = 0
    stop = loop.time() + duration_s

    async def submitter(offset: int) -> None:
        nonlocal done
        index = offset
        while loop.time() < stop:
            await scheduler.submit(workload, pool[index % len(pool)])
            index += concurrency
            done += 1

    started = loop.time()
    cpu_started = time.process_time()
    await asyncio.gather(*(submitter(i) for i in range(concurrency)))
    elapsed = loop.time() - started
    return {"items_per_s": done * items_per_request / elapsed, "requests": done,
            "cpu_us_per_request": (time.process_time() - cpu_started) / max(done, 1) * 1e6}


class KernelBusy:
    """The share of a window in which ``device`` ran this process's kernels, copies or memsets: the union of their
    intervals as CUPTI records them (`torch.profiler`, CUDA activity only), over the window's wall time.

    Why: it is the busy fraction itself (device time of model work over wall time). CUDA-event spans around each
    batch also count the host stalls inside it, and with overlapping streams they read near 100% (98-100% in
    four-workload windows where NVML read 64-75%); NVML's utilization is sampled over periods of its own, though it
    agreed with this within 3 points wherever both were read (68% and 68% in one four-workload window). ``fraction``
    is None off CUDA and when not ``enabled``. Use as ``with KernelBusy(device) as kernels: ...``, then
    ``kernels.fraction``.
    """

    def __init__(self, device: torch.device, *, enabled: bool = True) -> None:
        self.device = device
        self.enabled = enabled and device.type == "cuda"
        self.fraction: float | None = None
        self._profiler: Any = None
        self._started = 0.0

    def __enter__(self) -> KernelBusy:
        if self.enabled:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self._profiler.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._started
        if self._profiler is None:
            return
        self._profiler.__exit__(*exc)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        events = self._profiler.profiler.kineto_results.events()
        union = BusyTracker(horizon_s=math.inf)
        for event in events:
            if event.device_type() == torch.autograd.DeviceType.CUDA and event.device_index() == index:
                union.add(event.start_ns() / 1e9, event.end_ns() / 1e9)
        self.fraction = union.busy_s / wall


class GcPauses:
    """Python's garbage collections while a window runs: how many of each generation, and the longest pause.

    Why: a collection holds the GIL, so every thread (event loop, executor stages) stops for as long as it takes,
    and a full one walks every tracked object that is not frozen. A latency tail that lines up with these pauses
    is the collector's, not the scheduler's. Use as ``with GcPauses() as pauses: ...``, then ``pauses.summary()``.
    """

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.longest_s = 0.0
        self._started = 0.0

    def _note(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.collections[info["generation"]] += 1
        self.longest_s = max(self.longest_s, time.perf_counter() - self._started)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._note)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._note)

    def summary(self) -> dict[str, Any]:
        return {"gc_collections_by_generation": list(self.collections), "gc_longest_pause_ms": self.longest_s * 1e3}


def gc_note(result: dict[str, Any]) -> str:
    """A results-table note from `GcPauses.summary` fields: collections by generation and the longest pause."""
    young, middle, full = result["gc_collections_by_generation"]
    return f"GC {young}/{middle}/{full} (gen 0/1/2), longest {result['gc_longest_pause_ms']:.1f} ms"


def latency_target(p99_ms: float, max_wait_ms: float, batch_ms: float) -> dict[str, Any]:
    """The half-load target: p99 below ``max_wait_ms`` plus two runs of a full batch (``batch_ms``, model only).

    Why two runs: a request that just missed a batch waits for that batch to finish, then for its own."""
    target_ms = max_wait_ms + 2 * batch_ms
    return {"target_ms": target_ms, "met": p99_ms < target_ms,
            "note": f"target {target_ms:.1f} ms (max_wait {max_wait_ms:g} + 2 x {batch_ms:.2f}): "
                    f"{'met' if p99_ms < target_ms else 'missed'}"}


async def open_loop(scheduler: Any, workload: str, make_request: Callable[[random.Random], Any], *, rate: float,
                    duration_s: float) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` requests/s for ``duration_s``: p50/p99 end-to-end latency in ms.

    Latency counts from when the generator sends a request (creates its task), so the time the task then waits for
    a busy event loop is charged: the generator shares the loop with the scheduler (its own cost per request:
    `open_loop_cost.py`), which the closed loop (`saturate`) does not pay. Requests due while the generator slept
    go out together when it wakes (``asyncio.sleep`` overshoots: epoll counts whole milliseconds). Only requests
    still in flight are kept: holding every finished task made the heap grow with the window, and the full garbage
    collections that walked it stalled every thread for up to 64 ms at 20k requests/s (2-core EPYC). The result
    also says which collections ran in the window (`GcPauses`). The first request that fails is raised at the end.
    """
    loop = asyncio.get_running_loop()
    rng = random.Random(1)
    pool = [make_request(rng) for _ in range(256)]
    latencies: list[float] = []
    in_flight: set[asyncio.Future] = set()
    failures: list[BaseException] = []

    async def one(item: Any, sent: float) -> None:
        await scheduler.submit(workload, item)
        latencies.append(loop.time() - sent)

    def finished(task: asyncio.Future) -> None:
        in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())

    sent = 0
    due = loop.time()
    stop = due + duration_s
    with GcPauses() as pauses:
        while due < stop:
            now = loop.time()
            while due <= now and due < stop:
                task = asyncio.ensure_future(one(pool[sent % len(pool)], now))
                in_flight.add(task)
                task.add_done_callback(finished)
                sent += 1
                due += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, due - loop.time()))
        while in_flight:
            await asyncio.wait(set(in_flight))
    if failures:
        raise failures[0]
    ordered = sorted(latencies)
    return {"rate": rate, "requests": len(ordered),
            "p50_ms": ordered[len(ordered) // 2] * 1000,
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, **pauses.summary()}


def write_results(stem: str, payload: dict[str, Any], table: list[list[str]], header: list[str], *,
                  torch_threads: str | None = None) -> Path:
    """Write ``<stem>.json`` and ``<stem>.md`` (a table stamped with the machine) under benchmarks/results.

    ``torch_threads`` replaces the stamp's intra-op thread count (the count when writing) where the runs used
    several, each named in its rows."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = machine()
    if torch_threads is not None:
        stamp["torch_threads"] = torch_threads
    threads = f"{stamp['torch_threads']} intra-op thread{'' if stamp['torch_threads'] == '1' else 's'}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": stamp, **payload}, indent=2, default=str))
    lines = [f"# {stem}", "", f"- machine: {stamp['machine']} ({stamp['cpus']} CPUs), Python {stamp['python']}, "
             f"torch {stamp['torch']} ({threads})", f"- command: `{stamp['command']}`",
             f"- date: {stamp['date']}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    path = RESULTS / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
