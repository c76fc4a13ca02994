"""Vision throughput: image classification through batchplex against the model alone, and detection with and
without size buckets.

Classification (``image`` adapter): a torchvision ResNet (random weights, eval mode; float16 and channels_last on
CUDA, float32 on the CPU), requests are single 3xSxS uint8 CHW tensors (S=224 by default).

* model only: the model on a ready, normalized batch already on the device (no transfer, no preprocessing), at
  batch ``--batch`` and at batch 1: the ceiling;
* end to end, saturating: ``--concurrency`` closed-loop submitters (default 4x the batch) on one event loop, each
  awaiting its result before submitting again, ``BatchPolicy(max_batch_size=--batch)``; includes the uint8
  staging, host-to-device copy, normalization on the device, the model, the copy back and the split;
* latency at half load: open-loop Poisson arrivals at 50% of the end-to-end throughput, p50/p99 submit-to-result;
* both end-to-end runs once per ``--switch-interval-us`` value (the interpreter's GIL switch interval): the thread
  that launches an eager model releases the GIL at every operator and may then wait up to one interval for the
  event loop to give it back. On an H200 host 200 µs gained nothing over the default 5,000 µs, neither in throughput
  nor in the half-load tail (`benchmarks/README.md`); the second run keeps that checked.

Detection (``detection`` adapter): torchvision's fasterrcnn_mobilenet_v3_large_320_fpn (random weights, float32),
requests are uint8 images with random heights and widths (so random aspect ratios), saturating closed-loop load,
once with one FIFO (mixed sizes in every batch) and once with area buckets on the area the model computes on
(``model_resize=(320, 640)``); reported: images/s and the scheduler's ``padding_waste``.

    python benchmarks/vision_throughput.py --device cuda     # ResNet-50 fp16, batch 64, 224x224 (the GPU run)
    python benchmarks/vision_throughput.py --device cpu      # resnet18 fp32, batch 8, 112x112, under 2 minutes

Results go to ``benchmarks/results/<--out>.json`` and ``.md``, stamped with the card (or CPU), the command and
the date.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from typing import Any

import torch
import torchvision
from harness import (add_torch_threads_option, apply_torch_threads, gc_note, graph_batch_sizes, latency_target,
                     model_only, open_loop, request_pool, saturate, write_results)
from vision_common import DETECTOR_RESIZE, uint8_image

import batchplex_vision
from batchplex import BatchPolicy, GraphedModel, Scheduler

DEFAULT_SWITCH_INTERVAL_S = sys.getswitchinterval()
DETECTION_EDGES = tuple(DETECTOR_RESIZE[0] * long for long in (400, 480, 560, 640))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=("resnet18", "resnet50"), help="default: resnet50 on cuda, resnet18 on cpu")
    parser.add_argument("--batch", type=int, help="max batch size (default: 64 on cuda, 8 on cpu)")
    parser.add_argument("--size", type=int, help="image side in pixels (default: 224 on cuda, 112 on cpu)")
    parser.add_argument("--concurrency", type=int, help="closed-loop submitters (default: 4x the batch)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--dispatch-when-idle", action="store_true",
                        help="BatchPolicy(dispatch_when_idle=True): a batch leaves at once while the device is idle")
    parser.add_argument("--duration", type=float, help="seconds per measured window (default: 10 cuda, 5 cpu)")
    parser.add_argument("--detection-batch", type=int, help="detection max batch size (default: 8 cuda, 2 cpu)")
    parser.add_argument("--detection-max-side", type=int, help="largest image side (default: 640 cuda, 192 cpu)")
    parser.add_argument("--switch-interval-us", type=float, nargs="+",
                        help="GIL switch intervals to run end to end with (default: 5000 200 on cuda, 5000 on cpu)")
    add_torch_threads_option(parser)
    parser.add_argument("--out", help="result file stem under benchmarks/results (default: vision-throughput-<device>)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    defaults = {"model": "resnet50" if cuda else "resnet18", "batch": 64 if cuda else 8, "size": 224 if cuda else 112,
                "duration": 10.0 if cuda else 5.0, "detection_batch": 8 if cuda else 2,
                "detection_max_side": 640 if cuda else 192, "out": f"vision-throughput-{args.device}",
                "switch_interval_us": [5000.0, 200.0] if cuda else [5000.0]}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.concurrency = args.concurrency or 4 * args.batch
    return args


def mean_batch(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Mean batch size between two `statistics()` snapshots of one workload."""
    return (after["completed"] - before["completed"]) / max(1, after["batches"] - before["batches"])


