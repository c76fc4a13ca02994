"""batchplex inside Ray Serve: two CPU replicas, a vision and an NLP workload batched together in each, driven
through deployment handles and over HTTP on 127.0.0.1; every request gets its own result (compared with the same
workload run alone, one request per batch, atol 1e-5), bad requests fail alone with their type and status, and a
small queue in front of a slow model answers 503 instead of hanging."""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import httpx
import numpy as np
import pytest
import ray
import torch
from batchplex import BatchPolicy, InvalidRequestError, QueueFullError, RequestFailed, Scheduler
from batchplex_nlp import HFModel
from batchplex_nlp.testing import minilm_dir, tiny_bert
from batchplex_ray import WorkloadSpec, build_app, collect_statistics, encode_image
from ray import serve
from transformers import AutoTokenizer

pytestmark = pytest.mark.ray

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # replicas cannot import this test module

ATOL = 1e-5
SIDE = 32
TEXTS = ["a short one", "batching requests together on one device", "ray routes, batchplex batches",
         "hello", "the quick brown fox jumps over the lazy dog again and again", "tiny"]


def tiny_cnn(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval().to(device)


def tiny_encoder(device: torch.device) -> torch.nn.Module:
    return HFModel(tiny_bert()).to(device)


def slow_double(device: torch.device):
    def run(batch: torch.Tensor) -> torch.Tensor:
        time.sleep(0.2)
        return batch * 2
    return run


def refuse_negative(device: torch.device):
    """Fails any batch holding a negative number: batchplex bisects and fails only that request."""
    def run(batch: torch.Tensor) -> torch.Tensor:
        if (batch < 0).any():
            raise ValueError("negative input")
        return batch + 1
    return run


def specs() -> list[WorkloadSpec]:
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    return [
        WorkloadSpec("classify", "image", tiny_cnn, {"size": (SIDE, SIDE)}, BatchPolicy(max_batch_size=8,
                                                                                        max_wait_ms=5)),
        WorkloadSpec("embed", "text", tiny_encoder, {"tokenizer": tokenizer}, BatchPolicy(max_batch_size=8,
                                                                                           max_wait_ms=5)),
        WorkloadSpec("picky", "tensor", refuse_negative, {"shape": (4,)}, BatchPolicy(max_batch_size=8,
                                                                                       max_wait_ms=5)),
        WorkloadSpec("slow", "tensor", slow_double, {"shape": (2,)}, BatchPolicy(max_batch_size=1, max_queue=2)),
    ]


def images(n: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, SIDE, SIDE), dtype=torch.uint8, generator=generator) for _ in range(n)]


async def alone(workload: str, items: list) -> list[torch.Tensor]:
    """Each item run alone (a batch of one) through a local scheduler with the same workload."""
    async with Scheduler() as scheduler:
        next(spec for spec in specs() if spec.name == workload).add_to(scheduler, torch.device("cpu"))
        return [await scheduler.submit(workload, item) for item in items]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(build_app(specs(), num_replicas=2), route_prefix="/bp", blocking=False)
        yield handle, f"http://127.0.0.1:{port}/bp"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_handles_and_http_give_each_request_its_own_result(served):
    handle, base = served
    pictures = images(12, seed=1)

    async def drive():
        calls = [handle.submit.remote("classify", image) for image in pictures[:6]]
        calls += [handle.submit.remote("embed", text) for text in TEXTS]
        async with httpx.AsyncClient(timeout=30) as client:
            posts = [client.post(f"{base}/classify", json={"item": encode_image(image.permute(1, 2, 0))})
                     for image in pictures[6:9]]
            posts += [client.post(f"{base}/classify", json={"item": {"tensor": image.tolist(), "dtype": "uint8"}})
                      for image in pictures[9:]]
            posts += [client.post(f"{base}/embed", json={"item": text}) for text in TEXTS]
            return await asyncio.gather(*calls), await asyncio.gather(*posts)

    by_handle, by_http = asyncio.run(asyncio.wait_for(drive(), 60))
    want_images = asyncio.run(alone("classify", pictures))
    want_texts = asyncio.run(alone("embed", TEXTS))
    for got, want in zip(by_handle, want_images[:6] + want_texts):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert got.untyped_storage().nbytes() == got.numel() * got.element_size()  # not its batch's whole output
    assert all(response.status_code == 200 for response in by_http), [r.text for r in by_http]
    for response, want in zip(by_http, want_images[6:] + want_texts):
        np.testing.assert_allclose(response.json()["result"], want.numpy(), atol=ATOL, rtol=0)

    reports = asyncio.run(collect_statistics(handle, 2))
    assert len(reports) == 2
    completed = sum(report["workloads"]["classify"]["completed"] for report in reports.values())
    assert completed == 12  # every image ran, on one replica or the other
    response = httpx.get(f"{base}/stats", timeout=10)
    assert response.status_code == 200 and response.json()["replica"] in reports


