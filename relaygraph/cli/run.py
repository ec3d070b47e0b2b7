"""``relaygraph run`` and ``relaygraph resume``: answer a question with a relay; a step that
asks for a person (a supervisor's ``interrupt()``, e.g. ``--supervisor ask:human``) is
answered at the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from relaygraph.agents.catalog import DEFAULT_CONTROLLER, DEFAULT_EXPERT, RELAY_CONTROLLER
from relaygraph.cli.common import (
    Namespace,
    Redis,
    Ttl,
    console,
    ensure_pulled,
    err,
    friendly,
    open_cli_store,
    parse_set_options,
    quiet_loading,
    relay_config,
    say,
    store_retrying,
    traced,
)
from relaygraph.errors import ConfigError
from relaygraph.policies.registry import policy_types

POLICY_HELP = f"{' | '.join(policy_types())} (default call-token; more with register_policy)."


@friendly
@traced
def run(
    question: Annotated[str, typer.Argument(metavar="QUESTION", help="The question to answer.")],
    policy: Annotated[str | None, typer.Option(help=POLICY_HELP)] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Relay config file (.toml, .yaml, .json); options below override it.")] = None,
    controller: Annotated[str | None, typer.Option(help=f"Controller model: catalog name, folder, .gguf or hub id (default {DEFAULT_CONTROLLER}; call-token: {RELAY_CONTROLLER}).")] = None,
    expert: Annotated[str | None, typer.Option(help=f"Expert model (default {DEFAULT_EXPERT}).")] = None,
    controller_url: Annotated[str | None, typer.Option(help="Use the controller model served at this OpenAI-compatible URL (e.g. vllm serve: http://localhost:8000/v1); --controller is then the served model name.")] = None,
    expert_url: Annotated[str | None, typer.Option(help="The same for the expert.")] = None,
    redis: Redis = None,
    namespace: Namespace = None,
    ttl: Ttl = None,
    max_tokens: Annotated[int | None, typer.Option(help="Budget of generated tokens, all models together (default 512).")] = None,
    dtype: Annotated[str | None, typer.Option(help="bfloat16 | float16 | float32")] = None,
    max_call_tokens: Annotated[int | None, typer.Option(help="call-token: most tokens one call may ask for.")] = None,
    threshold: Annotated[float | None, typer.Option(help="confidence/truncate: log-prob (or entropy) threshold.")] = None,
    fallback_tokens: Annotated[int | None, typer.Option(help="confidence: tokens the fallback writes.")] = None,
    interval: Annotated[int | None, typer.Option(help="fixed-interval: tokens per turn.")] = None,
    p: Annotated[float | None, typer.Option("--p", help="random-router: share of queries sent to the expert.")] = None,
    supervisor: Annotated[str | None, typer.Option(help="supervisor: module:function, judge:AGENT, score:AGENT or ask:human (you, at the terminal).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any policy field as KEY=VALUE (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming text.")] = False,
    trace: Annotated[str | None, typer.Option("--trace", help="OpenTelemetry traces to: console | otlp | none | an OTLP URL such as http://localhost:6006 (default: the OTEL_* variables).")] = None,
    trace_content: Annotated[bool, typer.Option("--trace-content", help="Record the question and generated text in spans (off by default).")] = False,
) -> None:
    """Answer QUESTION with a relay; tokens stream coloured by the model that wrote them."""
    if not question.strip():
        raise ConfigError("the question is empty; pass the text of a question in quotes")
    flags = {"max_call_tokens": max_call_tokens, "threshold": threshold,
             "fallback_tokens": fallback_tokens, "interval": interval, "p": p,
             "supervisor": supervisor}
    options = {k: v for k, v in flags.items() if v is not None} | parse_set_options(set_ or [])
    cfg = relay_config(config, policy, controller, expert, redis, max_tokens, dtype, options,
                       {"controller": controller_url, "expert": expert_url}, namespace, ttl)
    store = cfg.store.open(on_retry=store_retrying)
    ensure_pulled(*(cfg.agents[name].local_model for name in cfg.needed_agents()))
    relay = _load(cfg, store)
    if as_json:
        result = answer_humans(relay, relay.run(question))
        _print_result(result, store, as_json)
        return
    from relaygraph.viewer.terminal import LivePrinter, Styles

    out = console()
    styles = Styles([a.name for a in relay.agents])
    out.print(styles.legend())
    printer = LivePrinter(out, styles)
    result = answer_humans(relay, relay.run(question, on_event=printer), printer)
    out.print()
    _print_result(result, store, as_json)


def answer_humans(relay: Any, result: Any, on_event: Any = None) -> Any:
    """While the run waits for a person, ask at the terminal and resume with the answer."""
    while result.status == "interrupted":
        result = relay.resume(result.trajectory_id, ask_person(result), on_event=on_event)
    return result


def ask_person(result: Any) -> str:
    """Show what a paused run asks (on stderr) and read one line of answer from stdin."""
    from relaygraph.viewer.terminal import printable

    asked = result.interrupt
    err.print()
    if isinstance(asked, dict) and "chunk" in asked:
        err.print(f"the supervisor asks you about {asked.get('worker', 'the')}'s latest chunk"
                  + (f" (flagged: {asked['flag']})" if asked.get("flag") else "") + ":",
                  style="bold")
        err.print(printable(str(asked["chunk"])), style="yellow")
        if asked.get("error"):
            err.print(f"{asked['error']}", markup=False, style="red")
        err.print(f"answer {asked.get('options', '')}", markup=False, style="dim")
    else:
        err.print("the run asks you:", style="bold")
        err.print(json.dumps(asked, ensure_ascii=False, default=str), markup=False)
    try:
        return err.input("> ")
    except EOFError:
        raise ConfigError(f"trajectory {result.trajectory_id} waits for your answer and there is "
                          f"no more input; answer later: `relaygraph resume "
                          f"{result.trajectory_id} --answer TEXT`") from None


@friendly
def resume(
    trajectory_id: Annotated[str, typer.Argument(metavar="TRAJECTORY_ID", help="Id of the interrupted run.")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="The config the run started from (a relay config; for a served trajectory the serve config naming its relay). Without it, only a stored config that names catalog models and no endpoint, credential variable, code or file is used.")] = None,
    trust_stored: Annotated[bool, typer.Option("--trust-stored", help="Use the config stored with the trajectory even where it names endpoints, credential variables, code, files or models outside the catalog (only if you trust whoever can write to the store).")] = False,
    redis: Redis = None,
    namespace: Namespace = None,
    answer: Annotated[str | None, typer.Option("--answer", help="A run waiting for a person: the answer to what it asked (e.g. continue, rollback, 'steer: TEXT', stop); later questions are asked at the terminal.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (what `relaygraph run --json` prints).")] = False,
) -> None:
    """Continue an interrupted run from its last completed step (same models and policy);
    a finished run is printed as it is."""

    from relaygraph.config import RelayConfig
    from relaygraph.relay import RunResult
    from relaygraph.trajectory import check_trajectory_id
    from relaygraph.trajectory.liveness import effective_status, stopped_because
    from relaygraph.trajectory.totals import tally

    store = open_cli_store(redis, namespace)
    stored = store.load(check_trajectory_id(trajectory_id))
    task = stored.task
    status = effective_status(trajectory_id, stored.status, stored.info)
    if status == "finished":  # nothing to do: what its run returned
        say(f"trajectory {trajectory_id} has finished; nothing to resume")
        _print_result(RunResult.from_trajectory(stored), store, as_json)
        return
    if status == "running":
        raise ConfigError(f"trajectory {trajectory_id} is running now ({stored.info.get('holder') or 'another process'}); "
                          f"watch it with `relaygraph show {trajectory_id} --follow`, or resume it once it has stopped")
    served = isinstance(task.config.get("serve"), dict)
    # the trust model: a stored config only where it names nothing a store is not trusted with
    cfg = None if served else RelayConfig.for_resume(task, trajectory_id, config, trust_stored)
    _, done = tally(stored.segments, list(task.agents))
    why = (stopped_because(stored.info) if stored.status == "running"
           else stored.info.get("error") or stored.info.get("cancel_reason") or "")
    say(f"trajectory {trajectory_id} is {status}" + (f" ({why})" if why else "")
        + f"; continuing from its last completed step ({done} of {len(stored.segments)} segments)")
    if cfg is None:
        relay = served_relay(trajectory_id, store, config, trust_stored)
    else:
        ensure_pulled(*(cfg.agents[name].local_model for name in cfg.needed_agents()))
        relay = _load(cfg, store)
    if as_json:
        result = answer_humans(relay, relay.resume(trajectory_id, answer))
    else:
        from relaygraph.viewer.terminal import LivePrinter, Styles

        out = console()
        styles = Styles([a.name for a in relay.agents])
        out.print(styles.legend())
        printer = LivePrinter(out, styles)
        result = answer_humans(relay, relay.resume(trajectory_id, answer, on_event=printer), printer)
        out.print()
    _print_result(result, store, as_json)


def _load(cfg: Any, store: Any) -> Any:
    """The relay of ``cfg``, its models loaded under a status line."""
    import time

    from langgraph.checkpoint.memory import InMemorySaver

    from relaygraph.relay import Relay

    models = ", ".join(dict.fromkeys(cfg.agents[n].model for n in cfg.needed_agents()))
    started = time.perf_counter()
    # the status line says it; per-file bars would clutter the answer
    with quiet_loading(), err.status(f"loading {models}…"):
        relay = Relay.from_config(cfg, store, checkpointer=InMemorySaver())
    say(f"loaded {models} in {time.perf_counter() - started:.1f}s")
    return relay


def _print_result(result: Any, store: Any, as_json: bool) -> None:
    """A run's result: the JSON object, or the summary lines under the streamed text."""
    if as_json:
        print(result.model_dump_json(indent=2, by_alias=True))
        return
    from relaygraph.viewer.terminal import printable

    out = console()
    out.rule()
    tokens = ", ".join(f"{k} {v}" for k, v in result.tokens_by_agent.items())
    total = sum(result.tokens_by_agent.values())
    out.print("answer: ", style="bold", end="")
    out.print(printable(result.answer) or "(none)")
    rate = f" ({total / result.seconds:.1f} tok/s)" if result.seconds > 0 else ""
    out.print(printable(f"call ratio {result.call_ratio:.1%} · tokens {tokens} · handoffs "
                        f"{result.handoffs} · {result.finish_reason} · {result.seconds:.1f}s"
                        f"{rate}"))
    out.print(f"trajectory {result.trajectory_id} — `relaygraph show {result.trajectory_id}`",
              style="dim")


def served_relay(trajectory_id: str, store: Any, config: Path | None, trust_stored: bool) -> Any:
    """The relay of a trajectory ``relaygraph serve`` ran, its models pulled and loaded."""
    try:
        from relaygraph.serve.registry import served_relay as rebuild
    except ImportError as exc:
        raise ConfigError(f"resuming a served trajectory needs the serve extra ({exc.name} is "
                          "missing): pip install 'relaygraph[serve]'") from None

    def build(agent: Any) -> Any:
        ensure_pulled(agent.local_model)
        return agent.build()

    with err.status("loading models…"):
        return rebuild(trajectory_id, store, config, trust_stored, backend_factory=build)
