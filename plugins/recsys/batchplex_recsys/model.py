"""Glue between torchrec models and the ranking adapter: the one-argument call, and table sizes for validation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .adapter import RankingBatch

__all__ = ["RankingModel", "table_sizes_of"]


class RankingModel(torch.nn.Module):
    """Calls ``module(dense_features, sparse_features)`` with a `RankingBatch`.

    The scheduler calls a model with one argument; torchrec's ranking models (``DLRM``, ``DLRM_DCN``,
    ``DLRM_Projection``) take the dense and the sparse features as two. Wrap them in this. It refuses CUDA graph
    capture, so ``add_workload(cuda_graphs=True)`` falls back to eager runs instead of replaying stale ids.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        if batch.dense_features.is_cuda and torch.cuda.is_current_stream_capturing():
            # the scheduler's CUDA graphs key a graph on input shapes: a replay would reuse this batch's ids
            raise RuntimeError("ranking batches are jagged (ids per feature change from batch to batch), so a "
                               "CUDA graph cannot be replayed for them; run ranking workloads without cuda_graphs")
        return self.module(batch.dense_features, batch.sparse_features)

    def scripted(self) -> RankingModel:
        """This model with its torchrec module compiled by ``torch.jit.script`` (sharing its parameters), for a
        process that batches other workloads too.

        Why: an eager torchrec model does much of its work in Python on the host (DLRM with 26 tables: a lookup
        and a KeyedJaggedTensor split per table), holding the GIL that every other workload's threads need. A
        scripted module runs in C++ with the GIL released. Measured on an H200 (four workloads in one process,
        one executor each): DLRM 40-46k -> 72-78k samples/s; alone it gains nothing. TorchScript is deprecated
        from torch 2.14 (a ``FutureWarning``) but still the way to run a torchrec forward off the GIL.

        Read `table_sizes_of` from this (eager) model: a scripted one keeps only what its forward calls. On CUDA,
        keep TorchScript's fusers off for as long as the model serves, not only while scripting: the flags are
        process-wide and TorchScript reads them when it optimizes (on the second call, and again when new shapes
        arrive), so enter ``torch.jit.fuser("none")`` around the whole ``async with Scheduler(...)`` block."""
        return RankingModel(torch.jit.script(self.module)).train(self.training)


def table_sizes_of(module: torch.nn.Module) -> dict[str, int]:
    """``{feature key: num_embeddings}`` of every embedding table in ``module``, for the adapter's ``table_sizes``.

    Reads the configs of each torchrec ``EmbeddingBagCollection``/``EmbeddingCollection`` inside ``module``; a
    feature that feeds several tables gets the smallest size, so its ids are valid in all of them. Raises
    ``ValueError`` for a TorchScript module with no configs to read: an empty result would switch the adapter's
    range check off, and an out-of-range id on CUDA ends in a device-side assert.
    """
    sizes: dict[str, int] = {}
    scripted = False
    for sub in module.modules():
        scripted = scripted or isinstance(sub, torch.jit.ScriptModule)
        configs = getattr(sub, "embedding_bag_configs", None) or getattr(sub, "embedding_configs", None)
        if not callable(configs):
            continue
        for config in configs():
            for key in config.feature_names:
                sizes[key] = min(sizes.get(key, config.num_embeddings), config.num_embeddings)
    if scripted and not sizes:
        raise ValueError(f"table_sizes_of({type(module).__name__}): it holds TorchScript modules, which keep no "
                         f"torchrec embedding configs, and no eager table to read a size from; read the sizes from "
                         f"the eager model (before RankingModel.scripted() or torch.jit.script)")
    return sizes
