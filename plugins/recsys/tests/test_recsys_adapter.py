"""The ranking adapter on its own: request forms, the key-major batch layout, padding, weights, empty features,
the checks at submit and the adapter options. Models are real torchrec modules with random weights."""

import math
import random
from decimal import Decimal

import numpy as np
import pytest
import torch
from batchplex import InvalidRequestError
from batchplex.testing import check_adapter
from batchplex_recsys import RankingAdapter, RankingRequest, table_sizes_of
from batchplex_recsys.criteo import DENSE_DIM, SPARSE_KEYS, build_dlrm, random_request
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, JaggedTensor

KEYS = ("a", "b", "c")
SIZES = {"a": 10, "b": 20, "c": 30}


def tolerance(device):
    """Batched vs alone: the same float32 kernels on the CPU; cuBLAS may pick another algorithm per batch size."""
    return {"rtol": 1e-5, "atol": 1e-6} if device.type == "cpu" else {"rtol": 1e-4, "atol": 1e-5}


def small_adapter(**options):
    return RankingAdapter().configure(keys=KEYS, table_sizes=SIZES, dense_dim=2, **options)


def weighted_collection(keys=KEYS, dim=4):
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{key}", embedding_dim=dim, num_embeddings=SIZES[key], feature_names=[key])
              for key in keys]
    return EmbeddingBagCollection(tables=tables, is_weighted=True)


MIXED = [
    {"sparse": {"a": [1, 2], "c": [3]}, "dense": [0.5, 1.0]},
    {"sparse": {"a": [[4], [], [5, 6]], "b": [[7], [8, 9], []]}, "dense": [[1, 2], [3, 4], [5, 6]]},
    RankingRequest(sparse={"b": torch.tensor([10], dtype=torch.int32)}, dense=torch.tensor([7.0, 8.0])),
]
# the five samples of MIXED, feature by feature
MIXED_IDS = {"a": [[1, 2], [4], [], [5, 6], []], "b": [[], [7], [8, 9], [], [10]], "c": [[3], [], [], [], []]}


def test_collate_builds_one_key_major_kjt_with_host_metadata(device):
    adapter = small_adapter()
    items = [adapter.prepare(request) for request in MIXED]
    assert [item.samples for item in items] == [1, 3, 1]
    batch = adapter.collate(items, device, len(items))
    kjt = batch.sparse_features
    assert kjt.keys() == list(KEYS) and kjt.stride() == 5
    assert kjt.values().device.type == device.type and batch.dense_features.device.type == device.type
    assert kjt.values().tolist() == [i for key in KEYS for ids in MIXED_IDS[key] for i in ids]
    assert kjt.lengths().tolist() == [len(ids) for key in KEYS for ids in MIXED_IDS[key]]
    assert kjt.offsets().tolist() == [0, 2, 3, 3, 5, 5, 5, 6, 8, 8, 9, 10, 10, 10, 10, 10]
    assert kjt.length_per_key() == [5, 4, 1] and kjt.offset_per_key() == [0, 5, 9, 10]
    assert kjt.weights_or_none() is None
    assert batch.dense_features.tolist() == [[0.5, 1.0], [1, 2], [3, 4], [5, 6], [7, 8]]


def test_padding_adds_one_empty_sample_per_padding_request(device):
    adapter = small_adapter()
    items = [adapter.prepare(request) for request in MIXED]
    batch = adapter.collate(items, device, 5)
    kjt = batch.sparse_features
    assert kjt.stride() == 7 and kjt.length_per_key() == [5, 4, 1]
    assert kjt.lengths().view(3, 7)[:, 5:].sum().item() == 0
    assert batch.dense_features[5:].abs().sum().item() == 0
    assert adapter.padded_cost([1, 3, 1], 5) == 7


def test_request_forms_give_the_same_flat_request():
    adapter = small_adapter()
    as_lists = adapter.prepare({"sparse": {"a": [[1, 2], [3]], "b": [[], [4]]}, "dense": [[0, 1], [2, 3]]})
    as_tensors = adapter.prepare(RankingRequest(
        sparse={"a": [torch.tensor([1, 2]), torch.tensor([3])], "b": [torch.tensor([], dtype=torch.int64),
                                                                        torch.tensor([4])]},
        dense=torch.tensor([[0.0, 1.0], [2.0, 3.0]])))
    as_jagged = adapter.prepare({"sparse": {"a": JaggedTensor(torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1])),
                                            "b": JaggedTensor(torch.tensor([4]), lengths=torch.tensor([0, 1]))},
                                 "dense": [[0, 1], [2, 3]]})
    for prepared in (as_lists, as_tensors, as_jagged):
        assert prepared.samples == 2 and not prepared.single
        assert prepared.values.tolist() == [1, 2, 3, 4]  # sample-major: sample 0 (a), then sample 1 (a, b)
        assert prepared.lengths.tolist() == [2, 0, 0, 1, 1, 0]
    square = adapter.prepare({"sparse": {"c": torch.tensor([[1, 2], [3, 4]])}, "dense": [[0, 0], [0, 0]]})
    assert square.samples == 2 and square.values.tolist() == [1, 2, 3, 4]
    assert square.lengths.tolist() == [0, 0, 2, 0, 0, 2]


