"""Several GPUs: one model replica per device, and each batch goes to whichever device is free.

Needs two or more CUDA devices. The CPU twin is `test_scheduler.test_a_workload_on_two_devices_uses_both_replicas`
("cpu" and "cpu:0" are two lanes there).
"""

import asyncio
import copy
from collections import Counter

import pytest
import torch
from batchplex import BatchPolicy, Scheduler

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA devices")]


def all_gpus() -> list[torch.device]:
    return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]


async def test_a_workload_spreads_over_every_gpu_and_each_request_gets_its_own_answer():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4)).eval()
    reference = copy.deepcopy(net)
    batches_on: Counter = Counter()
    xs = [torch.randn(16) for _ in range(600)]
    async with Scheduler(autoload=False) as scheduler:
        workload = scheduler.add_workload("w", adapter="tensor", model=net, device=all_gpus(),
                                          policy=BatchPolicy(max_batch_size=8, max_wait_ms=1))
        for device, replica in workload.models.items():
            assert next(replica.parameters()).device == device
            replica.register_forward_pre_hook(lambda module, args: batches_on.update([args[0].device]))
        ys = await asyncio.gather(*(scheduler.submit("w", x) for x in xs))
        stats = scheduler.statistics()["w"]
    with torch.inference_mode():
        expected = reference(torch.stack(xs))
    torch.testing.assert_close(torch.stack([y.cpu() for y in ys]), expected, rtol=1e-4, atol=1e-5)
    assert set(batches_on) == set(all_gpus()), batches_on
    assert min(batches_on.values()) >= 2 and stats["completed"] == len(xs)


async def test_two_workloads_share_two_gpus_without_mixing_their_results():
    torch.manual_seed(1)
    doubler = torch.nn.Linear(4, 4, bias=False).eval()
    with torch.no_grad():
        doubler.weight.copy_(2 * torch.eye(4))
    negator = copy.deepcopy(doubler)
    with torch.no_grad():
        negator.weight.copy_(-torch.eye(4))
    gpus = all_gpus()[:2]
    async with Scheduler(autoload=False) as scheduler:
        scheduler.add_workload("double", adapter="tensor", model=doubler, device=gpus,
                               policy=BatchPolicy(max_batch_size=16, max_wait_ms=1))
        scheduler.add_workload("negate", adapter="tensor", model=negator, device=list(reversed(gpus)),
                               policy=BatchPolicy(max_batch_size=16, max_wait_ms=1))
        xs = [torch.randn(4) for _ in range(300)]
        doubled, negated = await asyncio.gather(
            asyncio.gather(*(scheduler.submit("double", x) for x in xs)),
            asyncio.gather(*(scheduler.submit("negate", x) for x in xs)))
    for x, d, n in zip(xs, doubled, negated):
        torch.testing.assert_close(d.cpu(), 2 * x)
        torch.testing.assert_close(n.cpu(), -x)
