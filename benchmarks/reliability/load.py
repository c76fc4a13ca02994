"""Cases 3 and 7: more load than the device can take, and a long run at a steady share of what it can take.

3. `overload`: a baseline phase, then ``load_factor`` times the capacity for ``overload_s``, then the baseline load
   again. Promises: the queue never holds more than ``max_queue``; refused submits fail at once with
   `QueueFullError`; memory stays bounded; an accepted request either runs in time or fails with
   `DeadlineExceeded` when its timeout passes; once the load drops, latency returns to the baseline.
7. `soak`: two workloads (an MLP and a small CNN, both through the ``tensor`` adapter) share one device at
   ``load`` times their measured capacity, with a little bad input, a few cancelling callers and timeouts.
   Promises: memory and latency do not grow over time, and every request is accounted for, by the callers and
   by ``statistics()`` alike.
"""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
import weakref
from typing import Any

import torch

from batchplex import BatchPolicy, QueueFullError, Scheduler
from batchplex.testing import FakeAdapter

from .harness import KINDS, RssSampler, Tally, WindowedTally, call, open_loop, rss_mb, settle, summary_ms
from .models import AtLeast, DelayModel, mlp, small_cnn

__all__ = ["overload", "rejection_cost", "soak"]


def _first_value_check(value: float):
    return lambda result: float(result[0]) == 2 * value + 1


async def _sample_queue(scheduler: Scheduler, payloads: weakref.WeakSet, into: list[tuple[float, int, int]],
                        interval_s: float) -> None:
    """Every ``interval_s``: the queue depth of workload ``w`` and how many accepted payloads are still alive."""
    while True:
        into.append((time.perf_counter(), scheduler.statistics()["w"]["queue_depth"], len(payloads)))
        await asyncio.sleep(interval_s)


async def overload(*, max_batch_size: int = 8, batch_ms: float = 40.0, load_factor: float = 10.0,
                   baseline_load: float = 0.3, baseline_s: float = 1.0, overload_s: float = 2.0,
                   recovery_s: float = 2.0, max_queue: int = 128, timeout_s: float = 0.5,
                   long_timeout_share: float = 0.0, long_timeout_s: float = 3600.0, payload: int = 256,
                   device: str = "cpu") -> dict[str, Any]:
    """Case 3. The model takes ``batch_ms`` per batch of up to ``max_batch_size``: capacity is their ratio.

    Requests carry ``timeout_s``; a ``long_timeout_share`` of them carry ``long_timeout_s`` instead (callers
    with different patience). ``payload`` floats per request make queued and retained requests visible in RSS.
    """
    capacity = max_batch_size / (batch_ms / 1000.0)
    phases = (("baseline", baseline_s, baseline_load), ("overload", overload_s, load_factor),
              ("recovery", recovery_s, baseline_load))
    edges, at = [], 0.0
    for name, length, factor in phases:
        edges.append((name, at, at + length, factor))
        at += length

    def rate(elapsed: float) -> float:
        return next((factor for _, lo, hi, factor in edges if lo <= elapsed < hi), baseline_load) * capacity

    model = DelayModel(batch_ms, 0.0, device)
    policy = BatchPolicy(max_batch_size=max_batch_size, max_wait_ms=batch_ms / 4, max_queue=max_queue)
    tally, samples, counter = Tally(), [], iter(range(10**9))
    payloads: weakref.WeakSet = weakref.WeakSet()  # a payload lives while its request is referenced anywhere
    rng = random.Random(0)

    async def one() -> None:
        value = float(next(counter))
        timeout = long_timeout_s if rng.random() < long_timeout_share else timeout_s
        item = torch.full((payload,), value, device=device)
        payloads.add(item)
        await call(scheduler, "w", item, _first_value_check(value), tally, tag=timeout, timeout=timeout)

    gc.collect()
    rss_before = rss_mb()
    with RssSampler() as rss:
        async with Scheduler(autoload=False) as scheduler:
            scheduler.add_workload("w", adapter="tensor", model=model, policy=policy, device=device,
                                   adapter_options={"shape": (payload,), "dtype": torch.float32})
            sampler = asyncio.ensure_future(_sample_queue(scheduler, payloads, samples, 0.05))
            start = time.perf_counter()
            pending = await open_loop(rate, at, one)
            hung = await settle(pending, timeout_s + 5.0)
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            stats = scheduler.statistics()["w"]
    rejections = [o.latency_s for o in tally.outcomes if o.kind == "full"]
    past_timeout = [o.latency_s - o.tag for o in tally.outcomes if o.kind == "ok" and o.latency_s > o.tag]
    early_timeouts = [o for o in tally.outcomes if o.kind == "timeout" and o.latency_s < o.tag - 0.002]
    timeouts = [o.latency_s - o.tag for o in tally.outcomes if o.kind == "timeout"]
    by_phase = {}
    for name, lo, hi, factor in edges:
        lo_t, hi_t = start + lo, start + hi
        settled_from = lo_t + (hi - lo) / 2  # the second half of each phase
        by_phase[name] = {
            "offered_per_s": round(factor * capacity, 1), "attempts": sum(lo_t <= o.started < hi_t for o in tally.outcomes),
            "counts": {kind: sum(o.kind == kind and lo_t <= o.started < hi_t for o in tally.outcomes) for kind in KINDS},
            "latency_ms": summary_ms(tally.latencies("ok", lo_t, hi_t)),
            "latency_ms_second_half": summary_ms(tally.latencies("ok", settled_from, hi_t)),
            "rejected_second_half": sum(o.kind == "full" and settled_from <= o.started < hi_t for o in tally.outcomes),
            "peak_rss_mb": round(max(rss.between(lo_t, hi_t), default=rss_before), 1),
            "max_queue_depth": max((d for t, d, _ in samples if lo_t <= t < hi_t), default=0),
            "max_live_payloads": max((n for t, _, n in samples if lo_t <= t < hi_t), default=0),
        }
    return {
        "params": {"max_batch_size": max_batch_size, "batch_ms": batch_ms, "capacity_per_s": capacity,
                   "load_factor": load_factor, "baseline_load": baseline_load, "phases_s": [baseline_s, overload_s,
                   recovery_s], "max_queue": max_queue, "timeout_s": timeout_s,
                   "long_timeout_share": long_timeout_share, "long_timeout_s": long_timeout_s, "payload": payload,
                   "device": device},
        "outcomes": tally.as_dict(), "hung": hung, "phases": by_phase,
        "max_queue_depth": max((d for _, d, _ in samples), default=0),
        "max_live_payloads": max((n for _, _, n in samples), default=0),
        "rejection_ms": summary_ms(rejections),
        "ok_past_timeout_ms": summary_ms(past_timeout), "timeouts_early": len(early_timeouts),
        "timeout_overshoot_ms": summary_ms(timeouts),
        "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(max(mb for _, mb in rss.samples), 1),
        "rss_timeline": [(round(t - start, 3), round(mb, 1)) for t, mb in rss.samples],
        "queue_timeline": [(round(t - start, 3), depth, live) for t, depth, live in samples],
        "latency_timeline": [(round(o.started - start, 4), round(o.latency_s * 1000, 2), o.kind)
                             for o in tally.outcomes if o.kind in ("ok", "timeout")],
        "statistics": {k: stats[k] for k in ("submitted", "completed", "failed", "rejected_full", "timeouts",
                                             "cancelled", "batches", "mean_batch_size")},
    }


