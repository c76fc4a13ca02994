"""`ContinuousPolicy`: how a continuous workload admits requests into its running batch (validated once)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PolicyError
from .policy import BatchPolicy, _is_int, _is_number

__all__ = ["ContinuousPolicy"]


@dataclass(frozen=True)
class ContinuousPolicy:
    """How a continuous workload admits requests: validated once, when the policy is made.

    * ``max_active``: the most sequences in the running batch at once;
    * ``max_batch_tokens``: the token budget of one step (one per continuing sequence, plus the prompt tokens of
      the requests joining at that step); also the longest prompt a request may have;
    * ``max_queue``: the most requests waiting to join; one more is refused at once with `QueueFullError`;
    * ``priority_levels`` (higher served first) and ``priority_aging_ms`` (a request that waited this long joins
      before any fresher one, so low levels never starve);
    * ``default_timeout_s``: the deadline of requests submitted without ``timeout``;
    * ``step_log``: how many `StepRecord` the workload keeps.
    """

    max_active: int = 64
    max_batch_tokens: int = 2048
    max_queue: int = 4096
    priority_levels: int = 1
    priority_aging_ms: float = 5000.0
    default_timeout_s: float | None = None
    step_log: int = 1024

    def __post_init__(self) -> None:
        for field in ("max_active", "max_batch_tokens", "max_queue", "step_log"):
            value = getattr(self, field)
            _require(_is_int(value) and value >= 1, field, value, "an int >= 1")
        _require(self.max_batch_tokens >= self.max_active, "max_batch_tokens", self.max_batch_tokens,
                 f"at least max_active ({self.max_active}): every active sequence needs one token per step")
        _require(_is_int(self.priority_levels) and 1 <= self.priority_levels <= 16, "priority_levels",
                 self.priority_levels, "an int from 1 to 16")
        _require(_is_number(self.priority_aging_ms) and self.priority_aging_ms > 0, "priority_aging_ms",
                 self.priority_aging_ms, "a number > 0")
        if self.default_timeout_s is not None:
            _require(_is_number(self.default_timeout_s) and self.default_timeout_s > 0, "default_timeout_s",
                     self.default_timeout_s, "a number > 0 or None")

    def waiting_policy(self) -> BatchPolicy:
        """The policy of the waiting queue: one request at a time, in priority order, never waiting to batch."""
        return BatchPolicy(max_batch_size=1, max_wait_ms=0.0, max_queue=self.max_queue,
                           default_timeout_s=self.default_timeout_s, priority_levels=self.priority_levels,
                           priority_aging_ms=self.priority_aging_ms)


def _require(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise PolicyError(f"ContinuousPolicy.{field} must be {expected}, got {value!r}")