def _jagged(rows, dtype=torch.int64):
    return JaggedTensor(torch.tensor([i for row in rows for i in row], dtype=dtype),
                        lengths=torch.tensor([len(row) for row in rows]))


def test_every_feature_as_a_jagged_tensor_reads_all_features_at_once_alike():
    """The all-JaggedTensor fast path flattens exactly as the per-feature reading of the same lists does."""
    adapter = small_adapter()
    rows = {"a": [[1, 2], [], [9]], "b": [[4], [5, 6], []], "c": [[], [29], [0, 1]]}
    dense = [[0, 1], [2, 3], [4, 5]]
    fast = adapter.prepare({"sparse": {key: _jagged(value, torch.int32) for key, value in rows.items()},
                            "dense": dense})
    general = adapter.prepare({"sparse": rows, "dense": dense})
    for field in ("values", "lengths", "dense"):
        assert torch.equal(getattr(fast, field), getattr(general, field)), field
    assert fast.values.dtype == torch.int64 and (fast.samples, fast.single) == (3, False)


@pytest.mark.parametrize(("sparse", "rule"), [
    ({"a": [[1], [2]], "b": [[1], [2]], "c": [[30], [0]]}, "ids < table size"),
    ({"a": [[1], [-2]], "b": [[1], [2]], "c": [[3], [0]]}, "ids >= 0"),
    ({"a": [[1], [2]], "b": [[1]], "c": [[3], [0]]}, "same number of samples"),
])
def test_bad_jagged_requests_get_the_precise_error(sparse, rule):
    with pytest.raises(InvalidRequestError) as caught:
        small_adapter().prepare({"sparse": {key: _jagged(rows) for key, rows in sparse.items()},
                                 "dense": [[0, 0], [0, 0]]})
    assert caught.value.rule == rule


def test_jagged_lengths_that_wrap_around_when_summed_are_refused():
    """Lengths of 2**63 - 1 add up (in int64) to a small number: summed in Python they are refused, never
    handed to the transpose, which would read past the ids."""
    huge = 2**63 - 1
    sparse = {"a": JaggedTensor(torch.tensor([1, 2]), lengths=torch.tensor([huge, huge, 4])),
              "b": _jagged([[1], [2], [3]]), "c": _jagged([[1], [2], [3]])}
    with pytest.raises(InvalidRequestError) as caught:
        small_adapter().prepare({"sparse": sparse, "dense": [[0, 0]] * 3})
    assert caught.value.rule == "ids lengths"


def test_one_sample_forms_give_the_same_flat_request():
    """Int lists and 1-D tensors (the fast path) and tuples or mixed forms (read feature by feature) flatten
    alike; ids may pass the smallest table (a: 10 rows) as long as they fit their own (c: 30 rows)."""
    adapter = small_adapter()
    forms = [
        {"sparse": {"a": [9, 1], "c": [29]}, "dense": [0.5, 1.0]},
        RankingRequest({"a": torch.tensor([9, 1]), "c": torch.tensor([29], dtype=torch.int32)},
                       torch.tensor([0.5, 1.0])),
        {"sparse": {"a": (9, 1), "b": [], "c": [29]}, "dense": (0.5, 1.0)},
        {"sparse": {"a": [9, 1], "c": torch.tensor([29])}, "dense": torch.tensor([0.5, 1.0], dtype=torch.float64)},
    ]
    for form in forms:
        prepared = adapter.prepare(form)
        assert prepared.values.tolist() == [9, 1, 29] and prepared.lengths.tolist() == [2, 0, 1]
        assert prepared.dense.tolist() == [0.5, 1.0] and prepared.samples == 1 and prepared.single


@pytest.mark.parametrize("weights", [[0.5, 2.0], [1, 2.0], torch.tensor([0.5, 2.0]),
                                     torch.tensor([0.5, 2.0], dtype=torch.float64)])
def test_one_sample_weights_as_lists_or_tensors(weights):
    adapter = small_adapter(weighted_keys=["a", "c"])
    prepared = adapter.prepare({"sparse": {"b": [3], "c": [1, 2]}, "dense": [0, 0], "weights": {"c": weights}})
    assert prepared.values.tolist() == [3, 1, 2]
    assert prepared.weights.tolist() == [1.0, float(weights[0]), 2.0]


