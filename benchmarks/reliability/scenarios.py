"""Every case of the reliability suite: its runs, their short (CI) and long settings, and the promises checked.

A case is one or more `Run`s; each run is an async scenario function called with ``short`` or ``long`` keyword
arguments (plus ``device`` where the scenario takes one) on a fresh `harness.ProbeLoop`, and checked by its
``check`` function plus the probe checks every run shares.

    from benchmarks.reliability import scenarios, harness
    result = harness.run(scenarios.overload(**scenarios.CASES["overload"].runs[0].short))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from . import checks
from .bad_input import bad_input_table
from .checks import Promise, assert_kept
from .faults import out_of_memory, poisonous_requests
from .harness import run as run_on_probe_loop
from .lifecycle import cancellation_storm, shutdown_threaded, shutdown_under_load
from .load import overload, rejection_cost, soak

__all__ = ["Run", "Case", "CASES", "execute", "run_short", "poisonous_requests", "out_of_memory", "overload", "rejection_cost",
           "cancellation_storm", "shutdown_under_load", "shutdown_threaded", "bad_input_table", "soak"]

OOM_WARNING = "out of memory at batch size"


@dataclass(frozen=True)
class Run:
    label: str
    scenario: Callable[..., Coroutine[Any, Any, dict[str, Any]]]
    check: Callable[[dict[str, Any]], list[Promise]]
    short: dict[str, Any] = field(default_factory=dict)
    long: dict[str, Any] = field(default_factory=dict)
    allowed_logs: tuple[str, ...] = ()

    @property
    def takes_device(self) -> bool:
        return "device" in inspect.signature(self.scenario).parameters


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    runs: tuple[Run, ...]


def _bad_input_checks(result: dict[str, Any]) -> list[Promise]:
    return checks.check_bad_input_good_requests(result) + [
        checks.check_bad_input_typed(section) for section in result["sections"] if "skipped" not in section]


CASES: dict[str, Case] = {case.name: case for case in (
    Case("poison", "1% poisonous requests: adapter-level and model-level faults", (
        Run("poison", poisonous_requests, checks.check_poison, {"requests": 1000}, {"requests": 20000}),)),
    Case("oom", "Out of memory above a batch size: split, serve, remember", (
        Run("oom", out_of_memory, checks.check_oom, {"requests": 256, "waves": 3}, {"requests": 2048, "waves": 5},
            allowed_logs=(OOM_WARNING,)),)),
    Case("overload", "10x capacity for a bounded time, then the baseline load again", (
        Run("overload", overload, checks.check_overload, {"baseline_s": 0.5, "overload_s": 1.5, "recovery_s": 2.0},
            {"baseline_s": 3.0, "overload_s": 20.0, "recovery_s": 10.0, "long_timeout_share": 0.1, "payload": 4096}),
        Run("rejection_cost", rejection_cost, checks.check_rejection_cost, {"rejections": 300},
            {"rejections": 3000}))),
    Case("cancel", "Cancellation storm: half the callers cancel at random moments", (
        Run("storm", cancellation_storm, checks.check_cancel, {"callers": 800},
            {"callers": 20000, "threaded_callers": 2000}),)),
    Case("shutdown", "Closing the scheduler while requests are queued and running", (
        Run("drain", shutdown_under_load, checks.check_shutdown, {"drain": True}, {"drain": True, "load_s": 5.0}),
        Run("no_drain", shutdown_under_load, checks.check_shutdown, {"drain": False},
            {"drain": False, "load_s": 5.0}),
        Run("threaded_drain", shutdown_threaded, checks.check_shutdown_threaded, {"drain": True},
            {"drain": True, "load_s": 3.0}),
        Run("threaded_no_drain", shutdown_threaded, checks.check_shutdown_threaded, {"drain": False},
            {"drain": False, "load_s": 3.0}))),
    Case("bad-input", "Malformed input, per adapter", (
        Run("table", bad_input_table, _bad_input_checks),)),
    Case("soak", "Mixed workload at 70% load: no growth, everything accounted for", (
        Run("soak", soak, checks.check_soak, {"seconds": 5.0, "warmup_s": 1.0, "windows": 4},
            {"seconds": 180.0, "warmup_s": 10.0, "windows": 12, "capacity_s": 3.0}),)),
)}


def execute(run: Run, settings: dict[str, Any], device: str = "cpu") -> tuple[dict[str, Any], list[Promise]]:
    """Run one scenario on a fresh probe loop with ``settings``; return its result and every promise checked."""
    kwargs = dict(settings)
    if run.takes_device:
        kwargs.setdefault("device", device)
    result = run_on_probe_loop(run.scenario(**kwargs))
    return result, run.check(result) + checks.check_probe(result, run.allowed_logs)


def run_short(case: str, label: str, device: str = "cpu") -> dict[str, Any]:
    """Run the short (CI) version of one run of ``case``, assert every promise it checks, return its result."""
    run = next(r for r in CASES[case].runs if r.label == label)
    result, promises = execute(run, run.short, device=device)
    assert_kept(promises)
    return result
