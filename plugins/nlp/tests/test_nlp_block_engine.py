"""`BlockEngine`, batchplex's generation step loop, stepped directly with tiny random decoders: greedy tokens of
sequences that join at different steps equal ``model.generate`` for each alone (grouped-query and full attention,
sdpa and eager, Llama and GPT-2); KV blocks follow the tokens held and come back at finish and cancel; a sequence
preempted when the cache is full still generates the same tokens; a cache too small for one sequence fails at
start; per-row sampling; CUDA graph replay equals eager decoding."""

from __future__ import annotations

import math

import pytest
import torch
from batchplex.continuous import ContinuousPolicy
from batchplex_nlp._generation_blocks import BlockEngine, sample
from batchplex_nlp.generation import GenerationAdapter
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 512
BLOCK = 8
PROMPTS = {"a": [5, 6, 7, 8], "b": [9, 10], "c": list(range(100, 130)), "d": [11, 12, 13, 14, 15, 16], "e": [17],
           "f": list(range(200, 219))}
NEW_TOKENS = {"a": 12, "b": 20, "c": 5, "d": 16, "e": 9, "f": 14}
#: When each request is added: before the first step, or before step 3 or 7 (joining sequences that decode).
SCHEDULE = {0: ["a", "b", "c"], 3: ["d", "e"], 7: ["f"]}


def llama(kv_heads: int = 2, attention: str = "sdpa", vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=128,
                         attn_implementation=attention)
    return LlamaForCausalLM(config).eval()


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


MODELS = {"llama-gqa": llama, "llama-mha": lambda: llama(kv_heads=4), "llama-eager": lambda: llama(attention="eager"),
          "gpt2": gpt2}


def alone(model, prompt: list[int], new_tokens: int) -> list[int]:
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt], device=device), generation_config=config,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device))
    return out[0, len(prompt):].tolist()


def engine(model, *, num_blocks: int = 64, max_active: int = 4, max_length: int = 64, sampling=None, **options):
    config = GenerationConfig(do_sample=bool(sampling), **(sampling or {}))
    return BlockEngine(model, config, max_active=max_active, max_batch_tokens=256, max_length=max_length,
                       num_blocks=num_blocks, block_size=BLOCK, max_memory_percent=0.5,
                       per_request_sampling=bool(sampling), seed=0, **options)


def run(blocks: BlockEngine, schedule=SCHEDULE, on_step=None) -> dict[str, list[int]]:
    """Step until every scheduled request finished; the tokens of each. Every report must extend the last one."""
    reported: dict[str, list[int]] = {}
    finished: dict[str, list[int]] = {}
    names = [name for step in schedule.values() for name in step]
    index = 0
    with torch.inference_mode():
        while len(finished) < len(names):
            for name in schedule.get(index, []):
                blocks.add(name, PROMPTS[name], NEW_TOKENS[name], None, {})
            for request_id, tokens, done, error in blocks.step():
                assert error is None and tokens[:len(reported.get(request_id, []))] == reported.get(request_id, [])
                reported[request_id] = list(tokens)
                if done:
                    finished[request_id] = list(tokens)
            if on_step:
                on_step(blocks, index)
            index += 1
    return finished


@pytest.mark.parametrize("kind", MODELS)
def test_greedy_tokens_equal_generate_alone(kind):
    model = MODELS[kind]()
    tokens = run(engine(model))
    assert tokens == {name: alone(model, PROMPTS[name], NEW_TOKENS[name]) for name in tokens}


def test_blocks_follow_the_tokens_held_and_all_come_back():
    blocks = engine(llama())
    held = []

    def check(blocks, index):
        expected = sum(math.ceil(sequence.cached / BLOCK) for sequence in blocks._running)
        used = round((1 - blocks.free_fraction()) * blocks.num_blocks)
        assert used == expected
        held.append(used)

    run(blocks, on_step=check)
    assert max(held) > held[0] and held[-1] == 0 and blocks.free_fraction() == 1.0
    with torch.inference_mode():
        blocks.add("long", PROMPTS["c"], 30, None, {})
        blocks.add("waiting", PROMPTS["a"], 30, None, {})
        for _ in range(3):
            blocks.step()
        assert blocks.free_fraction() < 1.0
        blocks.add("queued", PROMPTS["b"], 5, None, {})
        for request_id in ("long", "waiting", "queued", "unknown"):
            blocks.cancel(request_id)
        assert blocks.free_fraction() == 1.0 and blocks.step() == []


def test_a_preempted_sequence_generates_the_same_tokens():
    model = llama()
    # 9 blocks of 8 tokens: the running sequences outgrow them, the newest is preempted and recomputed later.
    blocks = engine(model, num_blocks=9, max_length=72)
    schedule = {0: ["a", "b", "c"], 2: ["d", "f"]}
    tokens = run(blocks, schedule)
    assert blocks.preemptions > 0 and blocks.free_fraction() == 1.0
    assert tokens == {name: alone(model, PROMPTS[name], NEW_TOKENS[name]) for name in tokens}


