"""The common request, one sample in plain form, read for all features at once: the submit-time fast path.

Plain form: ids as int lists or as 1-D integer tensors (all features alike), dense as a list, 1-D tensor or numpy
array of numbers, weights as flat lists or 1-D tensors. Each reader builds one flat host tensor (through ``array``
or one ``torch.cat``) instead of a tensor per feature, which is what made a 26-feature request cost ~100 us.

Every reader returns None for anything else, and also for a value the request would be refused for (a wrong
length, a NaN): the caller then takes the feature-by-feature path, which refuses it with the precise error.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ._jagged import EMPTY_IDS, INTEGER_DTYPES

__all__ = ["flat_dense", "flat_ids", "flat_weights"]

_LISTS = frozenset((list, type(None)))
_REAL = frozenset((int, float))  # plain Python numbers; bool, Decimal, Fraction and numpy scalars take the slow path
_TENSORS = frozenset((torch.Tensor, type(None)))


def flat_ids(raws: Sequence[Any]) -> tuple[torch.Tensor, list[int]] | None:
    """One sample's ids (``raws``: per key, in key order, None where absent) as (int64 tensor, ids per key)."""
    kinds = set(map(type, raws))
    if kinds <= _LISTS:
        return _from_int_lists(raws)
    if kinds <= _TENSORS:
        present = [raw for raw in raws if raw is not None]
        if {raw.dtype for raw in present} <= INTEGER_DTYPES:
            return _from_tensors(raws, present)
    return None


def _from_int_lists(raws: Sequence[list[Any] | None]) -> tuple[torch.Tensor, list[int]] | None:
    """Lists joined into one ``array``; None if a number is not an int64 or a list starts with a bool.

    Only the first id of a list is looked at for a bool (a bool further on counts as 0 or 1): a look at every id
    would cost more than all the rest.
    """
    filled = list(filter(None, raws))
    if not {type(raw[0]) for raw in filled} <= {int}:
        return None
    numbers = array("q")
    try:
        for raw in filled:
            numbers.fromlist(raw)
    except (TypeError, OverflowError):
        return None
    values = torch.frombuffer(numbers, dtype=torch.int64) if numbers else EMPTY_IDS
    return values, [0 if raw is None else len(raw) for raw in raws]


def _from_tensors(raws: Sequence[Any], present: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
    """Integer tensors joined with one ``torch.cat``; None unless all are 1-D (``cat`` refuses mixed dims)."""
    try:
        values = torch.cat(present)
    except RuntimeError:
        return None
    if values.dim() != 1:
        return None
    if values.dtype != torch.int64 or not values.is_cpu:
        values = values.to("cpu", torch.int64)
    return values, [0 if raw is None else raw.numel() for raw in raws]


def flat_dense(dense: Any, width: int) -> torch.Tensor | None:
    """One sample's ``width`` finite dense features as a 1-D float32 tensor.

    A list of real numbers, or a real-valued tensor or numpy array read through ``tolist()``: a copy, so the batch
    never sees later changes (the feature-by-feature path may keep a view of a float32 tensor).
    """
    if dense is None:
        return None if width else torch.empty(0)
    if type(dense) is torch.Tensor:
        if dense.dtype == torch.bool or dense.is_complex():
            return None
        dense = dense.tolist()
    elif type(dense) is np.ndarray:
        if dense.dtype.kind not in "iuf":
            return None
        dense = dense.tolist()
    numbers = _float32_array(dense)
    if numbers is None or len(numbers) != width or not math.isfinite(sum(numbers)):
        return None
    return _float32_tensor(numbers)


def flat_weights(given: Mapping[str, Any], weighted: frozenset[str], index: Mapping[str, int],
                 counts: list[int]) -> torch.Tensor | None:
    """float32 weights aligned with one sample's ids: ``given`` for the weighted keys, 1.0 for the others.

    None unless every given key is weighted and each weighted key has one finite real weight per id.
    """
    if not given.keys() <= weighted:
        return None
    numbers = array("f", [1.0]) * sum(counts)
    starts = [0, *itertools.accumulate(counts)]
    for key in weighted:
        i = index[key]
        values = _weight_list(given.get(key))
        if values is None or len(values) != counts[i]:
            return None
        numbers[starts[i]:starts[i + 1]] = values
    return _float32_tensor(numbers) if math.isfinite(sum(numbers)) else None


def _weight_list(raw: Any) -> array | None:
    """One weighted key's weights as a float32 ``array`` (empty when not given); None if not real numbers."""
    if raw is None:
        return array("f")
    if type(raw) is torch.Tensor:
        if raw.dim() != 1 or raw.dtype == torch.bool or raw.is_complex():
            return None
        raw = raw.tolist()
    elif type(raw) is not list:
        return None
    return _float32_array(raw)


def _float32_array(numbers: Any) -> array | None:
    """A list of real numbers as a float32 ``array``; None for anything else (a string, a list, a Decimal, an int
    past 1e308). ``array`` takes any object with ``__float__``, so every element's type is checked."""
    if type(numbers) is not list or not set(map(type, numbers)) <= _REAL:
        return None
    try:
        return array("f", numbers)
    except OverflowError:
        return None


def _float32_tensor(numbers: array) -> torch.Tensor:
    """A float32 ``array`` as a tensor sharing its memory (``frombuffer`` refuses an empty buffer)."""
    return torch.frombuffer(numbers, dtype=torch.float32) if numbers else torch.empty(0)
