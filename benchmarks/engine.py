"""The execution engine, measured: four workloads alone and sharing one device, against running each request
alone; copy/compute overlap on and off; CUDA graphs on and off at small batches.

Workloads (random weights; on CUDA the issue's sizes, on the CPU small stand-ins so the same command runs in
minutes):

* ``classify``: ResNet-50 fp16 channels_last, 224x224 uint8 requests, batch 64, CUDA graphs (resnet18 fp32 64x64,
  batch 8 on the CPU);
* ``embed``: MiniLM-L6 fp16, 128-token pre-tokenized requests, batch 128, mean pooling, CUDA graphs (32 tokens,
  batch 8 on the CPU);
* ``rank``: torchrec DLRM, 26 sparse + 13 dense features, 32 candidate samples per request (a JaggedTensor per
  feature, ``flatten="collate"``: read a batch at a time on the collate thread, not request by request on the
  event loop that every workload shares), 2048 samples a batch (256 on the CPU);
* ``detect``: fasterrcnn_mobilenet_v3_large_320_fpn fp32, images with sides of 160-640 px, batch 8 (64-192 px,
  batch 2).

Measurements:

1. **naive**: each request run alone in a loop, as code without a batcher does (the adapter's prepare, a batch of
   one, the model, the split): the baseline of the headline ratio;
2. **solo**: one workload on its own scheduler under saturating closed-loop load: items/s, and the device's busy
   fraction (the time the device ran model work, over wall time: the union of the batches' spans on the device's
   clock, from CUDA events, so batches that overlap count once);
3. **mixed**: all four workloads (or those ``--mix`` names) in one scheduler on one device, each under its own
   saturating load: each one's share of its solo throughput and the busy fraction; then again with
   ``dedicated_executor=True`` for each (one executor and set of CUDA streams per workload instead of one per device
   shared fairly); then again with one executor each and ``rank`` and ``detect`` compiled by TorchScript
   (``torch.jit.script``: their forward runs in C++ with the GIL released, TorchScript's fusers off); then
   ``classify`` and ``embed`` alone together, the two whose solo runs keep the device busy
   (``rank`` and ``detect`` are host-bound: alone they keep a GPU busy 6-8% and 33-48% of the time). On CUDA a
   mixed window's busy fraction is the kernels' (`harness.KernelBusy`: CUPTI records of every kernel and copy, their
   union over wall time), with NVML's utilization beside it; the batches' CUDA-event spans are not shown there:
   under CUPTI they read about half the kernels' time, and without it, with executors of their own, 98-100%;
4. **overlap**: ``classify`` and ``embed`` alone with ``pipeline_depth=1`` (collate, run and finish one batch at a
   time) against the default, one batch per executor stage (3 on CUDA: batch k+2 collates and copies while k+1
   runs and k's results come back; 2 on the CPU);
5. **graphs**: ``classify`` at batch 1, 2, 4 and 8, eager against CUDA-graph replay, model only and end to end
   (CUDA only).

    python benchmarks/engine.py --device cuda
    python benchmarks/engine.py --device cpu

Results go to ``benchmarks/results/<--out>.json``, ``.md`` and ``.png``, stamped with the card (or CPU), the
command and the date.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import batchplex_nlp
import batchplex_recsys
import batchplex_vision
import torch
import torchvision
from batchplex import BatchPolicy, GraphedModel, Scheduler
from batchplex.metrics import busy_time
from batchplex.testing import BatchLog, scripting
from batchplex.plugins import PluginHost
from batchplex_nlp import HFModel
from batchplex_nlp.testing import load_minilm
from batchplex_recsys import RankingModel, RankingRequest, table_sizes_of
from batchplex_recsys.criteo import DENSE_DIM, SPARSE_KEYS, build_dlrm, jagged_form, random_request
from harness import (RESULTS, KernelBusy, add_torch_threads_option, apply_torch_threads, model_only, request_pool,
                     saturate, write_results)
from nlp_common import token_ids
from vision_common import DETECTOR_RESIZE, uint8_image

PLUGINS = [batchplex_vision, batchplex_nlp, batchplex_recsys]


@dataclass
class Spec:
    """One workload of the benchmark: how to add it to a scheduler and how to make its requests."""

    name: str
    adapter: str
    model: Callable[[Any], Any]
    make_request: Callable[[random.Random], Any]
    batch: int
    adapter_options: dict[str, Any] = field(default_factory=dict)
    items_per_request: int = 1
    graphs: bool = False
    policy_options: dict[str, Any] = field(default_factory=dict)
    script: Callable[[Any], Any] | None = None  # the model compiled by TorchScript, for a host-bound workload

    def scripted(self) -> Spec:
        """This workload with its model compiled by TorchScript where it has ``script`` (else itself)."""
        return self if self.script is None else replace(self, model=self.script(self.model), script=None)

    @property
    def batch_label(self) -> str:
        return str(self.batch) if self.items_per_request == 1 else f"{self.batch} x {self.items_per_request}"

    def policy(self, max_wait_ms: float) -> BatchPolicy:
        return BatchPolicy(max_batch_size=self.batch, max_wait_ms=max_wait_ms, max_queue=1 << 20,
                           preferred_batch_sizes=(self.batch,) if self.graphs else (), **self.policy_options)

    def add_to(self, scheduler: Scheduler, device: torch.device, max_wait_ms: float,
               dedicated: bool = False) -> None:
        scheduler.add_workload(self.name, adapter=self.adapter, model=self.model, device=device,
                               policy=self.policy(max_wait_ms), adapter_options=self.adapter_options,
                               cuda_graphs=self.graphs, dedicated_executor=dedicated)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--duration", type=float, help="seconds per measured window (default: 5 cuda, 3 cpu)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--model-dir", help="folder with MiniLM's config.json and tokenizer (default: installed)")
    parser.add_argument("--mix", nargs="+", choices=("classify", "embed", "rank", "detect"),
                        help="the workloads run at once in the mixed measurement (default: all four); leaving one out "
                             "shows what it costs the others")
    add_torch_threads_option(parser, cpu_default=1)  # on the CPU four workloads share the cores
    parser.add_argument("--out", help="result file stem under benchmarks/results (default: engine-<device>)")
    args = parser.parse_args()
    args.duration = args.duration or (5.0 if args.device == "cuda" else 3.0)
    args.out = args.out or f"engine-{args.device}"
    return args


def build_specs(device: torch.device, model_dir: str | None) -> list[Spec]:
    cuda = device.type == "cuda"
    half = torch.float16 if cuda else torch.float32
    layout = torch.channels_last if cuda else torch.contiguous_format
    side = 224 if cuda else 64
    classifier = getattr(torchvision.models, "resnet50" if cuda else "resnet18")(weights=None).eval()
    classifier = classifier.to(device, half, memory_format=layout)

    tokenizer, bert = load_minilm(random_weights=True, dtype=half, device=device, path=model_dir)
    tokens = 128 if cuda else 32

    rows = 100_000 if cuda else 1000
    dlrm = build_dlrm(num_embeddings=rows, embedding_dim=64 if cuda else 16, hidden=512 if cuda else 64).to(device)
    samples = 32

    def rank_request(rng: random.Random) -> RankingRequest:
        return jagged_form(random_request(rng, num_embeddings=rows, samples=samples))

    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None).eval().to(device)
    low, high = (160, 640) if cuda else (64, 192)
    return [
        Spec("classify", "image", classifier, lambda rng: uint8_image(rng, side, side), 64 if cuda else 8,
             adapter_options={"size": side, "dtype": half, "channels_last": cuda}, graphs=cuda),
        Spec("embed", "text", HFModel(bert), lambda rng: token_ids(rng, tokens), 128 if cuda else 8,
             adapter_options={"tokenizer": tokenizer, "max_length": tokens}, graphs=cuda),
        Spec("rank", "ranking", dlrm, rank_request, (2048 if cuda else 256) // samples,
             adapter_options={"keys": SPARSE_KEYS, "table_sizes": table_sizes_of(dlrm), "dense_dim": DENSE_DIM,
                              "flatten": "collate"},
             items_per_request=samples, script=RankingModel.scripted),
        Spec("detect", "detection", detector,
             lambda rng: uint8_image(rng, rng.randint(low, high), rng.randint(low, high)), 8 if cuda else 2,
             adapter_options={"model_resize": DETECTOR_RESIZE}, script=torch.jit.script),
    ]


class UtilizationSampler:
    """NVML's GPU utilization (share of time a kernel ran), sampled every 100 ms while a window runs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: list[float] = []
        self._task: asyncio.Task | None = None
        try:
            torch.cuda.utilization(device)
            self.available = device.type == "cuda"
        except (ImportError, RuntimeError, ValueError):  # no NVML here: the event-based busy fraction alone
            self.available = False

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.samples.append(torch.cuda.utilization(self.device) / 100)

    def __enter__(self) -> "UtilizationSampler":
        if self.available:
            self._task = asyncio.ensure_future(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


async def run_load(specs: list[Spec], device: torch.device, args: argparse.Namespace, *,
                   pipeline_depth: int | None = None, dedicated: bool = False, kernel_time: bool = False,
                   ready: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
    """Saturate every workload in ``specs`` at once on one scheduler: items/s each, busy fraction overall.

    The busy fraction is the union of the measured batches' device spans over the wall time (`busy_time`).
    ``dedicated``: each workload with an executor (and CUDA streams) of its own; their batches then overlap on
    the device, and the union counts the overlap once where a sum of run times would count it twice.
    ``kernel_time``: also the kernels' busy fraction (`KernelBusy`; CUDA), under CUPTI's small cost per kernel.
    ``ready``: awaited between the warm-up and the measured window (`mix_processes.py` starts the windows of
    several processes together)."""
    finished = BatchLog()
    async with Scheduler(plugins=[*PLUGINS, finished], autoload=False, pipeline_depth=pipeline_depth) as scheduler:
        for spec in specs:
            spec.add_to(scheduler, device, args.max_wait_ms, dedicated)
            await scheduler.warmup(spec.name, spec.make_request(random.Random(0)))  # every batch size: cuDNN plans

        pools = [request_pool(spec.make_request, 4 * spec.batch) for spec in specs]

        async def window(seconds: float) -> list[dict[str, float]]:
            return await asyncio.gather(*(
                saturate(scheduler, spec.name, pool, concurrency=4 * spec.batch, duration_s=seconds,
                         items_per_request=spec.items_per_request) for spec, pool in zip(specs, pools)))

        await window(max(1.0, args.duration / 4))  # warm-up: allocator, cuDNN, graph capture
        if ready is not None:
            await ready()
        before = scheduler.statistics()
        finished.records.clear()
        started = time.perf_counter()
        with UtilizationSampler(device) as nvml, KernelBusy(device, enabled=kernel_time) as kernels:
            loads = await window(args.duration)
        wall = time.perf_counter() - started
        measured = list(finished.records)
        after = scheduler.statistics()
    device_time = {spec.name: after[spec.name]["device_time_s"] - before[spec.name]["device_time_s"]
                   for spec in specs}
    per_workload = {spec.name: {**load, "device_time_s": device_time[spec.name],
                                "mean_batch": after[spec.name]["mean_batch_size"]}
                    for spec, load in zip(specs, loads)}
    return {"workloads": per_workload, "wall_s": wall, "busy_fraction": busy_time(measured) / wall,
            "summed_device_time_fraction": sum(device_time.values()) / wall, "nvml_utilization": nvml.mean,
            "kernel_busy_fraction": kernels.fraction}


def naive(spec: Spec, device: torch.device, seconds: float) -> dict[str, float]:
    """Each request alone, one after another: prepare, a batch of one, the model, postprocess, split."""
    adapter = PluginHost(plugins=PLUGINS, autoload=False).adapter(spec.adapter).configure(**spec.adapter_options)
    rng = random.Random(0)
    pool = [spec.make_request(rng) for _ in range(64)]
    done = 0
    with torch.inference_mode():
        for item in pool[:3]:  # warm-up
            _run_one(adapter, spec.model, item, device)
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            _run_one(adapter, spec.model, pool[done % len(pool)], device)
            done += 1
    return {"items_per_s": done * spec.items_per_request / (time.perf_counter() - started), "requests": done}


def _run_one(adapter: Any, model: Callable, request: Any, device: torch.device) -> Any:
    items = [adapter.prepare(request)]
    inputs = adapter.collate(items, device, 1)
    return adapter.split(adapter.postprocess(model(inputs), inputs, items), items)


def graphs_model_only(model: torch.nn.Module, device: torch.device, side: int, dtype: torch.dtype,
                      batch: int) -> dict[str, float]:
    """ResNet at ``batch``: eager forward against a replayed CUDA graph, ms per call."""
    x = torch.randn(batch, 3, side, side, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    graphed = GraphedModel(model, device, name=f"classify@{batch}")
    eager = model_only(lambda: model(x), batch, device)
    replay = model_only(lambda: graphed(x), batch, device)
    return {"eager_ms": eager["ms_per_call"], "graph_ms": replay["ms_per_call"]}


async def measure(args: argparse.Namespace) -> tuple[dict[str, Any], list[list[str]]]:
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = False  # detection batches have many shapes: autotuning each would dominate
    specs = build_specs(device, args.model_dir)
    result: dict[str, Any] = {"duration_s": args.duration, "max_wait_ms": args.max_wait_ms}
    rows: list[list[str]] = []

    result["naive"] = {spec.name: naive(spec, device, args.duration / 2) for spec in specs}
    print("naive", result["naive"], flush=True)
    result["solo"] = {spec.name: await run_load([spec], device, args) for spec in specs}
    for spec in specs:
        solo = result["solo"][spec.name]
        load = solo["workloads"][spec.name]
        ratio = load["items_per_s"] / result["naive"][spec.name]["items_per_s"]
        rows.append([f"{spec.name}: naive, one request at a time", "1",
                     f"{result['naive'][spec.name]['items_per_s']:.0f}", "", "", ""])
        rows.append([f"{spec.name}: batchplex alone", spec.batch_label, f"{load['items_per_s']:.0f}",
                     f"{ratio:.1f}x naive", f"{solo['busy_fraction']:.0%}", _nvml(solo)])
    print("solo", result["solo"], flush=True)

    mix = [spec for spec in specs if not args.mix or spec.name in args.mix]
    device_bound = [spec for spec in mix if spec.name in ("classify", "embed")]
    runs = [("mixed", "mixed", mix, False), ("mixed_dedicated", "mixed, one executor each", mix, True)]
    if any(spec.script for spec in mix):
        scripted_label = ("mixed, one executor each, " + " + ".join(spec.name for spec in mix if spec.script)
                          + " scripted")
        runs.append(("mixed_scripted", scripted_label, [spec.scripted() for spec in mix], True))
    if len(device_bound) == 2 and len(mix) > 2:
        runs.append(("device_bound_dedicated", "device-bound pair, one executor each", device_bound, True))
    for key, label, chosen, dedicated in runs:
        with scripting() if key == "mixed_scripted" else contextlib.nullcontext():  # fusers off: NNC fails on CUDA
            mixed = result[key] = await run_load(chosen, device, args, dedicated=dedicated, kernel_time=True)
        kernels = mixed["kernel_busy_fraction"]
        shares = []
        for spec in chosen:
            load = mixed["workloads"][spec.name]
            shares.append(load["items_per_s"] / result["solo"][spec.name]["workloads"][spec.name]["items_per_s"])
            rows.append([f"{spec.name}: {label}", spec.batch_label, f"{load['items_per_s']:.0f}",
                         f"{shares[-1]:.0%} of alone",
                         "" if kernels is not None else f"{load['device_time_s'] / mixed['wall_s']:.0%}", ""])
        rows.append([" + ".join(spec.name for spec in chosen) + f" at once ({label})", "", "",
                     f"shares add up to {sum(shares):.2f}",
                     f"{kernels:.0%} (kernels)" if kernels is not None else f"{mixed['busy_fraction']:.0%}",
                     _nvml(mixed) if kernels is not None else
                     f"run times summed: {mixed['summed_device_time_fraction']:.0%} of wall"])
        print(key, mixed, flush=True)

    result["overlap"] = {}
    for spec in specs[:2]:
        off = await run_load([spec], device, args, pipeline_depth=1)
        on = result["solo"][spec.name]
        rate_off, rate_on = (r["workloads"][spec.name]["items_per_s"] for r in (off, on))
        result["overlap"][spec.name] = {"pipeline_depth_1": off, "pipeline_depth_default": on}
        rows.append([f"{spec.name}: overlap off (pipeline_depth=1)", spec.batch_label, f"{rate_off:.0f}",
                     f"overlap on: {rate_on / rate_off:.2f}x", f"{off['busy_fraction']:.0%}", _nvml(off)])
    print("overlap", result["overlap"], flush=True)

    if cuda:
        result["graphs"] = await small_batches(specs[0], device, args)
        for batch, entry in result["graphs"].items():
            rows.append(["classify: CUDA graphs off / on, model only (ms per batch)", str(batch),
                         f"{entry['eager_ms']:.2f} / {entry['graph_ms']:.2f} ms",
                         f"{entry['eager_ms'] / entry['graph_ms']:.1f}x", "", ""])
            rows.append(["classify: CUDA graphs off / on, end to end", str(batch),
                         f"{entry['eager_items_per_s']:.0f} / {entry['graph_items_per_s']:.0f}",
                         f"{entry['graph_items_per_s'] / entry['eager_items_per_s']:.1f}x", "", ""])
        print("graphs", result["graphs"], flush=True)
    return result, rows


async def small_batches(spec: Spec, device: torch.device, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """``classify`` at batch 1-8, eager against CUDA graphs: model only and end to end (4 x batch submitters)."""
    side = spec.adapter_options["size"]
    out: dict[int, dict[str, float]] = {}
    for batch in (1, 2, 4, 8):
        entry = graphs_model_only(spec.model, device, side, spec.adapter_options["dtype"], batch)
        for graphs in (False, True):
            small = Spec(spec.name, spec.adapter, spec.model, spec.make_request, batch,
                         adapter_options=spec.adapter_options, graphs=graphs)
            load = (await run_load([small], device, args))["workloads"][spec.name]
            entry["graph_items_per_s" if graphs else "eager_items_per_s"] = load["items_per_s"]
        out[batch] = entry
    return out


def _busy(run: dict[str, Any]) -> float:
    """A mixed window's busy fraction: its kernels' where measured (CUDA), else the union of its batches' spans."""
    return run["kernel_busy_fraction"] if run["kernel_busy_fraction"] is not None else run["busy_fraction"]


def _nvml(run: dict[str, Any]) -> str:
    return "" if run["nvml_utilization"] is None else f"NVML utilization {run['nvml_utilization']:.0%}"


def plot(result: dict[str, Any], stem: str) -> None:
    """Bars: each workload's items/s naive, alone and in the mix (log scale: the naive bars are tiny)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["solo"])

    def mixed_rates(key: str) -> list[float]:
        return [result[key]["workloads"].get(name, {}).get("items_per_s", 0) for name in names]

    series = {"naive (one at a time)": [result["naive"][n]["items_per_s"] for n in names],
              "batchplex, alone": [result["solo"][n]["workloads"][n]["items_per_s"] for n in names],
              "batchplex, mixed": mixed_rates("mixed"),
              "batchplex, mixed, one executor each": mixed_rates("mixed_dedicated")}
    if "mixed_scripted" in result:
        series["batchplex, mixed, one executor each, host-bound models scripted"] = mixed_rates("mixed_scripted")
    figure, axis = plt.subplots(figsize=(9, 5.5))
    width = 0.8 / len(series)
    for offset, (label, values) in enumerate(series.items()):
        axis.bar([i + (offset - (len(series) - 1) / 2) * width for i in range(len(names))], values, width,
                 label=label)
    axis.set_xticks(range(len(names)), names)
    axis.set_yscale("log")
    axis.set_ylabel("items/s (images, sequences, samples)")
    scripted = f", {_busy(result['mixed_scripted']):.0%} (scripted)" if "mixed_scripted" in result else ""
    axis.set_title(f"batchplex engine, {', '.join(result['mixed']['workloads'])} at once\ndevice busy "
                   f"{_busy(result['mixed']):.0%} (one executor), "
                   f"{_busy(result['mixed_dedicated']):.0%} (one each){scripted}", fontsize=10)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / f"{stem}.png", dpi=120)


async def main() -> None:
    args = parse_args()
    apply_torch_threads(args)
    result, rows = await measure(args)
    path = write_results(args.out, result, rows,
                         ["measurement", "batch", "items/s", "ratio", "busy fraction", "notes"])
    plot(result, args.out)
    print(path.read_text())


if __name__ == "__main__":
    asyncio.run(main())
