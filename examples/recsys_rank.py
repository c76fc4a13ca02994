"""Rank with torchrec's DLRM through batchplex: single requests in, one KeyedJaggedTensor batch per model call.

A Criteo-like DLRM (26 sparse id-list features, 13 dense features, random weights) serves two kinds of requests
at once: a user with 5 candidate items (one score per candidate, the best one picked) and single-sample requests
given as plain lists. A request with an id outside its table fails alone, at submit.

    python examples/recsys_rank.py            # on CUDA when there is a GPU, else on the CPU
"""

import asyncio
import random

import torch
from batchplex import BatchPolicy, InvalidRequestError, Scheduler
from batchplex_recsys import table_sizes_of
from batchplex_recsys.criteo import DENSE_DIM, SPARSE_KEYS, build_dlrm


def request(rng: random.Random, candidates: int | None = None) -> dict:
    """One ranking request as a caller would send it: lists of ids per feature, dense floats."""
    def ids() -> list[int]:
        return [rng.randrange(1000) for _ in range(rng.randint(1, 5))]

    if candidates is None:
        return {"sparse": {key: ids() for key in SPARSE_KEYS}, "dense": [rng.random() for _ in range(DENSE_DIM)]}
    return {"sparse": {key: [ids() for _ in range(candidates)] for key in SPARSE_KEYS},
            "dense": [[rng.random() for _ in range(DENSE_DIM)] for _ in range(candidates)]}


async def main() -> None:
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = build_dlrm()  # RankingModel(DLRM(...)): wraps a DLRM for the one-argument call
    rng = random.Random(0)
    async with Scheduler() as scheduler:  # finds the recsys plugin through its entry point
        scheduler.add_workload(
            "rank", adapter="ranking", model=model, device=device,
            adapter_options={"keys": SPARSE_KEYS, "dense_dim": DENSE_DIM, "table_sizes": table_sizes_of(model)},
            policy=BatchPolicy(max_batch_size=32, max_batch_cost=256, max_wait_ms=5))  # cost = samples
        user, *singles = await asyncio.gather(scheduler.submit("rank", request(rng, candidates=5)),
                                              *(scheduler.submit("rank", request(rng)) for _ in range(8)))
        print(f"5 candidates -> logits {[round(x, 4) for x in user.squeeze(1).tolist()]}; "
              f"best candidate: {int(user.argmax())}")
        print(f"8 single requests -> logits {[round(float(s), 4) for s in singles]}")
        bad = request(rng)
        bad["sparse"]["cat_3"] = [7, 1000]  # the table has 1000 rows
        try:
            await scheduler.submit("rank", bad)
        except InvalidRequestError as error:
            print(f"refused at submit: {error} (rule {error.rule!r}, value {error.value!r})")
        print("statistics:", {k: v for k, v in scheduler.statistics()["rank"].items()
                              if k in ("completed", "batches", "mean_batch_size", "rejected_invalid")})


if __name__ == "__main__":
    asyncio.run(main())
