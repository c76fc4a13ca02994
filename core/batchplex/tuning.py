"""Batch-size profiling: measure one workload's batch latency and throughput over batch sizes, pick the sweet spot.

Use it before choosing a `BatchPolicy` (``batchplex profile`` is the command-line front end). Each batch size is
run with real inputs: requests from the workload's generator go through ``adapter.prepare``, then every repeat
runs ``adapter.collate`` (host staging and the copy to the device included), the model, ``adapter.postprocess``
(and the copy of the output to the host, as the scheduler does) and ``adapter.split``. Warm-up runs come first; the
numbers are medians over the repeats, timed with CUDA events on a GPU and ``perf_counter`` on the CPU. The sweep
stops cleanly at the first out-of-memory error and reports the size that failed.

What the budget bounds: the **batch latency**, from collation to split, of one batch at the chosen size. A
request also waits for its batch to form (at most ``max_wait_ms``) and, when the device is busy, for the batch
ahead of it: its end-to-end latency is about ``max_wait_ms + batch latency`` on an idle device and up to one more
batch latency under load. Throughput is measured one batch at a time; the scheduler overlaps the collation of the
next batch with the current run, so it can do somewhat better.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import gc
import json
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._executor import is_out_of_memory
from .adapter import Adapter, check_split
from .collate import copy_to_pinned_host, map_tensors
from .policy import BatchPolicy

__all__ = ["ProfilePoint", "Profile", "profile", "batch_sizes", "profile_batch_sizes", "sweet_spot",
           "suggest_policy", "policy_source", "device_name"]


@dataclass(frozen=True)
class ProfilePoint:
    """Medians over the repeats at one batch size (milliseconds); ``latency_ms`` = collate + run + split."""

    batch_size: int
    collate_ms: float
    run_ms: float
    split_ms: float
    latency_ms: float
    latency_min_ms: float
    latency_max_ms: float
    repeats: int

    @property
    def latency_per_item_ms(self) -> float:
        return self.latency_ms / self.batch_size

    @property
    def items_per_s(self) -> float:
        return self.batch_size / self.latency_ms * 1000.0

    def as_row(self) -> dict[str, float]:
        row = dataclasses.asdict(self)
        row.update(latency_per_item_ms=self.latency_per_item_ms, items_per_s=self.items_per_s)
        return row


@dataclass
class Profile:
    """A finished sweep: the measured points, where it ran out of memory (if it did) and the chosen size."""

    workload: str
    adapter: str
    device: str
    device_name: str
    budget_ms: float
    points: list[ProfilePoint]
    oom_at: int | None = None
    policy: BatchPolicy | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sweet_spot(self) -> ProfilePoint | None:
        return sweet_spot(self.points, self.budget_ms)

    def to_dict(self) -> dict[str, Any]:
        sweet = self.sweet_spot
        return {"workload": self.workload, "adapter": self.adapter, "device": self.device,
                "device_name": self.device_name, "latency_budget_ms": self.budget_ms,
                "budget_bounds": "batch latency (collate + run + split) at the chosen size",
                "oom_at": self.oom_at, "sweet_spot": sweet.as_row() if sweet else None,
                "policy": policy_source(self.policy) if self.policy else None,
                "points": [point.as_row() for point in self.points], **self.meta}

    def write(self, stem: Path) -> list[Path]:
        """Write ``stem`` + .json, .csv and .png; return the three paths."""
        stem.parent.mkdir(parents=True, exist_ok=True)
        paths = [stem.parent / f"{stem.name}{suffix}" for suffix in (".json", ".csv", ".png")]
        paths[0].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        with paths[1].open("w", newline="") as out:
            columns = [f.name for f in dataclasses.fields(ProfilePoint)] + ["latency_per_item_ms", "items_per_s"]
            writer = csv.DictWriter(out, fieldnames=columns)
            writer.writeheader()
            writer.writerows(point.as_row() for point in self.points)
        self.plot(paths[2])
        return paths

    def plot(self, path: Path) -> None:
        """Throughput and batch latency against batch size (log2 axis), the budget line and the sweet spot."""
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sizes = [p.batch_size for p in self.points]
        fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
        top.plot(sizes, [p.items_per_s for p in self.points], "o-", color="tab:blue")
        top.set_ylabel("throughput (items / s)")
        bottom.plot(sizes, [p.latency_ms for p in self.points], "o-", color="tab:orange", label="batch latency")
        bottom.axhline(self.budget_ms, color="black", linestyle="--", linewidth=1,
                       label=f"budget {self.budget_ms:g} ms")
        bottom.set_ylabel("batch latency (ms)")
        bottom.set_xlabel("batch size")
        bottom.set_xscale("log", base=2)
        bottom.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        sweet = self.sweet_spot
        for ax in (top, bottom):
            ax.grid(alpha=0.3, which="both")
            if sweet is not None:
                ax.axvline(sweet.batch_size, color="tab:green", linewidth=1)
            if self.oom_at is not None:
                ax.axvline(self.oom_at, color="tab:red", linestyle=":", linewidth=1.5)
        if sweet is not None:
            top.plot([sweet.batch_size], [sweet.items_per_s], "*", color="tab:green", markersize=16,
                     label=f"sweet spot: {sweet.batch_size} ({sweet.items_per_s:,.0f}/s)")
            bottom.plot([sweet.batch_size], [sweet.latency_ms], "*", color="tab:green", markersize=16,
                        label=f"{sweet.latency_ms:.2f} ms at {sweet.batch_size}")
            top.legend(fontsize=8, loc="upper left")
        if self.oom_at is not None:
            bottom.plot([], [], ":", color="tab:red", label=f"out of memory at {self.oom_at}")
        bottom.legend(fontsize=8, loc="upper left")
        fig.suptitle(f"{self.workload} ({self.adapter}) on {self.device_name}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def batch_sizes(max_batch: int, preferred: Iterable[int] = (), extra: Iterable[int] = ()) -> list[int]:
    """Powers of two up to ``max_batch`` plus the preferred and extra sizes (those up to ``max_batch``), sorted."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = {1 << k for k in range(max_batch.bit_length()) if 1 << k <= max_batch}
    sizes.update(s for s in (*preferred, *extra) if 1 <= s <= max_batch)
    return sorted(sizes)


