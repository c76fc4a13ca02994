"""Cases 4 and 5: callers that give up, and a scheduler that goes away, both while requests are everywhere.

4. `cancellation_storm`: a stream of callers near capacity; half of them cancel after a random delay, so some
   cancel while queued (a batch forming around them), some while their batch is collated or running, some after
   their answer was on its way. Threaded callers do the same with ``submit_nowait`` futures. Promises: no result
   reaches the wrong caller, nothing hangs, asyncio reports nothing (no ``InvalidStateError``), nothing is logged,
   and a caller that cancelled while queued never runs.
5. `shutdown_under_load` / `shutdown_threaded`: the scheduler is closed while requests are queued and running, and
   callers keep submitting. Promises: with ``drain`` every accepted request is answered (exactly once), without
   it the queued ones get `SchedulerClosed` and the running ones their results; later submits are refused with
   `SchedulerClosed`; no ``batchplex-`` thread and no task is left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
from typing import Any

from batchplex import BatchPolicy, BatchplexError, Scheduler, SchedulerClosed

from .harness import Tally, batchplex_threads, call, classify, open_loop, settle
from .models import DelayModel, TimedFakeAdapter

__all__ = ["cancellation_storm", "shutdown_under_load", "shutdown_threaded"]


def _check(value: float):
    return lambda result: float(result.reshape(-1)[0]) == 2 * value + 1


def _moment(cancel_at: float, collated: float | None, ran: tuple[float, float] | None) -> str:
    """Where a request was when its caller cancelled, from the adapter's and the model's own records."""
    if collated is None:
        return "queued (dropped, never ran)"
    if cancel_at < collated:
        return "taken into a batch, before collate"
    if ran is None or cancel_at < ran[0]:
        return "while collating"
    if cancel_at <= ran[1]:
        return "while running"
    return "after running, before delivery"


def _threaded_callers(scheduler: Scheduler, values: list[float], cancel_share: float, max_delay_s: float,
                      seed: int) -> tuple[dict[str, int], list[float]]:
    """One thread's callers: ``submit_nowait`` each value, cancel a share after a random delay, wait the rest.
    Returns the counts and the values whose cancellation took effect."""
    rng = random.Random(seed)
    futures = [(v, scheduler.submit_nowait("w", v), rng.random() < cancel_share) for v in values]
    counts = {"ok": 0, "wrong": 0, "cancelled": 0, "answered_before_cancel": 0, "hung": 0, "error": 0}
    for _, future, cancel in futures:
        if cancel:
            time.sleep(rng.uniform(0, max_delay_s / len(values)))
            if future.cancel():
                counts["cancelled"] += 1
    for value, future, _ in futures:
        if future.cancelled():
            continue
        try:
            result = future.result(timeout=10)
        except concurrent.futures.TimeoutError:
            counts["hung"] += 1
        except BatchplexError:
            counts["error"] += 1
        else:
            counts["ok" if _check(value)(result) else "wrong"] += 1
    counts["answered_before_cancel"] = sum(cancel and not future.cancelled() for _, future, cancel in futures)
    return counts, [value for value, future, _ in futures if future.cancelled()]


async def cancellation_storm(*, callers: int = 800, cancel_share: float = 0.5, load: float = 0.8,
                             max_batch_size: int = 16, max_wait_ms: float = 10.0, base_ms: float = 8.0,
                             per_item_ms: float = 0.2, threaded_callers: int = 200, threads: int = 4,
                             device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Case 4. ``callers`` async callers arrive at ``load`` times capacity; ``threaded_callers`` more come from
    ``threads`` threads. Cancel delays span a whole wait-collate-run cycle."""
    rng = random.Random(seed)
    capacity = max_batch_size / ((base_ms + per_item_ms * max_batch_size) / 1000.0)
    cycle_s = (max_wait_ms + 2 * (base_ms + per_item_ms * max_batch_size)) / 1000.0
    model = DelayModel(base_ms, per_item_ms, device, record_values=True)
    adapter = TimedFakeAdapter()
    tally = Tally()
    cancelled_at: dict[float, float] = {}
    counter = iter(range(callers))

    def cancel(task: asyncio.Task, value: float) -> None:
        if not task.done():
            cancelled_at[value] = time.perf_counter()
            task.cancel()

    async def one() -> None:
        value = float(next(counter, -1))
        if value < 0:
            return
        task = asyncio.ensure_future(call(scheduler, "w", value, _check(value), tally, tag=value))
        if rng.random() < cancel_share:
            asyncio.get_running_loop().call_later(rng.uniform(0, 3 * cycle_s), cancel, task, value)
        await task

    threaded_values = [[float(callers + t * threaded_callers + i) for i in range(threaded_callers // threads)]
                       for t in range(threads)]
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload("w", adapter=adapter, model=model, device=device, policy=BatchPolicy(
            max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=callers + threaded_callers))
        pool = [asyncio.to_thread(_threaded_callers, scheduler, values, cancel_share, callers / (load * capacity),
                                  seed + index) for index, values in enumerate(threaded_values)]
        threaded = asyncio.gather(*pool)
        pending = await open_loop(lambda _t: load * capacity, callers / (load * capacity) + 0.05, one)
        hung = await settle(pending, 10.0)
        threaded_runs = await threaded
    stats = scheduler.statistics()["w"]
    collated: dict[float, float] = {}
    for at, values in adapter.collations:
        for value in values:
            collated.setdefault(value, at)
    ran: dict[float, tuple[float, float]] = {}
    for c in model.calls:
        for value in c.values:
            ran.setdefault(value, (c.started, c.ended))
    moments: dict[str, int] = {}
    for outcome in tally.outcomes:
        if outcome.kind == "cancelled":
            where = _moment(cancelled_at[outcome.tag], collated.get(outcome.tag), ran.get(outcome.tag))
            moments[where] = moments.get(where, 0) + 1
    merged = {key: sum(counts[key] for counts, _ in threaded_runs) for key in threaded_runs[0][0]}
    merged["dropped_never_ran"] = sum(value not in collated for _, values in threaded_runs for value in values)
    return {"params": {"callers": callers, "cancel_share": cancel_share, "load": load, "capacity_per_s":
                       round(capacity, 1), "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
                       "base_ms": base_ms, "per_item_ms": per_item_ms, "threaded_callers": threaded_callers,
                       "threads": threads, "device": device, "seed": seed},
            "outcomes": tally.as_dict(), "hung": hung, "cancel_requested": len(cancelled_at),
            "answered_before_cancel_took_effect": len(cancelled_at) - tally.counts["cancelled"],
            "cancelled_at": dict(sorted(moments.items())),
            "cancelled_but_ran": sum(1 for o in tally.outcomes if o.kind == "cancelled" and o.tag in collated),
            "threaded": merged,
            "statistics": {k: stats[k] for k in ("submitted", "completed", "failed", "timeouts", "cancelled",
                                                 "batches", "mean_batch_size")}}


async def shutdown_under_load(*, drain: bool = True, load: float = 1.5, load_s: float = 1.0,
                              after_close_s: float = 0.3, max_batch_size: int = 8, max_wait_ms: float = 5.0,
                              base_ms: float = 10.0, per_item_ms: float = 0.5, device: str = "cpu"
                              ) -> dict[str, Any]:
    """Case 5 with asyncio callers: ``load`` times capacity for ``load_s``, then ``aclose(drain)`` while callers
    keep submitting for ``after_close_s`` more."""
    capacity = max_batch_size / ((base_ms + per_item_ms * max_batch_size) / 1000.0)
    model = DelayModel(base_ms, per_item_ms, device)
    tally = Tally()
    launched: list[asyncio.Task] = []
    counter = iter(range(10**9))

    async def one() -> None:
        value = float(next(counter))
        task = asyncio.current_task()
        launched.append(task)
        await call(scheduler, "w", value, _check(value), tally, tag=value)

    scheduler = Scheduler(autoload=False)
    scheduler.add_workload("w", adapter=TimedFakeAdapter(), model=model, device=device, policy=BatchPolicy(
        max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=100_000))
    await scheduler.__aenter__()
    stream = asyncio.ensure_future(open_loop(lambda _t: load * capacity, load_s + after_close_s, one))
    await asyncio.sleep(load_s)
    at_close = scheduler.statistics()["w"]
    closing_started = time.perf_counter()
    await scheduler.aclose(drain=drain)
    close_s = time.perf_counter() - closing_started
    launched_before_close = list(launched)
    await asyncio.sleep(0.05)  # let answered callers resume
    unanswered_after_close = sum(not task.done() for task in launched_before_close)
    threads_after_close = batchplex_threads()
    hung = await settle(await stream, 5.0)
    stats = scheduler.statistics()["w"]
    late_closed = sum(o.kind == "closed" and "drain=False" in str(o.error) for o in tally.outcomes)
    refused = sum(o.kind == "closed" for o in tally.outcomes) - late_closed
    return {"params": {"drain": drain, "load": load, "capacity_per_s": round(capacity, 1), "load_s": load_s,
                       "after_close_s": after_close_s, "max_batch_size": max_batch_size, "base_ms": base_ms,
                       "per_item_ms": per_item_ms, "device": device},
            "outcomes": tally.as_dict(), "queued_at_close": at_close["queue_depth"],
            "in_flight_at_close": at_close["in_flight"], "close_s": round(close_s, 4),
            "accepted": stats["submitted"], "answered": tally.counts["ok"] + late_closed + tally.counts["failed"]
            + tally.counts["timeout"], "closed_while_queued": late_closed, "refused_after_close": refused,
            "unanswered_after_close": unanswered_after_close, "threads_after_close": threads_after_close,
            "hung": hung}


def _threaded_submitter(scheduler: Scheduler, first: int, pause_s: float, stop: threading.Event,
                        futures: list[tuple[float, concurrent.futures.Future]], refused: list[str]) -> None:
    value = float(first)
    while not stop.is_set():
        try:
            futures.append((value, scheduler.submit_nowait("w", value)))
        except BaseException as error:  # noqa: BLE001 - a refusal must be typed; anything else is counted
            refused.append(classify(error) if isinstance(error, BatchplexError) else f"untyped {error!r}")
            if isinstance(error, SchedulerClosed) or classify(error) == "untyped":
                return
        value += 1
        time.sleep(pause_s)


async def shutdown_threaded(*, drain: bool = True, threads: int = 4, load: float = 1.5, load_s: float = 0.5,
                            max_batch_size: int = 8, base_ms: float = 10.0, device: str = "cpu") -> dict[str, Any]:
    """Case 5 with threaded callers: ``start()``, ``threads`` threads calling ``submit_nowait`` in a loop (together
    about ``load`` times capacity), then ``close(drain)`` from another thread while they go on."""
    pause_s = threads / (load * max_batch_size / (base_ms / 1000.0))
    scheduler = Scheduler(autoload=False)
    scheduler.add_workload("w", adapter=TimedFakeAdapter(), model=DelayModel(base_ms, 0.0, device), device=device,
                           policy=BatchPolicy(max_batch_size=max_batch_size, max_wait_ms=5, max_queue=100_000))
    await asyncio.to_thread(scheduler.start)
    stop = threading.Event()
    futures: list[tuple[float, concurrent.futures.Future]] = []
    refused: list[str] = []
    workers = [threading.Thread(target=_threaded_submitter, args=(scheduler, index * 10**6, pause_s, stop, futures, refused),
                                name=f"reliability-submitter-{index}") for index in range(threads)]
    for worker in workers:
        worker.start()
    await asyncio.sleep(load_s)
    started = time.perf_counter()
    await asyncio.to_thread(scheduler.close, drain)
    close_s = time.perf_counter() - started
    stop.set()
    for worker in workers:
        await asyncio.to_thread(worker.join, 5.0)
    counts = {"ok": 0, "wrong": 0, "closed_while_queued": 0, "other": 0, "hung": 0}
    for value, future in futures:
        try:
            result = future.result(timeout=5)
        except concurrent.futures.TimeoutError:
            counts["hung"] += 1
        except SchedulerClosed:
            counts["closed_while_queued"] += 1
        except BaseException:  # noqa: BLE001 - counted: every accepted request must end in a result or SchedulerClosed
            counts["other"] += 1
        else:
            counts["ok" if _check(value)(result) else "wrong"] += 1
    refusals = {kind: refused.count(kind) for kind in sorted(set(refused))}
    return {"params": {"drain": drain, "threads": threads, "load": load, "load_s": load_s,
                       "max_batch_size": max_batch_size,
                       "base_ms": base_ms, "device": device},
            "accepted": len(futures), "outcomes": counts, "refusals": refusals, "close_s": round(close_s, 4),
            "submitters_alive": sum(worker.is_alive() for worker in workers),
            "threads_after_close": batchplex_threads()}

