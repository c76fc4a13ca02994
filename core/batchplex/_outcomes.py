"""Handing a request its one outcome: a result or an error, tolerating a caller that cancelled meanwhile.

Waiters are asyncio futures (``submit``) or `concurrent.futures.Future` (``submit_nowait``); a cancelled waiter
refuses the outcome, which is then dropped: the caller asked for nothing more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

__all__ = ["resolve", "fail"]

_INVALID_STATE = (asyncio.InvalidStateError, concurrent.futures.InvalidStateError)


def resolve(request: Any, result: Any) -> None:
    try:
        request.waiter.set_result(result)
    except _INVALID_STATE:  # the caller cancelled meanwhile
        pass


def fail(request: Any, error: BaseException) -> None:
    try:
        request.waiter.set_exception(error)
    except _INVALID_STATE:
        pass