async def classification(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], list[list[str]]]:
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = getattr(torchvision.models, args.model)(weights=None).eval().to(device, dtype, memory_format=memory_format)
    repeats = 30 if cuda else 5

    def ceiling(batch: int, run: Any = model) -> dict[str, float]:
        x = torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype).to(memory_format=memory_format)
        return model_only(lambda: run(x), batch, device, warmup=3 if cuda else 1, repeats=repeats)

    alone = {"batch": ceiling(args.batch), "batch_1": ceiling(1)}
    if cuda:  # the ceiling of the CUDA-graph rows: the same batch replayed as one graph
        alone["batch_graph"] = ceiling(args.batch, GraphedModel(model, device, "classify"))
    print(f"model only {alone}", flush=True)
    name = f"{args.model} {str(dtype)[6:]} {args.size}x{args.size} uint8"
    result = {"model": args.model, "dtype": str(dtype), "image": [3, args.size, args.size], "batch": args.batch,
              "concurrency": args.concurrency, "max_wait_ms": args.max_wait_ms,
              "graph_batch_sizes": graph_batch_sizes(args.batch), "dispatch_when_idle": args.dispatch_when_idle,
              "model_only": alone}
    rows = [[f"{name}: model only", "1", f"{alone['batch_1']['items_per_s']:.0f}", "", "", ""],
            [f"{name}: model only", str(args.batch), f"{alone['batch']['items_per_s']:.0f}", "", "", ""]]
    if cuda:
        rows.append([f"{name}: model only, CUDA graph", str(args.batch), f"{alone['batch_graph']['items_per_s']:.0f}",
                     "", "", ""])
    configurations = [(graphs, interval) for interval in args.switch_interval_us
                      for graphs in ((False, True) if cuda else (False,))]
    for graphs, interval in configurations:
        label = f"{'CUDA graph' if graphs else 'eager'}, GIL switch {interval:g} us"
        sys.setswitchinterval(interval / 1e6)
        loaded, half = await end_to_end(args, model, device, dtype, graphs)
        ratio = loaded["items_per_s"] / alone["batch"]["items_per_s"]
        if graphs:
            result.setdefault("end_to_end_over_graph_model_only", {})[label] = \
                loaded["items_per_s"] / alone["batch_graph"]["items_per_s"]
        half["target"] = latency_target(half["p99_ms"], args.max_wait_ms,
                                        alone["batch_graph" if graphs else "batch"]["ms_per_call"])
        result[label] = {"end_to_end": loaded, "end_to_end_over_model_only": ratio, "half_load_latency": half}
        rows += [
            [f"{name}: end to end ({label}), {args.concurrency} submitters", str(args.batch),
             f"{loaded['items_per_s']:.0f}", "", "",
             f"{100 * ratio:.0f}% of model only (eager)"
             + (f", {100 * loaded['items_per_s'] / alone['batch_graph']['items_per_s']:.0f}% of the graph"
                if graphs else "") + f"; mean batch {loaded['mean_batch_size']:.1f}; "
             f"{loaded['cpu_us_per_request']:.0f} us CPU/request"],
            [f"{name}: open loop at 50% load ({label})", str(args.batch), f"{half['rate']:.0f} offered",
             f"{half['p50_ms']:.1f}", f"{half['p99_ms']:.1f}",
             f"{half['target']['note']}; {half['requests']} requests; mean batch {half['mean_batch_size']:.1f}; "
             f"{gc_note(half)}"]]
    return result, rows


