"""`BlockEngine`'s paged KV cache: per-layer K/V pools cut into blocks, the block tables, and the cache object
the model's attention writes to and reads from.

A pool holds ``(num_blocks + 1) * block_size`` token slots of ``[kv_heads, head_dim]``; slot ``b * block_size + i``
is token ``i`` of block ``b``. A sequence owns a row of the block table (its blocks in order; unused entries point
to the last, *scratch* block, which is never handed out), so token ``t`` of a sequence lives in slot
``table[row, t // block_size] * block_size + t % block_size``. Padding tokens write to, and padded keys read from,
the scratch block: the pools hold finite values only, and a masked key weighs exactly zero.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

__all__ = ["BlockTables", "PagedKVCache", "block_bytes", "kv_layout"]


def kv_layout(config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder config (Llama-style names; GPT-2's map onto them)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def block_bytes(config, block_size: int, dtype: torch.dtype) -> int:
    """The memory one block takes: its keys and values in every layer."""
    layers, kv_heads, head_dim = kv_layout(config)
    return 2 * layers * block_size * kv_heads * head_dim * dtype.itemsize


class BlockTables:
    """The free blocks and every sequence's block table: a host tensor written as blocks are handed out, copied
    to the device before a forward reads it (only when it changed). Row ``padding_row`` stays all scratch: padded
    batch rows point at it."""

    def __init__(self, num_blocks: int, rows: int, max_blocks: int, device: torch.device) -> None:
        self.scratch = num_blocks  # the block id past the last real one
        self.padding_row = rows
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out the lowest id first
        self._free_rows = list(range(rows - 1, -1, -1))
        host = torch.full((rows + 1, max_blocks), num_blocks, dtype=torch.long, pin_memory=device.type == "cuda")
        self._host = host
        self._entries = host.numpy()  # scalar writes through numpy cost ~100 ns, through torch ~2 us
        self.device = host if device.type == "cpu" else torch.empty_like(host, device=device)
        self._dirty = True

    def free_blocks(self) -> int:
        return len(self._free)

    def open(self) -> int:
        """A free row for a sequence joining the batch."""
        return self._free_rows.pop()

    def grow(self, row: int, blocks: list[int], count: int) -> bool:
        """Append ``count`` free blocks to a sequence's ``blocks`` (its table ``row``); False, and nothing taken,
        when fewer are free."""
        if count > len(self._free):
            return False
        for _ in range(count):
            block = self._free.pop()
            self._entries[row, len(blocks)] = block
            blocks.append(block)
        self._dirty = True
        return True

    def close(self, row: int, blocks: list[int]) -> None:
        """Hand a sequence's blocks and row back (finished, cancelled or preempted)."""
        self._free.extend(reversed(blocks))
        self._entries[row, :len(blocks)] = self.scratch
        blocks.clear()
        self._free_rows.append(row)
        self._dirty = True

    def sync(self) -> None:
        """Bring the device copy up to date: an asynchronous copy from pinned memory on CUDA, so the host table
        must not change before the forward that reads it has run (a step reads its tokens back before the next
        step, or a cancel, changes it)."""
        if self._dirty and self.device is not self._host:
            self.device.copy_(self._host, non_blocking=True)
        self._dirty = False


class PagedKVCache(Cache):
    """The ``past_key_values`` of every forward: ``update`` writes the step's keys and values to the slots
    ``slots`` (``[B * q]``, set before the forward) and returns the batch's keys and values gathered through
    ``index`` (``[B, L]``) as ``[B, kv_heads, L, head_dim]``. The attention mask (explicit, 4D) hides what a query
    must not see, so entries of ``index`` past a sequence's length may point anywhere in the pools."""

    def __init__(self, config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(layers=[])
        layers, kv_heads, head_dim = kv_layout(config)
        shape = ((num_blocks + 1) * block_size, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots: torch.Tensor | None = None
        self.index: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(0, self.slots, key_states.transpose(1, 2).flatten(0, 1))
        values.index_copy_(0, self.slots, value_states.transpose(1, 2).flatten(0, 1))
        return keys[self.index].transpose(1, 2), values[self.index].transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions are always passed explicitly, so the model never needs this (0 keeps it from syncing)."""
        return 0
