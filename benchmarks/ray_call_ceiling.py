"""How many requests per second Ray itself passes to one replica on this machine, with no model and no batching.

Read it next to `ray_serve.py`: a Serve replica that only answers each request's size, driven by ``--clients``
actors with ``--in-flight`` calls each through deployment handles, and a bare Ray actor given ``--calls`` calls at
once by the driver, each with a 1 KB and an image-sized (3x224x224 uint8) tensor argument. Whatever batches inside a
replica cannot serve more than this.

    python benchmarks/ray_call_ceiling.py
"""

from __future__ import annotations

import argparse
import asyncio
import time

import ray
import torch
from harness import write_results
from ray import serve

SIZES = {"1 KB": 1024, "224x224 image": 3 * 224 * 224}


@serve.deployment(name="echo", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 1})
class Echo:
    async def submit(self, item: torch.Tensor) -> int:
        return item.numel()


@ray.remote(num_cpus=1)
class EchoClient:
    def __init__(self) -> None:
        self.handle = serve.get_app_handle("echo")

    async def run(self, nbytes: int, calls: int, in_flight: int) -> tuple[float, float]:
        """``calls`` calls, ``in_flight`` at a time: when they began and ended (wall clock, shared by the host)."""
        item = torch.zeros(nbytes, dtype=torch.uint8)
        slots = asyncio.Semaphore(in_flight)

        async def one() -> None:
            async with slots:
                await self.handle.submit.remote(item)

        start = time.time()
        await asyncio.gather(*(one() for _ in range(calls)))
        return start, time.time()


@ray.remote(num_cpus=1)
class Bare:
    def size(self, item: torch.Tensor) -> int:
        return item.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=64, help="concurrent calls per client")
    parser.add_argument("--calls", type=int, default=2000, help="calls per client and per measurement")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=args.clients + 2, include_dashboard=False, log_to_driver=False)
    serve.start(logging_config={"log_level": "WARNING"})
    rows = []
    try:
        serve.run(Echo.bind(), name="echo", route_prefix=None)
        clients = [EchoClient.remote() for _ in range(args.clients)]
        bare = Bare.remote()
        for label, nbytes in SIZES.items():
            ray.get([client.run.remote(nbytes, 50, args.in_flight) for client in clients])  # warm-up
            spans = ray.get([client.run.remote(nbytes, args.calls, args.in_flight) for client in clients])
            elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
            rows.append({"path": "Serve replica through handles", "argument": label,
                         "calls_per_s": round(args.calls * len(clients) / elapsed)})
            item = torch.zeros(nbytes, dtype=torch.uint8)
            ray.get(bare.size.remote(item))
            start = time.perf_counter()
            ray.get([bare.size.remote(item) for _ in range(args.calls)])
            rows.append({"path": "bare actor from the driver", "argument": label,
                         "calls_per_s": round(args.calls / (time.perf_counter() - start))})
            print(rows[-2], rows[-1], flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    stem = "ray-call-ceiling-" + ("cuda" if torch.cuda.is_available() else "cpu")
    path = write_results(stem, {"ray": ray.__version__, "settings": vars(args), "results": rows},
                         [[row["path"], row["argument"], f"{row['calls_per_s']:,}"] for row in rows],
                         ["path", "argument", "calls/s"])
    print(path.read_text())


if __name__ == "__main__":
    main()
