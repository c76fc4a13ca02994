"""The ranking adapter through a real Scheduler with torchrec's DLRM (random weights, Criteo-like 26 sparse + 13
dense features): batched scores equal each request run alone, bad requests fail alone at submit, and the cost
budget bounds the samples of a batch."""

import asyncio
import random

import batchplex_recsys
import pytest
import torch
from batchplex import BatchPolicy, InvalidRequestError, RequestTooLargeError, Scheduler
from batchplex.testing import BatchLog, assert_same_result, scripting
from batchplex_recsys import RankingAdapter, RankingRequest, table_sizes_of
from batchplex_recsys.criteo import DENSE_DIM, SPARSE_KEYS, build_dlrm, random_request


def tolerance(device):
    """Batched vs alone: the same float32 kernels on the CPU; cuBLAS may pick another algorithm per batch size."""
    return {"rtol": 1e-5, "atol": 1e-6} if device.type == "cpu" else {"rtol": 1e-4, "atol": 1e-5}


def indexed(device):
    """The device with its index: the device executor calls torch.cuda.set_device, which refuses a bare 'cuda'."""
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


def options(model, table_sizes=None, **extra):
    return {"keys": SPARSE_KEYS, "table_sizes": table_sizes or table_sizes_of(model), "dense_dim": DENSE_DIM,
            **extra}


def alone(adapter, model, request, device):
    """The request run by itself: collate a batch of one, run the model, split."""
    item = adapter.prepare(request)
    with torch.inference_mode():
        output = model(adapter.collate([item], device, 1))
    return adapter.split(output, [item])[0]


async def run(requests, model, device, policy, *, log=None, **extra):
    device = indexed(device)
    async with Scheduler(autoload=False, plugins=[batchplex_recsys, *([log] if log else [])]) as scheduler:
        scheduler.add_workload("dlrm", adapter="ranking", adapter_options=options(model, **extra), model=model,
                               device=device, policy=policy)
        results = await asyncio.gather(*(scheduler.submit("dlrm", request) for request in requests),
                                       return_exceptions=True)
        return results, scheduler.statistics()["dlrm"]


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
async def test_dlrm_scores_batched_equal_each_request_alone(device, weighted):
    model = build_dlrm(weighted=weighted)
    weighted_keys = SPARSE_KEYS[::4] if weighted else ()
    rng = random.Random(0)
    requests = [random_request(rng, samples=rng.choice((None, None, 2, 6)), weighted=weighted_keys)
                for _ in range(24)]
    requests[5] = RankingRequest({}, requests[5].dense)  # no ids at all
    requests[9] = RankingRequest({key: [] for key in SPARSE_KEYS[:10]}, torch.zeros(DENSE_DIM))
    results, stats = await run(requests, model, device, BatchPolicy(max_batch_size=16, max_wait_ms=50),
                               weighted_keys=weighted_keys)
    assert stats["completed"] == 24 and stats["failed"] == 0
    assert stats["mean_batch_size"] > 1
    adapter = RankingAdapter().configure(**options(model, weighted_keys=weighted_keys))
    for index, (request, result) in enumerate(zip(requests, results)):
        assert_same_result(result, alone(adapter, model, request, device), where=f"request {index}",
                           **tolerance(device))
        samples = request.dense.shape[0] if request.dense.dim() == 2 else None
        assert result.shape == ((samples, 1) if samples else (1,)) and result.device.type == "cpu"


async def test_a_batch_whose_requests_have_no_ids(device):
    model = build_dlrm()
    requests = [{"sparse": {}, "dense": [float(i)] * DENSE_DIM} for i in range(6)]
    results, stats = await run(requests, model, device, BatchPolicy(max_batch_size=8, max_wait_ms=50))
    assert stats["completed"] == 6 and stats["mean_batch_size"] > 1
    adapter = RankingAdapter().configure(**options(model))
    for request, result in zip(requests, results):
        assert_same_result(result, alone(adapter, model, request, device), **tolerance(device))


BAD = [
    ({"sparse": {"cat_0": [1], "no_such_feature": [2]}}, "known feature key", "no_such_feature"),
    ({"sparse": {"cat_7": [999, 1000]}}, "ids < table size", 1000),
    ({"sparse": {"cat_2": [4, -1]}}, "ids >= 0", -1),
    ({"sparse": {"cat_3": [1.0, 2.0]}}, "integer ids", 1.0),
    ({"sparse": {"cat_4": [1]}, "dense": [0.0] * (DENSE_DIM - 1)}, "dense length", DENSE_DIM - 1),
    ({"sparse": {"cat_5": [1]}, "dense": [float("nan")] + [0.0] * (DENSE_DIM - 1)}, "finite dense values", None),
]


