"""The whole plugin contract of batchplex: every hook a plugin may implement.

Hooks are few, synchronous and called at set-up, never on the request path. A plugin is any object or module
with functions marked ``@batchplex.hookimpl``; installed plugins are found through the entry-point group
``batchplex`` and registered under their entry-point name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch

    from .adapter import Adapter
    from .metrics import BatchRecord
    from .workloads import ExampleWorkload

PROJECT = "batchplex"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_adapters(register: Callable[[Adapter], None]) -> None:
    """Register this plugin's adapters by calling ``register(adapter)`` once per adapter.

    Called once per plugin when a scheduler builds its adapter registry (and when a plugin is registered on a
    running scheduler). Not ``firstresult``; the return value is ignored. ``register`` raises
    `DuplicateAdapterError` at the plugin's own line when another plugin already took the adapter's name.
    """


@hookspec
def batch_finished(record: BatchRecord) -> None:
    """Observe one finished batch (for metrics exporters): workload, device, size, padding, wait and run times.

    Called on the event loop thread after the batch's results were handed out, once per batch and per plugin;
    keep it cheap (update counters, never block). Not ``firstresult``; the return value is ignored.
    """


@hookspec
def example_workloads(device: torch.device) -> list[ExampleWorkload]:
    """Offer ready-to-run example workloads (a small model with random weights and a request generator).

    Called by ``batchplex demo`` and ``batchplex profile`` when they build their workloads; each plugin returns a
    list (possibly empty) of `ExampleWorkload` built for ``device``. Not ``firstresult``: the lists are joined.
    """
