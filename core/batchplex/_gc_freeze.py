"""Keep Python's full garbage collections off the serving path while a scheduler runs.

A full (generation 2) collection walks every tracked object of the process and holds the GIL while it does, so
every thread stops: with torch, a vision model and transformers imported it took 120-170 ms on an H200 host, and
it was the whole tail of ResNet-50's latency at half load there (p99 61 ms; 14 ms with the heap frozen). What a
server holds when it starts serving (modules, models, tokenizers, captured graphs) lives as long as the process,
so `hold` moves it into the permanent generation with `gc.freeze` (the collector stops scanning it, and young
collections stay cheap); requests' own short-lived objects are collected as usual. The last scheduler to stop
calls `gc.unfreeze`, so what became garbage meanwhile is collected again, unless the application had frozen
objects itself before (e.g. before forking workers, to keep pages shared): that freeze is its own and stays.
"""

from __future__ import annotations

import gc
import threading

__all__ = ["hold", "release"]

_lock = threading.Lock()
_holders = 0
_frozen_by_application = False


def hold() -> None:
    """A scheduler starts serving: freeze what the process holds now (again, if another scheduler runs)."""
    global _holders, _frozen_by_application
    with _lock:
        if _holders == 0:
            _frozen_by_application = gc.get_freeze_count() > 0
        _holders += 1
        gc.freeze()


def release() -> None:
    """A scheduler stopped: unfreeze when no other one still serves."""
    global _holders
    with _lock:
        _holders -= 1
        if _holders == 0 and not _frozen_by_application:
            gc.unfreeze()
