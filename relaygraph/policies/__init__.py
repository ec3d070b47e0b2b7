"""Router policies: who writes next, for how long, and what each agent sees.

Each policy is one module with its class (a pydantic model: the policy is its own config);
the registry (:mod:`.registry`) maps a config's ``type`` to the class.
"""

from relaygraph.policies.base import (
    SUPERVISOR,
    Decision,
    Policy,
    PolicyConfig,
    SupervisedPolicy,
    TurnContext,
)
from relaygraph.policies.call_token import (
    PROMPTED_CALL_SYSTEM_PROMPT,
    CallCommand,
    CallTokenPolicy,
    PromptedCallPolicy,
    parse_call,
)
from relaygraph.policies.confidence import ConfidencePolicy
from relaygraph.policies.fixed_interval import FixedIntervalPolicy
from relaygraph.policies.registry import parse_policy, policy_class, policy_types, register_policy
from relaygraph.policies.routers import PerfectRouter, RandomRouter
from relaygraph.policies.solo import SoloPolicy
from relaygraph.policies.supervisor import (
    JudgeSupervisor,
    Review,
    ScoreSupervisor,
    SupervisorPolicy,
    Verdict,
    ask_human,
    human_review,
    human_verdict,
    keyword_guard,
    load_supervisor,
    parse_verdict,
)
from relaygraph.policies.truncate import TruncatePolicy

__all__ = ["PROMPTED_CALL_SYSTEM_PROMPT", "SUPERVISOR", "CallCommand", "CallTokenPolicy",
           "ConfidencePolicy", "Decision", "FixedIntervalPolicy", "JudgeSupervisor",
           "PerfectRouter", "Policy", "PolicyConfig", "PromptedCallPolicy", "RandomRouter",
           "Review", "ScoreSupervisor", "SoloPolicy", "SupervisedPolicy", "SupervisorPolicy",
           "TruncatePolicy", "TurnContext", "Verdict", "ask_human", "human_review", "human_verdict",
           "keyword_guard", "load_supervisor",
           "parse_call", "parse_policy", "parse_verdict", "policy_class", "policy_types",
           "register_policy"]
