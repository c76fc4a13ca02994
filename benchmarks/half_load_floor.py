"""The half-load latency floor of this host: batchplex serving a stand-in model that holds no GIL.

The half-load rows of `vision_throughput.py` and `nlp_throughput.py` compare p99 with ``max_wait_ms`` + 2 runs of a
full batch: a request that just missed a batch waits for it, then for its own. Those rows measure the scheduler,
the host's CPU and the model's host work (launches, or a graph's replay) together. Here the model is replaced by
one that sleeps (``time.sleep`` releases the GIL, as a replayed CUDA graph nearly does) for its share of a full
batch's run time and returns its input, so what is left is batchplex on this host: the open-loop load generator,
queueing, collation on the executor's thread, the hand-offs between threads and the delivery of results. The real
model adds its own host work (launches or a graph's replay, copies to the device), so a miss here says the host
alone already misses. One difference runs the other way: on the CPU the executor has two stages, and the split of
batch k runs on the stand-in's thread before batch k+1 starts, where CUDA's finish thread would let the device go
on; in both, at most one batch waits behind the running one.

Each point mirrors one half-load row of the CUDA results (model-only run time of a full batch, offered rate and
batch size, and so the same target; requests of the same shape and dtype, batched by the built-in ``tensor``
adapter, whose collation stacks them):

* ``minilm-graphed``: 1.88 ms per batch of 128, 32,251 requests/s, 128 int32 token ids per request;
* ``minilm-eager``: 2.17 ms per batch of 128, 13,964 requests/s, the same requests;
* ``resnet50-graphed``: 4.28 ms per batch of 64, 7,435 requests/s, one 3x224x224 uint8 image per request.

Reported per point (``--repeats`` windows, each on a fresh scheduler after a ``--warmup`` window): p50 and p99
latency, the target (``max_wait_ms`` + 2 x the full batch's run time), how long each batch's oldest request waited
in the queue (p99 over the window's batches), the mean batch, the share of the window the stand-in ran, and the
garbage collections.

    python benchmarks/half_load_floor.py                 # about 1 minute
    python benchmarks/half_load_floor.py --points minilm-graphed --rates 8000 16000 24000 32000

Results go to ``benchmarks/results/<--out>.json`` and ``.md``, by default ``half-load-floor-[rates-]cpu``, or
``half-load-floor-[rates-]gpu-host`` on a machine with a GPU (its CPU: no GPU is used).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from harness import gc_note, latency_target, open_loop, write_results

from batchplex import BatchPolicy, Scheduler
from batchplex.metrics import percentile
from batchplex.testing import BatchLog


@dataclass(frozen=True)
class Point:
    """One half-load row of the CUDA results to mirror: ``run_ms`` is the model-only time of a full batch of
    ``batch`` requests there, ``rate`` the offered requests/s, ``shape``/``dtype`` one request's tensor."""

    name: str
    run_ms: float
    rate: float
    batch: int
    shape: tuple[int, ...]
    dtype: torch.dtype


POINTS = {point.name: point for point in (
    Point("minilm-graphed", 1.88, 32251.0, 128, (128,), torch.int32),
    Point("minilm-eager", 2.17, 13964.0, 128, (128,), torch.int32),
    Point("resnet50-graphed", 4.28, 7435.0, 64, (3, 224, 224), torch.uint8),
)}


class SleepingModel:
    """Sleeps without the GIL for ``run_ms`` x (rows / ``full``), and returns the batch.

    Proportional to the rows: a real model's smaller batches take longer than their share of a full one (fixed
    costs per batch, padding up to a graph's size), so at partial batches this stand-in flatters the latency."""

    def __init__(self, run_ms: float, full: int) -> None:
        self.row_s = run_ms / 1000 / full

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(self.row_s * len(batch))
        return batch


