"""Online adaptation under changing load: does the controller find the profiled sweet spot and keep p99 latency
under the objective when the load and the model change?

The model is simulated: a batch of ``n`` rows sleeps ``a + b * n`` milliseconds (``b`` times ``--slowdown`` in the
last two phases, as when another tenant shares the GPU) and returns its input. It runs through a real `Scheduler`
(built-in ``tensor`` adapter, pipeline depth 2) under open-loop Poisson load that changes by phase: light, heavy,
light again, the slower model under a medium load, the slower model under a heavier load.

1. Profile: `batchplex.tuning.profile` sweeps the simulated model (powers of two and every 4th size) with the
   batch-latency budget the objective implies, ``objective / (pipeline_depth + 1)``: a request may wait for its
   batch and for the batch ahead of it, then its own batch runs. Its sweet spot is the size to converge to.
2. Two runs over the same phases (same seeds): ``adaptive`` (`AdaptiveBatching` with a p99 request objective,
   starting from a limit of 1, the policy's max_batch_size and max_wait_ms as ceilings) and ``fixed`` (the
   policy the profile suggests: the sweet spot, and its batch latency as the wait).

Reported per phase and run: requests, p50/p99/max end-to-end latency (client side: submit to result), the share of
requests over the objective, mean batch size, the batch-size limit and the wait; a PNG with the limit, the batch
sizes and the rolling p99 over time.

    python benchmarks/adaptive_convergence.py               # about 80 s on the CPU
    python benchmarks/adaptive_convergence.py --quick       # about 40 s
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

import batchplex
from batchplex import BatchPolicy, Scheduler
from batchplex.adaptive import AdaptiveBatching, LatencyObjective
from batchplex.builtin_adapters import TensorAdapter
from batchplex.metrics import percentile
from batchplex.tuning import device_name, policy_source, profile

WORKLOAD = "simulated"


class SimulatedModel:
    """Sleeps ``a_ms + b_ms * n * slowdown`` for a batch of ``n`` rows; returns the batch."""

    def __init__(self, a_ms: float, b_ms: float) -> None:
        self.a_ms, self.b_ms, self.slowdown = a_ms, b_ms, 1.0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep((self.a_ms + self.b_ms * batch.shape[0] * self.slowdown) / 1000.0)
        return batch

    def fitting_size(self, budget_ms: float, slowdown: float) -> int:
        return int((budget_ms - self.a_ms) / (self.b_ms * slowdown))


class BatchLog:
    """Plugin that keeps (time, size, run seconds, limit now) of every finished batch."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler, self.rows = scheduler, []

    @batchplex.hookimpl
    def batch_finished(self, record: batchplex.BatchRecord) -> None:
        queue = self.scheduler.workloads[record.workload].queue
        self.rows.append((time.monotonic(), record.size, record.run_s, queue.batch_limit, queue.max_wait_s))


def phases(args: argparse.Namespace) -> list[dict[str, Any]]:
    scale = 0.5 if args.quick else 1.0
    return [{"name": "light", "rate": args.light, "slowdown": 1.0, "seconds": 5 * scale},
            {"name": "heavy", "rate": args.heavy, "slowdown": 1.0, "seconds": 8 * scale},
            {"name": "light again", "rate": args.light, "slowdown": 1.0, "seconds": 4 * scale},
            {"name": "slower model", "rate": args.light * 8, "slowdown": args.slowdown, "seconds": 6 * scale},
            {"name": "slower, heavier", "rate": args.slow_rate, "slowdown": args.slowdown, "seconds": 6 * scale}]


async def run(kind: str, policy: BatchPolicy, args: argparse.Namespace, plan: list[dict[str, Any]]
              ) -> dict[str, Any]:
    """One run over every phase; returns per-request (arrival offset, latency) and the batch log."""
    model = SimulatedModel(args.a_ms, args.b_ms)
    rng = random.Random(args.seed)
    done: list[tuple[float, float]] = []
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload(WORKLOAD, adapter=TensorAdapter().configure(shape=(1,), dtype=torch.float32),
                               model=model, policy=policy, device=args.device)
        log = BatchLog(scheduler)
        scheduler.register_plugin(log)
        if kind == "adaptive":
            scheduler.register_plugin(AdaptiveBatching(scheduler, {WORKLOAD: LatencyObjective(args.objective_ms)}))
        loop = asyncio.get_running_loop()
        start = loop.time()
        pending: set[asyncio.Task] = set()

        async def one(item: torch.Tensor) -> None:
            sent = loop.time()
            result = await scheduler.submit(WORKLOAD, item)
            assert torch.equal(result, item.to(result.device))
            done.append((sent - start, loop.time() - sent))

        at = start
        for phase in plan:
            model.slowdown = phase["slowdown"]
            end = at + phase["seconds"]
            while True:
                at += rng.expovariate(phase["rate"])
                if at >= end:
                    break
                await asyncio.sleep(max(0.0, at - loop.time()))
                task = asyncio.ensure_future(one(torch.tensor([rng.random()])))
                pending.add(task)
                task.add_done_callback(pending.discard)
            at = end
        await asyncio.gather(*pending)
    # the default event loop's clock is time.monotonic, which the batch log uses too
    return {"requests": done, "batches": [(t - start, *rest) for t, *rest in log.rows]}