async def rejection_cost(*, max_queues: tuple[int, ...] = (16, 256, 4096), rejections: int = 1000
                         ) -> dict[str, Any]:
    """Case 3's companion: what one refused submit costs the event loop, per ``max_queue``, with the queue held
    full behind a blocked model. Rejections are the common path under overload, so their cost must not grow
    with the queue bound."""
    rows = []
    for max_queue in max_queues:
        gate = threading.Event()

        def blocked(batch: torch.Tensor, gate: threading.Event = gate) -> torch.Tensor:
            gate.wait(30)
            return batch

        async with Scheduler(autoload=False, pipeline_depth=1) as scheduler:
            scheduler.add_workload("w", adapter=FakeAdapter(), model=blocked, policy=BatchPolicy(
                max_batch_size=1, max_wait_ms=0, max_queue=max_queue))
            queued = [asyncio.ensure_future(scheduler.submit("w", 1.0)) for _ in range(max_queue + 1)]
            while scheduler.statistics()["w"]["queue_depth"] < max_queue:
                await asyncio.sleep(0.001)
            costs = []
            for _ in range(rejections):
                started = time.perf_counter()
                try:
                    await scheduler.submit("w", 2.0)
                except QueueFullError:
                    costs.append(time.perf_counter() - started)
            gate.set()
            await asyncio.gather(*queued)
        rows.append({"max_queue": max_queue, "rejected": len(costs), "us": {
            k: (None if v is None else round(v * 1000.0, 1)) for k, v in summary_ms(costs).items() if k != "n"}})
    return {"params": {"max_queues": list(max_queues), "rejections": rejections}, "rows": rows}


# ---------------------------------------------------------------------------------------------- soak
def _soak_workloads(device: str, cpu_batch_ms: float) -> dict[str, dict[str, Any]]:
    """An MLP and a small CNN, both through the ``tensor`` adapter; on the CPU each batch takes at least
    ``cpu_batch_ms`` (`AtLeast`), on a GPU the models run as they are."""
    def paced(model: torch.nn.Module) -> Any:
        return AtLeast(model, cpu_batch_ms) if torch.device(device).type == "cpu" and cpu_batch_ms else model

    return {
        "mlp": {"model": paced(mlp(device)), "reference": mlp(device), "shape": (256,),
                "policy": BatchPolicy(max_batch_size=32, max_wait_ms=4), "make": lambda: torch.randn(256)},
        "cnn": {"model": paced(small_cnn(device)), "reference": small_cnn(device), "shape": (3, 32, 32),
                "policy": BatchPolicy(max_batch_size=16, max_wait_ms=4), "make": lambda: torch.rand(3, 32, 32)},
    }