async def end_to_end(args: argparse.Namespace, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                     graphs: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Saturating closed-loop load, then open-loop load at half the throughput it reached, on one workload.

    ``graphs`` replays the model as CUDA graphs, one per preferred batch size (`graph_batch_sizes`).
    """
    make = lambda rng: uint8_image(rng, args.size, args.size)  # noqa: E731
    policy = BatchPolicy(max_batch_size=args.batch, max_wait_ms=args.max_wait_ms, max_queue=1 << 20,
                         preferred_batch_sizes=graph_batch_sizes(args.batch) if graphs else (),
                         dispatch_when_idle=args.dispatch_when_idle)
    async with Scheduler(plugins=[batchplex_vision], autoload=False) as scheduler:
        scheduler.add_workload("classify", adapter="image", model=model, device=device, policy=policy,
                               cuda_graphs=graphs,
                               adapter_options={"size": args.size, "dtype": dtype, "channels_last": device.type
                                                == "cuda"})
        await scheduler.warmup("classify", make(random.Random(0)))  # every batch size once: cuDNN plans, graphs
        pool = request_pool(make, args.concurrency)
        await saturate(scheduler, "classify", pool, concurrency=args.concurrency, duration_s=args.duration / 4)
        before = scheduler.statistics()["classify"]
        loaded = await saturate(scheduler, "classify", pool, concurrency=args.concurrency, duration_s=args.duration)
        after = scheduler.statistics()["classify"]
        loaded["mean_batch_size"] = mean_batch(before, after)
        print(f"end to end, graphs={graphs}: {loaded}", flush=True)
        half = await open_loop(scheduler, "classify", make, rate=loaded["items_per_s"] / 2,
                               duration_s=args.duration)
        half["mean_batch_size"] = mean_batch(after, scheduler.statistics()["classify"])
        print(f"half load, graphs={graphs}: {half}", flush=True)
    sys.setswitchinterval(DEFAULT_SWITCH_INTERVAL_S)
    return loaded, half


async def detection(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], list[list[str]]]:
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = False  # every batch has its own padded shape: autotuning each would dominate
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None).eval().to(device)
    low = max(32, args.detection_max_side // 4)
    make = lambda rng: uint8_image(rng, rng.randint(low, args.detection_max_side),  # noqa: E731
                                   rng.randint(low, args.detection_max_side))
    result, rows = {}, []
    for label, edges in (("one queue", ()), ("area buckets", DETECTION_EDGES)):
        async with Scheduler(plugins=[batchplex_vision], autoload=False) as scheduler:
            scheduler.add_workload("detect", adapter="detection", model=model, device=device,
                                   adapter_options={"model_resize": DETECTOR_RESIZE},
                                   policy=BatchPolicy(max_batch_size=args.detection_batch, max_wait_ms=10,
                                                      bucket_edges=edges))
            concurrency = 4 * args.detection_batch
            pool = request_pool(make, concurrency)
            await saturate(scheduler, "detect", pool, concurrency=concurrency, duration_s=args.duration / 4)
            loaded = await saturate(scheduler, "detect", pool, concurrency=concurrency, duration_s=args.duration)
            stats = scheduler.statistics()["detect"]
        loaded.update(padding_waste=stats["padding_waste"], mean_batch_size=stats["mean_batch_size"])
        result[label] = loaded
        print(f"detection, {label}: {loaded}", flush=True)
        rows.append([f"fasterrcnn_mobilenet_v3_large_320_fpn fp32, {low}-{args.detection_max_side} px sides: "
                     f"{label}", str(args.detection_batch), f"{loaded['items_per_s']:.1f}", "", "",
                     f"padding waste {100 * stats['padding_waste']:.0f}%, mean batch "
                     f"{stats['mean_batch_size']:.1f}"])
    result.update(bucket_edges=DETECTION_EDGES, model_resize=DETECTOR_RESIZE, batch=args.detection_batch,
                  sides=[low, args.detection_max_side])
    return result, rows


async def main() -> None:
    args = parse_args()
    apply_torch_threads(args)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    torch.backends.cudnn.benchmark = True  # classification: one input shape, autotuned once
    classify, classify_rows = await classification(args, device)
    detect, detect_rows = await detection(args, device)
    path = write_results(args.out, {"classification": classify, "detection": detect},
                         classify_rows + detect_rows, ["measurement", "batch", "images/s", "p50 ms", "p99 ms", "notes"])
    print(path.read_text())


if __name__ == "__main__":
    asyncio.run(main())
