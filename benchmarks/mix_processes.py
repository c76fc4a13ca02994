"""The four workloads of `engine.py` in one process against one process each, on one device: what the GIL costs.

In one process the four share one GIL: the event loop, every executor thread and the host work of each forward take
turns on it, and `engine.py`'s mixed runs leave the GPU 59-62% busy (kernels). Here the same four workloads (rank
and detect compiled by TorchScript, as in `engine.py`'s best mixed run) run under the same saturating closed-loop
load in two layouts, windows alternating:

* one process: one scheduler, one executor each (``dedicated_executor=True``);
* four processes: one scheduler each, one workload each, sharing the device (CUDA time-slices between processes;
  batchplex's fair sharing works within a process only).

Each process builds its workloads, warms up (every batch size, then a 2 s window), says it is ready, and starts its
measured window when every process is ready. Reported per layout: items/s per workload and the device's
utilization (NVML, sampled every 100 ms over the window less its first and last second; CUDA only).

    python benchmarks/mix_processes.py --device cuda --model-dir DIR
    python benchmarks/mix_processes.py --device cpu --seconds 4     # the same layouts on the CPU (no NVML)

Results go to ``benchmarks/results/mix-processes-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from typing import Any

import engine
import torch
from harness import request_pool, saturate, write_results

from batchplex import Scheduler
from batchplex.testing import scripting

NAMES = ("classify", "embed", "rank", "detect")
SCRIPTED = ("rank", "detect")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-dir", help="folder with MiniLM's config.json and tokenizer (default: installed)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--rounds", type=int, default=2, help="windows per layout, alternating")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the workloads one child process serves
    return parser.parse_args()


async def serve(args: argparse.Namespace, names: list[str]) -> dict[str, float]:
    """A child: saturate ``names`` on one scheduler once the parent says go (a line on stdin); items/s each.

    Run inside `batchplex.testing.scripting` (TorchScript's fusers off, as batchplex advises for scripted models)."""
    device = torch.device(args.device)
    specs = {spec.name: spec for spec in engine.build_specs(device, args.model_dir)}
    specs = [specs[name].scripted() if name in SCRIPTED else specs[name] for name in names]
    async with Scheduler(plugins=engine.PLUGINS, autoload=False) as scheduler:
        for spec in specs:
            spec.add_to(scheduler, device, 2.0, dedicated=len(specs) > 1)
            await scheduler.warmup(spec.name, spec.make_request(random.Random(0)))
        pools = [request_pool(spec.make_request, 4 * spec.batch) for spec in specs]

        async def window(seconds: float) -> list[dict[str, float]]:
            return await asyncio.gather(*(
                saturate(scheduler, spec.name, pool, concurrency=4 * spec.batch, duration_s=seconds,
                         items_per_request=spec.items_per_request) for spec, pool in zip(specs, pools)))

        await window(2.0)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        loads = await window(args.seconds)
    return {spec.name: load["items_per_s"] for spec, load in zip(specs, loads)}


def run_layout(args: argparse.Namespace, groups: list[list[str]]) -> dict[str, Any]:
    """Start one child per group, wait until all are ready, release them together; sample NVML meanwhile."""
    command = [sys.executable, __file__, "--device", args.device, "--seconds", str(args.seconds)]
    if args.model_dir:
        command += ["--model-dir", args.model_dir]
    children = [subprocess.Popen([*command, "--child", ",".join(group)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for group in groups]
    for child in children:
        line = child.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"a child ({child.args[-1]}) stopped before it was ready: {line!r}")
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    started, samples = time.perf_counter(), []
    while (elapsed := time.perf_counter() - started) < args.seconds:
        if args.device == "cuda" and 1.0 < elapsed < args.seconds - 1.0:
            samples.append(torch.cuda.utilization(0) / 100)
        time.sleep(0.1)
    items_per_s: dict[str, float] = {}
    for child in children:
        out, _ = child.communicate()
        if child.returncode:
            raise RuntimeError(f"child {child.args[-1]} failed with exit status {child.returncode}")
        items_per_s.update(json.loads(out.strip().splitlines()[-1]))
    utilization = sum(samples) / len(samples) if samples else None
    print(f"{len(groups)} process(es): {items_per_s}, utilization {utilization}", flush=True)
    return {"processes": len(groups), "items_per_s": items_per_s, "nvml_utilization": utilization}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.child:
        with scripting():
            print(json.dumps(asyncio.run(serve(args, args.child.split(",")))), flush=True)
        return
    layouts = {"one process, one executor each": [list(NAMES)], "four processes": [[name] for name in NAMES]}
    runs = [{"layout": label, "round": r, **run_layout(args, groups)}
            for r in range(args.rounds) for label, groups in layouts.items()]
    table = []
    for run in runs:
        utilization = run["nvml_utilization"]
        table.append([f"{run['layout']} (round {run['round'] + 1})",
                      *(f"{run['items_per_s'][name]:,.0f}" for name in NAMES),
                      "n/a (no NVML)" if utilization is None else f"{utilization:.0%}"])
    path = write_results(f"mix-processes-{args.device}", {"settings": vars(args), "runs": runs}, table,
                         ["layout", *(f"{name} items/s" for name in NAMES), "device utilization (NVML)"])
    print(path.read_text())


if __name__ == "__main__":
    main()
