"""The ``ranking`` adapter: ranking requests batched into one torchrec `KeyedJaggedTensor` plus dense rows.

Configure it per workload with ``adapter_options``:

* ``keys``: the sparse feature keys, in the order the model's embedding tables expect them (required);
* ``table_sizes``: ``{key: num_embeddings}``; ids must lie in ``[0, size)`` (`table_sizes_of(model)` reads them
  from the model). Keys without a size are only checked for ``>= 0``;
* ``weighted_keys``: keys whose ids carry a weight each (for ``EmbeddingBagCollection(is_weighted=True)``);
  the batch then has weights for every id, 1.0 for the unweighted keys;
* ``dense_dim``: the number of dense features per sample (13 for Criteo);
* ``results_on_device``: keep the outputs on the device instead of copying them to host memory;
* ``flatten``: ``"submit"`` (default: each request is checked and flattened when it is submitted, on the event
  loop, and bad input is refused there) or ``"collate"`` (N-sample requests whose features are all torchrec
  ``JaggedTensor``s, and one-sample requests whose features are all 1-D id tensors with a 1-D dense tensor, without
  weights, are kept as given and read a batch at a time on the collate thread: a few operations per batch instead
  of a concatenation and a range check (one sample) or about 20 operations (N samples) per request on the event
  loop, which every workload of the scheduler shares). With ``"collate"`` such a request breaking a rule fails
  when its batch is collated, alone and with the same `InvalidRequestError` (the batch is bisected; it counts as
  ``failed``, not ``rejected_invalid``); other forms are still prepared at submit. Only host tensors are kept: a
  request with CUDA tensors is prepared at submit, on the caller's stream. Such a request is read when its batch
  is collated: leave its tensors unchanged until its result arrives.

The model is called with one `RankingBatch` (``dense_features``, ``sparse_features``: the field names of
torchrec's own ``Batch``); wrap a torchrec ``DLRM`` in `RankingModel`.

A request's cost is its number of samples, so ``BatchPolicy.max_batch_cost`` bounds the samples in a batch while
``max_batch_size`` bounds the requests. A padded batch (``preferred_batch_sizes``) gets one empty sample per
padding request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
from batchplex import Adapter, InvalidRequestError
from batchplex.collate import map_tensors

from ._jagged_batch import DeferredRanking, defer, flatten_batch
from ._layout import stage, transpose_segments
from ._torchrec import load
from .request import PreparedRanking, prepare_request
from .spec import FeatureSpec

__all__ = ["RankingAdapter", "RankingBatch"]


@dataclass(frozen=True)
class RankingBatch:
    """What the model receives: ``dense_features`` (samples x dense_dim, float32) and ``sparse_features`` (a
    key-major `KeyedJaggedTensor` with ``stride() == samples``), both on the workload's device."""

    dense_features: torch.Tensor
    sparse_features: Any  # torchrec.sparse.jagged_tensor.KeyedJaggedTensor

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Mark every tensor as used on ``stream`` so the allocator keeps it until the stream's work is done."""
        self.dense_features.record_stream(stream)
        self.sparse_features.record_stream(stream)


