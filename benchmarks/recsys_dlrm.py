"""DLRM end to end: samples/s through batchplex's ``ranking`` adapter against the model alone at the same batch
size, for requests of one sample and of several candidate samples (given as one torchrec JaggedTensor per
feature, the cheapest N-sample form).

The model is torchrec's ``DLRM`` with random weights (26 sparse features with one table each, 13 dense features;
on CUDA 100k x 64 tables and 512-wide MLPs, on the CPU 1000 x 16 tables and 64-wide MLPs).

* model only: the model on a ready batch of ``--batch`` samples already on the device: the ceiling;
* end to end: closed-loop submitters (4 batches' worth of requests in flight) on one event loop, each awaiting its
  result before submitting again; ``BatchPolicy(max_batch_size=batch // samples, max_batch_cost=batch)``. Includes
  validation and flattening at submit, collation into one KeyedJaggedTensor, the pinned host-to-device copies,
  the model, the copy back and the split per request;
* end to end, flattened at collate: each run again with the adapter's ``flatten="collate"`` (requests
  kept as given at submit, each batch read in one pass on the collate thread).

    python benchmarks/recsys_dlrm.py --device cuda
    python benchmarks/recsys_dlrm.py --device cpu

Results go to ``benchmarks/results/<--out>.json`` and ``.md``, stamped with the card (or CPU), the command and
the date.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from typing import Any

import batchplex_recsys
import torch
from batchplex import BatchPolicy, Scheduler
from batchplex_recsys import RankingAdapter, RankingRequest, table_sizes_of
from batchplex_recsys.criteo import DENSE_DIM, SPARSE_KEYS, build_dlrm, jagged_form, random_request
from harness import (add_torch_threads_option, apply_torch_threads, model_only, request_pool, saturate, synchronize,
                     write_results)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="samples per batch (default: 2048 on cuda, 256 on cpu)")
    parser.add_argument("--samples", type=int, nargs="+",
                        help="samples per request, one end-to-end run each (default: 1 32 256 on cuda, 1 32 on cpu)")
    parser.add_argument("--num-embeddings", type=int, help="rows per table (default: 100000 cuda, 1000 cpu)")
    parser.add_argument("--embedding-dim", type=int, help="default: 64 on cuda, 16 on cpu")
    parser.add_argument("--hidden", type=int, help="MLP width (default: 512 on cuda, 64 on cpu)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--duration", type=float, help="seconds per measured window (default: 10 cuda, 5 cpu)")
    add_torch_threads_option(parser)
    parser.add_argument("--out", help="result file stem under benchmarks/results (default: recsys-dlrm-<device>)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    defaults = {"batch": 2048 if cuda else 256, "samples": [1, 32, 256] if cuda else [1, 32],
                "num_embeddings": 100_000 if cuda else 1000, "embedding_dim": 64 if cuda else 16,
                "hidden": 512 if cuda else 64, "duration": 10.0 if cuda else 5.0, "out": f"recsys-dlrm-{args.device}"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


async def end_to_end(args: argparse.Namespace, model: Any, device: torch.device, samples: int,
                     flatten: str = "submit") -> dict[str, Any]:
    """Closed-loop saturating load with requests of ``samples`` samples each."""
    per_batch = max(1, args.batch // samples)
    policy = BatchPolicy(max_batch_size=per_batch, max_batch_cost=per_batch * samples, max_wait_ms=args.max_wait_ms)
    options = {"keys": SPARSE_KEYS, "table_sizes": table_sizes_of(model), "dense_dim": DENSE_DIM, "flatten": flatten}

    def make(rng: random.Random) -> RankingRequest:
        if samples == 1:
            return random_request(rng, num_embeddings=args.num_embeddings)
        return jagged_form(random_request(rng, num_embeddings=args.num_embeddings, samples=samples))

    async with Scheduler(plugins=[batchplex_recsys], autoload=False) as scheduler:
        scheduler.add_workload("dlrm", adapter="ranking", adapter_options=options, model=model, device=device,
                               policy=policy)
        load = {"concurrency": 4 * per_batch, "items_per_request": samples}
        pool = request_pool(make, load["concurrency"])
        await saturate(scheduler, "dlrm", pool, duration_s=args.duration / 4, **load)
        before = scheduler.statistics()["dlrm"]
        result = await saturate(scheduler, "dlrm", pool, duration_s=args.duration, **load)
        after = scheduler.statistics()["dlrm"]
    batches = max(1, after["batches"] - before["batches"])
    result.update(samples_per_request=samples, flatten=flatten, requests_per_batch=per_batch,
                  mean_samples_per_batch=(after["completed"] - before["completed"]) * samples / batches)
    return result


def components(args: argparse.Namespace, adapter: RankingAdapter, device: torch.device) -> dict[str, float]:
    """Per-request prepare time (on the event loop when served) and per-batch collate time (with the copies; on
    the collate thread) for one-sample requests, with ``adapter``'s ``flatten`` setting."""
    rng = random.Random(2)
    requests = [random_request(rng, num_embeddings=args.num_embeddings) for _ in range(args.batch)]
    started = time.perf_counter()
    prepared = [adapter.prepare(request) for request in requests]
    prepare_us = (time.perf_counter() - started) / len(requests) * 1e6
    collate = model_only(lambda: adapter.collate(prepared, device, len(prepared)), args.batch, device,
                         warmup=5, repeats=50)
    return {"prepare_us_per_request": prepare_us, "collate_ms_per_batch": collate["ms_per_call"]}


