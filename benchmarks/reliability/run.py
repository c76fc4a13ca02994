"""Run the reliability suite's long versions and write one JSON and one PNG per case.

    .venv/bin/python -m benchmarks.reliability.run                       # every case, long settings, on the CPU
    .venv/bin/python -m benchmarks.reliability.run oom shutdown soak --device cuda
    .venv/bin/python -m benchmarks.reliability.run soak --soak-seconds 600
    .venv/bin/python -m benchmarks.reliability.run bad-input             # also rewrites docs/bad-input.md
    .venv/bin/python -m benchmarks.reliability.run --short               # the CI settings (a quick look)

Each case writes ``<out>/reliability-<case>.json`` (the command, the machine, the date, the settings, every run's
numbers and every promise with whether it held) and ``<out>/reliability-<case>.png``; with ``--device cuda`` the
names end in ``-cuda``. The exit status is 1 when a
promise was broken, so a long run can gate a release.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.reliability import bad_input, figures, harness, scenarios  # noqa: E402
from benchmarks.reliability.checks import as_records, failed  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def settings_for(case: str, run: scenarios.Run, args: argparse.Namespace) -> dict[str, Any]:
    settings = dict(run.short if args.short else run.long)
    if args.short:
        return settings
    if case == "soak":
        settings["seconds"] = args.soak_seconds
        settings["warmup_s"] = min(settings["warmup_s"], args.soak_seconds / 6)
    if case == "overload" and run.label == "overload":
        settings["overload_s"] = args.overload_seconds
    if args.scale != 1.0:
        for key in ("requests", "callers", "threaded_callers"):
            if key in settings:
                settings[key] = max(1, int(settings[key] * args.scale))
    return settings


def stem_for(case: str, device: str) -> str:
    return f"reliability-{case}" + ("" if device == "cpu" else f"-{device.split(':')[0]}")


def draw(case: scenarios.Case, report: dict[str, Any], path: Path) -> None:
    machine = report["machine"]
    where = machine["gpu"] or f"{machine['cpu']} ({machine['cpu_cores']} cores)"
    figures.draw(case.name, case.title, report["results"], path,
                 f"{where}, torch {machine['torch']}, {report['date'][:10]}")


def run_case(case: scenarios.Case, args: argparse.Namespace) -> bool:
    """Run every run of ``case``; write its JSON and PNG; return whether every promise held."""
    results, promises, used = {}, [], {}
    started = time.perf_counter()
    for run in case.runs:
        settings = settings_for(case.name, run, args)
        print(f"[{case.name}] {run.label}: {settings}", flush=True)
        result, checked = scenarios.execute(run, settings, device=args.device)
        results[run.label] = result
        used[run.label] = result.get("params", settings)
        promises += [{"run": run.label, **record} for record in as_records(checked)]
        for broken in failed(checked):
            print(f"  BROKEN: {broken.promise}: {broken.detail}", flush=True)
    report = {
        "case": case.name, "title": case.title, "command": "python -m benchmarks.reliability.run "
        + " ".join(shlex.quote(a) for a in sys.argv[1:]), "date": datetime.datetime.now().astimezone().isoformat(
            timespec="seconds"), "machine": harness.machine(args.device), "settings": "short" if args.short else "long",
        "wall_s": round(time.perf_counter() - started, 1), "promises_kept": all(p["ok"] for p in promises),
        "promises": promises, "params": used, "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem_for(case.name, args.device)}.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    draw(case, report, path.with_suffix(".png"))
    if case.name == "bad-input" and not args.short:
        (ROOT / bad_input.DOC_PATH).write_text(bad_input.render(results["table"]))
        print(f"  wrote {bad_input.DOC_PATH}", flush=True)
    kept = sum(p["ok"] for p in promises)
    print(f"[{case.name}] {kept}/{len(promises)} promises kept in {report['wall_s']} s -> {out}", flush=True)
    return report["promises_kept"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", metavar="case",
                        help=f"cases to run, of {', '.join(scenarios.CASES)} (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cases that place models on a device)")
    parser.add_argument("--short", action="store_true", help="the CI settings instead of the long ones")
    parser.add_argument("--soak-seconds", type=float, default=180.0, help="length of the soak (default 180)")
    parser.add_argument("--overload-seconds", type=float, default=20.0, help="length of the 10x phase (default 20)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request and caller counts")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for JSON and PNG")
    parser.add_argument("--redraw", action="store_true", help="only redraw the figures from the JSON in --out")
    args = parser.parse_args(argv)
    unknown = [name for name in args.cases if name not in scenarios.CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(scenarios.CASES)}")
    names = args.cases or list(scenarios.CASES)
    if args.redraw:
        for name in names:
            path = Path(args.out) / f"{stem_for(name, args.device)}.json"
            if path.exists():
                draw(scenarios.CASES[name], json.loads(path.read_text()), path.with_suffix(".png"))
        return 0
    kept = [run_case(scenarios.CASES[name], args) for name in names]
    return 0 if all(kept) else 1


if __name__ == "__main__":
    sys.exit(main())
