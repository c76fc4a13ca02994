"""``flatten="collate"``: N-sample JaggedTensor requests and one-sample requests of 1-D id tensors are kept as given
at submit and read a batch at a time. The batch must be exactly what requests prepared at submit give, and a request
breaking a rule must fail alone, with the error it would have had at submit."""

import asyncio
import random

import batchplex_recsys
import pytest
import torch
from batchplex import BatchPolicy, InvalidRequestError, Scheduler
from batchplex.testing import assert_same_result, check_adapter
from batchplex_recsys import RankingAdapter, table_sizes_of
from batchplex_recsys._jagged_batch import _SERIAL_CAT_ELEMENTS, DeferredRanking, _cat, flatten_batch
from batchplex_recsys.criteo import DENSE_DIM, SPARSE_KEYS, build_dlrm, jagged_form, random_request
from batchplex_recsys.request import PreparedRanking
from torchrec import JaggedTensor

KEYS = ("a", "b", "c")
SIZES = {"a": 10, "b": 20, "c": 30}


def adapter(flatten="collate"):
    return RankingAdapter().configure(keys=KEYS, table_sizes=SIZES, dense_dim=2, flatten=flatten)


def jagged(rows, dtype=torch.int64, lengths_dtype=torch.int64):
    return JaggedTensor(torch.tensor([i for row in rows for i in row], dtype=dtype),
                        lengths=torch.tensor([len(row) for row in rows], dtype=lengths_dtype))


def request(rng, samples, dtype=torch.int64):
    rows = {key: [[rng.randrange(SIZES[key]) for _ in range(rng.randrange(4))] for _ in range(samples)]
            for key in KEYS}
    return {"sparse": {key: jagged(value, dtype, dtype) for key, value in rows.items()},
            "dense": torch.tensor([[rng.random(), rng.random()] for _ in range(samples)])}


def assert_same_batch(ours, theirs):
    kjt, expected = ours.sparse_features, theirs.sparse_features
    assert kjt.keys() == expected.keys() and kjt.stride() == expected.stride()
    for name in ("values", "lengths", "offsets"):
        assert torch.equal(getattr(kjt, name)(), getattr(expected, name)()), name
    assert kjt.length_per_key() == expected.length_per_key()
    assert kjt.offset_per_key() == expected.offset_per_key()
    assert torch.equal(ours.dense_features, theirs.dense_features)


@pytest.mark.parametrize("padding", [0, 3])
def test_a_deferred_batch_collates_exactly_like_requests_prepared_at_submit(device, padding):
    rng = random.Random(0)
    requests = [request(rng, samples, dtype) for samples, dtype in ((1, torch.int64), (4, torch.int32),
                                                                     (2, torch.int64), (7, torch.int32))]
    deferred, submitted = adapter(), adapter("submit")
    items = [deferred.prepare(r) for r in requests]
    assert all(type(item) is DeferredRanking for item in items)
    assert [deferred.cost(item) for item in items] == [1, 4, 2, 7]
    assert flatten_batch(deferred.spec, items, padding) is not None  # read in one pass, not request by request
    size = len(requests) + padding
    assert_same_batch(deferred.collate(items, device, size),
                      submitted.collate([submitted.prepare(r) for r in requests], device, size))


def test_dense_rows_and_empty_features_read_in_one_pass_as_at_submit():
    """Each dense part goes to float32 alone (a concatenation would turn ints beside float16 rows into float16),
    and empty ids of any dtype (``torch.tensor([])`` is float32) hold no ids, as at submit."""
    empty = JaggedTensor(torch.tensor([]), lengths=torch.tensor([0, 0]))
    requests = [{"sparse": {"a": jagged([[1], [2]]), "b": empty, "c": jagged([[3], []])},
                 "dense": torch.tensor([[2049, 1], [1, 1]])},
                {"sparse": {key: jagged([[4], [5, 6]]) for key in KEYS}, "dense": torch.zeros(2, 2).half()}]
    ours, submitted = adapter(), adapter("submit")
    items = [ours.prepare(r) for r in requests]
    assert flatten_batch(ours.spec, items, 0) is not None
    batch = ours.collate(items, torch.device("cpu"), 2)
    assert batch.dense_features[0].tolist() == [2049.0, 1.0]
    assert_same_batch(batch, submitted.collate([submitted.prepare(r) for r in requests], torch.device("cpu"), 2))