def test_generation_stops_at_any_eos():
    model = llama()
    reference = alone(model, PROMPTS["b"], 20)
    blocks = engine(model)
    with torch.inference_mode():
        blocks.add("b", PROMPTS["b"], 20, [VOCAB + 1, reference[5]], {})
        progress = []
        while not progress or not progress[-1][2]:
            progress = blocks.step()
    assert progress[-1][1] == reference[:reference.index(reference[5]) + 1]


def test_a_cache_too_small_for_one_sequence_fails_at_start(tokenizer):
    with pytest.raises(ValueError, match="fewer than one sequence of max_length=64"):
        engine(llama(), num_blocks=7)
    adapter = GenerationAdapter(tokenizer, cache_tokens=100, block_size=16, max_length=128)
    model = llama(vocab=len(tokenizer))
    with pytest.raises(ValueError, match="make the cache larger or lower max_length"):
        adapter.start(model, torch.device("cpu"), ContinuousPolicy(max_active=2, max_batch_tokens=256))


def test_sampling_settings_apply_per_row():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    settings = torch.tensor([[1.0, 1, 1.0], [5.0, 0, 1e-6], [1.0, 3, 1.0], [2.0, 0, 1.0]])
    top3 = logits[2].topk(3).indices.tolist()
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, settings, generator) for _ in range(200)])
    best = logits.argmax(-1)
    assert (draws[:, 0] == best[0]).all() and (draws[:, 1] == best[1]).all()  # top_k 1, a tiny top_p: greedy
    assert set(draws[:, 2].tolist()) == set(top3)
    assert len(set(draws[:, 3].tolist())) > 50  # a high temperature over the whole vocabulary


def test_requests_override_only_configured_sampling_keys():
    blocks = engine(llama(), sampling={"temperature": 0.8, "top_k": 20})
    assert blocks.per_request_keys == {"temperature", "top_k"}
    assert engine(llama(), sampling={"temperature": 1.0, "top_p": 0.9}).per_request_keys == {"top_p"}
    with pytest.raises(ValueError, match="cannot be set per request"):
        blocks.add("x", [5], 4, None, {"top_p": 0.5})
    with torch.inference_mode():
        blocks.add("greedy", PROMPTS["d"], 10, None, {"top_k": 1})
        blocks.add("hot", PROMPTS["d"], 10, None, {"temperature": 3.0})
        tokens = {}
        while len(tokens) < 2:
            tokens.update({request_id: out for request_id, out, done, _ in blocks.step() if done})
    assert tokens["greedy"] == alone(blocks.model, PROMPTS["d"], 10) != tokens["hot"]


class EagerReplay:
    """Stands in for `DecodeGraphs` on the CPU: runs the forward eagerly on the padded batch a graph would replay."""

    def __init__(self, forward) -> None:
        self.forward = forward
        self.shapes: set[tuple[int, int]] = set()

    def replay(self, meta: torch.Tensor, length: int) -> torch.Tensor:
        self.shapes.add((meta.shape[1], length))
        return self.forward(meta[0, :, None], meta[1, :, None], meta[2], length)


def test_padded_batches_and_context_buckets_give_the_same_tokens():
    model = llama()
    blocks = engine(model, max_active=8)
    blocks._graphs = replay = EagerReplay(blocks._forward)
    tokens = run(blocks)
    assert tokens == {name: alone(model, PROMPTS[name], NEW_TOKENS[name]) for name in tokens}
    assert {batch for batch, _ in replay.shapes} <= {1, 2, 4, 8} and (4, 48) in replay.shapes  # 3 rows padded to 4


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2"])
def test_cuda_graph_replay_equals_eager_decoding(kind):
    model = MODELS[kind]().cuda()
    graphs = engine(model, max_active=8)
    replayed = run(graphs)
    assert graphs._graphs is not None and len(graphs._graphs) > 0  # captured, and none failed
    eager = run(engine(model, max_active=8, cuda_graphs=False))
    assert replayed == eager == {name: alone(model, PROMPTS[name], NEW_TOKENS[name]) for name in eager}


def test_a_prefill_stays_within_the_token_budget_padding_included():
    model = llama()
    config = GenerationConfig(do_sample=False)
    blocks = BlockEngine(model, config, max_active=16, max_batch_tokens=64, max_length=64, num_blocks=64,
                         block_size=BLOCK, max_memory_percent=0.5, per_request_sampling=False, seed=0)
    prefills: list[tuple[int, int]] = []
    original = blocks._prefill

    def recording(joining):
        prefills.append((len(joining), max(len(s.prompt) + len(s.generated) for s in joining)))
        return original(joining)

    blocks._prefill = recording
    blocks.add("long", list(range(100, 140)), 2, None, {})  # 40 tokens, then short prompts that would pad to 40
    for index in range(8):
        blocks.add(f"short{index}", [5, 6], 2, None, {})
    while blocks._running or blocks._waiting:
        blocks.step()
    assert prefills[0] == (1, 40), "the long prompt goes alone: a second row would pad to 80 tokens"
    assert all(rows * width <= 64 for rows, width in prefills[1:])
    assert sum(rows for rows, _ in prefills) == 9


def test_a_model_with_a_sliding_window_shorter_than_max_length_is_refused():
    model = llama()
    model.config.sliding_window = 32
    with pytest.raises(ValueError, match="sliding window of 32 tokens"):
        engine(model, max_length=64)
    assert engine(model, max_length=32).max_blocks == 4
