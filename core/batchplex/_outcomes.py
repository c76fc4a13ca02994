"""Handing a request its one outcome: a result or an error, tolerating a caller that cancelled meanwhile.

Waiters are asyncio futures (``submit``) or `concurrent.futures.Future` (``submit_nowait``); a cancelled waiter
refuses the outcome, which is then dropped: the caller asked for nothing more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from typing import Any

__all__ = ["resolve", "fail", "settle"]

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


def settle(requests: Sequence[Any], results: Sequence[Any], errors: Sequence[BaseException | None]) -> int:
    """Hand each request of a finished batch its result, or its error where it has one; returns how many failed.

    One loop with no call per request: a batch's delivery is on the event loop's hot path."""
    failed = 0
    for request, result, error in zip(requests, results, errors):
        try:
            if error is None:
                request.waiter.set_result(result)
            else:
                failed += 1
                request.waiter.set_exception(error)
        except _INVALID_STATE:  # the caller cancelled meanwhile
            pass
    return failed
