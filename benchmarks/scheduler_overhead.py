"""Scheduler overhead: requests/s and CPU microseconds per request with a no-op model, batchplex against peers.

Every system batches the same requests (a 1-element float32 tensor each) for the same no-op model, with the same
maximum batch size and maximum wait, under closed-loop load: N submitter coroutines on one asyncio event loop
(asyncio's default loop), each awaiting its own result before it submits again. A point is (system, N); each
point runs on a fresh event loop: warm-up, then a measured window of fixed length. Reported per point (median of
``--repeats`` runs):

* requests/s completed in the window;
* CPU microseconds per request: process CPU time (``time.process_time``, every thread) over the window divided by
  the requests completed in it, split per thread from /proc (event loop vs batchplex's executor threads); and
  wall microseconds per request (the window's length over the same count).

Systems (one row each):

* ``batchplex``: ``async with Scheduler(autoload=False)``, the built-in ``tensor`` adapter (shape (1,), float32,
  ``allow_nonfinite=True``: like the peers, it does not scan the values), ``BatchPolicy(max_batch_size,
  max_wait_ms)``, ``await s.submit(...)``. Collation, the model and ``split`` run on the scheduler's executor
  threads: ``torch.stack`` of the requests, the model returns its input, one row per request.
* ``batchplex-nan-check``: the same with the adapter's default ``allow_nonfinite=False`` (each request's values
  are scanned for NaN/inf at submit).
* ``batchplex-idle-dispatch``: ``BatchPolicy(dispatch_when_idle=True)``: while the device is idle a batch leaves
  at once instead of waiting ``max_wait_ms`` (batches still form while it is busy).
* ``ray-serve-batch``: Ray Serve's ``@serve.batch`` on an ``async def`` method of a plain class, on this loop.
  ``@serve.batch`` refuses to build its queue outside a replica (it reads the replica context), so the harness
  sets a stand-in replica context the way Ray's own unit tests do; no Ray cluster is started (no ``ray.init``).
  Measured: Ray's batching path only (its per-request enqueue, batch queue, batch task and batch metrics), not
  its HTTP proxy, handle routing or actor calls, which a real deployment adds on top.
* ``batched``: the PyPI library ``batched`` (``batched.aio.dynamically(batch_size=..., timeout_ms=...)``) around
  an ``async def`` batch function, awaited once per request.
* ``seed-dynamic-batcher``: the chapter's ``DynamicBatcher`` (``benchmarks/peers/seed_dynamic_batcher.py``).
* ``inline-floor`` (reference, not a peer): the least an asyncio batcher can do
  (``benchmarks/peers/inline_floor.py``).

The peers' batch function does the same work as batchplex's adapter and model: ``torch.stack`` the requests,
the model returns its input, ``unbind`` into one row per request (with ``--device cuda``: to the device and back).
They run it inline on the event loop, each library's own way for an ``async def`` batch function (the seed
batcher calls the model inline by design); for a no-op model that is the cheapest placement there is.

Correctness is checked for every system: submitter ``s`` cycles through its own payloads with the unique values
``s*K + j``; after the run, every result it received is compared with what it sent, and the number of results
with the number of requests (results are kept during the run and checked afterwards, so the check costs the
measured window one list append per request).

    python benchmarks/scheduler_overhead.py            # about 4 minutes on 2 CPU cores
    python benchmarks/scheduler_overhead.py --quick    # about 30 s
    python benchmarks/scheduler_overhead.py --profile 64 --profile 1024   # cProfile batchplex at those loads
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import gc
import importlib
import io
import json
import os
import pstats
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import RESULTS, machine  # noqa: E402
from peers.inline_floor import InlineFloorBatcher  # noqa: E402
from peers.seed_dynamic_batcher import DynamicBatcher  # noqa: E402

import batchplex  # noqa: E402
from batchplex import BatchPolicy, Scheduler  # noqa: E402

PAYLOADS_PER_SUBMITTER = 4
BATCHPLEX = "batchplex"
FLOOR = "inline-floor"
Submit = Callable[[torch.Tensor], Awaitable[torch.Tensor]]


def noop_model(batch: torch.Tensor) -> torch.Tensor:
    """The model under test: returns its input batch as is."""
    return batch


def peer_batch_function(device: torch.device) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """What a peer's batch function does: stack, run the no-op model, one row per request (as batchplex does)."""
    if device.type == "cpu":
        return lambda items: list(noop_model(torch.stack(items)).unbind(0))
    return lambda items: list(noop_model(torch.stack(items).to(device, non_blocking=True)).cpu().unbind(0))


