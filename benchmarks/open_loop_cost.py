"""What the open-loop load generator (`harness.open_loop`) costs the event loop it shares with the scheduler.

The half-load latency runs offer Poisson arrivals from the same event loop that runs batchplex, so every microsecond
the generator spends per request is taken from the scheduler; the closed-loop runs that set the rate (`saturate`)
do not pay it. Here the "scheduler" answers at once, so what is measured is the generator alone: its CPU per
request, and the p50/p99 of the latency it reports, which is the time each request's task waited for the loop: the
floor of any latency `open_loop` measures at that rate on this machine, and where it grows, the rate at which the
generator alone saturates the loop; and the garbage collections each window ran, with the longest pause.

    python benchmarks/open_loop_cost.py
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import torch
from harness import gc_note, open_loop, write_results


class InstantScheduler:
    """Answers every request at once: the generator's own cost is all that is left."""

    async def submit(self, workload: str, item: Any) -> Any:
        return item


async def measure(rate: float, duration_s: float) -> dict[str, Any]:
    cpu = time.process_time()
    result = await open_loop(InstantScheduler(), "instant", lambda rng: None, rate=rate, duration_s=duration_s)
    cpu = time.process_time() - cpu
    return {**result, "cpu_us_per_request": cpu / result["requests"] * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[1000.0, 5000.0, 10000.0, 20000.0, 40000.0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per point")
    args = parser.parse_args()
    rows = [asyncio.run(measure(rate, args.duration)) for rate in args.rates]
    for row in rows:
        print(row, flush=True)
    table = [[f"{row['rate']:,.0f}", f"{row['cpu_us_per_request']:.1f}", f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}",
              gc_note(row)] for row in rows]
    stem = "open-loop-cost-" + ("gpu-host" if torch.cuda.is_available() else "cpu")  # the host's CPU either way
    path = write_results(stem, {"settings": vars(args), "results": rows}, table,
                         ["offered /s", "CPU µs/request", "reported latency p50 ms", "p99 ms",
                          "garbage collections"])
    print(path.read_text())


if __name__ == "__main__":
    main()