def sweet_spot(points: Sequence[ProfilePoint], budget_ms: float) -> ProfilePoint | None:
    """The point with the highest throughput whose batch latency fits ``budget_ms`` (the smaller size on a tie);
    None when no measured size fits."""
    fitting = [p for p in points if p.latency_ms <= budget_ms]
    return max(fitting, key=lambda p: (p.items_per_s, -p.batch_size)) if fitting else None


def suggest_policy(base: BatchPolicy, sweet: ProfilePoint, max_wait_ms: float | None = None) -> BatchPolicy:
    """``base`` with ``max_batch_size`` = the sweet spot and ``max_wait_ms`` (default: the sweet spot's batch
    latency: while a batch runs the next one fills anyway, and the wait plus the run stays within twice the
    budget). Preferred sizes above the new maximum are dropped."""
    wait = round(sweet.latency_ms, 1) if max_wait_ms is None else max_wait_ms
    return dataclasses.replace(
        base, max_batch_size=sweet.batch_size, max_wait_ms=wait,
        preferred_batch_sizes=tuple(s for s in base.preferred_batch_sizes if s <= sweet.batch_size),
        priority_aging_ms=None if _derived_aging(base) else base.priority_aging_ms)


def policy_source(policy: BatchPolicy) -> str:
    """``BatchPolicy(...)`` with the size and wait and the other fields that differ from the defaults, ready to
    paste into code."""
    default = BatchPolicy()
    derived = {"priority_aging_ms"} if _derived_aging(policy) else set()
    values = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}
    args = [f"{name}={value!r}" for name, value in values.items()
            if name in ("max_batch_size", "max_wait_ms") or (name not in derived and value != getattr(default, name))]
    return f"BatchPolicy({', '.join(args)})"


def _derived_aging(policy: BatchPolicy) -> bool:
    """Whether ``priority_aging_ms`` is the value `BatchPolicy` derives from the wait (left out, it follows it)."""
    return policy.priority_aging_ms == max(100.0, 20 * policy.max_wait_ms)


