"""The text adapter's submit and collate steps on their own: tokenization equals the tokenizer's, bad input is
refused with the rule named, options are checked, and the padded batch has the documented layout."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from batchplex import InvalidRequestError, RequestTooLargeError, Scheduler
from batchplex_nlp import HFModel, TextAdapter
from batchplex_nlp.testing import minilm_dir
from transformers import PreTrainedTokenizerFast

PAIRS = [("What is batching?", "Grouping requests. " * 3), ("word " * 300, "short"), ("short", "word " * 300),
         ("word " * 200, "other " * 200)]


def _ids(adapter, request):
    return adapter.prepare(request).ids.tolist()


@pytest.mark.parametrize("side", ["right", "left"])
def test_tokenization_equals_the_tokenizer_call(tokenizer, texts, side):
    tokenizer = _with(tokenizer, truncation_side=side)
    adapter = TextAdapter(tokenizer, max_length=64)
    for text in texts:
        assert _ids(adapter, text) == tokenizer(text, truncation=True, max_length=64)["input_ids"]
    for pair in PAIRS:
        expected = tokenizer(*pair, truncation=True, max_length=64)
        prepared = adapter.prepare(pair)
        assert prepared.ids.tolist() == expected["input_ids"]
        assert prepared.type_ids.tolist() == expected["token_type_ids"]
    assert adapter.prepare(texts[1]).type_ids is None  # a single text's segment ids are all zero: not stored


def test_the_callers_tokenizer_is_not_reconfigured(tokenizer):
    before = (tokenizer.backend_tokenizer.padding, tokenizer.backend_tokenizer.truncation)
    adapter = TextAdapter(tokenizer, max_length=16)
    assert adapter.prepare("hi").length == 3  # tokenizer.json ships a padding to 128: the private copy has none
    assert (tokenizer.backend_tokenizer.padding, tokenizer.backend_tokenizer.truncation) == before


def test_a_slow_tokenizer_is_called_as_it_is(tokenizer, texts):
    slow_class = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)
    slow = slow_class(vocab_file=str(minilm_dir() / "vocab.txt"), do_lower_case=True)
    if slow.is_fast:
        pytest.skip("this transformers has no pure-Python BERT tokenizer")
    adapter = TextAdapter(slow, max_length=64)
    for request in texts + PAIRS:
        args = request if isinstance(request, tuple) else (request,)
        expected = slow(*args, truncation=True, max_length=64)
        prepared = adapter.prepare(request)
        assert prepared.ids.tolist() == expected["input_ids"]
        if any(expected.get("token_type_ids", [])):  # only where this tokenizer makes segment ids
            assert prepared.type_ids.tolist() == expected["token_type_ids"]
        else:
            assert prepared.type_ids is None
    assert _ids(adapter, texts[2]) == _ids(TextAdapter(tokenizer), texts[2])


def test_cost_is_the_token_count_and_padded_cost_rounds_up(tokenizer):
    adapter = TextAdapter(tokenizer, max_length=100)
    assert adapter.cost(adapter.prepare("Hello world")) == 4  # [CLS] hello world [SEP]
    assert adapter.padded_cost([5, 13], batch_size=4) == 4 * 16
    assert adapter.padded_cost([97, 3], batch_size=2) == 2 * 100  # never padded past max_length
    assert TextAdapter(tokenizer, pad_to_multiple_of=1).padded_cost([5, 13], batch_size=2) == 26


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_into_one_buffer_with_the_documented_layout(tokenizer, side):
    adapter = TextAdapter(tokenizer, padding_side=side)
    items = [adapter.prepare(request) for request in ("Hi", ("a question", "its answer"), [101, 7, 8, 9, 102])]
    batch = adapter.collate(items, torch.device("cpu"), batch_size=4)
    expected_fields = ["input_ids", "attention_mask", "token_type_ids"] + ["position_ids"] * (side == "left")
    assert list(batch) == expected_fields
    assert all(tensor.shape == (4, 8) and tensor.dtype == torch.int64 for tensor in batch.values())
    assert len({tensor.untyped_storage().data_ptr() for tensor in batch.values()}) == 1  # one buffer, one copy
    for row, item in enumerate(items):
        real = slice(8 - item.length, 8) if side == "left" else slice(0, item.length)
        assert batch["input_ids"][row, real].tolist() == item.ids.tolist()
        assert batch["attention_mask"][row].sum() == item.length == batch["attention_mask"][row, real].sum()
        assert (batch["input_ids"][row][batch["attention_mask"][row] == 0] == tokenizer.pad_token_id).all()
        if side == "left":
            assert batch["position_ids"][row, real].tolist() == list(range(item.length))
    segments = [0] * 4 + [1] * 3  # [CLS] a question [SEP] | its answer [SEP]
    assert batch["token_type_ids"][1].tolist() == (segments + [0] if side == "right" else [0] + segments)
    assert batch["token_type_ids"][[0, 2]].sum() == 0
    assert batch["attention_mask"][3].sum() == 1  # a padding row holds one token: never fully masked


def test_truncate_and_reject_pre_tokenized_ids(tokenizer):
    ids = list(range(1000, 1040))
    assert _ids(TextAdapter(tokenizer, max_length=16), ids) == ids[:16]
    assert _ids(TextAdapter(_with(tokenizer, truncation_side="left"), max_length=16), ids) == ids[-16:]
    with pytest.raises(RequestTooLargeError, match="40 tokens long, more than max_length=16") as caught:
        TextAdapter(tokenizer, max_length=16, overflow="reject").prepare(ids)
    assert caught.value.value == 40


def test_empty_text_is_refused_unless_allowed(tokenizer):
    for text in ("", "  \n\t", ("question", " ")):
        with pytest.raises(InvalidRequestError, match="empty") as caught:
            TextAdapter(tokenizer).prepare(text)
        assert caught.value.rule == "non-empty text"
    assert _ids(TextAdapter(tokenizer, allow_empty=True), "") == [101, 102]
    assert _ids(TextAdapter(tokenizer), "\u200b") == [101, 102]  # has content; only special tokens remain


@pytest.mark.parametrize("request_, rule", [
    (42, "text, text pair or token ids"), (None, "text, text pair or token ids"),
    (b"bytes", "text, text pair or token ids"), ({"text": "hi"}, "text, text pair or token ids"),
    (["a", 1], "text, text pair or token ids"), (["a", "b", "c"], "text, text pair or token ids"),
    ([[101, 102]], "text, text pair or token ids"), ([1.0, 2.0], "text, text pair or token ids"),
    ([True, False], "text, text pair or token ids"), (torch.zeros(3), "text, text pair or token ids"),
    ([], "at least one token"), ([101, 30522], "token ids within the vocabulary"),
    (np.array([-1, 5]), "token ids within the vocabulary"),
])
def test_invalid_requests_name_the_rule(tokenizer, request_, rule):
    with pytest.raises(InvalidRequestError) as caught:
        TextAdapter(tokenizer).prepare(request_)
    assert caught.value.rule == rule


#: Per integer dtype, ids outside MiniLM's vocabulary [0, 30522) that it can hold, extremes included.
OUT_OF_VOCABULARY = {
    "i1": [-1, -128], "i2": [-1, 30522, 2**15 - 1], "i4": [-1, 30522, 2**31 - 1, -2**31],
    "i8": [-1, 30522, 2**63 - 1, -2**63], "u1": [], "u2": [30522, 2**16 - 1], "u4": [30522, 2**32 - 1],
    "u8": [30522, 2**64 - 1], ">i4": [-1, 30522], ">u8": [30522, 2**64 - 1],
}


@pytest.mark.parametrize("dtype", list(OUT_OF_VOCABULARY))
def test_ids_of_every_integer_dtype_are_checked_and_copied_to_int32(tokenizer, dtype):
    adapter = TextAdapter(tokenizer)
    valid = [101, 7, min(30521, np.iinfo(dtype).max), 102]  # the last id of the vocabulary where it fits
    ids = np.array(valid, dtype=dtype)
    prepared = adapter.prepare(ids)
    assert prepared.ids.dtype == np.int32 and prepared.ids.tolist() == valid and prepared.length == 4
    ids[1] = 8
    assert prepared.ids[1] == 7  # a copy: the caller may reuse its array once submitted
    for bad in OUT_OF_VOCABULARY[dtype]:
        ids[2] = bad
        with pytest.raises(InvalidRequestError, match=f"token id {bad} is outside") as caught:
            adapter.prepare(ids)
        assert caught.value.rule == "token ids within the vocabulary" and caught.value.value == bad


def test_ids_beyond_max_length_are_checked_before_truncation(tokenizer):
    adapter = TextAdapter(tokenizer, max_length=4)
    for ids in ([101, 5, 6, 7, 8, 30522], torch.tensor([101, 5, 6, 7, -2], dtype=torch.int32)):
        with pytest.raises(InvalidRequestError) as caught:
            adapter.prepare(ids)
        assert caught.value.rule == "token ids within the vocabulary" and caught.value.value == int(ids[-1])


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_of_full_rows_equals_the_padded_layout(tokenizer, side):
    """Requests that fill the padded length are copied in as they are, without the mask: the rows are the same
    as when a padding row makes the batch go through the mask."""
    adapter = TextAdapter(tokenizer, padding_side=side)
    items = [adapter.prepare(request) for request in (list(range(101, 109)), ("a question", "its short answer"),
                                                      np.arange(1000, 1008, dtype=np.int32))]
    assert {item.length for item in items} == {8}
    full = adapter.collate(items, torch.device("cpu"), batch_size=3)
    padded = adapter.collate(items, torch.device("cpu"), batch_size=4)
    assert list(full) == list(padded)
    for field, tensor in full.items():
        assert tensor.shape == (3, 8) and torch.equal(tensor, padded[field][:3]), field
    assert full["input_ids"].tolist() == [item.ids.tolist() for item in items]
    assert full["attention_mask"].all()
    assert full["token_type_ids"].tolist() == [[0] * 8, items[1].type_ids.tolist(), [0] * 8]
    if side == "left":
        assert full["position_ids"].tolist() == [list(range(8))] * 3


@pytest.mark.parametrize("side", ["right", "left"])
def test_split_cuts_padding_off_only_where_there_is_some(tokenizer, side):
    adapter = TextAdapter(tokenizer, padding_side=side, output="hidden_states")
    items = [adapter.prepare(list(range(101, 109))), adapter.prepare([101, 7, 102])]
    output = torch.arange(3 * 8 * 2, dtype=torch.float32).reshape(3, 8, 2)  # a padding row at the end
    full, short = adapter.split(output, items)
    assert torch.equal(full, output[0]) and full.data_ptr() == output.data_ptr()  # a view, not a copy
    assert torch.equal(short, output[1, 5:] if side == "left" else output[1, :3])


def test_request_parameters_are_refused(tokenizer):
    with pytest.raises(InvalidRequestError, match="no request parameters"):
        TextAdapter(tokenizer).prepare("hi", language="en")


def test_a_tokenizer_without_pad_token_pads_with_eos_or_zero(tokenizer, tiny, texts, run):
    path = str(minilm_dir() / "tokenizer.json")
    with_eos = PreTrainedTokenizerFast(tokenizer_file=path, eos_token="[SEP]")
    bare = PreTrainedTokenizerFast(tokenizer_file=path)
    with_eos.pad_token = bare.pad_token = None  # else taken from the padding saved in tokenizer.json
    assert with_eos.pad_token_id is None and bare.pad_token_id is None and bare.eos_token_id is None
    assert TextAdapter(with_eos).pad_id == 102 and TextAdapter(bare).pad_id == 0
    reference, _ = run(texts, tiny, {"tokenizer": tokenizer})
    for unpadded in (with_eos, bare):
        results, _ = run(texts, tiny, {"tokenizer": unpadded})
        for got, expected in zip(results, reference):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # masked positions never matter


def test_options_are_checked_when_the_workload_is_added(tokenizer, tiny):
    scheduler = Scheduler()
    with pytest.raises(TypeError, match="needs a tokenizer"):
        scheduler.add_workload("a", adapter="text", model=HFModel(tiny))
    with pytest.raises(TypeError, match="PreTrainedTokenizerBase"):
        scheduler.add_workload("b", adapter="text", model=HFModel(tiny), adapter_options={"tokenizer": "bert"})
    for option, value in (("output", "pooled"), ("overflow", "drop"), ("padding_side", "middle"),
                          ("pad_to_multiple_of", 0), ("max_length", -3)):
        with pytest.raises(ValueError, match=option):
            TextAdapter(tokenizer, **{option: value})
    with pytest.raises(TypeError, match="no tokenizer"):
        TextAdapter().prepare("hi")


def test_max_length_defaults_to_the_tokenizer_capped_at_512(tokenizer):
    assert TextAdapter(tokenizer).max_length == 512
    assert TextAdapter(_with(tokenizer, model_max_length=128)).max_length == 128
    assert TextAdapter(_with(tokenizer, model_max_length=int(1e30))).max_length == 512


def _with(tokenizer, **attributes):
    """A copy of ``tokenizer`` with some attributes changed (the session's tokenizer stays as it is)."""
    clone = copy.deepcopy(tokenizer)
    for name, value in attributes.items():
        setattr(clone, name, value)
    return clone
