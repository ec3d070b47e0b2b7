"""How a failing generation is retried: a value (as LangGraph's ``RetryPolicy``), set in the
relay config, recorded with each trajectory and restored when the run is resumed."""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field


class RetryPolicy(BaseModel):
    """Attempts and back-off of one agent turn's generation.

    A generation that raises, or returns nothing without a reason, is tried again up to
    ``max_attempts`` times in all, waiting ``initial_interval * backoff_factor**n`` seconds
    (at most ``max_interval``; with ``jitter`` a random 0-1 s is added) before try ``n + 2``.
    Errors that are the user's to fix (bad input) and cancellations are never retried. When
    the attempts are spent the turn goes to the agent's fallback (``fallbacks``), if any,
    else the run fails and can be resumed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(3, ge=1)
    initial_interval: float = Field(0.5, ge=0)
    backoff_factor: float = Field(2.0, ge=1)
    max_interval: float = Field(30.0, ge=0)
    jitter: bool = False

    def interval(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        wait = min(self.max_interval, self.initial_interval * self.backoff_factor ** attempt)
        return wait + (random.random() if self.jitter else 0.0)

    @classmethod
    def from_retries(cls, retries: int) -> RetryPolicy:
        """``retries`` extra attempts after the first, with the default back-off."""
        return cls(max_attempts=retries + 1)
