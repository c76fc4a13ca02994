"""Case 6 of the reliability suite: malformed input for every installed adapter, and the generated document.

``docs/bad-input.md`` is generated from these runs. To regenerate it after a change of behaviour or wording:

    .venv/bin/python -m benchmarks.reliability.run bad-input
"""

from pathlib import Path

import pytest
import torch

from benchmarks.reliability import bad_input, harness
from benchmarks.reliability.checks import assert_kept, check_bad_input_good_requests, check_bad_input_typed

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def table() -> dict:
    return harness.run(bad_input.bad_input_table())


def sections(table: dict) -> dict:
    return {s["adapter"]: s for s in table["sections"]}


def test_good_requests_next_to_bad_ones_succeed(table):
    assert_kept(check_bad_input_good_requests(table))
    assert "tensor" in sections(table) and "skipped" not in sections(table)["tensor"]
    assert not table["probe"]["loop_errors"] and not table["probe"]["leftover_threads"]


@pytest.mark.parametrize("adapter", [s.adapter for s in bad_input.SECTIONS])
def test_the_committed_table_is_what_the_code_does(table, adapter):
    section = sections(table)[adapter]
    if "skipped" in section:
        pytest.skip(section["skipped"])
    document = (ROOT / bad_input.DOC_PATH).read_text()
    generated_with = bad_input.generated_with(document)
    if generated_with.get("torch") != bad_input.torch_release():
        pytest.skip(f"{bad_input.DOC_PATH} was generated with torch {generated_with.get('torch')}; messages that "
                    f"quote torch differ under torch {bad_input.torch_release()}")
    committed = bad_input.split_sections(document)
    assert adapter in committed, f"{bad_input.DOC_PATH} has no section for {adapter!r}; run {bad_input.REGENERATE}"
    assert committed[adapter] == bad_input.render_section(section), (
        f"{bad_input.DOC_PATH} is out of date for {adapter!r}; run {bad_input.REGENERATE}")


@pytest.mark.parametrize("adapter", [s.adapter for s in bad_input.SECTIONS])
def test_every_refusal_at_submit_is_typed(table, adapter):
    section = sections(table)[adapter]
    if "skipped" in section:
        pytest.skip(section["skipped"])
    assert_kept([check_bad_input_typed(section)])


@pytest.mark.parametrize("make", [lambda: torch.zeros(4).to_sparse(), lambda: torch.empty(4, device="meta")],
                         ids=["sparse", "meta"])
def test_tensor_adapter_refuses_tensors_without_plain_data_with_a_typed_error(make):
    from batchplex import InvalidRequestError
    from batchplex.builtin_adapters import TensorAdapter

    with pytest.raises(InvalidRequestError):
        TensorAdapter(shape=(4,), dtype=torch.float32).prepare(make())