def profile_batch_sizes(adapter: Adapter, model: Callable[[Any], Any], make_request: Callable[[random.Random], Any],
                        device: torch.device, sizes: Sequence[int], *, repeats: int = 10, warmup: int = 3,
                        seed: int = 0, progress: bool = True, label: str = "") -> tuple[list[ProfilePoint], int | None]:
    """Measure each size in ``sizes`` (ascending); return the points and the size that ran out of memory (or None).

    Requests come from ``make_request(rng)`` and are prepared once; every size uses the first ``n`` of them.
    """
    from tqdm import tqdm

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    rng = random.Random(seed)
    prepared: list[Any] = []
    points: list[ProfilePoint] = []
    with tqdm(sorted(sizes), desc=f"profiling {label or adapter.name}", unit="size", disable=not progress) as bar:
        for n in bar:
            bar.set_postfix(batch=n)
            while len(prepared) < n:
                prepared.append(adapter.prepare(make_request(rng)))
            runs = _repeat(adapter, model, prepared[:n], device, warmup, repeats)
            if runs is None:
                _release(device)
                bar.write(f"out of memory at batch size {n}; the sweep stops there")
                return points, n
            points.append(_point(n, runs))
            bar.set_postfix(batch=n, ms=f"{points[-1].latency_ms:.2f}", per_s=f"{points[-1].items_per_s:,.0f}")
    return points, None


def profile(name: str, adapter: Adapter, model: Callable[[Any], Any], make_request: Callable[[random.Random], Any],
            device: torch.device, *, budget_ms: float, max_batch: int = 256, extra_sizes: Iterable[int] = (),
            base_policy: BatchPolicy | None = None, max_wait_ms: float | None = None, repeats: int = 10,
            warmup: int = 3, seed: int = 0, progress: bool = True) -> Profile:
    """Sweep the powers of two up to ``max_batch``, ``base_policy``'s preferred sizes and ``extra_sizes``; pick the
    sweet spot under ``budget_ms`` and the policy to use (`suggest_policy`; None when no size fits)."""
    if not budget_ms > 0:
        raise ValueError(f"the latency budget must be > 0 ms, got {budget_ms}")
    base = base_policy or BatchPolicy()
    sizes = batch_sizes(max_batch, base.preferred_batch_sizes, extra_sizes)
    points, oom_at = profile_batch_sizes(adapter, model, make_request, device, sizes, repeats=repeats,
                                         warmup=warmup, seed=seed, progress=progress, label=name)
    result = Profile(workload=name, adapter=adapter.name, device=str(device), device_name=device_name(device),
                     budget_ms=budget_ms, points=points, oom_at=oom_at,
                     meta={"repeats": repeats, "warmup": warmup, "sizes": sizes, "torch": torch.__version__,
                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    sweet = result.sweet_spot
    result.policy = suggest_policy(base, sweet, max_wait_ms) if sweet else None
    return result


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (the platform's processor elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _repeat(adapter: Adapter, model: Callable[[Any], Any], items: list[Any], device: torch.device, warmup: int,
            repeats: int) -> list[tuple[float, float, float]] | None:
    """``warmup`` untimed runs, then ``repeats`` timed ones; None when the device ran out of memory."""
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                _run_once(adapter, model, items, device)
            return [_run_once(adapter, model, items, device) for _ in range(repeats)]
    except Exception as error:
        if is_out_of_memory(error):
            return None
        raise


def _run_once(adapter: Adapter, model: Callable[[Any], Any], items: list[Any], device: torch.device
              ) -> tuple[float, float, float]:
    """One batch as the executor runs it; (collate, run, split) in ms, synchronised with the device."""
    n = len(items)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, collated, ran = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        inputs = adapter.collate(items, device, n)
        collated.record()
        output = adapter.postprocess(model(inputs), inputs, items)
        if adapter.copy_output_to_host:
            output = map_tensors(copy_to_pinned_host, output)
        ran.record()
        ran.synchronize()
        collate_ms, run_ms = start.elapsed_time(collated), collated.elapsed_time(ran)
    else:
        t0 = time.perf_counter()
        inputs = adapter.collate(items, device, n)
        t1 = time.perf_counter()
        output = adapter.postprocess(model(inputs), inputs, items)
        t2 = time.perf_counter()
        collate_ms, run_ms = (t1 - t0) * 1000.0, (t2 - t1) * 1000.0
    t3 = time.perf_counter()
    check_split(adapter.name, adapter.split(output, items), n)
    return collate_ms, run_ms, (time.perf_counter() - t3) * 1000.0


def _point(n: int, runs: list[tuple[float, float, float]]) -> ProfilePoint:
    totals = [sum(run) for run in runs]
    return ProfilePoint(batch_size=n, collate_ms=statistics.median(r[0] for r in runs),
                        run_ms=statistics.median(r[1] for r in runs), split_ms=statistics.median(r[2] for r in runs),
                        latency_ms=statistics.median(totals), latency_min_ms=min(totals),
                        latency_max_ms=max(totals), repeats=len(runs))


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
