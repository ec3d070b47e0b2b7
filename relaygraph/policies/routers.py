"""Query-level routers, RelayLLM's baselines: the whole query goes to one model.

- :class:`RandomRouter`: to the large model with probability ``p``, decided per question
  (reproducibly, from ``seed`` and the question's text);
- :class:`PerfectRouter`: to the large model only when the small one fails alone, from
  known solo results (an oracle, for evaluation).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from relaygraph.agents.agent import Agent
from relaygraph.agents.backend import Generation, StopRule
from relaygraph.errors import ConfigError
from relaygraph.policies.base import Decision, PolicyConfig, TurnContext, end_or


class _QueryRouter(PolicyConfig):
    small: str = "controller"
    large: str = "expert"

    @model_validator(mode="after")
    def _two_agents(self) -> _QueryRouter:
        if self.small == self.large:
            raise ValueError("small and large must be different agents")
        return self

    def to_large(self, question: str) -> bool:
        raise NotImplementedError

    def agent_names(self) -> list[str]:
        return [self.small, self.large]

    def first_turn(self, ctx: TurnContext) -> tuple[str, int]:
        return (self.large if self.to_large(ctx.question) else self.small), ctx.remaining

    def stop_rule(self, agent: str, ctx: TurnContext) -> StopRule:
        return StopRule(max_tokens=ctx.remaining)

    def route(self, agent: Agent, generation: Generation, ctx: TurnContext) -> Decision:
        return end_or(agent, generation, None, 0, "budget")


class RandomRouter(_QueryRouter):
    """The large model with probability ``p``, reproducibly per question."""

    type: Literal["random-router"] = "random-router"
    p: float = Field(0.5, ge=0, le=1)
    seed: int = 0

    @property
    def name(self) -> str:
        return f"random-router(p={self.p:g})"

    def to_large(self, question: str) -> bool:
        return random.Random(f"{self.seed}\0{question}").random() < self.p


class PerfectRouter(_QueryRouter):
    """The oracle: the large model only for questions the small one fails alone.

    ``solo_results``: ``{question: small model correct}``, or a JSON object / JSONL file
    of rows with ``question`` and ``correct`` (read when the relay is built).
    """

    type: Literal["perfect-router"] = "perfect-router"
    solo_results: Path | Mapping[str, bool]
    trusted_fields: ClassVar[frozenset[str]] = frozenset({"solo_results"})

    def untrusted(self) -> dict[str, Any]:
        """A file to read (results given inline are data)."""
        return {"solo_results": str(self.solo_results)} if isinstance(self.solo_results, Path) else {}

    def check(self) -> None:
        if isinstance(self.solo_results, Path):
            load_solo_results(self.solo_results)

    def build(self, agents: Mapping[str, Agent]) -> PerfectRouter:
        if isinstance(self.solo_results, Path):
            return self.model_copy(update={"solo_results": load_solo_results(self.solo_results)})
        return self

    def to_large(self, question: str) -> bool:
        if isinstance(self.solo_results, Path):
            raise ConfigError("perfect router: build it first (its solo results are a file)")
        try:
            return not self.solo_results[question]
        except KeyError:
            raise ConfigError("perfect router: no solo result for this question; run the "
                              "small model alone on the dataset first") from None


def load_solo_results(path: Path) -> dict[str, bool]:
    """``{"question": bool}`` from a JSON object or JSONL rows with question and correct."""
    try:
        text = Path(path).read_text()
        if text.lstrip().startswith("{") and "\n{" not in text.strip():
            data = json.loads(text)
            return {str(k): bool(v) for k, v in data.items()}
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return {r["question"]: bool(r["correct"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"solo results {path}: expected JSON {{question: bool}} or JSONL rows "
                          f"with question and correct ({exc})") from None