# ---------------------------------------------------------------------------------------------------- systems
@contextlib.asynccontextmanager
async def batchplex_system(args: argparse.Namespace, scan_values: bool = False,
                           dispatch_when_idle: bool = False) -> AsyncIterator[Submit]:
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload(
            "noop", adapter="tensor", model=noop_model, device=args.device,
            adapter_options={"shape": (1,), "dtype": torch.float32, "allow_nonfinite": not scan_values},
            policy=BatchPolicy(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                               dispatch_when_idle=dispatch_when_idle))
        yield functools.partial(scheduler.submit, "noop")


def _ray_standin_replica_context() -> None:
    """``@serve.batch`` reads the replica context when it builds its queue; outside a Serve replica there is
    none, so set a stand-in (as Ray's own tests do). Nothing here starts Ray."""
    import ray.serve.context
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve._private.config import DeploymentConfig

    if ray.serve.context._get_internal_replica_context() is None:
        ray.serve.context._set_internal_replica_context(
            replica_id=ReplicaID("overhead", deployment_id=DeploymentID(name="overhead", app_name="bench")),
            servable_object=None, _deployment_config=DeploymentConfig(max_ongoing_requests=1 << 16), rank=0,
            world_size=1)


@contextlib.asynccontextmanager
async def ray_serve_system(args: argparse.Namespace) -> AsyncIterator[Submit]:
    from ray import serve

    _ray_standin_replica_context()
    run_batch = peer_batch_function(torch.device(args.device))

    class Model:  # a fresh class per point: @serve.batch keeps one queue per decorated function, bound to a loop
        @serve.batch(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.max_wait_ms / 1000)
        async def __call__(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
            return run_batch(items)

    try:
        yield Model().__call__
    finally:
        queue = Model.__call__._get_max_batch_size.__self__._queue  # the lazily built _BatchQueue
        if queue is not None:
            queue._handle_batch_task.cancel()


@contextlib.asynccontextmanager
async def batched_system(args: argparse.Namespace) -> AsyncIterator[Submit]:
    from batched import aio

    run_batch = peer_batch_function(torch.device(args.device))

    async def model(items: list[torch.Tensor]) -> list[torch.Tensor]:
        return run_batch(items)

    processor = aio.dynamically(model, batch_size=args.max_batch_size, timeout_ms=args.max_wait_ms)
    try:
        yield processor
    finally:
        if processor._task is not None:
            processor._task.cancel()


@contextlib.asynccontextmanager
async def seed_system(args: argparse.Namespace) -> AsyncIterator[Submit]:
    batcher = DynamicBatcher(peer_batch_function(torch.device(args.device)), max_batch_size=args.max_batch_size,
                             max_wait_ms=args.max_wait_ms)
    yield batcher.add_request


@contextlib.asynccontextmanager
async def floor_system(args: argparse.Namespace) -> AsyncIterator[Submit]:
    batcher = InlineFloorBatcher(peer_batch_function(torch.device(args.device)), args.max_batch_size,
                                 args.max_wait_ms)
    yield batcher.submit


SYSTEMS: dict[str, Callable[[argparse.Namespace], contextlib.AbstractAsyncContextManager[Submit]]] = {
    BATCHPLEX: batchplex_system,
    "batchplex-nan-check": functools.partial(batchplex_system, scan_values=True),
    "batchplex-idle-dispatch": functools.partial(batchplex_system, dispatch_when_idle=True),
    "ray-serve-batch": ray_serve_system,
    "batched": batched_system,
    "seed-dynamic-batcher": seed_system,
    FLOOR: floor_system,
}
PEERS = ("ray-serve-batch", "batched", "seed-dynamic-batcher")
REQUIRES = {"ray-serve-batch": "ray.serve", "batched": "batched"}


def available(system: str) -> bool:
    """False for a peer whose library is not installed here (it is left out of the run and the report says so)."""
    module = REQUIRES.get(system)
    if module is None:
        return True
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------- one point
def thread_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by each thread of this process, by thread name (Linux /proc; empty elsewhere)."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                used[names.get(int(tid), f"thread-{tid}")] = (int(fields[11]) + int(fields[12])) / tick
    return used


def thread_round_trip_us(same_cpu: bool, trips: int = 4000) -> float | None:
    """Microseconds for a token to reach another thread and come back, each way a blocking queue hand-off (the
    kind batchplex's executor threads make per batch), with both threads on one CPU or on two.

    Why: on a virtual machine a wake-up across CPUs can cost several times one on the same CPU, and it varies with
    the host's state; the peers run inline on one thread and never pay it. None without thread affinity (not Linux)
    or, for two CPUs, with fewer than two allowed."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not allowed or (not same_cpu and len(allowed) < 2):
        return None
    mine, theirs = allowed[0], allowed[0] if same_cpu else allowed[1]
    there: queue.SimpleQueue = queue.SimpleQueue()
    back: queue.SimpleQueue = queue.SimpleQueue()

    def echo() -> None:
        os.sched_setaffinity(0, {theirs})  # 0: the calling thread
        for _ in range(trips):
            back.put(there.get())

    os.sched_setaffinity(0, {mine})
    try:
        thread = threading.Thread(target=echo)
        thread.start()
        start = time.perf_counter()
        for trip in range(trips):
            there.put(trip)
            back.get()
        elapsed = time.perf_counter() - start
        thread.join()
    finally:
        os.sched_setaffinity(0, allowed)
    return elapsed / trips * 1e6


async def measure_point(system: str, submitters: int, args: argparse.Namespace,
                        profiler: cProfile.Profile | None = None) -> dict[str, Any]:
    """Closed-loop load from ``submitters`` coroutines: warm up, measure a window, stop, check every result."""
    k = PAYLOADS_PER_SUBMITTER
    payloads = [[torch.tensor([float(s * k + j)]) for j in range(k)] for s in range(submitters)]
    sent: list[list[int]] = [[] for _ in range(submitters)]
    received: list[list[torch.Tensor]] = [[] for _ in range(submitters)]
    done = [0]
    running = [True]

    async with SYSTEMS[system](args) as submit:
        async def submitter(s: int) -> None:
            mine, my_sent, my_results = payloads[s], sent[s], received[s]
            i = 0
            while running[0]:
                j = i % k
                result = await submit(mine[j])
                my_sent.append(j)
                my_results.append(result)
                done[0] += 1
                i += 1

        tasks = [asyncio.create_task(submitter(s)) for s in range(submitters)]
        await asyncio.sleep(args.warmup_s)
        if profiler is not None:
            profiler.enable()
        threads0, count0, cpu0, wall0 = thread_cpu_s(), done[0], time.process_time(), time.perf_counter()
        await asyncio.sleep(args.duration_s)
        count1, cpu1, wall1, threads1 = done[0], time.process_time(), time.perf_counter(), thread_cpu_s()
        if profiler is not None:
            profiler.disable()
        running[0] = False
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        except asyncio.TimeoutError:
            raise RuntimeError(f"{system} at {submitters} submitters: in-flight requests did not finish within 30 s")

    check_results(system, submitters, sent, received, done[0])
    requests = count1 - count0
    wall = wall1 - wall0
    per_thread = {name: round((used - threads0.get(name, 0.0)) / requests * 1e6, 2)
                  for name, used in threads1.items() if used - threads0.get(name, 0.0) > 0}
    return {"system": system, "submitters": submitters, "requests": requests, "wall_s": wall,
            "cpu_s": cpu1 - cpu0, "req_per_s": requests / wall, "cpu_us_per_req": (cpu1 - cpu0) / requests * 1e6,
            "wall_us_per_req": wall / requests * 1e6, "cpu_us_per_req_by_thread": per_thread,
            "checked_results": done[0]}


def check_results(system: str, submitters: int, sent: list[list[int]], received: list[list[torch.Tensor]],
                  total: int) -> None:
    """Every submitter got exactly its own values back, in order; nothing lost."""
    k = PAYLOADS_PER_SUBMITTER
    counted = 0
    for s in range(submitters):
        if len(sent[s]) != len(received[s]):
            raise AssertionError(f"{system}: submitter {s} sent {len(sent[s])} and received {len(received[s])}")
        if not received[s]:
            continue
        got = torch.stack([r.reshape(()) for r in received[s]]).cpu()
        expected = torch.tensor([s * k + j for j in sent[s]], dtype=got.dtype)
        if not torch.equal(got, expected):
            bad = int((got != expected).nonzero()[0])
            raise AssertionError(f"{system}: submitter {s} request #{bad} sent {float(expected[bad])} and got "
                                 f"{float(got[bad])} back")
        counted += len(received[s])
    if counted != total:
        raise AssertionError(f"{system}: {total} requests completed but {counted} results were checked")


def run_point(system: str, submitters: int, args: argparse.Namespace,
              profiler: cProfile.Profile | None = None) -> dict[str, Any]:
    gc.collect()
    return asyncio.run(measure_point(system, submitters, args, profiler))


# ---------------------------------------------------------------------------------------------------- reporting
def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def core_revision() -> str:
    """The commit the measured core comes from, marked when core/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "core"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted core changes" if dirty else "")


def summarize(runs: list[dict[str, Any]], systems: list[str], loads: list[int]) -> dict[str, Any]:
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for system in systems:
        for n in loads:
            mine = [r for r in runs if r["system"] == system and r["submitters"] == n]
            medians.setdefault(system, {})[str(n)] = {
                key: statistics.median(r[key] for r in mine)
                for key in ("req_per_s", "cpu_us_per_req", "wall_us_per_req")}
            medians[system][str(n)]["loop_cpu_us_per_req"] = statistics.median(
                r["cpu_us_per_req_by_thread"].get("MainThread", 0.0) for r in mine)
    ratios = {}
    peers = [s for s in systems if s in PEERS]
    if BATCHPLEX in systems and peers:
        for n in loads:
            key = str(n)
            best = max(peers, key=lambda s: medians[s][key]["req_per_s"])
            leanest = min(peers, key=lambda s: medians[s][key]["cpu_us_per_req"])
            ours = medians[BATCHPLEX][key]
            ratios[key] = {
                "best_peer": best,
                "throughput_ratio": ours["req_per_s"] / medians[best][key]["req_per_s"],
                "leanest_peer": leanest,
                "cpu_ratio": ours["cpu_us_per_req"] / medians[leanest][key]["cpu_us_per_req"],
                "meets_3x": ours["req_per_s"] >= 3 * medians[best][key]["req_per_s"],
                "meets_10us": ours["cpu_us_per_req"] < 10.0,
            }
    return {"medians": medians, "batchplex_vs_best_peer": ratios}


def round_trip_line(trips: list[dict[str, float | None]]) -> str:
    """The header line on the machine's thread hand-offs: the range over the rounds, each layout."""
    def span(key: str) -> str:
        values = [trip[key] for trip in trips if trip[key] is not None]
        return f"{min(values):.0f}-{max(values):.0f} µs" if values else "not measured"

    return (f"- Thread round trip (a blocking hand-off to another thread and back, before each round): "
            f"{span('two_cpus')} across two CPUs, {span('one_cpu')} on one. batchplex's executor threads make "
            "a few such hand-offs per batch; the peers, inline, none")


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    stamp, config = report["machine"], report["config"]
    medians, ratios = report["summary"]["medians"], report["summary"]["batchplex_vs_best_peer"]
    loads = config["submitters"]
    lines = [
        "# Scheduler overhead, no-op model",
        "",
        f"- Machine: {stamp['machine']} ({stamp['cpus']} CPUs), device `{config['device']}`; load average "
        f"{report['load_average'][0]:.2f} before, {report['load_average'][1]:.2f} after (other work shared the "
        "machine when above ~0)",
        round_trip_line(report["thread_round_trip_us"]),
        f"- Python {stamp['python']}, torch {stamp['torch']}, batchplex {report['versions']['batchplex']} "
        f"(commit {report['versions']['core_commit']}), ray {report['versions']['ray']}, batched "
        f"{report['versions']['batched']}; asyncio's default event loop",
        f"- Command: `{stamp['command']}`",
        f"- Date: {stamp['date']}",
        f"- Closed loop, max batch size {config['max_batch_size']}, max wait {config['max_wait_ms']} ms, warm-up "
        f"{config['warmup_s']} s, window {config['duration_s']} s, median of {config['repeats']} runs; every "
        "result checked against what its submitter sent.",
        "",
        "| system | submitters | req/s | CPU µs/req | of which event-loop thread | wall µs/req |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for system, by_load in medians.items():
        for n in loads:
            m = by_load[str(n)]
            lines.append(f"| {system} | {n} | {m['req_per_s']:,.0f} | {m['cpu_us_per_req']:.1f} | "
                         f"{m['loop_cpu_us_per_req']:.1f} | {m['wall_us_per_req']:.1f} |")
    if ratios:
        lines += ["", "| submitters | batchplex req/s / best peer's | best peer | batchplex CPU µs/req | "
                  "leanest peer CPU µs/req | >= 3x | < 10 µs |", "|---:|---:|---|---:|---:|:-:|:-:|"]
        for n in loads:
            r = ratios[str(n)]
            lines.append(
                f"| {n} | {r['throughput_ratio']:.2f}x | {r['best_peer']} | "
                f"{medians[BATCHPLEX][str(n)]['cpu_us_per_req']:.1f} | "
                f"{medians[r['leanest_peer']][str(n)]['cpu_us_per_req']:.1f} ({r['leanest_peer']}) | "
                f"{'yes' if r['meets_3x'] else 'no'} | {'yes' if r['meets_10us'] else 'no'} |")
    if config["left_out"]:
        lines += ["", f"Left out (library not installed on this machine): {', '.join(config['left_out'])}."]
    lines += ["", "Notes: " + report["notes"], ""]
    path.write_text("\n".join(lines))


def write_chart(path: Path, report: dict[str, Any]) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no chart")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = report["summary"]["medians"]
    loads = report["config"]["submitters"]
    systems = list(medians)
    width = 0.8 / len(systems)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key, label in ((axes[0], "req_per_s", "requests / s (higher is better)"),
                           (axes[1], "cpu_us_per_req", "CPU µs / request (lower is better)")):
        for i, system in enumerate(systems):
            values = [medians[system][str(n)][key] for n in loads]
            xs = [x + (i - (len(systems) - 1) / 2) * width for x in range(len(loads))]
            ax.bar(xs, values, width, label=system, hatch="//" if system == FLOOR else None,
                   edgecolor="black" if system == FLOOR else None, linewidth=0.5)
        ax.set_xticks(range(len(loads)), [f"{n} submitter{'s' if n != 1 else ''}" for n in loads])
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[1].axhline(10, color="black", linestyle="--", linewidth=1, label="10 µs target")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Scheduler overhead, no-op model, max batch {report['config']['max_batch_size']}, max wait "
                 f"{report['config']['max_wait_ms']} ms: {report['machine']['machine']} ({report['config']['device']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


NOTES = (
    "Ray Serve is measured on its @serve.batch path only, in this process, without ray.init (a stand-in replica "
    "context lets @serve.batch build its queue); a deployment adds Ray's proxy, routing and actor calls. "
    "The peers run the batch function inline on the event loop; batchplex runs collate, model and split on its "
    "executor threads. CPU time is the whole process's (all threads) over the window; the event-loop thread's "
    "share comes from /proc (10 ms ticks: coarse at 1 submitter). `inline-floor` is a "
    "reference (the least an asyncio batcher can do), not a peer; `batchplex-nan-check` is batchplex with the "
    "tensor adapter's default NaN/inf scan at submit, which the peers do not do. The best peer is the fastest of "
    "ray-serve-batch, batched and seed-dynamic-batcher at each load."
)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--submitters", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--duration-s", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run per point, short windows (about 30 s)")
    parser.add_argument("--profile", type=int, action="append", metavar="SUBMITTERS",
                        help="instead of the comparison, cProfile batchplex's event-loop thread at this load")
    parser.add_argument("--out", type=Path, default=RESULTS / "scheduler-overhead-cpu.json",
                        help="JSON path; the .md and .png go next to it")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup_s, args.duration_s, args.repeats = 0.3, 0.5, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    return args


def profile(args: argparse.Namespace) -> None:
    """cProfile the event-loop thread of batchplex under load; write the top functions next to ``--out``."""
    for n in args.profile:
        profiler = cProfile.Profile()
        point = run_point(BATCHPLEX, n, args, profiler)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(45)
        path = args.out.with_name(f"{args.out.stem}-profile-{n}.txt")
        path.write_text(f"# {machine()['command']}\n# {json.dumps(point)}\n"
                        f"# event-loop thread under cProfile (which slows it), sorted by own time\n{text.getvalue()}")
        print(f"{n} submitters under cProfile: {point['req_per_s']:,.0f} req/s, {point['cpu_us_per_req']:.1f} "
              f"CPU us/req, by thread {point['cpu_us_per_req_by_thread']} -> {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.profile:
        profile(args)
        return
    skipped = [system for system in args.systems if not available(system)]
    args.systems = [system for system in args.systems if system not in skipped]
    if skipped:
        print(f"left out (library not installed): {', '.join(skipped)}")
    load_before = os.getloadavg()[0]
    runs = []
    round_trips = []
    started = time.perf_counter()
    for repeat in range(args.repeats):
        trip = {"one_cpu": thread_round_trip_us(same_cpu=True), "two_cpus": thread_round_trip_us(same_cpu=False)}
        round_trips.append(trip)
        print(f"round {repeat + 1}: thread round trip {trip} us", flush=True)
        for system in args.systems:
            for n in args.submitters:
                point = run_point(system, n, args)
                point["repeat"] = repeat
                runs.append(point)
                print(f"[{time.perf_counter() - started:6.1f}s] run {repeat + 1}/{args.repeats} {system:>20} "
                      f"{n:>5} submitters: {point['req_per_s']:>9,.0f} req/s {point['cpu_us_per_req']:>7.1f} CPU "
                      f"us/req {point['cpu_us_per_req_by_thread']}", flush=True)
    report = {
        "benchmark": "scheduler overhead, no-op model",
        "machine": machine(),
        "load_average": [load_before, os.getloadavg()[0]],
        "thread_round_trip_us": round_trips,
        "versions": {"batchplex": batchplex.__version__, "core_commit": core_revision(), "ray": version("ray"),
                     "batched": version("batched")},
        "config": {"device": args.device, "submitters": args.submitters, "systems": args.systems,
                   "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                   "warmup_s": args.warmup_s, "duration_s": args.duration_s, "repeats": args.repeats,
                   "payload": "torch.tensor([value]), float32, value unique per submitter and request in flight",
                   "left_out": skipped},
        "notes": NOTES,
        "summary": summarize(runs, args.systems, args.submitters),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out.with_suffix(".md"), report)
    write_chart(args.out.with_suffix(".png"), report)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