def one_sample(rng, dtype=torch.int64, dense_dtype=torch.float32):
    return {"sparse": {key: torch.tensor([rng.randrange(SIZES[key]) for _ in range(rng.randrange(4))], dtype=dtype)
                       for key in KEYS},
            "dense": torch.tensor([rng.random(), rng.random()]).to(dense_dtype)}


@pytest.mark.parametrize("padding", [0, 2])
def test_one_sample_requests_are_deferred_and_collate_exactly_like_requests_prepared_at_submit(device, padding):
    rng = random.Random(5)
    requests = [one_sample(rng, dtype, dense) for dtype, dense in (
        (torch.int64, torch.float32), (torch.int32, torch.float16), (torch.int64, torch.float64), (torch.int16,
                                                                                                   torch.float32))]
    requests[1]["sparse"]["b"] = torch.tensor([])  # empty, float32: holds no ids, as at submit
    deferred, submitted = adapter(), adapter("submit")
    items = [deferred.prepare(r) for r in requests]
    assert all(type(item) is DeferredRanking and item.single for item in items)
    assert [deferred.cost(item) for item in items] == [1, 1, 1, 1]
    assert flatten_batch(deferred.spec, items, padding) is not None  # read in one pass, not request by request
    size = len(requests) + padding
    assert_same_batch(deferred.collate(items, device, size),
                      submitted.collate([submitted.prepare(r) for r in requests], device, size))
    rows = deferred.split(torch.arange(size * 3.0).view(size, 3), items)
    assert [row.tolist() for row in rows] == [[3.0 * i, 3.0 * i + 1, 3.0 * i + 2] for i in range(4)]


def test_a_batch_mixing_both_deferred_forms_is_read_request_by_request_with_the_same_result(device):
    rng = random.Random(6)
    requests = [one_sample(rng), request(rng, 3), one_sample(rng)]
    ours, submitted = adapter(), adapter("submit")
    items = [ours.prepare(r) for r in requests]
    assert [item.single for item in items] == [True, False, True]
    assert flatten_batch(ours.spec, items, 0) is None
    assert_same_batch(ours.collate(items, device, 4),
                      submitted.collate([submitted.prepare(r) for r in requests], device, 4))
    assert [tuple(part.shape) for part in ours.split(torch.zeros(6, 1), items)] == [(1,), (3, 1), (1,)]


def test_one_sample_forms_that_are_not_deferred():
    """2-D id tensors are the N-sample form; lists are read at submit by the fast path; a dense part of another
    length is refused at submit with its rule."""
    ours = adapter()
    two_d = {"sparse": {key: torch.tensor([[1], [2]]) for key in KEYS}, "dense": torch.zeros(2, 2)}
    assert type(ours.prepare(two_d)) is PreparedRanking and ours.prepare(two_d).samples == 2
    lists = {"sparse": {key: [1, 2] for key in KEYS}, "dense": [0.5, 0.5]}
    assert type(ours.prepare(lists)) is PreparedRanking
    with pytest.raises(InvalidRequestError) as caught:
        ours.prepare({"sparse": {key: torch.tensor([1]) for key in KEYS}, "dense": torch.zeros(3)})
    assert caught.value.rule == "dense length"


@pytest.mark.parametrize(("change", "rule"), [
    (lambda r: r["sparse"].update(c=torch.tensor([1, 30])), "ids < table size"),
    (lambda r: r["sparse"].update(a=torch.tensor([-1])), "ids >= 0"),
    (lambda r: r["sparse"].update(b=torch.tensor([1.0, 2.0])), "integer ids"),
    (lambda r: r.update(dense=torch.tensor([0.0, float("inf")])), "finite dense values")])
def test_a_one_sample_request_breaking_a_rule_makes_its_batch_raise_the_submit_error(change, rule):
    rng = random.Random(7)
    bad = one_sample(rng)
    change(bad)
    ours = adapter()
    batch = [ours.prepare(one_sample(rng)), ours.prepare(bad), ours.prepare(one_sample(rng))]
    assert all(type(item) is DeferredRanking for item in batch)  # nothing is read at submit
    assert flatten_batch(ours.spec, batch, 1) is None and flatten_batch(ours.spec, batch[::2], 1) is not None
    with pytest.raises(InvalidRequestError) as caught:
        ours.collate(batch, torch.device("cpu"), 4)
    assert caught.value.rule == rule
    with pytest.raises(InvalidRequestError) as at_submit:
        adapter("submit").prepare(bad)
    assert at_submit.value.rule == rule