async def measure_window(point: Point, args: argparse.Namespace, window: int) -> dict[str, Any]:
    """One measured window, on a scheduler of its own (no window inherits another's queue), after a warm-up."""
    model = SleepingModel(point.run_ms, point.batch)
    payload = torch.zeros(point.shape, dtype=point.dtype)
    log = BatchLog()
    async with Scheduler(plugins=[log], autoload=False) as scheduler:
        scheduler.add_workload(
            point.name, adapter="tensor", model=model, device="cpu",
            adapter_options={"shape": point.shape, "dtype": point.dtype},
            policy=BatchPolicy(max_batch_size=point.batch, max_wait_ms=args.max_wait_ms, max_queue=1 << 20))
        await open_loop(scheduler, point.name, lambda rng: payload, rate=point.rate, duration_s=args.warmup)
        log.records.clear()
        started = time.perf_counter()
        result = await open_loop(scheduler, point.name, lambda rng: payload, rate=point.rate,
                                 duration_s=args.duration)
        elapsed = time.perf_counter() - started
    batches = log.records
    batched = sum(r.size for r in batches)
    measured = {**result, "point": point.name, "window": window, "batches": len(batches), "batched": batched,
                "oldest_wait_p99_ms": percentile([r.max_wait_s for r in batches], 99) * 1000,
                "mean_batch": batched / len(batches),
                "ran_fraction": sum(r.run_s for r in batches) / elapsed,  # on the CPU run_s is the model's wall time
                **latency_target(result["p99_ms"], args.max_wait_ms, point.run_ms)}
    print(f"{point.name} window {window}: p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms "
          f"({measured['note']})", flush=True)
    return measured


def row(point: Point, windows: list[dict[str, Any]], max_wait_ms: float) -> list[str]:
    """A table row: medians over the windows (p99 with its range), how many windows met the target, and the
    collections of the window with the longest pause."""
    p99s = [w["p99_ms"] for w in windows]
    met = sum(w["met"] for w in windows)
    target = (f"{windows[0]['target_ms']:.1f} (max_wait {max_wait_ms:g} + 2 x {point.run_ms}): "
              f"met in {met} of {len(windows)}")
    return [f"{point.name}: {point.run_ms} ms per batch of {point.batch}, {point.rate:,.0f}/s",
            f"{statistics.median(w['p50_ms'] for w in windows):.1f}",
            f"{statistics.median(p99s):.1f} ({min(p99s):.1f}-{max(p99s):.1f})",
            target,
            f"{statistics.median(w['oldest_wait_p99_ms'] for w in windows):.1f}",
            f"{statistics.median(w['mean_batch'] for w in windows):.1f}",
            f"{statistics.median(w['ran_fraction'] for w in windows):.0%}",
            gc_note(max(windows, key=lambda w: w["gc_longest_pause_ms"]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="+", choices=sorted(POINTS), default=list(POINTS))
    parser.add_argument("--repeats", type=int, default=3, help="measured windows per point")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per window (> 0)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each window")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--rates", type=float, nargs="+",
                        help="offer these rates (requests/s) instead of each point's own, one row each")
    parser.add_argument("--out", help="result file stem under benchmarks/results (default: half-load-floor-<host>)")
    args = parser.parse_args()
    if args.duration <= 0 or args.repeats < 1:
        parser.error(f"--duration must be > 0 and --repeats >= 1, got {args.duration} and {args.repeats}")
    torch.set_num_threads(1)  # as the GPU runs: collation on one intra-op thread
    points = [replace(POINTS[name], rate=rate) for name in args.points for rate in (args.rates or [POINTS[name].rate])]
    results = [[asyncio.run(measure_window(point, args, window)) for window in range(args.repeats)] for point in points]
    table = [row(point, windows, args.max_wait_ms) for point, windows in zip(points, results)]
    # The host's CPU either way: a GPU host is named as such because its CPU is the one the GPU rows ran on.
    host = "gpu-host" if torch.cuda.is_available() else "cpu"
    stem = args.out or f"half-load-floor-{'rates-' if args.rates else ''}{host}"
    path = write_results(stem, {"settings": vars(args), "results": results}, table,
                         ["stand-in (mirrors)", "p50 ms", "p99 ms: median (range)", "target ms",
                          "oldest request's queue wait p99 ms", "mean batch", "stand-in ran",
                          "garbage collections (worst window)"])
    print(path.read_text())


if __name__ == "__main__":
    main()