async def test_bad_requests_fail_at_submit_and_the_rest_of_the_batch_succeeds(device):
    model = build_dlrm()
    rng = random.Random(1)
    good = [random_request(rng) for _ in range(8)]
    bad = [{"dense": [0.5] * DENSE_DIM, **request} for request, _, _ in BAD]
    mixed = [request for pair in zip(good, bad + [None] * 2) for request in pair if request is not None]
    results, stats = await run(mixed, model, device, BatchPolicy(max_batch_size=16, max_wait_ms=50))
    errors = [result for result in results if isinstance(result, BaseException)]
    assert [type(error) for error in errors] == [InvalidRequestError] * len(BAD)
    for error, (_, rule, value) in zip(errors, BAD):
        assert error.workload == "dlrm" and error.rule == rule and "dlrm" in str(error)
        if value is not None:
            assert error.value == value
    assert stats["completed"] == len(good) and stats["failed"] == 0 and stats["rejected_invalid"] == len(BAD)
    assert stats["mean_batch_size"] > 1
    adapter = RankingAdapter().configure(**options(model))
    scores = [result for result in results if not isinstance(result, BaseException)]
    for request, result in zip(good, scores):
        assert_same_result(result, alone(adapter, model, request, device), **tolerance(device))


async def test_max_batch_cost_bounds_the_samples_of_a_batch():
    model = build_dlrm()
    rng = random.Random(2)
    requests = [random_request(rng, samples=n) for n in (3, 3, 1, 3, 2, 3, 1, 3)]
    log = BatchLog()
    policy = BatchPolicy(max_batch_size=64, max_batch_cost=8, max_wait_ms=50)
    results, stats = await run([*requests, random_request(rng, samples=9)], model, torch.device("cpu"), policy,
                               log=log)
    assert isinstance(results[-1], RequestTooLargeError)
    assert [tuple(result.shape) for result in results[:-1]] == [(n, 1) for n in (3, 3, 1, 3, 2, 3, 1, 3)]
    assert all(record.cost <= 8 for record in log.records) and len(log.records) >= 3
    assert sum(record.cost for record in log.records) == 19 and max(r.size for r in log.records) > 1


@pytest.mark.gpu
async def test_cuda_graphs_fall_back_to_eager_runs_for_jagged_batches():
    device = indexed(torch.device("cuda"))
    model = build_dlrm()
    rng = random.Random(3)
    requests = [random_request(rng) for _ in range(40)]
    async with Scheduler(autoload=False, plugins=[batchplex_recsys]) as scheduler:
        scheduler.add_workload("dlrm", adapter="ranking", adapter_options=options(model), model=model,
                               device=device, cuda_graphs=True,
                               policy=BatchPolicy(max_batch_size=8, preferred_batch_sizes=(8,), max_wait_ms=20))
        results = await asyncio.gather(*(scheduler.submit("dlrm", request) for request in requests))
        assert "KeyedJaggedTensor" in scheduler.workloads["dlrm"].models[device].disabled_reason
    adapter = RankingAdapter().configure(**options(model))
    for request, result in zip(requests, results):
        assert_same_result(result, alone(adapter, model, request, device), **tolerance(device))


async def test_a_scripted_dlrm_scores_as_the_eager_one(device):
    model = build_dlrm()
    rng = random.Random(3)
    requests = [random_request(rng, samples=rng.choice((None, 4))) for _ in range(12)]
    with scripting():
        scripted = model.scripted()
        assert isinstance(scripted.module, torch.jit.ScriptModule) and not scripted.training
        with pytest.raises(ValueError, match="from the eager model"):  # not an empty dict: no range check
            table_sizes_of(scripted)
        results, stats = await run(requests, scripted, device, BatchPolicy(max_batch_size=8, max_wait_ms=50),
                                   table_sizes=table_sizes_of(model))
    assert stats["completed"] == 12 and stats["mean_batch_size"] > 1
    adapter = RankingAdapter().configure(**options(model))
    for index, (request, result) in enumerate(zip(requests, results)):
        assert_same_result(result, alone(adapter, model.to(indexed(device)), request, indexed(device)),
                           where=f"request {index}", **tolerance(device))