def test_dlrm_batched_equals_alone_with_multi_sample_requests_and_padding(device):
    model = build_dlrm().to(device)
    adapter = RankingAdapter().configure(keys=SPARSE_KEYS, table_sizes=table_sizes_of(model), dense_dim=DENSE_DIM)
    rng = random.Random(1)
    requests = [random_request(rng, samples=samples) for samples in (None, 4, None, 1, 7, None)]
    results = check_adapter(adapter, requests, model, device=device, pad_to=8, **tolerance(device))
    assert [tuple(result.shape) for result in results] == [(1,), (4, 1), (1,), (1, 1), (7, 1), (1,)]
    assert all(torch.isfinite(result).all() for result in results)


def test_weighted_features_scale_each_id(device):
    collection = weighted_collection().to(device)
    adapter = small_adapter(weighted_keys=["a", "b"])
    request = {"sparse": {"a": [1, 2, 1], "b": [[3], [4, 5]], "c": [[6], []]},
               "weights": {"a": [[0.5, 2.0], [1.5]], "b": [[3.0], [0.25, 4.0]]}, "dense": [[0, 0], [0, 0]]}
    with pytest.raises(InvalidRequestError):  # weights must follow the ids' per-sample shape
        adapter.prepare(request)
    request["sparse"]["a"] = [[1, 2], [1]]
    pooled = collection(adapter.collate([adapter.prepare(request)], device, 1).sparse_features).to_dict()
    tables = {key: collection.embedding_bags[f"t_{key}"].weight.detach() for key in KEYS}
    a, b, c = tables["a"], tables["b"], tables["c"]
    expected = {"a": torch.stack([0.5 * a[1] + 2.0 * a[2], 1.5 * a[1]]),
                "b": torch.stack([3.0 * b[3], 0.25 * b[4] + 4.0 * b[5]]),
                "c": torch.stack([c[6], torch.zeros_like(c[6])])}  # unweighted: weight 1; no ids: zeros
    for key in KEYS:
        torch.testing.assert_close(pooled[key], expected[key], rtol=1e-5, atol=1e-6)


def test_weighted_dlrm_batched_equals_alone(device):
    model = build_dlrm(weighted=True, num_embeddings=100).to(device)
    weighted = SPARSE_KEYS[:5]
    adapter = RankingAdapter().configure(keys=SPARSE_KEYS, table_sizes=table_sizes_of(model), dense_dim=DENSE_DIM,
                                         weighted_keys=weighted)
    rng = random.Random(2)
    requests = [random_request(rng, num_embeddings=100, samples=samples, weighted=weighted)
                for samples in (None, 3, None)]
    batch = adapter.collate([adapter.prepare(request) for request in requests], device, 3)
    assert batch.sparse_features.weights().numel() == batch.sparse_features.values().numel()
    check_adapter(adapter, requests, model, device=device, **tolerance(device))


def test_absent_features_and_a_batch_without_any_id(device):
    model = build_dlrm().to(device)
    adapter = RankingAdapter().configure(keys=SPARSE_KEYS, table_sizes=table_sizes_of(model), dense_dim=DENSE_DIM)
    rng = random.Random(3)
    partial = random_request(rng)
    partial = RankingRequest({key: ids for i, (key, ids) in enumerate(partial.sparse.items()) if i % 3},
                             partial.dense)
    emptied = {"sparse": {key: [] for key in SPARSE_KEYS}, "dense": [0.25] * DENSE_DIM}
    no_ids = [emptied, {"sparse": {}, "dense": [[1.0] * DENSE_DIM, [2.0] * DENSE_DIM]},
              {"sparse": {"cat_3": [[], []]}, "dense": [[0.5] * DENSE_DIM] * 2}]
    batch = adapter.collate([adapter.prepare(request) for request in no_ids], device, 3)
    assert batch.sparse_features.values().numel() == 0 and batch.sparse_features.stride() == 5
    check_adapter(adapter, no_ids, model, device=device, **tolerance(device))
    check_adapter(adapter, [partial, emptied, random_request(rng)], model, device=device, **tolerance(device))


