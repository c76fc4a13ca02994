"""Warm-up (one batch of every shape before serving) and the frozen heap while a scheduler serves."""

import asyncio
import gc
import time

import pytest
import torch
from batchplex import (
    BatchPolicy,
    InvalidRequestError,
    RequestFailed,
    Scheduler,
    SchedulerClosed,
    UnknownWorkloadError,
)


class SizeRecorder(torch.nn.Module):
    """Doubles its input and remembers the batch size of every call (on the device's executor thread)."""

    def __init__(self, fail_at: int | None = None, memory_for: int | None = None, seconds: float = 0.0) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.fail_at = fail_at
        self.memory_for = memory_for
        self.seconds = seconds

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(batch.shape[0])
        time.sleep(self.seconds)
        if batch.shape[0] == self.fail_at:
            raise RuntimeError(f"no kernel for batch {self.fail_at}")
        if self.memory_for is not None and batch.shape[0] > self.memory_for:
            raise torch.OutOfMemoryError(f"batch {batch.shape[0]} does not fit")
        return batch * 2


def test_batch_shapes_are_the_padded_sizes_a_policy_can_produce():
    assert BatchPolicy(max_batch_size=6, preferred_batch_sizes=(2, 4)).batch_shapes == (2, 4, 5, 6)
    assert BatchPolicy.static(8).batch_shapes == (8,)
    assert BatchPolicy(max_batch_size=3).batch_shapes == (1, 2, 3)


async def test_warmup_runs_each_shape_once_outside_the_statistics(device):
    model = SizeRecorder()
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload("w", adapter="tensor", model=model, device=device,
                               policy=BatchPolicy(max_batch_size=6, preferred_batch_sizes=(2, 4)))
        took = await scheduler.warmup("w", torch.ones(3))
        assert sorted(took) == [2, 4, 5, 6] and all(seconds > 0 for seconds in took.values())
        assert model.sizes == [6, 5, 4, 2]  # largest first: with cuda_graphs they get the few graphs
        stats = scheduler.statistics()["w"]
        assert (stats["submitted"], stats["completed"], stats["batches"], stats["in_flight"]) == (0, 0, 0, 0)
        assert scheduler.workloads["w"].device_time == 0.0
        result = await scheduler.submit("w", torch.full((3,), 1.5))  # serving afterwards is unaffected
        torch.testing.assert_close(result.cpu(), torch.full((3,), 3.0))


async def test_warmup_on_every_device_of_a_workload():
    models = [SizeRecorder(), SizeRecorder()]
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload("w", adapter="tensor", model=models, device=["cpu", "cpu:1"],
                               policy=BatchPolicy(max_batch_size=4))
        await scheduler.warmup("w", torch.ones(2), batch_sizes=[1, 4])
    assert [model.sizes for model in models] == [[4, 1], [4, 1]]


async def test_warmup_skips_batches_over_the_cost_budget():
    model = SizeRecorder()
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload("w", adapter="tensor", model=model,
                               policy=BatchPolicy(max_batch_size=6, max_batch_cost=4))
        assert sorted(await scheduler.warmup("w", torch.ones(2))) == [1, 2, 3, 4]
    assert model.sizes == [4, 3, 2, 1]


async def test_an_out_of_memory_error_in_warmup_lowers_the_limit_and_warmup_goes_on():
    model = SizeRecorder(memory_for=3)
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload("w", adapter="tensor", model=model, policy=BatchPolicy(max_batch_size=6))
        await scheduler.warmup("w", torch.ones(2))
        assert scheduler.statistics()["w"]["max_batch_size_now"] == 3
    assert model.sizes == [6, 3, 3, 3, 2, 1]  # 6 failed, ran as two halves; 5 and 4 skipped


async def test_closing_during_warmup_neither_hangs_nor_loses_the_running_batch():
    model = SizeRecorder(seconds=0.2)
    scheduler = Scheduler(autoload=False)
    scheduler.add_workload("w", adapter="tensor", model=model, policy=BatchPolicy(max_batch_size=4))
    await scheduler.__aenter__()
    warming = asyncio.create_task(scheduler.warmup("w", torch.ones(2)))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(scheduler.aclose(), 5)
    with pytest.raises(SchedulerClosed):
        await asyncio.wait_for(warming, 5)
    assert model.sizes == [4], "the batch running at close finished; no later one started"


async def test_warmup_refuses_bad_input_and_names_a_failing_size():
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload("w", adapter="tensor", model=SizeRecorder(fail_at=3),
                               policy=BatchPolicy(max_batch_size=4), adapter_options={"shape": (2,)})
        with pytest.raises(InvalidRequestError, match="shape"):
            await scheduler.warmup("w", torch.ones(5))
        with pytest.raises(ValueError, match="batch_sizes must be ints from 1 to max_batch_size"):
            await scheduler.warmup("w", torch.ones(2), batch_sizes=[0, 5])
        with pytest.raises(UnknownWorkloadError):
            await scheduler.warmup("nope", torch.ones(2))
        with pytest.raises(RequestFailed, match="warm-up batch of 3 on cpu failed: RuntimeError: no kernel"):
            await scheduler.warmup("w", torch.ones(2))


@pytest.mark.gpu
async def test_warmup_captures_every_graph_before_traffic():
    net = torch.nn.Linear(8, 4).cuda().eval()
    async with Scheduler(autoload=False) as scheduler:
        workload = scheduler.add_workload("g", adapter="tensor", model=net, device="cuda", cuda_graphs=True,
                                          policy=BatchPolicy(max_batch_size=8, preferred_batch_sizes=(2, 8)))
        await scheduler.warmup("g", torch.randn(8))
        graphed = workload.models[torch.device("cuda", 0)]
        assert graphed.disabled_reason is None
        assert sorted(signature[0][0][0] for signature in graphed.captured_signatures) == [2, 8]


async def test_the_heap_is_frozen_while_a_scheduler_serves_and_released_by_the_last_one():
    assert gc.get_freeze_count() == 0
    async with Scheduler(autoload=False) as first:
        assert gc.get_freeze_count() > 0
        async with Scheduler(autoload=False):
            pass
        assert gc.get_freeze_count() > 0, "a second scheduler's close must not unfreeze the first one's heap"
        assert first.freeze_gc
    assert gc.get_freeze_count() == 0
    async with Scheduler(autoload=False, freeze_gc=False):
        assert gc.get_freeze_count() == 0


async def test_an_application_s_own_freeze_outlives_the_scheduler():
    gc.freeze()  # e.g. before forking workers, so that their pages stay shared
    try:
        async with Scheduler(autoload=False):
            pass
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
