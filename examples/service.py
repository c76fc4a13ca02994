"""A small HTTP inference service: image classification, sentence embeddings and ranking behind one batchplex
scheduler, so requests from many clients are batched per workload and share one device.

    .venv/bin/uvicorn examples.service:create_app --factory --host 127.0.0.1 --port 8000
    curl -s 127.0.0.1:8000/embed -H 'content-type: application/json' -d '{"text": "a sentence"}'

Errors keep their meaning over HTTP: bad input -> 422 (with the rule and the value), a full queue -> 503, a
deadline passed in the queue -> 504, the model failing on this request -> 500.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import torch
import torchvision
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import batchplex
from batchplex import BatchPolicy, Scheduler
from batchplex_nlp import HFModel
from batchplex_nlp.testing import load_minilm
from batchplex_recsys.criteo import DENSE_DIM, SPARSE_KEYS, build_dlrm
from batchplex_recsys.model import table_sizes_of

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":  # the models run on the GPU: batching's host-side tensor work is faster on one thread
    torch.set_num_threads(1)
IMAGE_SIDE = 64


class ImageIn(BaseModel):
    pixels: list[list[list[int]]]  # height x width x 3, values 0-255


class TextIn(BaseModel):
    text: Any  # validated by the text adapter, so a wrong type gets batchplex's typed error


class RankIn(BaseModel):
    sparse: dict[str, list[int]]
    dense: list[float]


def build_models() -> dict[str, Any]:
    """The three models with random (classifier, ranker) or real (MiniLM, where installed) weights."""
    torch.manual_seed(0)
    tokenizer, encoder = load_minilm(random_weights=False, device=DEVICE)
    return {"classifier": torchvision.models.resnet18(weights=None, num_classes=10).eval().to(DEVICE),
            "tokenizer": tokenizer, "encoder": encoder.eval(), "ranker": build_dlrm().to(DEVICE)}


def add_workloads(scheduler: Scheduler, models: dict[str, Any]) -> None:
    scheduler.add_workload("classify", adapter="image", model=models["classifier"], device=DEVICE,
                           adapter_options={"size": (IMAGE_SIDE, IMAGE_SIDE)},
                           policy=BatchPolicy(max_batch_size=32, max_wait_ms=5, max_queue=256))
    scheduler.add_workload("embed", adapter="text", model=HFModel(models["encoder"]), device=DEVICE,
                           adapter_options={"tokenizer": models["tokenizer"], "output": "mean_pooling",
                                            "max_length": 256},
                           policy=BatchPolicy(max_batch_size=32, max_wait_ms=5, max_queue=256,
                                              bucket_edges=(16, 32, 64, 128, 256)))
    scheduler.add_workload("rank", adapter="ranking", model=models["ranker"], device=DEVICE,
                           adapter_options={"keys": SPARSE_KEYS, "table_sizes": table_sizes_of(models["ranker"]),
                                            "dense_dim": DENSE_DIM},
                           policy=BatchPolicy(max_batch_size=64, max_wait_ms=5, max_queue=512))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with Scheduler() as scheduler:
        add_workloads(scheduler, app.state.models)
        app.state.scheduler = scheduler
        yield  # leaving drains every accepted request before the server stops


def create_app(models: dict[str, Any] | None = None) -> FastAPI:
    """The service; ``models`` lets tests share the models they compare against."""
    app = FastAPI(title="batchplex example service", lifespan=lifespan)
    app.state.models = models or build_models()

    @app.exception_handler(batchplex.BatchplexError)
    async def batchplex_error(_: Request, error: batchplex.BatchplexError) -> JSONResponse:
        status = {batchplex.InvalidRequestError: 422, batchplex.QueueFullError: 503,
                  batchplex.DeadlineExceeded: 504, batchplex.SchedulerClosed: 503}
        code = next((code for kind, code in status.items() if isinstance(error, kind)), 500)
        return JSONResponse(status_code=code, content={
            "error": type(error).__name__, "message": str(error),
            "rule": getattr(error, "rule", None), "value": repr(getattr(error, "value", None))})

    @app.post("/classify")
    async def classify(body: ImageIn) -> dict[str, list[float]]:
        image = torch.tensor(body.pixels, dtype=torch.uint8) if body.pixels else torch.empty(0, dtype=torch.uint8)
        logits = await app.state.scheduler.submit("classify", image)
        return {"logits": logits.float().tolist()}

    @app.post("/embed")
    async def embed(body: TextIn) -> dict[str, list[float]]:
        vector = await app.state.scheduler.submit("embed", body.text)
        return {"embedding": vector.float().tolist()}

    @app.post("/rank")
    async def rank(body: RankIn) -> dict[str, float]:
        score = await app.state.scheduler.submit("rank", {"sparse": body.sparse, "dense": body.dense})
        return {"score": float(score.reshape(-1)[0])}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return app.state.scheduler.statistics()

    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(create_app(), host="127.0.0.1", port=8000)
