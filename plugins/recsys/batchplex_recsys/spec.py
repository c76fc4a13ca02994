"""A ranking workload's features, checked once when the workload is configured (the adapter's options)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FeatureSpec"]


@dataclass(frozen=True)
class FeatureSpec:
    """A workload's features: sparse keys in model order, table sizes, weighted keys and the dense width."""

    keys: tuple[str, ...]
    table_sizes: Mapping[str, int]
    weighted: frozenset[str]
    dense_dim: int
    index: Mapping[str, int] = field(init=False, repr=False)
    bounds: tuple[float, ...] = field(init=False, repr=False)  # per key: its table size, or inf when not given
    smallest_table: float = field(init=False, repr=False)  # ids below it are in range for every key (inf: no sizes)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {key: i for i, key in enumerate(self.keys)})
        object.__setattr__(self, "bounds", tuple(self.table_sizes.get(key, math.inf) for key in self.keys))
        object.__setattr__(self, "smallest_table", min(self.table_sizes.values(), default=math.inf))

    @classmethod
    def build(cls, keys: Sequence[str], table_sizes: Mapping[str, int] | None = None,
              weighted_keys: Sequence[str] = (), dense_dim: int = 0) -> FeatureSpec:
        """Validate the adapter options; errors name the option, the bad value and what it must be."""
        if isinstance(keys, str) or not isinstance(keys, Sequence) or not keys:
            raise ValueError(f"adapter 'ranking': option 'keys' must be a non-empty list of feature names in "
                             f"the model's order, got {keys!r}")
        keys = tuple(keys)
        if not all(isinstance(key, str) and key for key in keys) or len(set(keys)) != len(keys):
            raise ValueError(f"adapter 'ranking': option 'keys' must hold distinct non-empty strings, got {keys!r}")
        sizes = dict(table_sizes or {})
        _known("table_sizes", sizes, keys)
        bad = {key: size for key, size in sizes.items()
               if not (isinstance(size, int) and not isinstance(size, bool) and size >= 1)}
        if bad:
            raise ValueError(f"adapter 'ranking': option 'table_sizes' must map keys to ints >= 1 (the table's "
                             f"num_embeddings), got {bad!r}")
        if isinstance(weighted_keys, str):
            raise ValueError(f"adapter 'ranking': option 'weighted_keys' must be a list of keys, got "
                             f"{weighted_keys!r}")
        weighted = frozenset(weighted_keys)
        _known("weighted_keys", weighted, keys)
        if not (isinstance(dense_dim, int) and not isinstance(dense_dim, bool) and dense_dim >= 0):
            raise ValueError(f"adapter 'ranking': option 'dense_dim' must be an int >= 0, got {dense_dim!r}")
        return cls(keys, sizes, weighted, dense_dim)


def _known(option: str, given: Any, keys: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise ValueError(f"adapter 'ranking': option {option!r} names keys that are not in 'keys': {unknown}")
