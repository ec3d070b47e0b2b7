"""Router policies: who writes next, for how long, and what each agent sees."""

from relaygraph.policies.base import Decision, Policy
from relaygraph.policies.call_token import (
    PROMPTED_CALL_SYSTEM_PROMPT,
    CallCommand,
    CallTokenPolicy,
    parse_call,
)
from relaygraph.policies.solo import SoloPolicy

__all__ = ["PROMPTED_CALL_SYSTEM_PROMPT", "CallCommand", "CallTokenPolicy", "Decision",
           "Policy", "SoloPolicy", "parse_call"]
