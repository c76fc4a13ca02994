"""A Criteo-like ranking setup with random weights: 26 sparse id-list features, 13 dense features, torchrec's DLRM.

Not a trained model: it gives the tests, the example, the benchmarks and ``batchplex demo`` a real torchrec model
of the right shape, and requests that look like Criteo's (1-20 ids per feature by default).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from batchplex import BatchPolicy
from batchplex.workloads import ExampleWorkload

from ._torchrec import load
from .model import RankingModel, table_sizes_of
from .request import RankingRequest

__all__ = ["SPARSE_KEYS", "DENSE_DIM", "build_dlrm", "random_request", "example_workload"]

SPARSE_KEYS: tuple[str, ...] = tuple(f"cat_{i}" for i in range(26))
DENSE_DIM = 13


def build_dlrm(keys: Sequence[str] = SPARSE_KEYS, *, num_embeddings: int = 1000, embedding_dim: int = 16,
               dense_dim: int = DENSE_DIM, weighted: bool = False, hidden: int = 64, seed: int = 0) -> RankingModel:
    """A torchrec ``DLRM`` (one table of ``num_embeddings`` x ``embedding_dim`` per key, weighted or not) with
    random weights drawn from ``seed``, wrapped for the scheduler; in eval mode, on the CPU."""
    load()
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tables = [EmbeddingBagConfig(name=f"table_{key}", embedding_dim=embedding_dim,
                                     num_embeddings=num_embeddings, feature_names=[key]) for key in keys]
        collection = EmbeddingBagCollection(tables=tables, is_weighted=weighted, device=torch.device("cpu"))
        dlrm = DLRM(embedding_bag_collection=collection, dense_in_features=dense_dim,
                    dense_arch_layer_sizes=[hidden, embedding_dim], over_arch_layer_sizes=[hidden, 1])
    return RankingModel(dlrm).eval()


def random_request(rng: random.Random, keys: Sequence[str] = SPARSE_KEYS, *, num_embeddings: int = 1000,
                   dense_dim: int = DENSE_DIM, ids: tuple[int, int] = (1, 20), samples: int | None = None,
                   weighted: Sequence[str] = ()) -> RankingRequest:
    """A valid request with ``ids[0]..ids[1]`` ids per feature and sample, as tensors.

    ``samples=None`` gives the one-sample form, an int N the N-sample form; ``weighted`` keys get random
    weights in [0, 1).
    """
    generator = torch.Generator().manual_seed(rng.getrandbits(62))
    n = samples or 1
    counts = torch.randint(ids[0], ids[1] + 1, (len(keys) * n,), generator=generator).tolist()
    chunks = torch.randint(0, num_embeddings, (sum(counts),), generator=generator).split(counts)
    weight_chunks = torch.rand(sum(counts), generator=generator).split(counts)

    def per_key(parts: Sequence[torch.Tensor], i: int) -> torch.Tensor | list[torch.Tensor]:
        return parts[i * n] if samples is None else list(parts[i * n:(i + 1) * n])

    sparse = {key: per_key(chunks, i) for i, key in enumerate(keys)}
    weights = {key: per_key(weight_chunks, i) for i, key in enumerate(keys) if key in weighted}
    dense = torch.randn(n, dense_dim, generator=generator)
    return RankingRequest(sparse, dense[0] if samples is None else dense, weights or None)


def _bad_request(rng: random.Random) -> RankingRequest:
    """A malformed request of one of the kinds the adapter refuses at submit."""
    good = random_request(rng)
    sparse, dense = dict(good.sparse), good.dense.clone()
    kind = rng.randrange(4)
    if kind == 0:
        sparse["cat_0"] = [1000]  # out of the table's range
    elif kind == 1:
        sparse["cat_1"] = [-1]
    elif kind == 2:
        dense[0] = float("nan")
    else:
        sparse["no_such_feature"] = [1]
    return RankingRequest(sparse, dense)


def example_workload(device: torch.device) -> ExampleWorkload:
    """The Criteo-like DLRM as a demo workload: mostly one-sample requests, some with 2-32 candidates."""
    model = build_dlrm().to(device)

    def make_request(rng: random.Random) -> RankingRequest:
        return random_request(rng, samples=rng.choice((None, None, None, rng.randint(2, 32))))

    return ExampleWorkload(
        name="dlrm", adapter="ranking", model=model, make_request=make_request, make_bad_request=_bad_request,
        adapter_options={"keys": SPARSE_KEYS, "table_sizes": table_sizes_of(model), "dense_dim": DENSE_DIM},
        policy=BatchPolicy(max_batch_size=64, max_batch_cost=512, max_wait_ms=5),
        description="torchrec DLRM, 26 sparse + 13 dense features (Criteo-like, random weights)")


def jagged_form(request: RankingRequest) -> RankingRequest:
    """An N-sample request with one torchrec ``JaggedTensor`` per feature: the cheapest N-sample form to submit."""
    from torchrec import JaggedTensor

    return RankingRequest({key: JaggedTensor.from_dense(ids) for key, ids in request.sparse.items()}, request.dense)
