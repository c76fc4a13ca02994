"""batchplex: request batching for PyTorch inference.

A small core scheduler batches single requests (dynamic and static batching, length buckets, cost budgets,
priorities, deadlines, back-pressure) and finds workload adapters through pluggy hooks (entry-point group
``batchplex``).
"""

from ._graphs import GraphedModel, capture_graph
from .adapter import Adapter
from .continuous import ContinuousPolicy, ContinuousWorkload, StepAdapter, StepOutput, StepRecord, TokenStreamer
from .errors import (BatchplexError, ContractError, DeadlineExceeded, DuplicateAdapterError, InvalidRequestError,
                     PluginError, PolicyError, QueueFullError, RequestFailed, RequestTooLargeError,
                     SchedulerClosed, UnknownAdapterError, UnknownWorkloadError)
from .hookspecs import hookimpl
from .metrics import BatchRecord
from .policy import BatchPolicy
from .scheduler import Scheduler

__version__ = "0.1.0"

__all__ = [
    "Adapter", "BatchPolicy", "BatchRecord", "GraphedModel", "Scheduler", "capture_graph", "hookimpl",
    "ContinuousPolicy", "ContinuousWorkload", "StepAdapter", "StepOutput", "StepRecord", "TokenStreamer",
    "BatchplexError", "ContractError", "DeadlineExceeded", "DuplicateAdapterError", "InvalidRequestError",
    "PluginError", "PolicyError", "QueueFullError", "RequestFailed", "RequestTooLargeError", "SchedulerClosed",
    "UnknownAdapterError", "UnknownWorkloadError",
]
