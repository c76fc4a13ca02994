"""CUDA graphs (opt-in): replayed results equal eager ones; where capture is impossible, eager with a reason."""

import asyncio
import logging

import pytest
import torch

from batchplex import BatchPolicy, RequestFailed, Scheduler
from batchplex._graphs import GraphedModel
from batchplex.builtin_adapters import TensorAdapter


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()


async def test_graphed_workload_gives_the_eager_results(device, caplog):
    net = model().to(device)
    caplog.set_level(logging.WARNING, logger="batchplex")
    async with Scheduler(autoload=False) as scheduler:
        workload = scheduler.add_workload(
            "g", adapter="tensor", model=net, device=device, cuda_graphs=True,
            policy=BatchPolicy(max_batch_size=8, max_wait_ms=2, preferred_batch_sizes=(1, 4, 8)))
        xs = [torch.randn(8) for _ in range(37)]
        for _ in range(2):  # the second round replays graphs captured in the first
            ys = await asyncio.gather(*(scheduler.submit("g", x) for x in xs))
            with torch.inference_mode():
                expected = net(torch.stack(xs).to(device)).cpu()
            torch.testing.assert_close(torch.stack(ys).cpu(), expected, rtol=1e-4, atol=1e-5)
    (graphed,) = workload.models.values()
    if device.type == "cuda":
        assert graphed.disabled_reason is None
        assert {sig[0][0][0] for sig in graphed.captured_signatures} <= {1, 4, 8}
        assert graphed.captured_signatures
    else:
        assert "not CUDA" in graphed.disabled_reason
        assert "cuda_graphs ignored" in caplog.text


@pytest.mark.gpu
def test_a_model_that_cannot_be_captured_runs_eagerly_with_a_logged_reason(caplog):
    def syncing(batch):
        return batch * float(batch.sum().item())  # .item() syncs the host: illegal during capture

    graphed = GraphedModel(syncing, torch.device("cuda", 0), "sync")
    caplog.set_level(logging.WARNING, logger="batchplex")
    x = torch.ones(4, device="cuda")
    torch.testing.assert_close(graphed(x), syncing(x))
    assert graphed.disabled_reason and "capture failed" in caplog.text
    torch.testing.assert_close(graphed(x), syncing(x))
    # the failed capture must not leave CUDA random numbers broken for everyone else in the process
    assert torch.randint(0, 10, (4,), device="cuda").shape == (4,)


def test_inputs_a_graph_cannot_refill_turn_graphs_off_with_a_reason(caplog):
    class Opaque:  # stands for e.g. a KeyedJaggedTensor: tensors a graph's static inputs cannot be refilled from
        pass

    graphed = GraphedModel(lambda inputs: 1, torch.device("cuda", 0), "opaque")
    graphed.disabled_reason = None  # pretend we are on CUDA: the check happens before any CUDA call
    caplog.set_level(logging.WARNING, logger="batchplex")
    assert graphed({"dense": torch.zeros(2), "ids": Opaque()}) == 1
    assert "Opaque" in graphed.disabled_reason and "CUDA graphs off" in caplog.text


class _AffineAfter(TensorAdapter):
    """A tensor adapter whose postprocess (output * 2 + 1) may be captured in the graph; it counts its Python calls."""

    graph_postprocess = True

    def __init__(self):
        super().__init__()
        self.calls = 0

    def postprocess(self, output, inputs, items):
        self.calls += 1
        return output * 2 + 1


async def test_a_graphable_postprocess_runs_once_per_batch_in_the_graph_or_eagerly(device):
    net = model().to(device)
    affine = _AffineAfter()
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload("g", adapter=affine, model=net, device=device, cuda_graphs=True,
                               policy=BatchPolicy(max_batch_size=8, max_wait_ms=2, preferred_batch_sizes=(8,)))
        xs = [torch.randn(8) for _ in range(8 * 12)]
        ys = await asyncio.gather(*(scheduler.submit("g", x) for x in xs))
        batches = scheduler.statistics()["g"]["batches"]
    with torch.inference_mode():
        expected = net(torch.stack(xs).to(device)).cpu() * 2 + 1  # applied once: twice would give 4x + 3
    torch.testing.assert_close(torch.stack(ys).cpu(), expected, rtol=1e-4, atol=1e-5)
    if device.type == "cuda":  # called while capturing (warm-up runs and the capture), never on a replay
        assert affine.calls < batches
    else:
        assert affine.calls == batches