async def main() -> None:
    args = parse_args()
    apply_torch_threads(args)
    # with its index: the device executor calls torch.cuda.set_device, which refuses a bare "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    model = build_dlrm(num_embeddings=args.num_embeddings, embedding_dim=args.embedding_dim,
                       hidden=args.hidden).to(device)
    options = {"keys": SPARSE_KEYS, "table_sizes": table_sizes_of(model), "dense_dim": DENSE_DIM}
    adapter = RankingAdapter(**options)
    rng = random.Random(1)
    batch = adapter.collate([adapter.prepare(random_request(rng, num_embeddings=args.num_embeddings))
                             for _ in range(args.batch)], device, args.batch)
    synchronize(device)
    alone = model_only(lambda: model(batch), args.batch, device, warmup=5, repeats=50)
    parts = {flatten: components(args, RankingAdapter(**options, flatten=flatten), device)
             for flatten in ("submit", "collate")}
    runs = [await end_to_end(args, model, device, samples, flatten) for samples in args.samples
            for flatten in ("submit", "collate")]

    shape = (f"DLRM {len(SPARSE_KEYS)} x {args.num_embeddings} x {args.embedding_dim} tables, "
             f"{args.hidden}-wide MLPs")
    rows = [[f"{shape}: model only", str(args.batch), f"{alone['items_per_s']:.0f}",
             f"{alone['ms_per_call']:.2f} ms per batch"]]
    for run in runs:
        ratio = run["items_per_s"] / alone["items_per_s"]
        where = ", flattened at collate" if run["flatten"] == "collate" else ""
        rows.append([f"{shape}: end to end, {run['samples_per_request']} sample(s) per request{where}",
                     str(args.batch),
                     f"{run['items_per_s']:.0f}", f"{100 * ratio:.0f}% of model only; mean "
                     f"{run['mean_samples_per_batch']:.0f} samples per batch; host CPU "
                     f"{run['cpu_us_per_request']:.0f} us per request"])
        run["end_to_end_over_model_only"] = ratio
    rows += [[f"components (one-sample requests, flatten={flatten!r})", str(args.batch), "",
              f"prepare {part['prepare_us_per_request']:.1f} us per request at submit; collate "
              f"{part['collate_ms_per_batch']:.2f} ms per batch"] for flatten, part in parts.items()]
    rows.append(["host load average, 1/5/15 min (other jobs on the machine inflate every number)", "",
                 "/".join(f"{load:.1f}" for load in os.getloadavg()), ""])
    payload = {"batch": args.batch, "num_embeddings": args.num_embeddings, "embedding_dim": args.embedding_dim,
               "hidden": args.hidden, "max_wait_ms": args.max_wait_ms, "device": args.device,
               "threads": torch.get_num_threads(), "model_only": alone, "end_to_end": runs, "components": parts,
               "load_average": os.getloadavg()}
    path = write_results(args.out, payload, rows, ["measurement", "batch (samples)", "samples/s", "notes"])
    print(path.read_text())


if __name__ == "__main__":
    asyncio.run(main())
