"""batchplex-recsys: ranking requests batched into torchrec KeyedJaggedTensors, found through the entry point
``recsys`` (group ``batchplex``).

* ``ranking`` (`RankingAdapter`): sparse id-list features (optionally weighted) plus dense features, for one
  sample or N samples per request; one key-major `KeyedJaggedTensor` and one dense matrix per batch, handed to the
  model as a `RankingBatch`; results split back per request (one row, or N rows).

torchrec and fbgemm are imported when a ranking workload is configured, so the plugin is listed (and says what is
missing, `TorchrecMissingError`) on machines without them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import batchplex
import torch
from batchplex.workloads import ExampleWorkload

from ._torchrec import TorchrecMissingError
from .adapter import RankingAdapter, RankingBatch
from .model import RankingModel, table_sizes_of
from .request import RankingRequest

__all__ = ["RankingAdapter", "RankingBatch", "RankingModel", "RankingRequest", "TorchrecMissingError",
           "table_sizes_of", "register_adapters", "example_workloads"]

log = logging.getLogger("batchplex.recsys")


@batchplex.hookimpl
def register_adapters(register: Callable[[batchplex.Adapter], None]) -> None:
    """Register the ``ranking`` adapter (called by batchplex when it loads this plugin)."""
    register(RankingAdapter())


@batchplex.hookimpl
def example_workloads(device: torch.device) -> list[ExampleWorkload]:
    """Offer the Criteo-like DLRM (random weights) to ``batchplex demo``; none when torchrec is missing."""
    from .criteo import example_workload

    try:
        return [example_workload(device)]
    except TorchrecMissingError as error:
        log.warning("recsys: no example workload: %s", error)
        return []
