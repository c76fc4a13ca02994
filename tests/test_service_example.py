"""The example HTTP service (examples/service.py) on 127.0.0.1 under concurrent load: every response is that
request's own result (equal to the request run alone), bad input gets 422 with the rule, the others still pass."""

import asyncio
import random
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from examples.service import IMAGE_SIDE, build_models, create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def service():
    models = build_models()
    app = create_app(models)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive()


def alone(app, workload, item):
    """The reference: this request collated alone (a batch of one) and run by the same model."""
    w = app.state.scheduler.workloads[workload]
    device, model = next(iter(w.models.items()))
    prepared = [w.adapter.prepare(item)]
    with torch.inference_mode():
        inputs = w.adapter.collate(prepared, device, 1)
        return w.adapter.split(w.adapter.postprocess(model(inputs), inputs, prepared), prepared)[0]


def requests(rng):
    made = []
    for i in range(48):
        kind = ("classify", "embed", "rank")[i % 3]
        if kind == "classify":
            pixels = torch.randint(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=torch.uint8)
            made.append((kind, {"pixels": pixels.tolist()}, pixels))
        elif kind == "embed":
            text = " ".join(rng.choice(["batch", "queue", "token", "model"]) for _ in range(rng.randint(1, 60)))
            made.append((kind, {"text": text}, text))
        else:
            sparse = {f"cat_{k}": [rng.randrange(1000) for _ in range(rng.randint(0, 5))] for k in range(26)}
            dense = [rng.random() for _ in range(13)]
            made.append((kind, {"sparse": sparse, "dense": dense}, {"sparse": sparse, "dense": dense}))
    return made


def test_concurrent_clients_each_get_their_own_result_and_bad_input_fails_alone(service):
    base, app = service
    made = requests(random.Random(0))
    bad = [("embed", {"text": 42}), ("classify", {"pixels": [[[1, 2]]]}),
           ("rank", {"sparse": {"nope": [1]}, "dense": [0.0] * 13})]

    async def drive():
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            calls = [client.post(f"/{kind}", json=body) for kind, body, _ in made]
            calls += [client.post(f"/{kind}", json=body) for kind, body in bad]
            responses = await asyncio.gather(*calls)
            stats = (await client.get("/stats")).json()
        return responses, stats

    responses, stats = asyncio.run(drive())
    good, refused = responses[:len(made)], responses[len(made):]
    for (kind, _, item), response in zip(made, good):
        assert response.status_code == 200, response.text
        expected = alone(app, kind, item)
        got = torch.tensor(next(iter(response.json().values())))
        torch.testing.assert_close(got, expected.float().reshape(got.shape), rtol=1e-4, atol=1e-4)
    for response in refused:
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "InvalidRequestError" and response.json()["rule"]
    assert all(stats[w]["completed"] == 16 for w in ("classify", "embed", "rank"))
    assert max(stats[w]["mean_batch_size"] for w in ("classify", "embed", "rank")) > 1