def test_one_sample_dense_values_round_as_at_submit():
    """At submit a one-sample dense vector is read through float64 (``tolist``): an int64 past 2**53 rounds twice."""
    request = {"sparse": {key: torch.tensor([1]) for key in KEYS}, "dense": torch.tensor([2**60 + 2**36 + 1, 0])}
    ours, submitted = adapter(), adapter("submit")
    item = ours.prepare(request)
    assert type(item) is DeferredRanking
    assert torch.equal(ours.collate([item], torch.device("cpu"), 1).dense_features,
                       submitted.collate([submitted.prepare(request)], torch.device("cpu"), 1).dense_features)


@pytest.mark.parametrize("samples", [None, 2])
def test_without_dense_features_an_empty_dense_tensor_is_read_with_its_batch(samples):
    """A workload with ``dense_dim=0``: requests sending no dense tensor and an empty one batch in one pass."""
    ours = RankingAdapter().configure(keys=KEYS, table_sizes=SIZES, flatten="collate")
    submitted = RankingAdapter().configure(keys=KEYS, table_sizes=SIZES)
    if samples is None:
        requests = [{"sparse": {key: torch.tensor([1, 2]) for key in KEYS}, "dense": dense}
                    for dense in (None, torch.empty(0))]
    else:
        requests = [{"sparse": {key: jagged([[1], [2, 3]]) for key in KEYS}, "dense": dense}
                    for dense in (None, torch.empty(samples, 0))]
    items = [ours.prepare(r) for r in requests]
    assert all(type(item) is DeferredRanking for item in items)
    assert flatten_batch(ours.spec, items, 1) is not None
    assert_same_batch(ours.collate(items, torch.device("cpu"), 3),
                      submitted.collate([submitted.prepare(r) for r in requests], torch.device("cpu"), 3))


def test_empty_two_dimensional_ids_are_refused_at_submit_not_deferred():
    """An empty part is left out of the batch's concatenation, so a deferred 0 x 3 ids tensor would pass unseen:
    such a request is prepared at submit, which refuses it."""
    rng = random.Random(8)
    bad = request(rng, 2)
    bad["sparse"]["b"] = JaggedTensor(torch.zeros(0, 3, dtype=torch.int64), lengths=torch.tensor([0, 0]))
    with pytest.raises(InvalidRequestError) as caught:
        adapter().prepare(bad)
    assert caught.value.rule == "ids lengths"


@pytest.mark.parametrize("form", ["one sample", "3 samples"])
async def test_a_sparse_layout_id_tensor_is_prepared_at_submit_and_fails_alone(form):
    """Not deferred (it would fail only in the batch's range check): preparing it at submit fails that request
    alone, as the scheduler words an adapter's unforeseen error (rule ``adapter.prepare``)."""
    model = build_dlrm()
    rng = random.Random(9)
    one = form == "one sample"
    make = (lambda: random_request(rng)) if one else (lambda: jagged_form(random_request(rng, samples=3)))
    bad = make()
    ids = torch.tensor([0, 1, 2]).to_sparse()
    bad.sparse[SPARSE_KEYS[2]] = ids if one else JaggedTensor(ids, lengths=torch.tensor([1, 1, 1]))
    options = {"keys": SPARSE_KEYS, "table_sizes": table_sizes_of(model), "dense_dim": DENSE_DIM, "flatten": "collate"}
    async with Scheduler(autoload=False, plugins=[batchplex_recsys]) as scheduler:
        scheduler.add_workload("dlrm", adapter="ranking", adapter_options=options, model=model,
                               policy=BatchPolicy(max_batch_size=4, max_wait_ms=20))
        results = await asyncio.gather(*(scheduler.submit("dlrm", r) for r in (make(), bad, make())),
                                       return_exceptions=True)
    assert isinstance(results[1], InvalidRequestError) and results[1].rule == "adapter.prepare"
    assert all(isinstance(result, torch.Tensor) for result in results[::2])


