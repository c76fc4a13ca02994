"""`ExampleWorkload`: a runnable workload a plugin offers for demos, profiling and benchmarks.

Plugins return these from the ``example_workloads`` hook, so the ``batchplex`` command can run every installed
workload without the core importing any plugin.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .policy import BatchPolicy

__all__ = ["ExampleWorkload"]


@dataclass(frozen=True)
class ExampleWorkload:
    """A named workload: adapter (by registered name) and options, a model built for one device, a policy, and
    a generator of realistic requests (``make_request(rng)``; ``make_bad_request(rng)`` gives malformed ones)."""

    name: str
    adapter: str
    model: Callable[[Any], Any]
    make_request: Callable[[random.Random], Any]
    policy: BatchPolicy = field(default_factory=BatchPolicy)
    adapter_options: dict[str, Any] = field(default_factory=dict)
    make_bad_request: Callable[[random.Random], Any] | None = None
    description: str = ""
