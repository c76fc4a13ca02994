"""``batchplex demo``: every installed example workload batched at once in one process, under a generated stream.

Each workload gets an open-loop Poisson stream of requests (a small share of them malformed, to show that bad
input fails alone); a live table shows queue depths, batch sizes, padding waste and latency while it runs, and a
summary table is printed at the end. Runs on the first CUDA device when there is one, else on the CPU.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import BatchplexError, InvalidRequestError, QueueFullError
from .metrics import percentile
from .scheduler import Scheduler
from .workloads import ExampleWorkload

__all__ = ["run_demo"]


@dataclass
class _Tally:
    latencies_s: list[float] = field(default_factory=list)
    ok: int = 0
    rejected: int = 0
    busy: int = 0
    failed: int = 0


#: Distinct requests made per workload before the stream starts, then cycled: making a request (a random image,
#: say) can cost more than batching it, and the generator shares the event loop with the scheduler.
POOL_SIZE = 64


async def _drive(scheduler: Scheduler, workload: ExampleWorkload, rate: float, until: float, bad_share: float,
                 tally: _Tally, seed: int) -> None:
    """Submit requests at ``rate`` per second (Poisson arrivals) until ``until``; record each outcome.

    Requests come from a pool made up front; a generator that falls behind its schedule submits at once and
    still stops at ``until``, so the demo ends on time under any load.
    """
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    good = [workload.make_request(rng) for _ in range(POOL_SIZE)]
    bad = [workload.make_bad_request(rng) for _ in range(POOL_SIZE // 4)] if workload.make_bad_request else []
    pending: set[asyncio.Task] = set()

    async def one(item: Any) -> None:
        started = loop.time()
        try:
            await scheduler.submit(workload.name, item)
        except InvalidRequestError:
            tally.rejected += 1
        except QueueFullError:
            tally.busy += 1
        except BatchplexError:
            tally.failed += 1
        else:
            tally.ok += 1
            tally.latencies_s.append(loop.time() - started)

    next_at = loop.time()
    sent = 0
    while next_at < until and loop.time() < until:
        item = rng.choice(bad) if bad and rng.random() < bad_share else good[sent % POOL_SIZE]
        sent += 1
        task = asyncio.ensure_future(one(item))
        pending.add(task)
        task.add_done_callback(pending.discard)
        next_at += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    await asyncio.gather(*pending)


def _rows(scheduler: Scheduler, tallies: dict[str, _Tally]) -> list[list[str]]:
    rows = []
    for name, stats in scheduler.statistics().items():
        tally = tallies[name]
        latencies = tally.latencies_s[-4096:]
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        rows.append([name, str(stats["queue_depth"]), str(stats["completed"]), f"{stats['mean_batch_size']:.1f}",
                     f"{100 * stats['padding_waste']:.0f}%", _ms(p50), _ms(p99),
                     f"{tally.rejected}/{tally.busy}/{tally.failed}"])
    return rows


HEADER = ["workload", "queued", "done", "mean batch", "padding", "p50 ms", "p99 ms", "bad/busy/failed"]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _table(rows: list[list[str]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in HEADER:
        table.add_column(column, justify="left" if column == "workload" else "right")
    for row in rows:
        table.add_row(*row)
    return table


async def run_demo(duration_s: float = 45.0, load: float = 1.0, bad_share: float = 0.01, live: bool = True,
                   device: str | None = None, only: list[str] | None = None,
                   setup: Callable[[Scheduler], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run the demo; return the scheduler's final statistics (per workload).

    ``setup(scheduler)`` runs once the workloads exist (attach an exporter or an adaptive controller there).
    """
    from rich.console import Console
    from rich.live import Live

    console = Console()
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda":  # the models run on the GPU; the host's tensor work is faster on one thread (README)
        torch.set_num_threads(1)
    scheduler = Scheduler()
    examples = [w for w in scheduler.plugins.example_workloads(target) if not only or w.name in only]
    if not examples:
        raise SystemExit("no example workloads match; `batchplex plugins` lists what is installed")
    console.print(f"batchplex demo on [bold]{target}[/]: " + ", ".join(
        f"{w.name} ({w.description or w.adapter})" for w in examples))
    tallies = {w.name: _Tally() for w in examples}
    async with scheduler:
        for example in examples:
            scheduler.add_workload(example.name, adapter=example.adapter, adapter_options=example.adapter_options,
                                   model=example.model, policy=example.policy, device=target)
        if setup is not None:
            setup(scheduler)
        console.print("measuring each model's batch time to set the offered load ...")
        rates = {w.name: load * _rate(scheduler.workloads[w.name], w, len(examples)) for w in examples}
        console.print("offered load (requests/s): " + ", ".join(f"{n} {r:.0f}" for n, r in rates.items()))
        loop = asyncio.get_running_loop()
        until = loop.time() + duration_s
        drivers = asyncio.gather(*(
            _drive(scheduler, w, rates[w.name], until, bad_share, tallies[w.name], seed)
            for seed, w in enumerate(examples)))
        started = time.monotonic()
        if live and console.is_terminal:
            with Live(console=console, refresh_per_second=4) as view:
                while not drivers.done():
                    view.update(_table(_rows(scheduler, tallies),
                                       f"running {time.monotonic() - started:4.0f}s of {duration_s:.0f}s"))
                    await asyncio.wait([drivers], timeout=0.25)
        else:
            while not drivers.done():
                await asyncio.wait([drivers], timeout=max(1.0, duration_s / 6))
                console.print(f"  {time.monotonic() - started:5.1f}s: " + ", ".join(
                    f"{row[0]} {row[2]} done" for row in _rows(scheduler, tallies)))
        await drivers
    console.print(_table(_rows(scheduler, tallies), f"batchplex demo summary ({duration_s:.0f}s on {target}, "
                                                   f"bad/busy/failed = rejected at submit / queue full / failed)"))
    return scheduler.statistics()


#: The most requests per second one workload is offered: the generator shares the event loop with the scheduler.
MAX_RATE = {"cpu": 300.0, "cuda": 5000.0}


def _rate(workload: Any, example: ExampleWorkload, sharing: int, share_of_capacity: float = 0.8) -> float:
    """Requests per second to offer: a share of what the model does alone with full batches, divided among the
    workloads that share the device (measured with one warm-up and one timed batch), at most `MAX_RATE`."""
    device = next(iter(workload.models))
    model = workload.models[device]
    rng = random.Random(0)
    size = workload.policy.max_batch_size
    items = [workload.adapter.prepare(example.make_request(rng)) for _ in range(size)]
    with torch.inference_mode():
        for _ in range(2):  # the first run warms up; the second is timed
            started = time.perf_counter()
            inputs = workload.adapter.collate(items, device, workload.policy.padded_size(size))
            workload.forward(model, inputs, items)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    batch_s = max(time.perf_counter() - started, 1e-4)
    return min(share_of_capacity * size / batch_s / sharing, MAX_RATE.get(device.type, MAX_RATE["cpu"]))