@pytest.mark.gpu
async def test_replayed_outputs_handed_out_without_a_copy_stay_each_batchs_own():
    """The executor copies a replayed output to host memory before the next replay overwrites it: batches in
    flight together (pipeline depth 3) must each keep their own results."""
    net = model().cuda()
    async with Scheduler(autoload=False, pipeline_depth=3) as scheduler:
        workload = scheduler.add_workload("g", adapter="tensor", model=net, device="cuda", cuda_graphs=True,
                                          policy=BatchPolicy(max_batch_size=4, max_wait_ms=1,
                                                             preferred_batch_sizes=(4,)))
        xs = [torch.full((8,), float(i)) for i in range(400)]
        ys = await asyncio.gather(*(scheduler.submit("g", x) for x in xs))
    (graphed,) = workload.models.values()
    assert not graphed.clone_output and graphed.captured_signatures
    with torch.inference_mode():
        expected = net(torch.stack(xs).cuda()).cpu()
    torch.testing.assert_close(torch.stack(ys).cpu(), expected, rtol=1e-4, atol=1e-5)


class _PoisonAtCollate(_AffineAfter):
    """Fails a batch at collate when it holds a request of value -1: the executor bisects it while other batches
    keep replaying."""

    def collate(self, items, device, batch_size):
        if any(float(item[0]) == -1.0 for item in items):
            raise ValueError("poisoned request")
        return super().collate(items, device, batch_size)


async def test_bisecting_a_failed_batch_beside_replays_keeps_every_result_its_own(device):
    net = model().to(device)
    adapter = _PoisonAtCollate()
    async with Scheduler(autoload=False, pipeline_depth=3) as scheduler:
        workload = scheduler.add_workload("g", adapter=adapter, model=net, device=device, cuda_graphs=True,
                                          policy=BatchPolicy(max_batch_size=8, max_wait_ms=1,
                                                             preferred_batch_sizes=(8,)))
        xs = [torch.full((8,), -1.0 if i % 37 == 5 else float(i)) for i in range(8 * 40)]
        ys = await asyncio.gather(*(scheduler.submit("g", x) for x in xs), return_exceptions=True)
    with torch.inference_mode():
        expected = net(torch.stack(xs).to(device)).cpu() * 2 + 1
    for i, (x, y) in enumerate(zip(xs, ys)):
        if float(x[0]) == -1.0:
            assert isinstance(y, RequestFailed) and "poisoned" in str(y), f"request {i}: {y!r}"
        else:
            torch.testing.assert_close(y.cpu(), expected[i], rtol=1e-4, atol=1e-5, msg=f"request {i}")
    if device.type == "cuda":
        (graphed,) = workload.models.values()
        assert graphed.disabled_reason is None and graphed.captured_signatures


class _FailsOnce(_AffineAfter):
    def postprocess(self, output, inputs, items):
        if self.calls == 0:
            self.calls += 1
            raise RuntimeError("a transient postprocess error")
        return super().postprocess(output, inputs, items)


async def test_a_postprocess_error_fails_its_batch_not_the_graphs(device):
    net = model().to(device)
    async with Scheduler(autoload=False) as scheduler:
        workload = scheduler.add_workload("g", adapter=_FailsOnce(), model=net, device=device, cuda_graphs=True,
                                          policy=BatchPolicy(max_batch_size=8, max_wait_ms=2,
                                                             preferred_batch_sizes=(8,)))
        xs = [torch.randn(8) for _ in range(8 * 6)]
        ys = await asyncio.gather(*(scheduler.submit("g", x) for x in xs))  # the failed batch's halves pass
    with torch.inference_mode():
        expected = net(torch.stack(xs).to(device)).cpu() * 2 + 1
    torch.testing.assert_close(torch.stack(ys).cpu(), expected, rtol=1e-4, atol=1e-5)
    if device.type == "cuda":
        (graphed,) = workload.models.values()
        assert graphed.disabled_reason is None and graphed.captured_signatures
