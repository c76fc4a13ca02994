"""Recsys collation: N ranking requests (26 sparse id-list features, 1-20 ids each, 13 dense) into one
KeyedJaggedTensor plus a dense matrix on the device, the batchplex way against the obvious ways.

* batchplex ``ranking`` adapter: each request was flattened once at submit (sample-major ids, one length per
  feature); collation is two ``torch.cat``s, one key-major permute (``fbgemm::permute_1D_sparse_data`` with a
  cached permutation), per-key metadata on the host, and (on CUDA) two non-blocking copies from pinned memory;
* one JaggedTensor per feature + ``KeyedJaggedTensor.from_jt_dict``: per feature, concatenate the requests' ids
  and build a JaggedTensor, then join them;
* N x 26 small tensors: concatenate every request's every feature in key-major order, lengths from Python, then
  ``KeyedJaggedTensor(...)`` and ``sync()``.

``KeyedJaggedTensor.concat`` is not a contender: it joins KJTs that hold *different features* of the same samples
(their key lists are appended and every input must have the same stride), so concatenating two one-sample
requests gives a KJT with 52 keys and stride 1, not 26 keys and stride 2. The script checks this and records it.

The baselines get each request's features as the caller sent them (one 1-D tensor per feature); the batchplex
numbers exclude the submit-time ``prepare`` (validation and flattening, paid once per request on the caller's
thread), which is reported on its own line. On CUDA every repetition ends with a device synchronize, so the
host-to-device copies are included. Times are medians over ``--repeats`` runs after ``--warmup`` runs.

    python benchmarks/recsys_collate.py --device cpu
    python benchmarks/recsys_collate.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import random
from typing import Any

import torch
from batchplex_recsys import RankingAdapter, RankingRequest
from batchplex_recsys.criteo import DENSE_DIM, SPARSE_KEYS, random_request
from harness import timed, write_results
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--requests", type=int, default=256, help="requests per batch (one sample each)")
    parser.add_argument("--min-ids", type=int, default=1)
    parser.add_argument("--max-ids", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--out", help="result file stem under benchmarks/results (default: recsys-collate-<device>)")
    args = parser.parse_args()
    args.out = args.out or f"recsys-collate-{args.device}"
    return args


def per_feature_jagged(requests: list[RankingRequest], device: torch.device) -> tuple[Any, torch.Tensor]:
    """One JaggedTensor per feature (the requests' ids concatenated), joined with from_jt_dict."""
    jagged = {key: JaggedTensor(values=torch.cat([request.sparse[key] for request in requests]),
                                lengths=torch.tensor([request.sparse[key].numel() for request in requests]))
              for key in SPARSE_KEYS}
    sparse = KeyedJaggedTensor.from_jt_dict(jagged).sync()
    dense = torch.stack([request.dense for request in requests])
    return sparse.to(device, non_blocking=True), dense.to(device, non_blocking=True)


def small_tensors(requests: list[RankingRequest], device: torch.device) -> tuple[Any, torch.Tensor]:
    """All N x 26 small tensors concatenated key-major, lengths from Python, one KeyedJaggedTensor."""
    values = torch.cat([request.sparse[key] for key in SPARSE_KEYS for request in requests])
    lengths = torch.tensor([request.sparse[key].numel() for key in SPARSE_KEYS for request in requests])
    sparse = KeyedJaggedTensor(keys=list(SPARSE_KEYS), values=values, lengths=lengths, stride=len(requests)).sync()
    dense = torch.stack([request.dense for request in requests])
    return sparse.to(device, non_blocking=True), dense.to(device, non_blocking=True)


def concat_is_not_batching(requests: list[RankingRequest]) -> dict[str, int]:
    """What KeyedJaggedTensor.concat makes of two one-sample requests: features appended, stride unchanged."""
    one = [KeyedJaggedTensor(keys=list(SPARSE_KEYS), values=torch.cat([r.sparse[k] for k in SPARSE_KEYS]),
                             lengths=torch.tensor([r.sparse[k].numel() for k in SPARSE_KEYS]), stride=1)
           for r in requests[:2]]
    joined = KeyedJaggedTensor.concat(one)
    return {"keys": len(joined.keys()), "stride": joined.stride()}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = random.Random(0)
    requests = [random_request(rng, ids=(args.min_ids, args.max_ids)) for _ in range(args.requests)]
    adapter = RankingAdapter().configure(keys=SPARSE_KEYS, table_sizes={key: 1000 for key in SPARSE_KEYS},
                                         dense_dim=DENSE_DIM)
    prepared = [adapter.prepare(request) for request in requests]

    reference = adapter.collate(prepared, device, len(prepared))
    for build in (per_feature_jagged, small_tensors):
        sparse, dense = build(requests, device)
        assert torch.equal(sparse.values(), reference.sparse_features.values()), build.__name__
        assert torch.equal(sparse.lengths(), reference.sparse_features.lengths()), build.__name__
        assert torch.equal(dense, reference.dense_features), build.__name__
    concat = concat_is_not_batching(requests)
    assert concat == {"keys": 2 * len(SPARSE_KEYS), "stride": 1}, concat

    measure = {
        "batchplex ranking adapter (collate)": lambda: adapter.collate(prepared, device, len(prepared)),
        "one JaggedTensor per feature + from_jt_dict": lambda: per_feature_jagged(requests, device),
        f"{args.requests} x {len(SPARSE_KEYS)} small tensors concatenated": lambda: small_tensors(requests, device),
    }
    with torch.inference_mode():
        results = {name: timed(run, device, warmup=args.warmup, repeats=args.repeats) for name, run in measure.items()}
        prepare = timed(lambda: [adapter.prepare(request) for request in requests], device, warmup=3, repeats=
                        max(5, args.repeats // 50))
    ids = reference.sparse_features.values().numel()
    ours = results["batchplex ranking adapter (collate)"]["median_ms"]
    rows = [[name, f"{r['median_ms']:.3f}", f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}", f"{r['median_ms'] / ours:.1f}x"]
            for name, r in results.items()]
    rows.append(["KeyedJaggedTensor.concat (2 one-sample requests)", "n/a", "n/a",
                 f"not batching: {concat['keys']} keys, stride {concat['stride']}"])
    rows.append([f"batchplex prepare at submit, per request ({args.requests} requests timed together)",
                 f"{prepare['median_ms'] / args.requests:.4f}", "", "paid once per request, on the caller's thread"])
    rows.append(["host load average, 1/5/15 min (other jobs on the machine inflate every number)",
                 "/".join(f"{load:.1f}" for load in os.getloadavg()), "", ""])
    payload = {"requests": args.requests, "features": len(SPARSE_KEYS), "ids_per_feature": [args.min_ids, args.max_ids],
               "ids_in_batch": ids, "dense_dim": DENSE_DIM, "device": args.device, "threads": torch.get_num_threads(),
               "repeats": args.repeats, "warmup": args.warmup, "collate": results,
               "prepare_ms_per_request": prepare["median_ms"] / args.requests, "concat_of_two_requests": concat,
               "target_ms_cpu": 0.5, "load_average": os.getloadavg()}
    path = write_results(args.out, payload, rows, ["method", "median ms", "p10-p90 ms", "vs batchplex"])
    print(path.read_text())


if __name__ == "__main__":
    main()
