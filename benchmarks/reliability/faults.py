"""Cases 1 and 2: requests that make a batch fail, and batches too large for the device's memory.

1. `poisonous_requests`: a share of requests breaks its batch, at the adapter (collate raises) or in the model
   (the forward raises). Promise: every good request gets its result, every bad one its own `RequestFailed` with
   the cause chained; the price is the extra model calls and time of bisection, measured against a clean run of
   the same requests.
2. `out_of_memory`: the model fails with ``torch.OutOfMemoryError`` above a batch size (raised on the CPU, a real
   allocation failure on CUDA). Promise: the batch is split, every request is served, and the scheduler
   remembers the limit (``statistics()[w]["max_batch_size_now"]``) so later batches fit at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import torch

from batchplex import BatchPolicy, Scheduler

from .harness import Tally, call, settle
from .models import DelayModel, TimedFakeAdapter

__all__ = ["poisonous_requests", "out_of_memory"]


def _is_twice_plus_one(value: float):
    return lambda result: float(result.reshape(-1)[0]) == 2 * value + 1


async def _burst(scheduler: Scheduler, values: list[float], tally: Tally, timeout_s: float = 120.0) -> float:
    """Submit every value at once (one caller each); return the wall time until the last outcome. Callers still
    waiting after ``timeout_s`` are cancelled (and so not served)."""
    started = time.perf_counter()
    tasks = [asyncio.ensure_future(call(scheduler, "w", v, _is_twice_plus_one(v), tally, tag=v)) for v in values]
    await settle(tasks, timeout_s)
    return time.perf_counter() - started


async def _poison_run(values: list[float], poison: set[float], fault: str, policy: BatchPolicy,
                      model_ms: tuple[float, float], device: str) -> dict[str, Any]:
    model = DelayModel(*model_ms, device, poison=poison if fault == "model" else ())
    adapter = TimedFakeAdapter(fail_on=poison if fault == "adapter" else ())
    tally = Tally()
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload("w", adapter=adapter, model=model, policy=policy, device=device)
        wall_s = await _burst(scheduler, values, tally)
        stats = scheduler.statistics()["w"]
    good = [o for o in tally.outcomes if o.tag not in poison]
    bad = [o for o in tally.outcomes if o.tag in poison]
    own_error = [o for o in bad if o.kind == "failed" and o.error.__cause__ is not None
                 and f"[{o.tag}]" in str(o.error)]
    return {
        "fault": fault, "requests": len(values), "bad": len(poison),
        "good_ok": sum(o.kind == "ok" for o in good), "good_not_ok": sum(o.kind != "ok" for o in good),
        "bad_own_typed_error": len(own_error), "bad_other": len(bad) - len(own_error),
        "bad_error_example": next((f"{type(o.error).__name__}: {o.error} (cause: {o.error.__cause__!r})"
                                   for o in own_error), None),
        "model_calls": len(model.calls), "collate_calls": len(adapter.collations), "wall_s": round(wall_s, 4),
        "batches": stats["batches"], "retried_batches": stats["retried_batches"], "completed": stats["completed"],
        "failed": stats["failed"], "outcomes": tally.as_dict()["counts"],
    }


async def poisonous_requests(*, requests: int = 1000, bad_share: float = 0.01, max_batch_size: int = 32,
                             max_wait_ms: float = 2.0, base_ms: float = 1.0, per_item_ms: float = 0.02,
                             device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Case 1: the same ``requests`` run clean, with an adapter-level fault and with a model-level fault."""
    rng = random.Random(seed)
    values = [float(v) for v in range(requests)]
    poison = {float(v) for v in rng.sample(range(requests), max(1, round(requests * bad_share)))}
    policy = BatchPolicy(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=requests)
    model_ms = (base_ms, per_item_ms)
    clean = await _poison_run(values, set(), "none", policy, model_ms, device)
    runs = {fault: await _poison_run(values, poison, fault, policy, model_ms, device) for fault in ("adapter", "model")}
    for run in runs.values():
        run["extra_model_calls"] = run["model_calls"] - clean["model_calls"]
        run["extra_collate_calls"] = run["collate_calls"] - clean["collate_calls"]
        run["extra_calls_per_bad_request"] = round(run["extra_collate_calls"] / run["bad"], 2)
        run["time_vs_clean"] = round(run["wall_s"] / clean["wall_s"], 3)
    return {"params": {"requests": requests, "bad_share": bad_share, "max_batch_size": max_batch_size,
                       "max_wait_ms": max_wait_ms, "base_ms": base_ms, "per_item_ms": per_item_ms,
                       "device": device, "seed": seed},
            "clean": clean, "faults": runs}


def _hungry_bytes_per_item(device: torch.device, limit: int) -> int:
    """Bytes per request such that ``limit`` requests fit in the free device memory and ``limit + 1`` do not."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * 0.92 / limit)


async def out_of_memory(*, requests: int = 256, limit: int = 8, max_batch_size: int = 64, waves: int = 3,
                        max_wait_ms: float = 2.0, base_ms: float = 1.0, per_item_ms: float = 0.02,
                        device: str = "cpu") -> dict[str, Any]:
    """Case 2: ``waves`` bursts of ``requests``; the model runs out of memory above ``limit`` requests.

    On the CPU the model raises ``torch.OutOfMemoryError`` above ``limit``; on CUDA it allocates a scratch
    buffer sized so that ``limit`` requests fit in the free memory and one more does not (a real OOM).
    A reference run uses the same model with a policy that knows the limit in advance (``max_batch_size=limit``).
    """
    dev = torch.device(device)
    fault = ({"hungry_bytes_per_item": _hungry_bytes_per_item(dev, limit)} if dev.type == "cuda"
             else {"oom_above": limit})
    waves_out = []
    reference = []
    for known, model in ((False, DelayModel(base_ms, per_item_ms, dev, **fault)),
                         (True, DelayModel(base_ms, per_item_ms, dev, **fault))):
        policy = BatchPolicy(max_batch_size=limit if known else max_batch_size, max_wait_ms=max_wait_ms,
                             max_queue=requests)
        async with Scheduler(autoload=False) as scheduler:
            scheduler.add_workload("w", adapter=TimedFakeAdapter(), model=model, policy=policy, device=device)
            for wave in range(waves):
                tally = Tally()
                first_call = len(model.calls)
                values = [float(wave * requests + v) for v in range(requests)]
                wall_s = await _burst(scheduler, values, tally)
                calls = model.calls[first_call:]
                row = {"wave": wave, "wall_s": round(wall_s, 4), "served": tally.counts["ok"],
                       "not_served": tally.total - tally.counts["ok"], "model_calls": len(calls),
                       "oom_calls": sum(c.outcome == "oom" for c in calls),
                       "largest_ok_batch": max((c.size for c in calls if c.outcome == "ok"), default=0),
                       "largest_tried_batch": max((c.size for c in calls), default=0),
                       "max_batch_size_now": scheduler.statistics()["w"]["max_batch_size_now"]}
                (reference if known else waves_out).append(row)
        if not known:
            timeline = [{"t": round(c.started - model.calls[0].started, 5), "size": c.size, "outcome": c.outcome}
                        for c in model.calls]
    return {"params": {"requests": requests, "limit": limit, "max_batch_size": max_batch_size, "waves": waves,
                       "device": device, "injected": dev.type != "cuda",
                       "hungry_bytes_per_item": fault.get("hungry_bytes_per_item")},
            "waves": waves_out, "reference_known_limit": reference, "calls": timeline}