def test_bad_requests_fail_alone_with_their_type_and_status(served):
    handle, base = served
    good = torch.tensor([1.0, 2.0, 3.0, 4.0])

    async def drive():
        calls = [handle.submit.remote("picky", good), handle.submit.remote("picky", -good),
                 handle.submit.remote("classify", torch.zeros(4, SIDE, SIDE, dtype=torch.uint8)),
                 handle.submit.remote("picky", good + 1)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        async with httpx.AsyncClient(timeout=30) as client:
            posts = await asyncio.gather(
                client.post(f"{base}/picky", json={"item": {"tensor": [1, 2, 3, 4], "dtype": "float32"}}),
                client.post(f"{base}/picky", json={"item": {"tensor": [-1, 2, 3, 4], "dtype": "float32"}}),
                client.post(f"{base}/embed", json={"item": ""}),
                client.post(f"{base}/classify", json={"item": {"base64": "AAAA", "shape": [5, 5, 3]}}),
                client.post(f"{base}/nosuch", json={"item": 1}),
                client.post(f"{base}/embed", content=b"not json"))
        return results, posts

    results, posts = asyncio.run(asyncio.wait_for(drive(), 60))
    torch.testing.assert_close(results[0], good + 1)
    assert isinstance(results[1], RequestFailed) and "negative input" in str(results[1])
    assert isinstance(results[2], InvalidRequestError) and "classify" in str(results[2])
    torch.testing.assert_close(results[3], good + 2)
    assert [post.status_code for post in posts] == [200, 500, 422, 422, 404, 400], [p.text for p in posts]
    assert posts[0].json()["result"] == [2.0, 3.0, 4.0, 5.0]
    assert [posts[i].json()["error"] for i in (1, 2, 4)] == ["RequestFailed", "InvalidRequestError",
                                                            "UnknownWorkloadError"]


def test_overload_is_refused_at_once(served):
    handle, base = served

    async def drive():
        async with httpx.AsyncClient(timeout=30) as client:
            posts = [client.post(f"{base}/slow", json={"item": [1.0, 2.0]}) for _ in range(16)]
            answers = await asyncio.gather(*posts)
        calls = await asyncio.gather(*(handle.submit.remote("slow", torch.ones(2)) for _ in range(16)),
                                     return_exceptions=True)
        return answers, calls

    started = time.monotonic()
    answers, calls = asyncio.run(asyncio.wait_for(drive(), 60))
    assert time.monotonic() - started < 30
    statuses = [answer.status_code for answer in answers]
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}, statuses
    refused = next(answer for answer in answers if answer.status_code == 503)
    assert refused.json()["error"] == "QueueFullError" and refused.headers["retry-after"] == "1"
    assert all(answer.json()["result"] == [2.0, 4.0] for answer in answers if answer.status_code == 200)
    assert any(isinstance(call, QueueFullError) for call in calls)
    assert all(isinstance(call, QueueFullError) or torch.equal(call, torch.full((2,), 2.0)) for call in calls)
