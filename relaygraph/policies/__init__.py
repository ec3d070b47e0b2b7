"""Router policies: who writes next, for how long, and what each agent sees."""

from relaygraph.policies.base import SUPERVISOR, Decision, Policy, SupervisedPolicy
from relaygraph.policies.baselines import (
    FixedIntervalPolicy,
    QueryRouter,
    SoloPolicy,
    TruncatePolicy,
)
from relaygraph.policies.call_token import (
    PROMPTED_CALL_SYSTEM_PROMPT,
    CallCommand,
    CallTokenPolicy,
    parse_call,
)
from relaygraph.policies.confidence import ConfidencePolicy
from relaygraph.policies.supervisor import (
    JudgeSupervisor,
    Review,
    ScoreSupervisor,
    SupervisorPolicy,
    Verdict,
    keyword_guard,
    load_supervisor,
    parse_verdict,
)

__all__ = ["PROMPTED_CALL_SYSTEM_PROMPT", "SUPERVISOR", "CallCommand", "CallTokenPolicy",
           "ConfidencePolicy", "Decision", "FixedIntervalPolicy", "JudgeSupervisor", "Policy",
           "QueryRouter", "Review", "ScoreSupervisor", "SoloPolicy", "SupervisedPolicy",
           "SupervisorPolicy", "TruncatePolicy", "Verdict", "keyword_guard", "load_supervisor",
           "parse_call", "parse_verdict"]
