"""Every error batchplex raises, so callers can catch one base class or exactly the case they handle.

Messages name the workload or plugin, the rule that was broken and the offending value, and say how to fix it.
"""

from __future__ import annotations

__all__ = [
    "BatchplexError",
    "PolicyError",
    "PluginError",
    "DuplicateAdapterError",
    "UnknownAdapterError",
    "UnknownWorkloadError",
    "InvalidRequestError",
    "RequestTooLargeError",
    "QueueFullError",
    "DeadlineExceeded",
    "SchedulerClosed",
    "ContractError",
    "RequestFailed",
]


class BatchplexError(Exception):
    """Base class of every error batchplex raises on purpose."""


class PolicyError(BatchplexError, ValueError):
    """A `BatchPolicy` field is out of range or inconsistent with another field."""


class PluginError(BatchplexError):
    """A plugin could not be loaded or broke the plugin contract."""


class DuplicateAdapterError(PluginError):
    """Two plugins registered an adapter under the same name."""


class UnknownAdapterError(BatchplexError, LookupError):
    """`add_workload` named an adapter that no installed or registered plugin provides."""


class UnknownWorkloadError(BatchplexError, LookupError):
    """`submit` named a workload that was never added to the scheduler."""


class InvalidRequestError(BatchplexError, ValueError):
    """The adapter rejected one request at submit; only that caller sees this error.

    Attributes name the workload, the rule and the bad value so that a service can turn it into a 4xx answer.
    """

    def __init__(self, message: str, *, workload: str | None = None, rule: str | None = None, value: object = None):
        super().__init__(message)
        self.workload = workload
        self.rule = rule
        self.value = value

    def __str__(self) -> str:
        text = super().__str__()
        return f"workload {self.workload!r}: {text}" if self.workload else text


class RequestTooLargeError(InvalidRequestError):
    """The request's cost exceeds what any batch under the policy may hold (last bucket edge or cost budget)."""


class QueueFullError(BatchplexError):
    """The workload's queue holds `max_queue` requests already; the submit is refused at once (back-pressure)."""


class DeadlineExceeded(BatchplexError, TimeoutError):
    """The request's deadline passed while it was still queued; it never ran."""


class SchedulerClosed(BatchplexError, RuntimeError):
    """The scheduler is closed (or closing without draining) and does not take or finish this request."""


class ContractError(BatchplexError):
    """An adapter returned something that breaks the adapter contract (for example the wrong number of results)."""


class RequestFailed(BatchplexError):
    """Running this request failed; the batch was bisected and the failure isolated to this request.

    The original exception is chained as ``__cause__``.
    """
