"""Without a Ray cluster: batchplex errors survive Ray's pickling with type, message and attributes; the HTTP
codec turns JSON forms into tensors and back, and refuses malformed ones with `InvalidRequestError`."""

from __future__ import annotations

import batchplex.errors
import pytest
import ray.cloudpickle
import torch
from batchplex import InvalidRequestError
from batchplex_ray import compact_result, decode_item, encode_image, encode_result
from batchplex_ray.deployment import _status


@pytest.mark.parametrize("name", batchplex.errors.__all__)
def test_every_batchplex_error_pickles_with_its_type_and_message(name):
    cls = getattr(batchplex.errors, name)
    if issubclass(cls, InvalidRequestError):
        error = cls("too long", workload="embed", rule="max_length", value=600)
    else:
        error = cls("workload 'w': something precise")
    copy = ray.cloudpickle.loads(ray.cloudpickle.dumps(error))
    assert type(copy) is cls and str(copy) == str(error)
    if isinstance(error, InvalidRequestError):
        assert (copy.workload, copy.rule, copy.value) == ("embed", "max_length", 600)


def test_http_status_follows_the_most_specific_error_class():
    assert _status(batchplex.errors.RequestTooLargeError("x")) == 413
    assert _status(batchplex.errors.InvalidRequestError("x")) == 422
    assert _status(batchplex.errors.QueueFullError("x")) == 503
    assert _status(batchplex.errors.DeadlineExceeded("x")) == 504
    assert _status(batchplex.errors.ContractError("x")) == 500


def test_tensor_forms_round_trip():
    image = torch.randint(0, 256, (8, 6, 3), dtype=torch.uint8)
    assert torch.equal(decode_item(encode_image(image)), image)
    assert torch.equal(decode_item({"tensor": image.tolist(), "dtype": "uint8"}), image)
    assert decode_item("a text") == "a text" and decode_item([101, 102]) == [101, 102]
    assert encode_result({"boxes": torch.ones(1, 2), "labels": (torch.tensor(3),)}) == {
        "boxes": [[1.0, 1.0]], "labels": [3]}


@pytest.mark.parametrize("item, rule", [
    ({"tensor": [[1, 2], [3]]}, "tensor from nested lists"),
    ({"tensor": [1, 2], "dtype": "uint9"}, "dtype name"),
    ({"base64": "AAAA", "shape": [5, 5]}, "base64 bytes with shape"),
    ({"base64": "not base64!", "shape": [1]}, "base64 bytes with shape"),
    ({"base64": "AAAA"}, "base64 bytes with shape"),
])
def test_malformed_tensor_forms_are_invalid_requests(item, rule):
    with pytest.raises(InvalidRequestError) as caught:
        decode_item(item)
    assert caught.value.rule == rule


def test_compact_result_gives_each_row_view_its_own_storage():
    batch_output = torch.arange(64 * 1000, dtype=torch.float16).view(64, 1000)
    rows = list(batch_output.unbind(0))
    result = {"logits": rows[5], "labels": [rows[6][:3]], "whole": batch_output, "name": "x"}
    compact = compact_result(result)
    assert torch.equal(compact["logits"], rows[5]) and torch.equal(compact["labels"][0], rows[6][:3])
    assert compact["whole"] is batch_output and compact["name"] == "x"
    one_row = len(ray.cloudpickle.dumps(torch.zeros(1000, dtype=torch.float16)))
    assert len(ray.cloudpickle.dumps(compact["logits"])) <= one_row < len(ray.cloudpickle.dumps(rows[5])) / 10


def test_compact_result_keeps_expanded_and_strided_views_small_and_passes_sparse_through():
    batch_output = torch.arange(64 * 1000, dtype=torch.float16).view(64, 1000)
    expanded = batch_output[5:6].expand(200, 1000)  # one row seen 200 times: one row's storage is enough
    column = batch_output[:, 7]  # strided: 64 elements spread over the whole batch
    sparse = torch.eye(3).to_sparse()
    compact = compact_result([expanded, column, sparse])
    assert torch.equal(compact[0], expanded) and compact[0].stride() == expanded.stride()
    assert compact[0].untyped_storage().nbytes() == 1000 * 2
    assert torch.equal(compact[1], column) and compact[1].untyped_storage().nbytes() == 64 * 2
    assert compact[2] is sparse