@pytest.mark.gpu
def test_requests_holding_cuda_tensors_are_prepared_at_submit():
    """The collate thread reads on its own stream, which does not wait for the caller's kernels."""
    on_gpu = {"sparse": {key: JaggedTensor(torch.tensor([1, 2], device="cuda"), lengths=torch.tensor([1, 1]))
                         for key in KEYS}, "dense": torch.zeros(2, 2)}
    assert type(adapter().prepare(on_gpu)) is PreparedRanking
    on_gpu_dense = {"sparse": {key: jagged([[1], [2]]) for key in KEYS}, "dense": torch.zeros(2, 2, device="cuda")}
    assert type(adapter().prepare(on_gpu_dense)) is PreparedRanking


def test_other_forms_are_prepared_at_submit_and_batch_with_deferred_ones(device):
    rng = random.Random(1)
    jagged_request = request(rng, 3)
    lists = {"sparse": {"a": [[1], [2, 3]], "b": [[4], []]}, "dense": [[0, 1], [2, 3]]}  # "c" left out
    one_sample = {"sparse": {"a": [1], "b": [2], "c": [3]}, "dense": [0.5, 0.5]}
    ours = adapter()
    items = [ours.prepare(r) for r in (jagged_request, lists, one_sample)]
    assert [type(item) for item in items] == [DeferredRanking, PreparedRanking, PreparedRanking]
    submitted = adapter("submit")
    assert_same_batch(ours.collate(items, device, 4),
                      submitted.collate([submitted.prepare(r) for r in (jagged_request, lists, one_sample)],
                                        device, 4))
    with pytest.raises(InvalidRequestError) as caught:  # refused at submit as before
        ours.prepare({"sparse": {"a": [[1], [99]]}, "dense": [[0, 0], [0, 0]]})
    assert caught.value.rule == "ids < table size"


def _bad(kind):
    good = {key: jagged([[1], [2, 3]]) for key in KEYS}
    dense = torch.zeros(2, 2)
    if kind == "ids < table size":
        good["c"] = jagged([[1], [2, 30]])
    elif kind == "ids >= 0":
        good["b"] = jagged([[1], [-2, 3]])
    elif kind == "same number of samples":
        good["b"] = jagged([[1], [2], [3]])
    elif kind == "ids lengths":
        good["a"] = JaggedTensor(torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1]))
    elif kind == "2-D lengths":  # on a key other than the first, whose lengths give the sample count at submit
        good["b"] = JaggedTensor(torch.tensor([3]), lengths=torch.tensor([[0, 1]]))
    elif kind == "finite dense values":
        dense = torch.tensor([[0.0, float("nan")], [0.0, 0.0]])
    return {"sparse": good, "dense": dense}


@pytest.mark.parametrize(("kind", "rule"), [
    ("ids < table size", "ids < table size"), ("ids >= 0", "ids >= 0"),
    ("same number of samples", "same number of samples"), ("ids lengths", "ids lengths"),
    ("2-D lengths", "ids lengths"), ("finite dense values", "finite dense values")])
def test_a_request_breaking_a_rule_makes_its_batch_raise_the_submit_error(kind, rule):
    rng = random.Random(2)
    ours = adapter()
    bad = ours.prepare(_bad(kind))  # deferred: nothing is read at submit
    assert type(bad) is DeferredRanking
    batch = [ours.prepare(request(rng, 2)), bad, ours.prepare(request(rng, 1))]
    assert flatten_batch(ours.spec, batch, 1) is None and flatten_batch(ours.spec, batch[::2], 1) is not None
    with pytest.raises(InvalidRequestError) as caught:
        ours.collate(batch, torch.device("cpu"), 4)
    assert caught.value.rule == rule
    with pytest.raises(InvalidRequestError) as at_submit:
        adapter("submit").prepare(_bad(kind))
    assert at_submit.value.rule == rule


@pytest.mark.parametrize("sizes", [[7] * 10_000, [3, _SERIAL_CAT_ELEMENTS + 5, 2, 40_000, 1] + [9] * 5_000,
                                   [_SERIAL_CAT_ELEMENTS - 1, 1, _SERIAL_CAT_ELEMENTS, *[1] * 200], [2_000] * 40])
