import pytest

from batchplex import BatchPolicy, PolicyError


def test_defaults_are_valid_and_frozen():
    policy = BatchPolicy()
    assert policy.max_batch_size == 32 and policy.max_wait_s == pytest.approx(0.005)
    with pytest.raises(AttributeError):
        policy.max_batch_size = 4  # type: ignore[misc]


@pytest.mark.parametrize("fields, field_name", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_batch_size": 2.5}, "max_batch_size"),
    ({"max_batch_size": True}, "max_batch_size"),
    ({"max_wait_ms": -1}, "max_wait_ms"),
    ({"max_wait_ms": float("nan")}, "max_wait_ms"),
    ({"preferred_batch_sizes": (8, 4)}, "preferred_batch_sizes"),
    ({"preferred_batch_sizes": (4, 4)}, "preferred_batch_sizes"),
    ({"preferred_batch_sizes": (64,), "max_batch_size": 32}, "preferred_batch_sizes"),
    ({"bucket_edges": (0, 8)}, "bucket_edges"),
    ({"bucket_edges": 5}, "bucket_edges"),
    ({"max_batch_cost": 0}, "max_batch_cost"),
    ({"bucket_edges": (32, 512), "max_batch_cost": 256}, "max_batch_cost"),
    ({"max_queue": 0}, "max_queue"),
    ({"default_timeout_s": 0}, "default_timeout_s"),
    ({"priority_levels": 0}, "priority_levels"),
    ({"priority_aging_ms": 0}, "priority_aging_ms"),
])
def test_invalid_fields_name_the_field_and_the_value(fields, field_name):
    with pytest.raises(PolicyError) as caught:
        BatchPolicy(**fields)
    message = str(caught.value)
    assert f"BatchPolicy.{field_name}" in message
    assert repr(fields[field_name]) in message


def test_padded_size_rounds_up_to_the_nearest_preferred_size():
    policy = BatchPolicy(max_batch_size=64, preferred_batch_sizes=(1, 8, 32))
    assert [policy.padded_size(n) for n in (1, 2, 8, 9, 32, 33, 64)] == [1, 8, 8, 32, 32, 33, 64]


def test_static_policy_pads_every_batch_to_its_size():
    policy = BatchPolicy.static(16, max_wait_ms=1)
    assert policy.max_batch_size == 16
    assert {policy.padded_size(n) for n in range(1, 17)} == {16}


def test_buckets_and_max_cost():
    policy = BatchPolicy(bucket_edges=[32, 64, 128])
    assert policy.bucket_edges == (32, 64, 128)
    assert [policy.bucket_of(c) for c in (1, 32, 33, 64, 65, 128)] == [0, 0, 1, 1, 2, 2]
    assert policy.max_cost == 128
    assert BatchPolicy(max_batch_cost=4096).max_cost == 4096
    assert BatchPolicy().max_cost == float("inf")


def test_priority_aging_defaults_to_a_multiple_of_the_wait():
    assert BatchPolicy(max_wait_ms=50).priority_aging_ms == 1000
    assert BatchPolicy(max_wait_ms=1).priority_aging_ms == 100
