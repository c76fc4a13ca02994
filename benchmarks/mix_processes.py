"""The four workloads of `engine.py` in one process against one process each, on one device: what the GIL costs.

In one process the four share one GIL: the event loop, every executor thread and the host work of each forward take
turns on it, and `engine.py`'s mixed runs leave the GPU 59-62% busy (kernels). Here the same four workloads (rank
and detect compiled by TorchScript, as in `engine.py`'s best mixed run) run under the same saturating closed-loop
load (`engine.run_load`) in two layouts, windows alternating:

* one process: one scheduler, one executor each (``dedicated_executor=True``, as in that run: outside the device's
  fair share);
* four processes: one scheduler each, one workload each, sharing the device (CUDA time-slices between processes).

Each process builds its workloads, warms up (every batch size, then a warm-up window), says it is ready, and starts
its measured window when the parent has heard from every process. Reported per layout: items/s per workload; the
kernels' busy fraction (CUPTI, `harness.KernelBusy`, per process, summed over the processes: with several processes
an overcount, since a time-sliced kernel's span also covers the slices other contexts ran, 126-128% on an H200);
and NVML's utilization, which the parent samples meanwhile (a sample counts as busy if any process ran a kernel in
it): the measure across processes. CUDA only for the last two.

    python benchmarks/mix_processes.py --device cuda --model-dir DIR
    python benchmarks/mix_processes.py --device cpu --seconds 4     # the same layouts on the CPU

Results go to ``benchmarks/results/mix-processes-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import engine
import torch
from harness import write_results

from batchplex.testing import scripting

NAMES = ("classify", "embed", "rank", "detect")
SCRIPTED = ("rank", "detect")
GO = "go"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-dir", help="folder with MiniLM's config.json and tokenizer (default: installed)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window (> 0)")
    parser.add_argument("--rounds", type=int, default=2, help="windows per layout, alternating")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the workloads one child process serves
    args = parser.parse_args()
    if args.seconds <= 0 or args.rounds < 1:
        parser.error(f"--seconds must be > 0 and --rounds >= 1, got {args.seconds} and {args.rounds}")
    return args


async def serve(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """A child: `engine.run_load` on ``names``, its measured window started by the parent's go (a line on stdin)."""
    device = torch.device(args.device)
    specs = {spec.name: spec for spec in engine.build_specs(device, args.model_dir)}
    specs = [specs[name].scripted() if name in SCRIPTED else specs[name] for name in names]

    async def ready() -> None:
        print("ready", flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() != GO:  # the parent is gone or gave up: no window on a device others may be measuring
            raise SystemExit(f"child {names}: no go from the parent (read {line!r})")

    load_args = argparse.Namespace(duration=args.seconds, max_wait_ms=2.0)
    result = await engine.run_load(specs, device, load_args, dedicated=len(specs) > 1, kernel_time=True,
                                   ready=ready)
    return {"items_per_s": {name: load["items_per_s"] for name, load in result["workloads"].items()},
            "kernel_busy_fraction": result["kernel_busy_fraction"]}


async def run_layout(args: argparse.Namespace, groups: list[list[str]]) -> dict[str, Any]:
    """One child per group; release them together once all are ready; NVML sampled while their windows run.

    Any failure kills the children that are left, so none runs a window on a device nobody is measuring."""
    command = [sys.executable, __file__, "--device", args.device, "--seconds", str(args.seconds)]
    if args.model_dir:
        command += ["--model-dir", args.model_dir]
    children = [await asyncio.create_subprocess_exec(*command, "--child", ",".join(group),
                                                     stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
                for group in groups]
    try:
        for group, child in zip(groups, children):
            line = (await child.stdout.readline()).decode()
            if not line.startswith("ready"):
                raise RuntimeError(f"the child for {group} stopped before it was ready: {line!r}")
        for child in children:
            child.stdin.write(f"{GO}\n".encode())
            await child.stdin.drain()
        with engine.UtilizationSampler(torch.device(args.device)) as nvml:
            await asyncio.sleep(args.seconds)  # the children's windows, which began at the go
        outputs = [await child.communicate() for child in children]
        reports = []
        for group, child, (out, _) in zip(groups, children, outputs):
            if child.returncode:
                raise RuntimeError(f"the child for {group} failed with exit status {child.returncode}")
            reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
    kernels = [report["kernel_busy_fraction"] for report in reports]
    run = {"processes": len(groups),
           "items_per_s": {name: rate for report in reports for name, rate in report["items_per_s"].items()},
           "kernel_busy_fraction": None if None in kernels else sum(kernels), "nvml_utilization": nvml.mean}
    print(run, flush=True)
    return run


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction:.0%}"


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    layouts = {"one process, one executor each": [list(NAMES)], "four processes": [[name] for name in NAMES]}
    return [{"layout": label, "round": r, **await run_layout(args, groups)}
            for r in range(args.rounds) for label, groups in layouts.items()]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.child:
        with scripting():  # TorchScript's fusers off, as batchplex advises for scripted models
            print(json.dumps(asyncio.run(serve(args, args.child.split(",")))), flush=True)
        return
    runs = asyncio.run(measure(args))
    table = [[f"{run['layout']} (round {run['round'] + 1})",
              *(f"{run['items_per_s'][name]:,.0f}" for name in NAMES),
              _percent(run["kernel_busy_fraction"]), _percent(run["nvml_utilization"])] for run in runs]
    path = write_results(f"mix-processes-{args.device}", {"settings": vars(args), "runs": runs}, table,
                         ["layout", *(f"{name} items/s" for name in NAMES), "kernels busy (CUPTI, summed)",
                          "NVML utilization"])
    print(path.read_text())


if __name__ == "__main__":
    main()
