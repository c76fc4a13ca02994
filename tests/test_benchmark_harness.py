"""The benchmarks' load generators: what the open loop keeps alive, reports and raises; when the closed loop's
requests are made."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest
import torch
from benchmarks.harness import GcPauses, KernelBusy, gc_note, latency_target, open_loop, request_pool, saturate


class _Recording:
    """Answers after ``delay_s``; at the 300th request, counts how many earlier requests' tasks are still alive."""

    def __init__(self, delay_s: float = 0.001) -> None:
        self.delay_s = delay_s
        self.tasks: list[weakref.ref] = []
        self.alive_at_300: int | None = None

    async def submit(self, workload: str, item: object) -> object:
        self.tasks.append(weakref.ref(asyncio.current_task()))
        if len(self.tasks) == 300:
            gc.collect()
            self.alive_at_300 = sum(ref() is not None for ref in self.tasks[:-1])
        await asyncio.sleep(self.delay_s)
        return item


async def test_open_loop_keeps_only_requests_in_flight_and_reports_collections() -> None:
    scheduler = _Recording()
    result = await open_loop(scheduler, "w", lambda rng: rng.random(), rate=3000.0, duration_s=0.4)
    assert 600 <= result["requests"] <= 1800  # Poisson arrivals at 3,000/s for 0.4 s
    assert result["p50_ms"] <= result["p99_ms"]
    assert scheduler.alive_at_300 is not None
    # At 3,000/s with 1 ms answers a handful are in flight; a generator holding every task keeps all 299 alive.
    assert scheduler.alive_at_300 < 100
    assert len(result["gc_collections_by_generation"]) == 3
    assert result["gc_longest_pause_ms"] >= 0.0
    assert gc_note(result).startswith("GC ")


async def test_open_loop_raises_the_first_failure_after_the_window() -> None:
    class Failing:
        calls = 0

        async def submit(self, workload: str, item: object) -> object:
            Failing.calls += 1
            if Failing.calls == 5:
                raise ValueError("request 5 failed")
            return item

    with pytest.raises(ValueError, match="request 5 failed"):
        await open_loop(Failing(), "w", lambda rng: 0, rate=2000.0, duration_s=0.1)
    assert Failing.calls > 5  # the window went on after the failure


async def test_closed_loops_sharing_a_window_start_together_and_send_only_their_pool() -> None:
    """Making a request can take milliseconds on the event loop (a random image, a DLRM request): made inside a
    shared window, one workload's requests held back every other workload's submits."""
    loop = asyncio.get_running_loop()
    first_submit: dict[str, float] = {}
    sent: dict[str, set] = {"slow": set(), "fast": set()}

    class Recording:
        async def submit(self, workload: str, item: object) -> object:
            first_submit.setdefault(workload, loop.time())
            sent[workload].add(item)
            await asyncio.sleep(0.001)
            return item

    def slow_request(rng) -> float:
        time.sleep(0.002)  # 32 of them: 64 ms of a blocked loop
        return rng.random()

    pools = {"slow": request_pool(slow_request, concurrency=16), "fast": request_pool(lambda rng: rng.random(), 16)}
    assert len(pools["slow"]) == 32  # two per submitter
    assert len(request_pool(lambda rng: rng.random(), 1000)) == 256
    assert pools["fast"] == request_pool(lambda rng: rng.random(), 16)  # the same requests in every window
    results = await asyncio.gather(*(saturate(Recording(), name, pool, concurrency=16, duration_s=0.2)
                                     for name, pool in pools.items()))
    assert abs(first_submit["slow"] - first_submit["fast"]) < 0.03
    for name, pool in pools.items():
        assert sent[name] <= set(pool)
    assert all(result["requests"] > 16 for result in results)


def test_gc_pauses_counts_a_forced_full_collection() -> None:
    with GcPauses() as pauses:
        gc.collect()
    summary = pauses.summary()
    assert summary["gc_collections_by_generation"][2] >= 1
    assert summary["gc_longest_pause_ms"] > 0.0
    assert pauses._note not in gc.callbacks


def test_latency_target_is_max_wait_plus_two_full_batches() -> None:
    met = latency_target(10.0, max_wait_ms=2.0, batch_ms=4.3)
    assert met["target_ms"] == pytest.approx(10.6)
    assert met["met"] and met["note"].endswith(": met")
    missed = latency_target(10.7, max_wait_ms=2.0, batch_ms=4.3)
    assert not missed["met"] and missed["note"].endswith(": missed")


def test_kernel_busy_measures_nothing_off_cuda_or_when_disabled() -> None:
    with KernelBusy(torch.device("cpu")) as kernels:
        torch.ones(64, 64) @ torch.ones(64, 64)
    assert kernels.fraction is None
    with KernelBusy(torch.device("cuda", 0), enabled=False) as kernels:  # no CUDA call is made when disabled
        pass
    assert kernels.fraction is None


@pytest.mark.gpu
def test_kernel_busy_tells_a_busy_window_from_an_idle_one() -> None:
    device = torch.device("cuda", 0)
    x = torch.randn(4096, 4096, device=device)
    torch.cuda.synchronize(device)
    with KernelBusy(device) as idle:
        time.sleep(0.2)
    with KernelBusy(device) as busy:
        for _ in range(200):
            x = (x @ x).clamp_(-1, 1)
        torch.cuda.synchronize(device)
    assert idle.fraction is not None and busy.fraction is not None
    assert idle.fraction < 0.05
    assert 0.5 < busy.fraction <= 1.0
