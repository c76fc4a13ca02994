"""Warm-up (one batch of every shape before serving) and the frozen heap while a scheduler serves."""

import gc

import pytest
import torch

from batchplex import BatchPolicy, InvalidRequestError, RequestFailed, Scheduler, UnknownWorkloadError


class SizeRecorder(torch.nn.Module):
    """Doubles its input and remembers the batch size of every call (on the device's executor thread)."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.fail_at = fail_at

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(batch.shape[0])
        if batch.shape[0] == self.fail_at:
            raise RuntimeError(f"no kernel for batch {self.fail_at}")
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
        assert model.sizes == [2, 4, 5, 6]
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
    assert [model.sizes for model in models] == [[1, 4], [1, 4]]


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
