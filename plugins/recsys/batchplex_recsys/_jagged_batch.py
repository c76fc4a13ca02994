"""``flatten="collate"``: requests kept as given at submit and read a batch at a time on the collate thread.

Two forms are kept: N samples with a ``JaggedTensor`` per feature, and one sample with a 1-D id tensor per feature
(and a 1-D dense tensor). Why: prepared at submit, a 32-sample request of 26 ``JaggedTensor`` features costs about
20 tensor operations on the event loop, and a one-sample request of 26 id tensors one concatenation of 26 parts
and a range check (25-53 µs on a 2-core CPU, 31-56 on H200 hosts); under load each operation waits to take the GIL
back from the executor threads. With four workloads sharing an H200, the ranking requests' preparation alone kept
the event loop 77% busy and held every other workload back. Deferred, a request costs a few attribute reads per
feature at submit (`defer`: about 10 µs instead of 120 for the 32-sample form on a 2-core CPU), and its batch is
read in one pass on the collate thread (`flatten_batch`): one concatenation of every request's ids, already in
the key-major order a `KeyedJaggedTensor` wants (no transpose), its lengths made once, one range check of the ids
and one of the dense values for the whole batch.

A request breaking a rule is then found with its batch, not at submit: `flatten_batch` returns None, the adapter
prepares each request alone with `prepare_request` (which raises the precise `InvalidRequestError`), and the
executor bisects the batch so that only that request fails, with the same error it would have had at submit
(counted as failed, not rejected at submit). A batch mixing the two forms is also prepared request by request
(correct, only slower). Only host tensors are kept: the collate thread reads on its own stream, which does not
wait for kernels the caller may still be running on its tensors.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, compress
from operator import attrgetter
from typing import Any

import torch
from batchplex import InvalidRequestError

from ._jagged import EMPTY_IDS, INTEGER_DTYPES, int64_tensor
from .request import check_range, request_fields
from .spec import FeatureSpec

__all__ = ["DeferredRanking", "FlatBatch", "defer", "flatten_batch"]

_dtype = attrgetter("dtype")
_is_cpu = attrgetter("is_cpu")


def _flat_and_dense(ids: torch.Tensor) -> bool:
    """1-D and strided: an empty ids part is dropped before any concatenation could refuse its shape, and a
    sparse one fails only in the range check; either is prepared at submit, which names the rule it breaks."""
    return ids.dim() == 1 and ids.layout is torch.strided


#: torch's ``GRAIN_SIZE``: below this many elements ``torch.cat`` on the CPU copies its parts in one tight loop;
#: above it (with more than one intra-op thread) it makes a ``narrow`` and a ``copy_`` per part, about 1 µs each
_SERIAL_CAT_ELEMENTS = 32768
#: parts of more than this many elements on average are concatenated in one call (see `_cat`)
_LARGE_PART_ELEMENTS = 1024


@dataclass(frozen=True, slots=True)
class DeferredRanking:
    """A request kept as given until its batch is collated."""

    request: Any  # as submitted: prepared alone when its batch has to be read request by request
    ids: tuple  # per configured key, in key order: a JaggedTensor's values (N samples) or a 1-D id tensor (one)
    lengths: tuple | None  # per configured key, the JaggedTensor's lengths; None for the one-sample form
    dense: Any
    samples: int

    @property
    def single(self) -> bool:
        """The one-sample form: the result is one output row, not a block of rows."""
        return self.lengths is None


@dataclass(frozen=True, slots=True)
class FlatBatch:
    """A batch's sparse ids key-major (what a `KeyedJaggedTensor` holds) and its dense rows, on the host."""

    lengths: torch.Tensor  # int64, keys * samples
    values: torch.Tensor  # int64 ids, key-major
    length_per_key: list[int]
    dense: torch.Tensor  # float32, samples x dense_dim
    samples: int


def defer(spec: FeatureSpec, item: Any, jagged_type: type) -> DeferredRanking | None:
    """``item`` kept for its batch when every configured key holds a ``jagged_type`` (torchrec's JaggedTensor), or
    every key a 1-D id tensor (one sample, with 1-D dense features), all on the host and with no weights; None for
    every other form, which is then prepared at submit."""
    sparse, dense, weights = request_fields(item)
    if spec.weighted or weights or len(sparse) != len(spec.keys):  # a key left out, or an unknown one
        return None
    features = tuple(map(sparse.get, spec.keys))
    # host tensors only: the collate thread reads on its own stream, which does not wait for the caller's kernels
    if type(dense) is torch.Tensor and not dense.is_cpu:
        return None
    if all(type(feature) is torch.Tensor for feature in features):
        return _one_sample(spec, item, features, dense)
    if not all(type(feature) is jagged_type for feature in features):
        return None
    # read here, where the host check needs them anyway, so the collate thread does not call torchrec per feature
    ids, lengths = tuple(map(jagged_type.values, features)), tuple(map(jagged_type.lengths, features))
    if not (all(map(_is_cpu, ids)) and all(map(_is_cpu, lengths)) and all(map(_flat_and_dense, ids))):
        return None
    if lengths[0].dim() != 1 or not lengths[0].shape[0]:  # prepared at submit, which names what is wrong
        return None
    return DeferredRanking(item, ids, lengths, dense, lengths[0].shape[0])


