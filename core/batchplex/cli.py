"""The ``batchplex`` command: ``demo`` (the main job), ``profile`` (pick a batch size), ``plugins`` (what is
installed)."""

from __future__ import annotations

import argparse
import ast
import asyncio
import importlib
import inspect
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from .plugins import PluginHost, installed_plugins

__all__ = ["main"]


def _plugins(_: argparse.Namespace) -> int:
    installed = installed_plugins()
    host = PluginHost()
    adapters = host.adapters()
    print("installed plugins (entry-point group 'batchplex'):")
    if not installed:
        print("  none")
    for plugin in installed:
        state = "blocked" if plugin.blocked else "loaded"
        names = [name for name, owner in adapters.items() if owner == plugin.name]
        print(f"  {plugin.name:<10} {state:<8} {plugin.distribution} {plugin.version}  ({plugin.value})"
              f"  adapters: {', '.join(names) or '-'}")
    builtin = [name for name, owner in adapters.items() if owner == "batchplex.builtin"]
    print(f"built-in adapters: {', '.join(builtin)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    def setup(scheduler: Any) -> None:
        if args.prometheus_port is not None:
            from .prometheus import PrometheusExporter

            exporter = PrometheusExporter(scheduler)
            exporter.serve(args.prometheus_port)
            print(f"Prometheus metrics on http://127.0.0.1:{args.prometheus_port}/metrics")
        if args.adaptive_ms is not None:
            from .adaptive import AdaptiveBatching

            scheduler.register_plugin(AdaptiveBatching(scheduler, {name: args.adaptive_ms
                                                                   for name in scheduler.workloads}))

    stats = asyncio.run(run_demo(duration_s=args.duration, load=args.load, bad_share=args.bad_share,
                                 live=not args.no_live, device=args.device, only=args.workload, setup=setup))
    return 0 if all(s["completed"] > 0 for s in stats.values()) else 1


def _import(path: str) -> Any:
    """The object at ``module:attr`` (the current directory is importable, as for ``python -m``)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"expected an import path like 'package.module:name', got {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def _model(obj: Any) -> Any:
    """A model from ``--model``: a module or a callable taking the batch is the model; a class or a function
    without required arguments is a factory, called once."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, type):
        return obj()
    required = [p for p in inspect.signature(obj).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return obj if required else obj()


def _option(text: str) -> tuple[str, Any]:
    """``key=value``: a Python literal, a ``torch.<dtype>``, or else the string itself."""
    import torch

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--adapter-option expects key=value, got {text!r}")
    if raw.startswith("torch.") and isinstance(getattr(torch, raw[6:], None), torch.dtype):
        return key, getattr(torch, raw[6:])
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def _profile_target(args: argparse.Namespace, device: Any) -> tuple[str, Any, Any, Any, Any]:
    """(name, adapter, model, make_request, base policy) of the workload ``batchplex profile`` was given."""
    import torch

    from .policy import BatchPolicy

    host = PluginHost()
    if args.model:
        if args.workload or not (args.adapter and args.requests):
            raise SystemExit("with --model give --adapter and --requests too (and no example workload name)")
        adapter = host.adapter(args.adapter).configure(**dict(_option(o) for o in args.adapter_option or ()))
        model = _model(_import(args.model))
        if isinstance(model, torch.nn.Module):
            model = model.to(device).eval()
        name = args.name or args.model.partition(":")[2].split(".")[-1]
        return name, adapter, model, _import(args.requests), BatchPolicy()
    if args.adapter or args.requests or args.adapter_option:
        raise SystemExit("--adapter, --adapter-option and --requests go with --model")
    examples = {w.name: w for w in host.example_workloads(device)}
    if args.workload not in examples:
        raise SystemExit(f"name an example workload ({', '.join(examples) or 'none installed'}) or give "
                         f"--adapter, --model and --requests")
    example = examples[args.workload]
    adapter = host.adapter(example.adapter).configure(**example.adapter_options)
    return example.name, adapter, example.model, example.make_request, example.policy


def _profile(args: argparse.Namespace) -> int:
    import torch

    from .tuning import profile

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name, adapter, model, make_request, policy = _profile_target(args, device)
    result = profile(name, adapter, model, make_request, device, budget_ms=args.latency_budget_ms,
                     max_batch=args.max_batch, extra_sizes=args.sizes or (), base_policy=policy,
                     max_wait_ms=args.max_wait_ms, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                     progress=not args.no_progress)
    result.meta["command"] = args.command_line
    paths = result.write(Path(args.out or f"profile-{name}-{device.type}"))
    return _print_profile(result, paths, args)


def _print_profile(result: Any, paths: list[Path], args: argparse.Namespace) -> int:
    """The table of the sweep, then the sweet spot and the policy to use; 1 when no size fits the budget."""
    from rich.console import Console
    from rich.table import Table

    from .tuning import policy_source

    console = Console(soft_wrap=True)
    table = Table(title=f"{result.workload} ({result.adapter}) on {result.device_name}, median of {args.repeats}")
    for column in ("batch", "collate ms", "run ms", "split ms", "batch ms", "ms / item", "items / s"):
        table.add_column(column, justify="right")
    sweet = result.sweet_spot
    for p in result.points:
        table.add_row(str(p.batch_size), *(f"{v:.3f}" for v in (p.collate_ms, p.run_ms, p.split_ms, p.latency_ms,
                                                                  p.latency_per_item_ms)),
                      f"{p.items_per_s:,.0f}", style="bold green" if p is sweet else None)
    console.print(table)
    if result.oom_at is not None:
        console.print(f"out of memory at batch size {result.oom_at}: larger sizes were not tried")
    console.print("wrote " + ", ".join(str(path) for path in paths))
    if sweet is None:
        console.print(f"no measured batch size runs within {args.latency_budget_ms:g} ms; the smallest took "
                      f"{result.points[0].latency_ms:.2f} ms" if result.points else "nothing could be measured")
        return 1
    wait = result.policy.max_wait_ms
    console.print(f"sweet spot: batch size {sweet.batch_size}, {sweet.items_per_s:,.0f} items/s, batch latency "
                  f"{sweet.latency_ms:.2f} ms (budget {args.latency_budget_ms:g} ms bounds the batch latency)\n"
                  f"a request waits up to {wait:g} ms for its batch, then the batch takes about "
                  f"{sweet.latency_ms:.1f} ms: about {wait + sweet.latency_ms:.1f} ms end to end on an idle device, "
                  f"up to {wait + 2 * sweet.latency_ms:.1f} ms when a batch runs ahead of it")
    console.print(f"use: {policy_source(result.policy)}", highlight=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchplex", description="Request batching for PyTorch inference.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="batch every installed example workload at once under a request stream")
    demo.add_argument("--duration", type=float, default=45.0, help="seconds of traffic (default 45)")
    demo.add_argument("--load", type=float, default=1.0, help="scale of the offered request rates (default 1.0)")
    demo.add_argument("--bad-share", type=float, default=0.01, help="share of malformed requests (default 0.01)")
    demo.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    demo.add_argument("--workload", action="append", help="run only this example workload (repeatable)")
    demo.add_argument("--no-live", action="store_true", help="print progress lines instead of a live table")
    demo.add_argument("--prometheus-port", type=int, default=None, help="serve Prometheus metrics on this port")
    demo.add_argument("--adaptive-ms", type=float, default=None,
                      help="adapt batch size and wait online to keep each workload's p99 under this many ms")
    demo.set_defaults(run=_demo)

    prof = commands.add_parser(
        "profile", help="sweep batch sizes for a workload, pick the best throughput within a latency budget",
        description="Measure batch latency and throughput over batch sizes for an example workload (by name) or "
                    "for --adapter/--model/--requests, pick the sweet spot within --latency-budget-ms, print the "
                    "BatchPolicy to use and write JSON, CSV and a PNG plot.")
    prof.add_argument("workload", nargs="?", help="an installed example workload (e.g. mlp)")
    prof.add_argument("--adapter", help="a registered adapter's name (with --model)")
    prof.add_argument("--adapter-option", action="append", metavar="KEY=VALUE",
                      help="adapter option, a Python literal or torch.<dtype> (repeatable)")
    prof.add_argument("--model", metavar="MODULE:ATTR",
                      help="the model, or a class or zero-argument function that builds it")
    prof.add_argument("--requests", metavar="MODULE:ATTR", help="make_request(rng: random.Random) -> one request")
    prof.add_argument("--name", help="the workload's name in the report (default: the model's attribute name)")
    prof.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    prof.add_argument("--max-batch", type=int, default=256, help="largest power of two to try (default 256)")
    prof.add_argument("--sizes", type=int, nargs="+", help="more batch sizes to try (up to --max-batch)")
    prof.add_argument("--latency-budget-ms", type=float, default=50.0,
                      help="bound on one batch's latency, collate to split (default 50)")
    prof.add_argument("--max-wait-ms", type=float, default=None,
                      help="max_wait_ms of the suggested policy (default: the sweet spot's batch latency)")
    prof.add_argument("--repeats", type=int, default=10, help="timed runs per size; medians (default 10)")
    prof.add_argument("--warmup", type=int, default=3, help="untimed runs per size first (default 3)")
    prof.add_argument("--seed", type=int, default=0, help="seed of the request generator (default 0)")
    prof.add_argument("--out", help="path stem of the .json/.csv/.png (default profile-<workload>-<device>)")
    prof.add_argument("--no-progress", action="store_true", help="no progress bar")
    prof.set_defaults(run=_profile)

    plugins = commands.add_parser("plugins", help="list installed plugins, their adapters and what is blocked")
    plugins.set_defaults(run=_plugins)

    args = parser.parse_args(argv)
    args.command_line = "batchplex " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