def test_the_grouped_concatenation_equals_one_call(sizes, monkeypatch):
    """Many small parts past the serial-copy limit are concatenated in groups (large ones in one call): same values,
    same promoted dtype, and parts of different dimensions still refused. Groups are made with several intra-op
    threads only, so the test says there are two."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    generator = torch.Generator().manual_seed(len(sizes))
    dtypes = (torch.int64, torch.int32, torch.int16)
    parts = [torch.randint(0, 1000, (size,), generator=generator, dtype=dtypes[i % 3]) for i, size in enumerate(sizes)]
    ours, expected = _cat(parts, sizes), torch.cat(parts)
    assert ours.dtype == expected.dtype and torch.equal(ours, expected)
    with pytest.raises(RuntimeError):
        _cat([*parts, torch.zeros(2, 2, dtype=torch.int64)], [*sizes, 4])


@pytest.mark.parametrize("samples", [1, 32])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_batch_past_the_serial_copy_limit_collates_like_requests_prepared_at_submit(samples, threads, monkeypatch):
    """Enough ids that every concatenation is grouped with several intra-op threads, and made in one call with one
    (JaggedTensor and one-sample forms, with padding)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    options = {"keys": SPARSE_KEYS, "table_sizes": {key: 1000 for key in SPARSE_KEYS}, "dense_dim": DENSE_DIM}
    deferred = RankingAdapter().configure(**options, flatten="collate")
    submitted = RankingAdapter().configure(**options)
    rng = random.Random(samples)
    requests = [jagged_form(random_request(rng, samples=samples)) if samples > 1 else random_request(rng)
                for _ in range(2048 // samples)]
    items = [deferred.prepare(r) for r in requests]
    flat = flatten_batch(deferred.spec, items, 3)
    assert flat is not None and flat.values.numel() > 4 * _SERIAL_CAT_ELEMENTS
    size = len(requests) + 3
    assert_same_batch(deferred.collate(items, torch.device("cpu"), size),
                      submitted.collate([submitted.prepare(r) for r in requests], torch.device("cpu"), size))


def test_dlrm_batched_equals_alone_with_deferred_requests(device):
    model = build_dlrm().to(device)
    ours = RankingAdapter().configure(keys=SPARSE_KEYS, table_sizes=table_sizes_of(model), dense_dim=DENSE_DIM,
                                      flatten="collate")
    rng = random.Random(3)
    requests = [jagged_form(random_request(rng, samples=samples)) for samples in (4, 1, 7, 2)]
    results = check_adapter(ours, requests, model, device=device, pad_to=6)
    assert [tuple(result.shape) for result in results] == [(4, 1), (1, 1), (7, 1), (2, 1)]


@pytest.mark.parametrize("form", ["3 samples, JaggedTensors", "one sample, id tensors"])
async def test_through_the_scheduler_only_the_bad_request_fails(device, form):
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model = build_dlrm().to(device)
    options = {"keys": SPARSE_KEYS, "table_sizes": table_sizes_of(model), "dense_dim": DENSE_DIM}
    rng = random.Random(4)
    one = form.startswith("one")
    make = (lambda: random_request(rng)) if one else (lambda: jagged_form(random_request(rng, samples=3)))
    requests = [make() for _ in range(7)]
    bad = make()
    bad.sparse[SPARSE_KEYS[5]] = (torch.tensor([0, 1, 10**9]) if one else
                                  JaggedTensor(torch.tensor([0, 1, 10**9]), lengths=torch.tensor([1, 1, 1])))
    requests.insert(3, bad)
    async with Scheduler(autoload=False, plugins=[batchplex_recsys]) as scheduler:
        scheduler.add_workload("dlrm", adapter="ranking", adapter_options={**options, "flatten": "collate"},
                               model=model, device=device, policy=BatchPolicy(max_batch_size=8, max_wait_ms=50))
        results = await asyncio.gather(*(scheduler.submit("dlrm", r) for r in requests), return_exceptions=True)
        stats = scheduler.statistics()["dlrm"]
    error = results.pop(3)
    assert isinstance(error, InvalidRequestError) and error.rule == "ids < table size" and error.value == 10**9
    assert error.workload == "dlrm" and str(error).startswith("workload 'dlrm':")
    assert stats["completed"] == 7 and stats["failed"] == 1 and stats["batches"] >= 1
    submitted = RankingAdapter().configure(**options)
    for r, result in zip(requests[:3] + requests[4:], results):
        item = submitted.prepare(r)
        with torch.inference_mode():
            alone = submitted.split(model(submitted.collate([item], device, 1)), [item])[0]
        assert_same_result(result, alone, rtol=1e-4, atol=1e-5)


def test_flatten_option_is_checked():
    with pytest.raises(ValueError, match="flatten"):
        adapter("later")