def summarize(result: dict[str, Any], plan: list[dict[str, Any]], objective_s: float, settle_s: float
              ) -> list[dict[str, Any]]:
    rows, at = [], 0.0
    for phase in plan:
        lo, hi = at, at + phase["seconds"]
        at = hi
        lat = [latency for sent, latency in result["requests"] if lo <= sent < hi]
        settled = [latency for sent, latency in result["requests"] if lo + settle_s <= sent < hi]
        batches = [b for b in result["batches"] if lo <= b[0] < hi]
        rows.append({
            "phase": phase["name"], "rate": phase["rate"], "slowdown": phase["slowdown"], "requests": len(lat),
            "p50_ms": _ms(percentile(lat, 50)), "p99_ms": _ms(percentile(lat, 99)), "max_ms": _ms(max(lat)),
            "p99_settled_ms": _ms(percentile(settled, 99)),
            "over_objective": sum(x > objective_s for x in lat) / len(lat),
            "mean_batch": sum(b[1] for b in batches) / len(batches),
            "limit_median": sorted(b[3] for b in batches)[len(batches) // 2], "limit_last": batches[-1][3],
            "wait_ms_last": batches[-1][4] * 1000, "batch_run_p99_ms": _ms(percentile([b[2] for b in batches], 99))})
    return rows


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def rolling_p99(requests: list[tuple[float, float]], width: float, step: float, end: float
                ) -> tuple[list[float], list[float]]:
    times, values = [], []
    t = width
    while t <= end:
        window = [latency for sent, latency in requests if t - width <= sent < t]
        if window:
            times.append(t)
            values.append(percentile(window, 99) * 1000)
        t += step
    return times, values


def write_chart(path: Path, report: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, cfg = report["phases"], report["config"]
    end = sum(p["seconds"] for p in plan)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 7))
    colors = {"adaptive": "tab:blue", "fixed": "tab:orange"}
    for kind, result in results.items():
        batches = result["batches"]
        if kind == "adaptive":
            top.plot([b[0] for b in batches], [b[3] for b in batches], "-", color=colors[kind], linewidth=1.5,
                     label="adaptive: batch-size limit")
        top.plot([b[0] for b in batches], [b[1] for b in batches], ".", color=colors[kind], markersize=2,
                 alpha=0.35, label=f"{kind}: batch sizes")
        times, values = rolling_p99(result["requests"], 1.0, 0.25, end)
        bottom.plot(times, values, "-", color=colors[kind], label=f"{kind}: p99 over the last 1 s")
    sweet = report["profile"]["sweet_spot"]
    top.axhline(sweet, color="tab:green", linestyle="--", linewidth=1, label=f"profiled sweet spot ({sweet})")
    edges = [0.0]
    for phase in plan:
        edges.append(edges[-1] + phase["seconds"])
    fits = [report["fitting_size_per_phase"][phase["name"]] for phase in plan]
    top.stairs(fits, edges, color="black", linestyle=":", linewidth=1, label="n* = (budget - a) / b per phase")
    bottom.axhline(cfg["objective_ms"], color="black", linestyle="--", linewidth=1,
                   label=f"objective: p99 {cfg['objective_ms']:g} ms")
    at = 0.0
    for i, phase in enumerate(plan):
        for ax in (top, bottom):
            ax.axvspan(at, at + phase["seconds"], color="grey", alpha=0.08 if i % 2 else 0.0)
        bottom.text(at + 0.1, cfg["objective_ms"] * 1.05,
                    f"{phase['name']}\n{phase['rate']:g}/s" + (f", x{phase['slowdown']:g}" if phase["slowdown"] != 1
                                                            else ""), fontsize=8, va="bottom")
        at += phase["seconds"]
    top.set_ylabel("requests per batch")
    bottom.set_ylabel("end-to-end latency (ms)")
    bottom.set_xlabel("time (s)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    bottom.set_ylim(0, cfg["objective_ms"] * 1.6)
    fig.suptitle(f"Online adaptation, simulated model {cfg['a_ms']:g} + {cfg['b_ms']:g}·n ms, "
                 f"{report['machine']['device_name']} ({cfg['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    cfg, prof = report["config"], report["profile"]
    lines = [
        "# Online adaptation under changing load (simulated model)",
        "",
        f"- Machine: {report['machine']['device_name']} ({report['machine']['cpu_count']} CPUs), device "
        f"`{cfg['device']}`; Python {report['machine']['python']}, torch {report['machine']['torch']}",
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}",
        f"- Model: sleeps {cfg['a_ms']:g} + {cfg['b_ms']:g}·n ms per batch of n; objective: p99 end-to-end "
        f"{cfg['objective_ms']:g} ms, so a batch may run {prof['budget_ms']:.1f} ms (pipeline depth 2).",
        f"- Profile (`batchplex.tuning.profile`, budget {prof['budget_ms']:.1f} ms): sweet spot {prof['sweet_spot']} "
        f"({prof['sweet_latency_ms']:.1f} ms; powers of two only: {prof['sweet_spot_pow2']}); "
        f"fixed run uses `{prof['policy']}`.",
        "",
        "| run | phase | load /s | model | requests | p50 ms | p99 ms | p99 after 1 s | max ms | > objective "
        "| mean batch | limit (median / last) | wait ms (last) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, rows in report["runs"].items():
        for r in rows:
            lines.append(
                f"| {kind} | {r['phase']} | {r['rate']:g} | x{r['slowdown']:g} | {r['requests']} | {r['p50_ms']} | "
                f"{r['p99_ms']} | {r['p99_settled_ms']} | {r['max_ms']} | {100 * r['over_objective']:.1f}% | "
                f"{r['mean_batch']:.1f} | {r['limit_median']} / {r['limit_last']} | {r['wait_ms_last']:.1f} |")
    lines += ["", "Notes: " + report["notes"], ""]
    path.write_text("\n".join(lines))


NOTES = (
    "Latency is measured by the client from submit to result. The adaptive run starts from a limit of 1 and learns "
    "from the scheduler's own batch records (run time per batch); 'p99 after 1 s' leaves out each phase's first "
    "second. The size that fits the batch budget is n* = (budget - a) / (b * slowdown): {fits}. The limit only "
    "comes down when a batch runs late; when the model slows while batches stay below the new n*, the controller "
    "shortens the wait instead (max_wait = objective - 2 x the fitted run time at the limit), which is what keeps "
    "p99 down in the last two phases. The limit's own reaction to a slower model under saturating load is tested "
    "in tests/test_adaptive.py."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--objective-ms", type=float, default=90.0, help="p99 end-to-end objective (default 90)")
    parser.add_argument("--a-ms", type=float, default=4.0, help="fixed cost of a batch (default 4 ms)")
    parser.add_argument("--b-ms", type=float, default=0.5, help="cost per row (default 0.5 ms)")
    parser.add_argument("--light", type=float, default=100.0, help="light load, requests/s (default 100)")
    parser.add_argument("--heavy", type=float, default=1200.0, help="heavy load, requests/s (default 1200)")
    parser.add_argument("--slow-rate", type=float, default=950.0,
                        help="load in the last phase, with the slower model (default 950)")
    parser.add_argument("--slowdown", type=float, default=1.5, help="per-row cost factor in that phase (1.5)")
    parser.add_argument("--max-batch", type=int, default=256, help="the policy's max_batch_size (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="phases half as long")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results"
                        / "adaptive-convergence-cpu.json", help="JSON path; the .md and .png go next to it")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    budget_ms = args.objective_ms / 3  # wait + the batch ahead + this batch, with pipeline depth 2
    model = SimulatedModel(args.a_ms, args.b_ms)
    adapter = TensorAdapter().configure(shape=(1,), dtype=torch.float32)
    base = BatchPolicy(max_batch_size=args.max_batch, max_wait_ms=budget_ms)
    prof = profile(WORKLOAD, adapter, model, lambda rng: torch.tensor([rng.random()]), device, budget_ms=budget_ms,
                   max_batch=min(128, args.max_batch), extra_sizes=range(4, 129, 4), base_policy=base, repeats=5,
                   warmup=1, progress=False)
    pow2 = [p for p in prof.points if p.batch_size & (p.batch_size - 1) == 0 and p.latency_ms <= budget_ms]
    sweet = prof.sweet_spot
    fixed = prof.policy
    print(f"profile: sweet spot {sweet.batch_size} at {sweet.latency_ms:.1f} ms (budget {budget_ms:.1f} ms); "
          f"fixed policy {policy_source(fixed)}", flush=True)
    plan = phases(args)
    results = {kind: asyncio.run(run(kind, policy, args, plan))
               for kind, policy in (("adaptive", base), ("fixed", fixed))}
    fits = {p["name"]: model.fitting_size(budget_ms, p["slowdown"]) for p in plan}
    report = {
        "benchmark": "online adaptation under changing load, simulated model",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device_name": device_name(device), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "config": {"device": args.device, "objective_ms": args.objective_ms, "a_ms": args.a_ms, "b_ms": args.b_ms,
                   "max_batch": args.max_batch, "seed": args.seed, "pipeline_depth": 2},
        "phases": plan,
        "profile": {"budget_ms": budget_ms, "sweet_spot": sweet.batch_size, "sweet_latency_ms": sweet.latency_ms,
                    "sweet_spot_pow2": max(pow2, key=lambda p: p.items_per_s).batch_size if pow2 else None,
                    "policy": policy_source(fixed), "points": [p.as_row() for p in prof.points]},
        "fitting_size_per_phase": fits,
        "notes": NOTES.format(fits=", ".join(f"{name}: {n}" for name, n in fits.items())),
        "runs": {kind: summarize(result, plan, args.objective_ms / 1000, 1.0) for kind, result in results.items()},
        "series": {kind: {"batches": result["batches"]} for kind, result in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(args.out.with_suffix(".md"), report)
    write_chart(args.out.with_suffix(".png"), report, results)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