def _one_sample(spec: FeatureSpec, item: Any, features: tuple, dense: Any) -> DeferredRanking | None:
    """One sample: 1-D host id tensors and a vector of ``dense_dim`` values (none where the workload has none).
    A 2-D id tensor is the N-sample form (one row per sample): prepared at submit, as is a dense part of another
    shape (refused there, with the rule it breaks)."""
    if not all(feature.is_cpu and _flat_and_dense(feature) for feature in features):
        return None
    expected = (spec.dense_dim,)
    if (dense is not None or spec.dense_dim) and not (type(dense) is torch.Tensor and dense.shape == expected):
        return None
    return DeferredRanking(item, features, None, dense, 1)


def flatten_batch(spec: FeatureSpec, items: Sequence[DeferredRanking], padding: int) -> FlatBatch | None:
    """The batch's ids, lengths and dense rows, with ``padding`` empty samples at the end; None when any request
    breaks a rule (the caller then prepares each request alone to name it) or the batch mixes the two forms."""
    forms = {item.single for item in items}
    if len(forms) != 1:
        return None
    try:
        return (_flatten_one_sample if forms == {True} else _flatten_jagged)(spec, items, padding)
    except (RuntimeError, NotImplementedError):
        # torch refusing a part `defer` does not inspect (parts of different dimensions, a sparse layout, a tensor
        # resized since submit): None, so the batch is prepared request by request and the bad request fails alone
        # with its precise error
        return None


def _flatten_jagged(spec: FeatureSpec, items: Sequence[DeferredRanking], padding: int) -> FlatBatch | None:
    """A batch of N-sample requests: key by key, each request's JaggedTensor values and lengths, then the
    padding's empty samples."""
    keys = len(spec.keys)
    counts = [item.samples for item in items]
    segments = [*counts, padding] if padding else counts  # one segment of lengths per request, and the padding
    # key-major: key 0 of every request (then the padding's empty samples), key 1 of every request, ...
    ids_parts = list(chain.from_iterable(zip(*[item.ids for item in items])))
    lengths_columns = [item.lengths for item in items]
    if padding:
        lengths_columns.append((torch.zeros(padding, dtype=torch.int64),) * keys)
    lengths_parts = list(chain.from_iterable(zip(*lengths_columns)))
    ids_per_part = list(map(torch.Tensor.numel, ids_parts))
    # per lengths part only what the concatenation would hide (it promotes dtypes; `_cat_ids` checks the ids')
    if not (set(map(_dtype, lengths_parts)) <= INTEGER_DTYPES
            and list(map(torch.Tensor.numel, lengths_parts)) == segments * keys):
        return None
    ids_per_segment = _with_padding_segments(ids_per_part, len(items), keys) if padding else ids_per_part
    lengths = _cat(lengths_parts, segments * keys).to(torch.int64)
    values = _cat_ids(ids_parts, ids_per_part)
    if values is None or lengths.dim() != 1 or values.dim() != 1:
        return None
    if not _lengths_match(lengths, ids_per_segment, segments * keys):
        return None
    per_key = len(segments)
    length_per_key = [sum(ids_per_segment[key * per_key:(key + 1) * per_key]) for key in range(keys)]
    return _checked(spec, items, padding, lengths, values, length_per_key)


def _with_padding_segments(ids_per_part: list[int], requests: int, keys: int) -> list[int]:
    """Each key's id counts followed by a 0 for the padding segment (which holds no ids)."""
    return [count for key in range(keys) for count in (*ids_per_part[key * requests:(key + 1) * requests], 0)]


def _flatten_one_sample(spec: FeatureSpec, items: Sequence[DeferredRanking], padding: int) -> FlatBatch | None:
    """A batch of one-sample requests: key by key, each request's id tensor is its sample's ids for that key, so
    the lengths are the parts' sizes (and 0 for each padding sample)."""
    requests, keys = len(items), len(spec.keys)
    parts = list(chain.from_iterable(zip(*[item.ids for item in items])))
    counts = list(map(torch.Tensor.numel, parts))
    values = _cat_ids(parts, counts)
    if values is None:
        return None
    per_key = [counts[key * requests:(key + 1) * requests] for key in range(keys)]
    lengths = int64_tensor([length for lengths in per_key for length in (*lengths, *[0] * padding)])
    return _checked(spec, items, padding, lengths, values, list(map(sum, per_key)))


