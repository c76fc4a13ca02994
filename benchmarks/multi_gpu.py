"""Several GPUs: one workload on one device, then on 2, 3, ... devices of the host (one model replica each;
each batch goes to a device with room in its pipeline): throughput, how it scales, and how evenly the
batches spread.

Workload: ResNet-50 fp16 channels_last, 224x224 uint8 requests, batch 64, replayed as CUDA graphs (preferred sizes
8/16/32/64) on CUDA; on the CPU, resnet18 fp32 at 64x64, batch 8, on "cpu" and "cpu:0" as two lanes (the same code
path, not a speed-up: both lanes share the CPU's cores).

* model only: the (graphed) model at its batch on the first device, inputs ready there: one device's ceiling;
* end to end: closed-loop submitters (4 batches' worth per device) on one event loop, saturating; items/s, the
  scaling over one device, and per device its batches, mean batch and busy fraction (the union of its batches'
  device spans over the wall time, `batchplex.metrics.busy_time`).

Both runs happen once per ``--torch-threads`` value (default: torch's own, then 1). Why: the executor's
host-side tensor work (stacking a batch into pinned memory, staging copies) runs on torch's intra-op OpenMP pool,
and on a 32-core host its default of 32 threads cost 27% of one GPU's end-to-end throughput and 39% of two's.

All devices share one event loop and one GIL: where per-request host work, not the devices, runs out, scaling
stops (the loop's ceiling is in ``open-loop-cost-*.md`` and ``scheduler-overhead-cpu.md``).

    python benchmarks/multi_gpu.py --device cuda     # a machine with two or more GPUs
    python benchmarks/multi_gpu.py --device cpu

Results go to ``benchmarks/results/<--out>.json``, ``.md`` and ``.png``, stamped with the card (or CPU), the
command and the date.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import matplotlib
import torch
import torchvision
from harness import RESULTS, graph_batch_sizes, machine, model_only, request_pool, saturate, write_results
from vision_common import uint8_image

import batchplex_vision
from batchplex import BatchPolicy, GraphedModel, Scheduler
from batchplex.metrics import busy_time
from batchplex.testing import BatchLog

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--duration", type=float, help="seconds per measured window (default: 8 cuda, 3 cpu)")
    parser.add_argument("--torch-threads", type=int, nargs="+",
                        help="torch intra-op thread counts, one set of runs each (default: torch's own, then 1)")
    parser.add_argument("--out", help="result file stem under benchmarks/results (default: multi-gpu-<device>)")
    args = parser.parse_args()
    args.torch_threads = list(dict.fromkeys(args.torch_threads or [torch.get_num_threads(), 1]))
    cuda = args.device == "cuda"
    args.duration = args.duration or (8.0 if cuda else 3.0)
    args.out = args.out or f"multi-gpu-{args.device}"
    return args


def device_sets(cuda: bool) -> list[list[torch.device]]:
    """The first device alone, then the first 2, 3, ... of the host (on the CPU: two lanes of the one CPU)."""
    if not cuda:
        return [[torch.device("cpu")], [torch.device("cpu"), torch.device("cpu", 0)]]
    every = [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    return [every[:count] for count in range(1, len(every) + 1)]


async def end_to_end(args: argparse.Namespace, model: torch.nn.Module, devices: list[torch.device],
                     options: dict[str, Any]) -> dict[str, Any]:
    """Saturating closed-loop load on one workload placed on ``devices``: items/s, and per device its share."""
    cuda = devices[0].type == "cuda"
    make = lambda rng: uint8_image(rng, options["size"], options["size"])  # noqa: E731
    policy = BatchPolicy(max_batch_size=options["batch"], max_wait_ms=args.max_wait_ms, max_queue=1 << 20,
                         preferred_batch_sizes=graph_batch_sizes(options["batch"]) if cuda else ())
    finished = BatchLog()
    async with Scheduler(plugins=[batchplex_vision, finished], autoload=False) as scheduler:
        scheduler.add_workload("classify", adapter="image", model=model, device=devices, policy=policy,
                               cuda_graphs=cuda, adapter_options={"size": options["size"], "dtype": options["dtype"],
                                                                  "channels_last": cuda})
        await scheduler.warmup("classify", make(random.Random(0)))  # every size on every device: cuDNN, graphs
        concurrency = 4 * options["batch"] * len(devices)
        pool = request_pool(make, concurrency)
        await saturate(scheduler, "classify", pool, concurrency=concurrency, duration_s=args.duration / 4)
        finished.records.clear()
        started = time.perf_counter()
        loaded = await saturate(scheduler, "classify", pool, concurrency=concurrency, duration_s=args.duration)
        wall = time.perf_counter() - started
        records = list(finished.records)
    per_device = {}
    for device in devices:
        mine = [record for record in records if record.device == str(device)]
        per_device[str(device)] = {
            "batches": len(mine), "mean_batch": sum(r.size for r in mine) / max(1, len(mine)),
            "busy_fraction": busy_time(mine) / wall, "items": sum(r.size for r in mine)}
    print(f"{len(devices)} device(s), {torch.get_num_threads()} intra-op threads: {loaded['items_per_s']:.0f} "
          f"items/s, {per_device}", flush=True)
    return {**loaded, "devices": [str(device) for device in devices], "per_device": per_device,
            "concurrency": concurrency, "wall_s": wall, "intra_op_threads": torch.get_num_threads()}


def plot(result: dict[str, Any], stem: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for threads in result["intra_op_threads"]:
        runs = [run for run in result["end_to_end"] if run["intra_op_threads"] == threads]
        ax.plot([len(run["devices"]) for run in runs], [run["items_per_s"] for run in runs], "o-",
                label=f"batchplex, end to end, {threads} intra-op thread(s)")
    counts = sorted({len(run["devices"]) for run in result["end_to_end"]})
    ax.plot(counts, [count * result["model_only"]["items_per_s"] for count in counts], "--",
            label="devices x one device's model-only ceiling")
    ax.set_xlabel("devices")
    ax.set_ylabel("images/s")
    ax.set_xticks(counts)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{result['model']} on several devices ({machine()['machine']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=110)


async def main() -> None:
    args = parse_args()
    cuda = args.device == "cuda"
    if cuda and torch.cuda.device_count() < 2:
        raise SystemExit(f"multi_gpu.py --device cuda needs two or more GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    torch.backends.cudnn.benchmark = True  # one input shape per batch size, autotuned once per device
    options = {"size": 224 if cuda else 64, "batch": 64 if cuda else 8,
               "dtype": torch.float16 if cuda else torch.float32}
    first = device_sets(cuda)[0][0]
    name = "resnet50" if cuda else "resnet18"
    model = getattr(torchvision.models, name)(weights=None).eval().to(
        first, options["dtype"], memory_format=torch.channels_last if cuda else torch.contiguous_format)
    x = torch.randn(options["batch"], 3, options["size"], options["size"], device=first, dtype=options["dtype"])
    x = x.to(memory_format=torch.channels_last) if cuda else x
    run = GraphedModel(model, first, "classify") if cuda else model
    ceiling = model_only(lambda: run(x), options["batch"], first, repeats=30 if cuda else 5)
    runs = []
    for threads in args.torch_threads:
        torch.set_num_threads(threads)  # read by each scheduler's new executor threads
        runs += [await end_to_end(args, model, devices, options) for devices in device_sets(cuda)]

    label = f"{name} {str(options['dtype'])[6:]} {options['size']}x{options['size']} uint8" + (
        ", CUDA graphs" if cuda else "")
    rows = [[f"{label}: model only, one device", "1", str(options["batch"]), f"{ceiling['items_per_s']:.0f}", "", ""]]
    for run in runs:
        count = len(run["devices"])
        alone = next(one for one in runs if one["intra_op_threads"] == run["intra_op_threads"])
        spread = "; ".join(f"{device}: {share['batches']} batches (mean {share['mean_batch']:.1f}), busy "
                           f"{share['busy_fraction']:.0%}" for device, share in run["per_device"].items())
        rows.append([f"{label}: end to end, {run['intra_op_threads']} intra-op thread(s), {run['concurrency']} "
                     f"submitters", str(count), str(options["batch"]),
                     f"{run['items_per_s']:.0f}", f"{run['items_per_s'] / alone['items_per_s']:.2f}x",
                     f"{run['items_per_s'] / (count * ceiling['items_per_s']):.0%} of {count} x model only; "
                     f"{spread}; {run['cpu_us_per_request']:.0f} us CPU/request"])
    payload = {"model": name, "batch": options["batch"], "image": [3, options["size"], options["size"]],
               "dtype": str(options["dtype"]), "max_wait_ms": args.max_wait_ms, "duration_s": args.duration,
               "intra_op_threads": args.torch_threads,
               "model_only": ceiling, "end_to_end": runs}
    header = ["measurement", "devices", "batch", "images/s", "vs one device", "notes"]
    path = write_results(args.out, payload, rows, header, torch_threads=" and ".join(map(str, args.torch_threads)))
    plot(payload, args.out)
    print(path.read_text())


if __name__ == "__main__":
    asyncio.run(main())