async def _capacity(scheduler: Scheduler, workloads: dict[str, dict[str, Any]], seconds: float,
                    warmup_s: float) -> dict[str, float]:
    """Requests per second each workload completes when both are saturated by closed-loop callers, measured
    after ``warmup_s`` of the same load (first calls of a model are slow)."""
    done = {name: 0 for name in workloads}
    start = time.perf_counter()
    measure_from, until = start + warmup_s, start + warmup_s + seconds

    async def caller(name: str) -> None:
        item = workloads[name]["make"]()
        while (now := time.perf_counter()) < until:
            await scheduler.submit(name, item)
            done[name] += now >= measure_from

    callers = [caller(name) for name, w in workloads.items() for _ in range(3 * w["policy"].max_batch_size)]
    await asyncio.gather(*callers)
    return {name: count / seconds for name, count in done.items()}


async def soak(*, seconds: float = 5.0, load: float = 0.7, capacity_s: float = 1.0, windows: int = 5,
               warmup_s: float = 1.0, bad_share: float = 0.01, cancel_share: float = 0.01, timeout_s: float = 2.0,
               max_rate: float = 2000.0, cpu_batch_ms: float = 20.0, device: str = "cpu", seed: int = 0
               ) -> dict[str, Any]:
    """Case 7: measure capacity, then offer ``load`` times it for ``seconds`` (open loop, evenly spaced).

    The offered rate per workload is capped at ``max_rate``, what one asyncio load generator sustains next to
    the scheduler in the same process (it binds on a GPU, where the models are far faster than Python); the
    result reports the load actually offered. The run after ``warmup_s`` is cut into ``windows`` equal windows;
    each reports RSS and latency per workload.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    workloads = _soak_workloads(device, cpu_batch_ms)
    width = (seconds - warmup_s) / windows
    async with Scheduler(autoload=False) as scheduler:
        for name, w in workloads.items():
            scheduler.add_workload(name, adapter="tensor", model=w["model"], policy=w["policy"], device=device,
                                   adapter_options={"shape": w["shape"], "dtype": torch.float32})
        capacity = await _capacity(scheduler, workloads, capacity_s, warmup_s=1.0)
        offered = {name: min(load * c, max_rate) for name, c in capacity.items()}
        baseline = {name: dict(s) for name, s in scheduler.statistics().items()}
        with torch.no_grad():
            reference = {name: (w["make"](), w) for name, w in workloads.items()}
            expected = {name: w["reference"](x.to(device).unsqueeze(0))[0].cpu() for name, (x, w) in reference.items()}

        tallies: dict[str, WindowedTally] = {}

        def launcher(name: str):
            item, _ = reference[name]
            bad = torch.randn(7)

            def check(result: torch.Tensor) -> bool:
                return torch.allclose(result.cpu(), expected[name], rtol=1e-4, atol=1e-5)

            async def one() -> None:
                roll = rng.random()
                if roll < bad_share:
                    await call(scheduler, name, bad, check, tallies[name])
                    return
                task = asyncio.ensure_future(call(scheduler, name, item, check, tallies[name], timeout=timeout_s))
                if roll < bad_share + cancel_share:
                    asyncio.get_running_loop().call_later(rng.uniform(0, 0.02), task.cancel)
                await task
            return one

        gc.collect()
        with RssSampler(0.05) as rss:
            start = time.perf_counter()
            tallies.update({name: WindowedTally(start + warmup_s, width) for name in workloads})
            streams = [open_loop(lambda _t, r=offered[name]: r, seconds, launcher(name))
                       for name in workloads]
            pending = set().union(*await asyncio.gather(*streams))
            hung = await settle(pending, timeout_s + 5.0)
    stats = scheduler.statistics()
    series = []
    for index in range(windows):
        lo = start + warmup_s + index * width
        samples = rss.between(lo, lo + width)
        row = {"from_s": round(lo - start, 2), "rss_mb": round(sum(samples) / max(1, len(samples)), 1)}
        for name, tally in tallies.items():
            row[name] = tally.window_ms(index)
        series.append(row)
    accounting = {}
    for name, tally in tallies.items():
        s, b = stats[name], baseline[name]
        sched = {k: s[k] - b[k] for k in ("submitted", "completed", "failed", "timeouts", "cancelled",
                                          "rejected_full", "rejected_invalid")}
        accounting[name] = {"callers": tally.as_dict()["counts"], "attempts": tally.total, "scheduler": sched}
    return {"params": {"seconds": seconds, "load": load, "capacity_s": capacity_s, "windows": windows,
                       "warmup_s": warmup_s, "bad_share": bad_share, "cancel_share": cancel_share,
                       "timeout_s": timeout_s, "max_rate": max_rate, "cpu_batch_ms": cpu_batch_ms, "device": device,
                       "seed": seed},
            "capacity_per_s": {k: round(v, 1) for k, v in capacity.items()},
            "offered_per_s": {k: round(v, 1) for k, v in offered.items()},
            "offered_fraction": {k: round(offered[k] / capacity[k], 3) for k in capacity},
            "windows": series, "accounting": accounting, "hung": hung,
            "rss_timeline": [(round(t - start, 2), round(mb, 1)) for t, mb in rss.samples],
            "examples": {name: tally.examples for name, tally in tallies.items()}}