def _checked(spec: FeatureSpec, items: Sequence[DeferredRanking], padding: int, lengths: torch.Tensor,
             values: torch.Tensor, length_per_key: list[int]) -> FlatBatch | None:
    """The batch, once its ids pass the range check and its dense rows are read (both forms end here); None when
    either fails (the caller then prepares each request alone to name the request)."""
    try:
        check_range(spec, values, length_per_key)
    except InvalidRequestError:
        return None
    dense = _dense_rows(spec, items, padding)
    return None if dense is None else FlatBatch(lengths, values, length_per_key, dense, dense.shape[0])


def _cat_ids(parts: list[torch.Tensor], sizes: list[int]) -> torch.Tensor | None:
    """The ids of ``parts`` (whose element counts are ``sizes``) as one int64 tensor; None if a part holding ids
    is not of an integer dtype (a concatenation would promote the batch's ids). Empty parts, whatever their dtype,
    hold no ids: left out, as at submit (``torch.tensor([])`` is float32)."""
    if 0 in sizes:
        parts, sizes = list(compress(parts, sizes)), [size for size in sizes if size]
    if not set(map(_dtype, parts)) <= INTEGER_DTYPES:
        return None
    return _cat(parts, sizes).to(torch.int64) if parts else EMPTY_IDS


def _cat(parts: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """``torch.cat(parts)`` (``sizes`` are the parts' element counts); many small parts in groups of under 32,768
    elements.

    Why: over that size, with more than one intra-op thread, torch's CPU cat copies part by part, and a batch can
    have thousands of small parts (64 requests of 32 samples x 26 features: 1,664 parts, 558k ids, 3.0 ms in one
    call against 1.8 ms grouped; 2,048 one-sample requests: 53k parts). Grouped, the ids are copied twice, so parts
    of more than ~1,000 elements on average go in one call (variable sizes, 500k elements, 2-core AMD EPYC: 20 per
    part 22 -> 8 ms grouped, 300: 1.4 -> 0.7, 1,000: 0.47 -> 0.37, 2,400: 0.31 -> 0.37), and so does everything
    with one intra-op thread, where cat never copies part by part (1,664 parts: 0.28 ms in one call, 1.33
    grouped). A cat of parts of different dimensions raises ``RuntimeError``, as one call would."""
    ends = list(accumulate(sizes))
    if (not ends or ends[-1] < _SERIAL_CAT_ELEMENTS or ends[-1] > _LARGE_PART_ELEMENTS * len(parts)
            or torch.get_num_threads() == 1):
        return torch.cat(parts)
    groups, start, done = [], 0, 0
    while start < len(parts):  # each group: the longest run from ``start`` under the limit, at least one part
        stop = max(start + 1, bisect_left(ends, done + _SERIAL_CAT_ELEMENTS, start))
        groups.append(torch.cat(parts[start:stop]))
        start, done = stop, ends[stop - 1]
    return torch.cat(groups)


def _lengths_match(lengths: torch.Tensor, ids_per_segment: list[int], segment_sizes: list[int]) -> bool:
    """Every length >= 0, and each segment's lengths add up to the ids its JaggedTensor holds."""
    if not lengths.numel():
        return not any(ids_per_segment)
    shortest, longest = lengths.aminmax()
    if int(shortest) < 0 or int(longest) > max(ids_per_segment):  # then the sums below cannot wrap around
        return False
    ends = int64_tensor([end - 1 for end in accumulate(segment_sizes)])
    totals = lengths.cumsum(0)[ends]
    return torch.diff(totals, prepend=totals.new_zeros(1)).tolist() == ids_per_segment


def _dense_rows(spec: FeatureSpec, items: Sequence[DeferredRanking], padding: int) -> torch.Tensor | None:
    """Every request's dense rows stacked (zeros for the padding); None unless each request gave finite values, a
    vector of ``dense_dim`` (one sample) or a samples x dense_dim tensor; where the workload has no dense features,
    none or such an empty tensor."""
    width = spec.dense_dim
    parts = [item.dense for item in items]
    shapes_match = all(type(part) is torch.Tensor and part.shape == ((width,) if item.single else (item.samples, width))
                       for part, item in zip(parts, items) if part is not None or width)
    if not shapes_match:
        return None
    if not width:
        return torch.zeros(sum(item.samples for item in items) + padding, 0)
    # each part to float32 first, as at submit: a cat would promote ints beside float16 rows to float16; a one-sample
    # part through float64, as its values are read at submit (an int64 past 2**53 rounds there twice)
    single = items[0].single  # a batch holds one form
    parts = [part if part.dtype is torch.float32 else (part.double() if single else part).float() for part in parts]
    rows = torch.stack(parts) if single else torch.cat(parts)
    if padding:
        rows = torch.cat([rows, rows.new_zeros(padding, width)])
    return rows if bool(torch.isfinite(rows).all()) else None
