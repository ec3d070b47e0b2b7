"""The policy registry: ``type`` -> policy class (config model).

Built-in policies are listed here by module and imported on first use; your own are
added with :func:`register_policy` (a class decorator) or, from an installed package, the
``relaygraph.policies`` entry-point group. Config files, ``relaygraph run --policy``,
sweeps and ``serve`` all look policies up here.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import ValidationError

from relaygraph.errors import ConfigError, NestedError, nested_error
from relaygraph.plugins import Registry
from relaygraph.policies.base import PolicyConfig

P = TypeVar("P", bound=type[PolicyConfig])

POLICIES: Registry[type[PolicyConfig]] = Registry(
    "policy",
    key=lambda cls: str(cls.model_fields["type"].default),
    builtins={
        "call-token": "relaygraph.policies.call_token:CallTokenPolicy",
        "prompted-call": "relaygraph.policies.call_token:PromptedCallPolicy",
        "solo": "relaygraph.policies.solo:SoloPolicy",
        "confidence": "relaygraph.policies.confidence:ConfidencePolicy",
        "supervisor": "relaygraph.policies.supervisor:SupervisorPolicy",
        "fixed-interval": "relaygraph.policies.fixed_interval:FixedIntervalPolicy",
        "random-router": "relaygraph.policies.routers:RandomRouter",
        "perfect-router": "relaygraph.policies.routers:PerfectRouter",
        "truncate": "relaygraph.policies.truncate:TruncatePolicy",
    },
    group="relaygraph.policies",
)


def register_policy(cls: P) -> P:
    """Make a :class:`PolicyConfig` subclass usable by its ``type`` in configs, the CLI,
    sweeps and ``serve`` (a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, PolicyConfig)):
        raise ConfigError(f"register_policy takes a PolicyConfig subclass, not {cls!r}")
    klass: type[PolicyConfig] = cls
    field = klass.model_fields.get("type")
    if field is None or not isinstance(field.default, str) or not field.default:
        raise ConfigError(f"{cls.__qualname__} needs a default for its type, e.g. "
                          'type: Literal["my-policy"] = "my-policy"')
    POLICIES.register(cls)
    return cls


def policy_types() -> list[str]:
    """Every registered policy type."""
    return POLICIES.names()


def trusted_fields() -> frozenset[str]:
    """Every registered policy's fields that name code or files (never set by a request or
    taken from the store), and ``type``."""
    return frozenset({"type"}).union(*(cls.trusted_fields for cls in POLICIES.classes()))


def policy_class(name: str) -> type[PolicyConfig]:
    return POLICIES.get(name)


def parse_policy(data: Any) -> PolicyConfig:
    """The policy a ``{"type": ..., field: value}`` mapping describes (or the instance given);
    a ValueError naming the bad field otherwise."""
    if isinstance(data, PolicyConfig):
        return data
    if not isinstance(data, dict):
        raise ValueError("expected a table with a policy type, e.g. {type = \"confidence\"}")
    name = data.get("type", "call-token")
    if not isinstance(name, str):
        raise ValueError("type: expected a policy name")
    try:
        cls = POLICIES.get(name)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    try:
        return cls.model_validate({**data, "type": name})
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "extra_forbidden" and len(first["loc"]) == 1:
            options = ", ".join(f for f in cls.model_fields if f != "type")
            raise NestedError((), f"policy {name!r} has no option {first['loc'][0]!r} "
                              f"(its options: {options})") from None
        raise nested_error(exc) from None