class RankingAdapter(Adapter[PreparedRanking]):
    """Sparse id-list + dense feature requests (one or N samples each) -> one `RankingBatch` per batch.

    The instance registered by the plugin holds no options; each workload gets a configured copy
    (``adapter_options={"keys": [...], ...}``), and configuring it imports torchrec.
    """

    name = "ranking"

    def __init__(self, keys: Sequence[str] | None = None, *, table_sizes: Mapping[str, int] | None = None,
                 weighted_keys: Sequence[str] = (), dense_dim: int = 0, results_on_device: bool = False,
                 flatten: str = "submit") -> None:
        if flatten not in ("submit", "collate"):
            raise ValueError(f"adapter 'ranking': option 'flatten' must be 'submit' or 'collate', got {flatten!r}")
        self.spec = None if keys is None else FeatureSpec.build(keys, table_sizes, weighted_keys, dense_dim)
        self.copy_output_to_host = not results_on_device
        self.flatten_at_collate = flatten == "collate"
        self._torchrec = None if keys is None else load()

    def configure(self, **options: Any) -> RankingAdapter:
        if "keys" not in options:
            raise ValueError("adapter 'ranking' needs its sparse feature keys: add_workload(..., adapter='ranking', "
                             "adapter_options={'keys': [...], 'dense_dim': D, 'table_sizes': {...}})")
        return type(self)(**options)

    def _spec(self) -> FeatureSpec:
        if self.spec is None:
            raise ValueError("this ranking adapter has no feature keys; use RankingAdapter(keys=[...]) or "
                             "adapter_options={'keys': [...]}")
        return self.spec

    # ------------------------------------------------------------------ submit
    def prepare(self, item: Any, **params: Any) -> PreparedRanking | DeferredRanking:
        """Validate one request and flatten it (see `batchplex_recsys.request`), or with ``flatten="collate"``
        keep an N-sample request of JaggedTensors for its batch."""
        if params:
            raise InvalidRequestError(f"the ranking adapter takes no request parameters, got {sorted(params)}",
                                      rule="no parameters", value=sorted(params))
        spec = self._spec()
        if self.flatten_at_collate:
            deferred = defer(spec, item, self._torchrec.JaggedTensor)
            if deferred is not None:
                return deferred
        return prepare_request(spec, item)

    def cost(self, prepared: PreparedRanking | DeferredRanking) -> int:
        """The request's number of samples."""
        return prepared.samples

    def padded_cost(self, costs: Sequence[int], batch_size: int) -> int:
        """The batch's samples plus one empty sample per padding request."""
        return sum(costs) + batch_size - len(costs)

    # ------------------------------------------------------------------ batch
    def collate(self, items: Sequence[PreparedRanking | DeferredRanking], device: torch.device,
                batch_size: int) -> RankingBatch:
        """Two concatenations, one sample-major -> key-major transpose, per-key metadata on the host, then at
        most two non-blocking copies (ints; floats) from pinned memory. A batch of deferred requests is read in
        one pass (`flatten_batch`); if one of them breaks a rule, each is prepared alone, which raises its error."""
        spec = self._spec()
        padding = batch_size - len(items)
        if self.flatten_at_collate:
            flat = flatten_batch(spec, items, padding) if all(
                type(item) is DeferredRanking for item in items) else None
            if flat is not None:
                return self._batch(flat.lengths, flat.values, None, flat.dense, flat.samples, flat.length_per_key,
                                   device)
            items = [_prepare_deferred(spec, item) if type(item) is DeferredRanking else item for item in items]
        keys = len(spec.keys)
        samples = sum(item.samples for item in items) + padding
        values = torch.cat([item.values for item in items])
        length_parts = [item.lengths for item in items]
        dense_parts = [item.dense for item in items]
        if padding:
            length_parts.append(torch.zeros(padding * keys, dtype=torch.int64))
            dense_parts.append(torch.zeros(padding * spec.dense_dim))
        weights = torch.cat([item.weights for item in items]) if spec.weighted else None
        lengths, values, weights = transpose_segments(torch.cat(length_parts), values, weights, samples, keys)
        return self._batch(lengths, values, weights, torch.cat(dense_parts).view(samples, spec.dense_dim), samples,
                           lengths.view(keys, samples).sum(1).tolist(), device)

    def _batch(self, lengths: torch.Tensor, values: torch.Tensor, weights: torch.Tensor | None,
               dense: torch.Tensor, samples: int, length_per_key: list[int], device: torch.device) -> RankingBatch:
        """Key-major host tensors -> a `RankingBatch` on ``device``: offsets made on the host, then at most two
        non-blocking copies (ints; floats) from pinned memory."""
        offsets = self._torchrec.complete_cumsum(lengths)
        values, lengths, offsets = stage((values, lengths, offsets), device)
        if weights is None:
            (dense,) = stage((dense,), device)
        else:
            dense, weights = stage((dense, weights), device)
        sparse = self._torchrec.KeyedJaggedTensor(
            keys=list(self.spec.keys), values=values, weights=weights, lengths=lengths, offsets=offsets, stride=samples,
            length_per_key=length_per_key, offset_per_key=[0, *accumulate(length_per_key)])
        return RankingBatch(dense, sparse)

    def postprocess(self, output: Any, inputs: RankingBatch, items: Sequence[PreparedRanking]) -> Any:
        """Runs on the compute stream: record the batch's tensors there (they were made on the copy stream), so
        their memory is not reused by the next batch's copy before this batch's kernels are done."""
        if inputs.dense_features.is_cuda:
            inputs.record_stream(torch.cuda.current_stream(inputs.dense_features.device))
        return output

    def split(self, output: Any, items: Sequence[PreparedRanking]) -> list[Any]:
        """Per request its rows of every output tensor: one row (one-sample form) or a block of N rows."""
        if not isinstance(output, (torch.Tensor, Mapping, tuple, list)):
            raise TypeError(f"the ranking adapter splits tensors (or tuples/lists/dicts of them) by sample; the "
                            f"model returned a {type(output).__name__} (return e.g. KeyedTensor.values())")
        results = []
        start = 0
        for item in items:
            results.append(_rows(output, start, start + item.samples, item.single))
            start += item.samples
        return results


def _prepare_deferred(spec: FeatureSpec, item: DeferredRanking) -> PreparedRanking:
    """A deferred request prepared alone, as at submit: anything it breaks raises `InvalidRequestError`, also an
    error the checks did not foresee (which at submit the scheduler would have turned into one)."""
    try:
        return prepare_request(spec, item.request)
    except InvalidRequestError:
        raise
    except Exception as error:
        raise InvalidRequestError(f"adapter 'ranking' could not prepare this request: {type(error).__name__}: "
                                  f"{error}", rule="adapter.prepare", value=type(item.request).__name__) from error


def _rows(output: Any, start: int, stop: int, single: bool) -> Any:
    """Rows ``start:stop`` of every tensor in ``output`` (row ``start`` alone for a one-sample request); views."""
    return map_tensors(lambda tensor: tensor[start] if single else tensor[start:stop], output)
