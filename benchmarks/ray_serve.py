"""Ray Serve with batchplex inside each replica vs Ray's own ``@serve.batch``: 1 and N replicas, same offered load.

The model is simulated: a batch of n requests takes ``a + b*n`` seconds (``time.sleep`` off the event loop in both
deployments), so the numbers measure batching and serving overhead, not a network. Requests (one float tensor of
``--width`` values each) arrive open-loop as a Poisson process at ``--rate`` per second for ``--seconds`` through a
deployment handle from this process; each configuration reports completed requests/s, p50/p99 latency, mean batch
size where known, and refusals.

    python benchmarks/ray_serve.py --device cpu --rate 200 --seconds 5 --out benchmarks/results/ray-serve-cpu
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

import numpy as np
import ray
import torch
from batchplex import BatchPolicy, BatchplexError
from batchplex_ray import WorkloadSpec, build_app, collect_statistics
from ray import serve


ENGINES = ("batchplex", "ray-serve-batch")


class SimulatedModel:
    """``a + b*n`` seconds per batch of n rows, then the rows doubled."""

    def __init__(self, a: float, b: float) -> None:
        self.a, self.b = a, b

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(self.a + self.b * batch.shape[0])
        return batch * 2


class RayBatchDeployment:
    """The same model behind Ray's ``@serve.batch`` (batches of up to ``max_batch_size``, waiting ``wait_s``)."""

    def __init__(self, a: float, b: float, max_batch_size: int, wait_s: float, device: str) -> None:
        self.model = SimulatedModel(a, b)
        self.device = torch.device(device)
        self.sizes: list[int] = []
        self.run.set_max_batch_size(max_batch_size)
        self.run.set_batch_wait_timeout_s(wait_s)

    @serve.batch
    async def run(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        self.sizes.append(len(items))
        batch = torch.stack(items).to(self.device)
        output = await asyncio.to_thread(self.model, batch)
        return list(output.cpu().unbind(0))

    async def submit(self, item: torch.Tensor) -> torch.Tensor:
        return await self.run(item)

    async def statistics(self) -> dict:
        """Batches run so far, in the shape `collect_statistics` reads (``replica`` and ``workloads``)."""
        completed = sum(self.sizes)
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "workloads": {"sim": {"batches": len(self.sizes), "completed": completed,
                                      "mean_batch_size": completed / len(self.sizes) if self.sizes else 0.0}}}


async def offer_load(handle, call, rate: float, seconds: float, width: int, seed: int) -> dict:
    """Send Poisson arrivals at ``rate``/s for ``seconds``; latency of each completed request."""
    rng = random.Random(seed)
    item = torch.ones(width)
    latencies, refused, errors = [], 0, 0

    async def one() -> None:
        nonlocal refused, errors
        sent = time.perf_counter()
        try:
            await call(handle, item)
            latencies.append(time.perf_counter() - sent)
        except BatchplexError:
            refused += 1
        except Exception:  # Ray's own overload or failures: counted, not fatal
            errors += 1

    tasks = []
    start = time.perf_counter()
    due = start
    while due - start < seconds:
        due += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000.0
    return {"sent": len(tasks), "completed": len(latencies), "refused": refused, "errors": errors,
            "elapsed_s": round(elapsed, 3), "throughput_rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None}


async def bp_call(handle, item):
    return await handle.submit.remote("sim", item)


async def ray_call(handle, item):
    return await handle.submit.remote(item)


def run_one(engine: str, replicas: int, args: argparse.Namespace) -> dict:
    options = {"num_gpus": 1} if args.device == "cuda" else {"num_cpus": 1}
    if engine == "batchplex":
        spec = WorkloadSpec("sim", "tensor", lambda device: SimulatedModel(args.a, args.b), {"shape": (args.width,)},
                            BatchPolicy(max_batch_size=args.max_batch_size, max_wait_ms=args.wait_ms))
        app = build_app([spec], num_replicas=replicas, device=args.device, name="bench",
                        max_ongoing_requests=args.max_ongoing, ray_actor_options=options)
    else:
        app = serve.deployment(RayBatchDeployment, name="bench").options(
            num_replicas=replicas, max_ongoing_requests=args.max_ongoing, ray_actor_options=options).bind(
            args.a, args.b, args.max_batch_size, args.wait_ms / 1000.0, args.device)
    handle = serve.run(app, name="bench", route_prefix=None)
    call = bp_call if engine == "batchplex" else ray_call

    async def measure() -> dict:
        await offer_load(handle, call, args.rate, 1.0, args.width, seed=0)  # warm-up
        result = await offer_load(handle, call, args.rate, args.seconds, args.width, seed=1)
        stats = [report["workloads"]["sim"] for report in (await collect_statistics(handle, replicas)).values()]
        batches = sum(s["batches"] for s in stats)  # warm-up included
        result["mean_batch_size"] = round(sum(s["completed"] for s in stats) / batches, 2) if batches else None
        result["per_replica_completed"] = [s["completed"] for s in stats]
        return result

    result = asyncio.run(measure())
    serve.delete("bench")
    return {"engine": engine, "replicas": replicas, **result}


def machine(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--rate", type=float, default=200.0, help="offered requests per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--a", type=float, default=0.050, help="seconds per batch")
    parser.add_argument("--b", type=float, default=0.005, help="seconds per request in a batch")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--max-ongoing", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/ray-serve-cpu", help="path without extension")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=max(os.cpu_count() or 2, max(args.replicas)), include_dashboard=False,
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1"}, logging_config={"log_level": "WARNING"})
    rows = []
    try:
        for replicas in args.replicas:
            for engine in args.engines:
                rows.append(run_one(engine, replicas, args))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {"machine": machine(args.device), "device": args.device, "command": " ".join(["python"] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "ray": ray.__version__, "torch": torch.__version__,
              "model": f"sleep({args.a} + {args.b}*n) per batch", "settings": vars(args), "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Ray Serve: batchplex vs @serve.batch ({args.device})", "",
             f"Machine: {report['machine']}; Ray {ray.__version__}; {report['date']}", "",
             f"Command: `{report['command']}`", "",
             f"Simulated model {report['model']}; max batch {args.max_batch_size}, wait {args.wait_ms} ms; "
             f"Poisson arrivals at {args.rate:g} req/s for {args.seconds:g} s through a deployment handle.", "",
             "| engine | replicas | sent | completed req/s | p50 ms | p99 ms | mean batch | refused/errors |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['engine']} | {row['replicas']} | {row['sent']} | {row['throughput_rps']} | "
                     f"{row['p50_ms']} | {row['p99_ms']} | {row['mean_batch_size']} | "
                     f"{row['refused']}/{row['errors']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
