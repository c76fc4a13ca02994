"""`BatchplexDeployment`: a Ray Serve replica that owns one batchplex `Scheduler` on its own device.

Ray routes each request to a replica; inside the replica every workload's requests wait in batchplex's queues and
are batched together on that replica's device (workloads share it fairly). So that batchplex, not Ray, is where
requests queue, each replica takes up to ``max_ongoing_requests`` concurrent requests (by default the sum of the
workloads' ``max_queue`` and twice their ``max_batch_size``); a full batchplex queue is refused at once.

Callers:

* handles: ``await handle.submit.remote(workload, item, priority=0, timeout=None, **params)`` returns that
  request's result; batchplex errors arrive with their own type (Ray re-raises them as a subclass of the
  original class: ``except QueueFullError`` works) and message. ``handle.statistics.remote()`` returns one
  replica's ``{"replica": id, "workloads": statistics()}``; `collect_statistics` gathers all replicas'.
* HTTP: ``POST <route_prefix>/<workload>`` with a JSON body (`codec`), answered with ``{"result": ...}``;
  ``GET <route_prefix>/stats`` returns the replica's statistics. Errors answer ``{"error": type, "message": ...}``
  with the status in `HTTP_STATUS` (a full queue: 503 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from batchplex import (BatchplexError, DeadlineExceeded, InvalidRequestError, QueueFullError, RequestFailed,
                       RequestTooLargeError, Scheduler, SchedulerClosed, UnknownWorkloadError)
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from .codec import compact_result, decode_item, encode_result
from .spec import WorkloadSpec

__all__ = ["BatchplexDeployment", "HTTP_STATUS", "build_app", "collect_statistics"]

#: HTTP status per batchplex error class (the most specific class listed wins); any other error answers 500.
HTTP_STATUS: dict[type[BaseException], int] = {
    RequestTooLargeError: 413,
    InvalidRequestError: 422,
    UnknownWorkloadError: 404,
    QueueFullError: 503,
    SchedulerClosed: 503,
    DeadlineExceeded: 504,
    RequestFailed: 500,
}


class BatchplexDeployment:
    """One replica: a scheduler with every workload of ``specs`` on ``device``, a handle method and HTTP routes.

    ``device`` ``"cuda"`` means the GPU Ray gave this replica (``ray_actor_options={"num_gpus": 1}`` makes it
    the replica's only visible GPU). ``plugins`` are registered on the scheduler next to the installed ones.
    """

    async def __init__(self, specs: Sequence[WorkloadSpec], device: str = "cpu", plugins: Iterable[object] = (),
                       pipeline_depth: int | None = None) -> None:
        self.device = torch.device(device)
        self.replica_id = _replica_id()
        self.scheduler = Scheduler(plugins, pipeline_depth=pipeline_depth)
        for spec in specs:
            spec.add_to(self.scheduler, self.device)
        await self.scheduler.__aenter__()

    async def submit(self, workload: str, item: Any, *, priority: int = 0, timeout: float | None = None,
                     **params: Any) -> Any:
        """One request's result, batched with whatever else this replica is running (see `compact_result`)."""
        return compact_result(await self.scheduler.submit(workload, item, priority=priority, timeout=timeout,
                                                          **params))

    async def statistics(self) -> dict[str, Any]:
        """This replica's id and its scheduler's ``statistics()``."""
        return {"replica": self.replica_id, "device": str(self.device), "workloads": self.scheduler.statistics()}

    async def __call__(self, request: Request) -> JSONResponse:
        """HTTP: ``POST .../<workload>`` runs one request, ``GET .../stats`` reports statistics."""
        name = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method == "GET" and name == "stats":
            return JSONResponse(await self.statistics())
        if request.method != "POST":
            return _error_response(405, "MethodNotAllowed", "POST <route>/<workload> or GET <route>/stats")
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict) or "item" not in body:
                raise ValueError("the body must be a JSON object with an 'item' member")
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            return _error_response(400, "BadRequest", str(error))
        try:
            result = await self.scheduler.submit(name, decode_item(body["item"]), priority=body.get("priority", 0),
                                                 timeout=body.get("timeout"), **body.get("params", {}))
        except BatchplexError as error:
            return _error_response(_status(error), type(error).__name__, str(error),
                                   {"Retry-After": "1"} if isinstance(error, QueueFullError) else None)
        return JSONResponse({"result": encode_result(result)})

    async def __del__(self) -> None:
        """Ray calls this when the replica stops: run what was accepted, then join the scheduler's threads."""
        await self.scheduler.aclose(drain=True)


def build_app(specs: Sequence[WorkloadSpec], *, num_replicas: int = 1, device: str = "cpu",
              name: str = "batchplex", plugins: Iterable[object] = (), max_ongoing_requests: int | None = None,
              ray_actor_options: dict[str, Any] | None = None, pipeline_depth: int | None = None) -> serve.Application:
    """A Serve application of ``num_replicas`` replicas, each with one scheduler running all ``specs``.

    On ``device="cuda"`` each replica asks Ray for one GPU (``num_gpus: 1``) unless ``ray_actor_options`` says
    otherwise; on the CPU for one CPU. Run it with ``serve.run(app, route_prefix="/...")``.
    """
    specs = list(specs)
    names = [spec.name for spec in specs]
    if not specs or len(set(names)) != len(names) or "stats" in names:
        raise ValueError(f"specs must name distinct workloads other than 'stats', got {names!r}")
    options = dict(ray_actor_options or {})
    if torch.device(device).type == "cuda":
        options.setdefault("num_gpus", 1)
    else:
        options.setdefault("num_cpus", 1)
    if max_ongoing_requests is None:
        max_ongoing_requests = sum(spec.policy.max_queue + 2 * spec.policy.max_batch_size for spec in specs)
    deployment = serve.deployment(BatchplexDeployment, name=name).options(
        num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests, ray_actor_options=options)
    return deployment.bind(specs, device, list(plugins), pipeline_depth)


async def collect_statistics(handle: DeploymentHandle, num_replicas: int, *, timeout_s: float = 10.0,
                             fan_out: int = 8) -> dict[str, dict[str, Any]]:
    """``{replica id: statistics}`` from ``num_replicas`` distinct replicas.

    Ray picks the replica of each call, so this sends rounds of ``fan_out`` concurrent calls until it has heard
    from ``num_replicas`` replicas; it raises `TimeoutError` after ``timeout_s`` naming those it reached (e.g.
    when a replica is stuck or the deployment has fewer replicas than asked). Snapshots are taken at slightly
    different moments.
    """
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < num_replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"statistics reached {len(seen)} of {num_replicas} replicas in {timeout_s}s: "
                               f"{sorted(seen)}")
        for report in await asyncio.gather(*(handle.statistics.remote() for _ in range(fan_out))):
            seen.setdefault(report["replica"], report)
    return seen


def _status(error: BaseException) -> int:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def _error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message}, status_code=status, headers=headers)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # outside a Serve replica (e.g. constructed directly)
        return "local"