BAD = [
    ({"sparse": {"zzz": [1]}, "dense": [0, 0]}, "known feature key", "zzz"),
    ({"sparse": {"a": [3, 10]}, "dense": [0, 0]}, "ids < table size", 10),
    ({"sparse": {"c": [[1], [29, 30]]}, "dense": [[0, 0], [0, 0]]}, "ids < table size", 30),
    ({"sparse": {"c": [5], "a": [12]}, "dense": [0, 0]}, "ids < table size", 12),
    ({"sparse": {"a": torch.tensor([3, 10])}, "dense": [0, 0]}, "ids < table size", 10),
    ({"sparse": {"b": [-3]}, "dense": [0, 0]}, "ids >= 0", -3),
    ({"sparse": {"b": torch.tensor([2, -3], dtype=torch.int32)}, "dense": [0, 0]}, "ids >= 0", -3),
    ({"sparse": {"a": [1.5]}, "dense": [0, 0]}, "integer ids", 1.5),
    ({"sparse": {"a": torch.tensor([2.0])}, "dense": [0, 0]}, "integer ids", 2.0),
    ({"sparse": {"a": [True]}, "dense": [0, 0]}, "integer ids", True),
    ({"sparse": {"a": ["7"]}, "dense": [0, 0]}, "numeric ids", ["7"]),
    ({"sparse": {"a": [1]}, "dense": [0, 0, 0]}, "dense length", 3),
    ({"sparse": {"a": [1]}}, "dense length", None),
    ({"sparse": {"a": [1]}, "dense": [float("nan"), 0]}, "finite dense values", math.nan),
    ({"sparse": {"a": [1]}, "dense": [float("inf"), 0]}, "finite dense values", math.inf),
    ({"sparse": {"a": [1]}, "dense": [1e300, 0]}, "finite dense values", math.inf),  # past float32
    ({"sparse": {"a": [1]}, "dense": np.array([0.5, 1.0], dtype=object)}, "numeric dense", np.ndarray),
    ({"sparse": {"a": [[1], [2]], "b": [[1]]}, "dense": [[0, 0], [0, 0]]}, "same number of samples",
     {"a": 2, "b": 1, "dense": 2}),
    ({"sparse": {"a": [[1], [2]], "b": [1]}, "dense": [[0, 0], [0, 0]]}, "same number of samples", "b"),
    ({"sparse": {"a": [1]}, "dense": [0, 0], "weights": {"a": [1.0]}}, "weighted feature key", "a"),
    ({"sparse": {"a": [1]}, "dense": [0, 0], "extra": 1}, "request fields", "extra"),
    ({"sparse": {"a": JaggedTensor(torch.tensor([1, 2]), lengths=torch.tensor([1, 2]))}, "dense": [[0, 0]] * 2},
     "ids lengths", 3),
    ({"sparse": {"a": JaggedTensor(torch.tensor([1, 2]), lengths=torch.tensor([3, -1]))}, "dense": [[0, 0]] * 2},
     "ids lengths", -1),
    ([1, 2, 3], "request type", list),
]


@pytest.mark.parametrize(("request_", "rule", "value"), BAD, ids=[f"{rule}-{i}" for i, (_, rule, _) in enumerate(BAD)])
def test_bad_requests_are_refused_naming_rule_and_value(request_, rule, value):
    with pytest.raises(InvalidRequestError) as caught:
        small_adapter().prepare(request_)
    assert caught.value.rule == rule
    if isinstance(value, float) and math.isnan(value):
        assert math.isnan(caught.value.value)
    else:
        assert caught.value.value == value


@pytest.mark.parametrize(("weights", "rule"), [
    ({}, "one weight per id"), ({"a": [1.0]}, "one weight per id"), ({"a": [1.0, float("nan")]}, "finite weights"),
    ({"a": torch.tensor([1.0, float("inf")])}, "finite weights"), ({"a": [True, False]}, "numeric weights"),
    ({"a": [Decimal("0.5"), Decimal("1")]}, "numeric weights"), ({"b": [1.0]}, "weighted feature key"),
    ({"q": [1.0]}, "known feature key")])
def test_bad_weights_are_refused(weights, rule):
    adapter = small_adapter(weighted_keys=["a"])
    with pytest.raises(InvalidRequestError) as caught:
        adapter.prepare({"sparse": {"a": [1, 2], "b": [3]}, "dense": [0, 0], "weights": weights})
    assert caught.value.rule == rule


def test_cost_is_the_number_of_samples():
    adapter = small_adapter()
    assert [adapter.cost(adapter.prepare(request)) for request in MIXED] == [1, 3, 1]


@pytest.mark.parametrize("options", [
    {}, {"keys": "abc"}, {"keys": []}, {"keys": ["a", "a"]}, {"keys": KEYS, "table_sizes": {"z": 3}},
    {"keys": KEYS, "table_sizes": {"a": 0}}, {"keys": KEYS, "weighted_keys": ["z"]},
    {"keys": KEYS, "dense_dim": -1}])
def test_options_are_checked_when_the_workload_is_configured(options):
    with pytest.raises(ValueError, match="ranking"):
        RankingAdapter().configure(**options)


def test_results_stay_on_the_device_when_asked():
    assert small_adapter().copy_output_to_host
    assert not small_adapter(results_on_device=True).copy_output_to_host


def test_table_sizes_are_read_from_the_model():
    assert table_sizes_of(build_dlrm(SPARSE_KEYS[:3], num_embeddings=50)) == {key: 50 for key in SPARSE_KEYS[:3]}
