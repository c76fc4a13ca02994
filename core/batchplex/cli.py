"""The ``batchplex`` command: ``demo`` (the main job), ``plugins`` (what is installed)."""

from __future__ import annotations

import argparse
import asyncio
import sys

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

    stats = asyncio.run(run_demo(duration_s=args.duration, load=args.load, bad_share=args.bad_share,
                                 live=not args.no_live, device=args.device, only=args.workload))
    return 0 if all(s["completed"] > 0 for s in stats.values()) else 1


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
    demo.set_defaults(run=_demo)

    plugins = commands.add_parser("plugins", help="list installed plugins, their adapters and what is blocked")
    plugins.set_defaults(run=_plugins)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
