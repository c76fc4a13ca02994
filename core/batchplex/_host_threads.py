"""Torch's intra-op CPU threads with models on CUDA: say once when the pool is wide enough to slow the executor.

Why: the executor's host-side tensor work (a batch stacked into pinned memory, staging copies, padding, id
concatenation) runs on torch's intra-op OpenMP pool. With the models on CUDA that work is small and frequent, and a
wide pool costs more than it gives. On a 32-core host with two H200s, ResNet-50 (CUDA graphs) end to end reached
10.8k images/s on one GPU and 18.1k on two with torch's default of 32 threads, against 14.9k and 29.8k (99% of twice
the model-only ceiling) with 1 (``benchmarks/results/multi-gpu-cuda.md``); in a probe on the same kind of host,
8 threads gave 15.0k and 29.1k, hence `WIDE_POOL`.

The pool is process-wide and CPU models in the same process need it, so batchplex leaves it alone and logs a
warning once, when a CUDA workload has been added while the pool is wider than `WIDE_POOL` threads and the environment
does not set ``OMP_NUM_THREADS`` (a choice already made).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

__all__ = ["WIDE_POOL", "warn_if_wide_pool"]

log = logging.getLogger("batchplex")

#: more intra-op threads than this, with a workload on CUDA, gets the warning
WIDE_POOL = 8

_warned = False


def warn_if_wide_pool(devices: Sequence[torch.device]) -> None:
    """Log, once per process, that torch's intra-op pool is wide while a workload runs on CUDA."""
    global _warned
    if _warned or "OMP_NUM_THREADS" in os.environ or not any(device.type == "cuda" for device in devices):
        return
    threads = torch.get_num_threads()
    if threads > WIDE_POOL:
        _warned = True
        log.warning("torch runs host-side tensor work on %d intra-op CPU threads; with models on CUDA, batchplex's "
                    "collation is faster with few (a 32-core host, ResNet-50 on two H200s: 18.1k images/s at 32 "
                    "threads, 29.8k at 1). Call torch.set_num_threads(1) before serving, or set OMP_NUM_THREADS, "
                    "unless CPU models in this process need the threads.", threads)
