"""Ray Serve with batchplex inside each replica vs Ray's own ``@serve.batch``: 1 and N replicas, same offered load.

Models (``--model``):

* ``sim`` (the default on the CPU): a batch of n requests takes ``a + b*n`` seconds (``time.sleep`` off the event
  loop in both deployments), so the numbers measure batching and serving overhead. Requests are one float tensor of
  ``--width`` values.
* ``resnet50`` (the default on CUDA) or ``resnet18``: a torchvision ResNet (random weights, eval; float16 and
  channels_last on CUDA). Requests are uint8 CHW images of ``--size``. batchplex runs them through its ``image``
  adapter (pinned staging, normalized on the device); the ``@serve.batch`` deployment stacks, copies and normalizes
  each batch the usual way, in a worker thread. Each replica owns one GPU (``num_gpus: 1``).

Load: ``--clients`` Ray actors each send Poisson arrivals at ``rate / clients`` per second for ``--seconds`` through
their own deployment handle. Each configuration reports, per offered rate, completed requests/s, p50/p99 latency,
the mean batch size of that window and refusals. Keep the rates near what Ray passes to a replica on the machine
(`ray_call_ceiling.py`): beyond it both deployments only queue.

    python benchmarks/ray_serve.py --device cpu --rate 200 --seconds 5 --out benchmarks/results/ray-serve-cpu
    python benchmarks/ray_serve.py --device cuda --clients 4 --rate 200 400 800 --seconds 4 \
        --out benchmarks/results/ray-serve-cuda
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import ray
import torch
import torchvision
from batchplex import BatchPolicy, BatchplexError
from batchplex_ray import WorkloadSpec, build_app, collect_statistics
from batchplex_vision.classification import IMAGENET_MEAN, IMAGENET_STD
from harness import machine
from vision_common import uint8_image
from ray import serve

ENGINES = ("batchplex", "ray-serve-batch")
MODELS = ("sim", "resnet50", "resnet18")
APP = "bench"


class SimulatedModel:
    """``a + b*n`` seconds per batch of n rows, then the rows doubled."""

    def __init__(self, a: float, b: float) -> None:
        self.a, self.b = a, b

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(self.a + self.b * batch.shape[0])
        return batch * 2


def build_model(kind: str, device: torch.device, *, a: float, b: float) -> torch.nn.Module | SimulatedModel:
    """The model a replica runs on ``device``: float16 channels_last ResNets on CUDA, float32 on the CPU."""
    if kind == "sim":
        return SimulatedModel(a, b)
    net = getattr(torchvision.models, kind)(weights=None).eval()
    if device.type == "cuda":
        return net.to(device, torch.float16, memory_format=torch.channels_last)
    return net.to(device)


class NormalizingClassifier:
    """The ``@serve.batch`` side's classifier: a uint8 batch on the device, normalized there, then the network."""

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        self.net = net
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=self.dtype).view(1, -1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device, dtype=self.dtype).view(1, -1, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = (batch.to(self.dtype) / 255 - self.mean) / self.std
        return self.net(x.contiguous(memory_format=self.layout))


class RayBatchDeployment:
    """The same model behind Ray's ``@serve.batch`` (batches of up to ``max_batch_size``, waiting ``wait_s``)."""

    def __init__(self, kind: str, a: float, b: float, max_batch_size: int, wait_s: float, device: str) -> None:
        self.device = torch.device(device)
        model = build_model(kind, self.device, a=a, b=b)
        self.model = model if kind == "sim" else NormalizingClassifier(model, self.device)
        self.sizes: list[int] = []
        self.run.set_max_batch_size(max_batch_size)
        self.run.set_batch_wait_timeout_s(wait_s)

    @serve.batch
    async def run(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        self.sizes.append(len(items))
        output = await asyncio.to_thread(self._forward, items)
        return [row.clone() for row in output]  # each row its own storage, as batchplex's replicas send them

    def _forward(self, items: list[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(torch.stack(items).to(self.device)).cpu()

    async def submit(self, item: torch.Tensor) -> torch.Tensor:
        return await self.run(item)

    async def statistics(self) -> dict:
        """Batches run so far, in the shape `collect_statistics` reads (``replica`` and ``workloads``)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "workloads": {"bench": {"batches": len(self.sizes), "completed": sum(self.sizes)}}}


def make_items(kind: str, width: int, size: int, count: int, seed: int) -> list[torch.Tensor]:
    """Requests made before the timed window: uint8 images for the ResNets, float rows for ``sim``."""
    if kind == "sim":
        return [torch.ones(width)] * count
    rng = random.Random(seed)
    return [uint8_image(rng, size, size) for _ in range(count)]


@ray.remote(num_cpus=1)
class LoadClient:
    """One share of the offered load, sent through this actor's own deployment handle."""

    def __init__(self, engine: str, workload: str, items: list[torch.Tensor]) -> None:
        self.handle = serve.get_app_handle(APP)
        self.items = items
        self.prefix = (workload,) if engine == "batchplex" else ()

    async def offer(self, rate: float, seconds: float, seed: int) -> dict:
        """Poisson arrivals at ``rate``/s for ``seconds``; each completed request's latency in seconds, and the
        first failure other than a batchplex refusal (type and message), if any."""
        rng = random.Random(seed)
        latencies, refused, errors, first_error = [], 0, 0, None

        async def one(item: torch.Tensor, sent: float) -> None:
            nonlocal refused, errors, first_error
            try:
                await self.handle.submit.remote(*self.prefix, item)
                latencies.append(time.perf_counter() - sent)
            except BatchplexError:
                refused += 1
            except Exception as error:  # Ray's own overload or failures: counted, not fatal
                errors += 1
                first_error = first_error or f"{type(error).__name__}: {error}"

        # Latency counts from the send (as in harness.open_loop), and only calls in flight are kept (a heap that
        # grows with the window makes full garbage collections longer).
        in_flight: set[asyncio.Future] = set()
        sent = 0
        start = time.perf_counter()
        due = start
        while due - start < seconds:
            due += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            task = asyncio.ensure_future(one(self.items[sent % len(self.items)], time.perf_counter()))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            sent += 1
        while in_flight:
            await asyncio.wait(set(in_flight))
        return {"sent": sent, "latencies": latencies, "refused": refused, "errors": errors,
                "first_error": first_error, "elapsed_s": time.perf_counter() - start}


def offer_load(clients: list, rate: float, seconds: float, seed: int) -> dict:
    """``rate`` requests/s split over ``clients``, all started together; the merged outcome."""
    shares = ray.get([client.offer.remote(rate / len(clients), seconds, seed * 1000 + i)
                      for i, client in enumerate(clients)])
    ms = np.array([latency for share in shares for latency in share["latencies"]]) * 1000.0
    elapsed = max(share["elapsed_s"] for share in shares)
    return {"offered_rps": rate, "sent": sum(share["sent"] for share in shares), "completed": len(ms),
            "refused": sum(share["refused"] for share in shares), "errors": sum(share["errors"] for share in shares),
            "first_error": next((share["first_error"] for share in shares if share["first_error"]), None),
            "elapsed_s": round(elapsed, 3), "throughput_rps": round(len(ms) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None}


def batches_so_far(handle, replicas: int) -> dict[str, tuple[int, int]]:
    """``{replica id: (batches, requests completed)}`` so far."""
    reports = asyncio.run(collect_statistics(handle, replicas))
    counts = {}
    for replica, report in reports.items():
        stats = next(iter(report["workloads"].values()))
        counts[replica] = (stats["batches"], stats["completed"])
    return counts


def deploy(engine: str, replicas: int, args: argparse.Namespace):
    options = {"num_gpus": 1} if args.device == "cuda" else {"num_cpus": 1}
    if engine == "batchplex":
        factory = functools.partial(build_model, args.model, a=args.a, b=args.b)
        policy = BatchPolicy(max_batch_size=args.max_batch_size, max_wait_ms=args.wait_ms)
        if args.model == "sim":
            spec = WorkloadSpec(args.workload, "tensor", factory, {"shape": (args.width,)}, policy)
        else:
            cuda = args.device == "cuda"
            spec = WorkloadSpec(args.workload, "image", factory, {"size": args.size, "channels_last": cuda,
                                "dtype": torch.float16 if cuda else torch.float32}, policy)
        app = build_app([spec], num_replicas=replicas, device=args.device, name=APP,
                        max_ongoing_requests=args.max_ongoing, ray_actor_options=options)
    else:
        app = serve.deployment(RayBatchDeployment, name=APP).options(
            num_replicas=replicas, max_ongoing_requests=args.max_ongoing, ray_actor_options=options).bind(
            args.model, args.a, args.b, args.max_batch_size, args.wait_ms / 1000.0, args.device)
    return serve.run(app, name=APP, route_prefix=None)


def run_deployment(engine: str, replicas: int, args: argparse.Namespace) -> list[dict]:
    """One deployment, warmed up, then one measured window per offered rate."""
    handle = deploy(engine, replicas, args)
    clients = [LoadClient.remote(engine, args.workload,
                                 make_items(args.model, args.width, args.size, args.distinct_items, seed=i))
               for i in range(args.clients)]
    rows = []
    try:
        offer_load(clients, min(args.rate), args.warmup, seed=0)
        for rate in args.rate:
            before = batches_so_far(handle, replicas)
            result = offer_load(clients, rate, args.seconds, seed=1)
            after = batches_so_far(handle, replicas)
            ran = {replica: (after[replica][0] - before[replica][0], after[replica][1] - before[replica][1])
                   for replica in after}
            batches = sum(b for b, _ in ran.values())
            result["mean_batch_size"] = round(sum(c for _, c in ran.values()) / batches, 2) if batches else None
            result["per_replica_completed"] = sorted(c for _, c in ran.values())
            rows.append({"engine": engine, "replicas": replicas, **result})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for client in clients:
            ray.kill(client)
        serve.delete(APP)
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=MODELS, help="default: sim on the CPU, resnet50 on CUDA")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--rate", type=float, nargs="+", default=[200.0], help="offered requests per second")
    parser.add_argument("--clients", type=int, default=1, help="load-generating actors (one CPU each)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per rate")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds at the lowest rate before measuring")
    parser.add_argument("--a", type=float, default=0.050, help="sim: seconds per batch")
    parser.add_argument("--b", type=float, default=0.005, help="sim: seconds per request in a batch")
    parser.add_argument("--width", type=int, default=16, help="sim: values per request")
    parser.add_argument("--size", type=int, default=224, help="ResNets: image side")
    parser.add_argument("--distinct-items", type=int, default=16, help="requests each client cycles through")
    parser.add_argument("--max-batch-size", type=int, help="default: 16 for sim, 64 for the ResNets")
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--max-ongoing", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/ray-serve-cpu", help="path without extension")
    args = parser.parse_args()
    args.model = args.model or ("resnet50" if args.device == "cuda" else "sim")
    args.max_batch_size = args.max_batch_size or (16 if args.model == "sim" else 64)
    args.workload = "sim" if args.model == "sim" else "classify"
    if args.device == "cuda" and torch.cuda.device_count() < max(args.replicas):
        parser.error(f"--replicas {max(args.replicas)} on cuda needs as many GPUs (one per replica), found "
                     f"{torch.cuda.device_count()}")
    return args


def describe_model(args: argparse.Namespace) -> str:
    if args.model == "sim":
        return f"sleep({args.a} + {args.b}*n) per batch"
    precision = "float16 channels_last" if args.device == "cuda" else "float32"
    return f"torchvision {args.model} (random weights, {precision}), uint8 {args.size}x{args.size} images, eager"


def write_report(args: argparse.Namespace, rows: list[dict]) -> None:
    stamp = machine()
    if args.device == "cuda":
        stamp["machine"] = f"{torch.cuda.device_count()}x {stamp['machine']}"
    report = {**stamp, "device": args.device, "ray": ray.__version__, "model": describe_model(args),
              "settings": vars(args), "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Ray Serve: batchplex vs @serve.batch ({args.device})", "",
             f"Machine: {report['machine']} ({report['cpus']} CPUs); Ray {ray.__version__}; torch {torch.__version__}; "
             f"{report['date']}", "",
             f"Command: `{report['command']}`", "",
             f"Model: {report['model']}; max batch {args.max_batch_size}, wait {args.wait_ms} ms; Poisson arrivals "
             f"from {args.clients} client actor(s) through deployment handles, {args.seconds:g} s per rate.", "",
             "| engine | replicas | offered req/s | completed req/s | p50 ms | p99 ms | mean batch | refused/errors |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['engine']} | {row['replicas']} | {row['offered_rps']:g} | {row['throughput_rps']} | "
                     f"{row['p50_ms']} | {row['p99_ms']} | {row['mean_batch_size']} | "
                     f"{row['refused']}/{row['errors']} |")
    failures = [f"First error, {row['engine']} on {row['replicas']} replica(s) at {row['offered_rps']:g}/s: "
                f"{row['first_error']}" for row in rows if row.get("first_error")]
    if failures:
        lines += ["", *failures]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    args = parse_args()
    ray.init(address="local", num_cpus=max(os.cpu_count() or 2, max(args.replicas) + args.clients + 1),
             include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1"}, logging_config={"log_level": "WARNING"})
    rows = []
    try:
        for replicas in args.replicas:
            for engine in args.engines:
                rows += run_deployment(engine, replicas, args)
    finally:
        serve.shutdown()
        ray.shutdown()
    write_report(args, rows)


if __name__ == "__main__":
    main()
