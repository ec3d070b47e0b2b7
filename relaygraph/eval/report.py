"""Experiment outputs: ``results.json``, a Markdown ``table.md`` and (sweeps) ``curve.png``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def interval(bounds: Sequence[float] | None) -> str:
    """``[lo, hi]`` as ``12.3-45.6%``."""
    return "n/a" if not bounds else f"{100 * bounds[0]:.1f}-{100 * bounds[1]:.1f}%"


def write_outputs(result: dict[str, Any], out: Path, markdown: str) -> None:
    """``results.json`` and ``table.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    (out / "table.md").write_text(markdown + "\n")


INTERVAL_NOTE = ("95% interval: Wilson score interval of the accuracy over the runs (with "
                 "--samples k a problem's k runs are not independent: too narrow then); won / "
                 "lost vs small: problems right where the small model alone was wrong, and the "
                 "other way round; large wrote on: runs with any large-model token; random "
                 "router at this call ratio: the random router's expected accuracy at the "
                 "policy's call ratio")


def sweep_markdown(result: dict[str, Any]) -> str:
    """The per-policy table, the per-family curve numbers, and the notes."""
    models = result["models"]
    head = (f"{result['dataset']['problems']} problems from {result['dataset']['source']}; "
            f"small {models['small']}, large {models['large']}; "
            f"max_tokens {result['config']['max_tokens']}")
    priced = any(p.get("cost_per_problem") is not None for p in result["policies"])
    rows = [[p["name"], "derived" if p["derived_from"] else "run", p["n"], pct(p["accuracy"]),
             interval(p.get("ci95")), _versus(p.get("vs_small")), p["unparseable"],
             pct(p["call_ratio"]), _wrote_on(p),
             pct(p.get("gap_recovered"), 0), pct(p.get("random_router_same_ratio")),
             num(p["tokens_per_problem"], 0), num(p["seconds_per_problem"], 1),
             *([num(p.get("cost_per_problem"), 6)] if priced else [])]
            for p in result["policies"]]
    table = markdown_table(["policy", "", "problems", "accuracy", "95% interval",
                            "won / lost vs small", "unparseable", "call ratio",
                            "large wrote on", "gap recovered", "random router at this call ratio",
                            "tokens / problem", "s / problem",
                            *(["cost / problem"] if priced else [])], rows)
    fam_rows = [[name, len(f["policies"]) or "line", num(f["auc"], 3), num(f["apgr"]),
                 pct(f["call_ratio_50"]), pct(f["call_ratio_80"])]
                for name, f in result["families"].items()]
    families = markdown_table(["family", "points", "AUC", "APGR", "call ratio for 50% of gap",
                               "call ratio for 80% of gap"], fam_rows)
    notes = "\n".join(f"- {n}" for n in [*result["notes"], INTERVAL_NOTE])
    return f"{head}\n\n{table}\n\n{families}\n\n{notes}"


def _versus(counts: dict[str, int] | None) -> str:
    return f"+{counts['won']} / -{counts['lost']}" if counts else ""


def _wrote_on(policy: dict[str, Any]) -> str:
    """Runs in which the large model wrote, of all (results from before it was counted: "")."""
    wrote = policy.get("large_wrote_on")
    return "" if wrote is None else f"{wrote}/{policy['n']}"


def plot_sweep(result: dict[str, Any], path: Path) -> bool:
    """Accuracy vs call ratio: solo points, each family's curve, the random-router line.
    False when matplotlib is missing (``pip install "relaygraph[eval]"``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    by_name = {p["name"]: p for p in result["policies"]}
    expected = result["families"].get("random-router (expected)")
    if expected:
        xs, ys = zip(*expected["curve"], strict=True)
        ax.plot(xs, ys, "--", color="grey", label="random router (expected)")
    markers = iter("os^vDP*Xhp<>")
    for kind, family in result["families"].items():
        if kind == "random-router (expected)":
            continue
        points = sorted((by_name[n]["call_ratio"], by_name[n]["accuracy"])
                        for n in family["policies"] if by_name[n]["accuracy"] is not None)
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker=next(markers, "o"), linestyle="-" if len(points) > 1 else "none",
                label=kind)
    for name, colour in (("solo-small", "black"), ("solo-large", "tab:red")):
        p = by_name[name]
        if p["accuracy"] is not None:
            ax.scatter([p["call_ratio"]], [p["accuracy"]], s=80, color=colour, zorder=5,
                       label=f"{name} ({Path(result['models'][name.split('-')[1]]).name})")
    ax.set_xlabel("call ratio (large-model tokens / all generated tokens)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(-0.03, 1.03)
    ax.set_title(f"{result['dataset']['problems']} problems, max_tokens "
                 f"{result['config']['max_tokens']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_cost(result: dict[str, Any], path: Path) -> bool:
    """Accuracy vs cost per problem, one point per priced policy (RouteLLM's users pick by
    cost). False without matplotlib or without prices."""
    points = [(p["cost_per_problem"], p["accuracy"], p["name"]) for p in result["policies"]
              if p.get("cost_per_problem") is not None and p["accuracy"] is not None]
    if not points:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for cost, accuracy, name in sorted(points):
        ax.scatter([cost], [accuracy], s=40)
        ax.annotate(name, (cost, accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("cost per problem (from the agents' prices per million tokens)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def write_sweep(result: dict[str, Any], out: Path) -> str:
    """``results.json``, ``table.md``, ``curve.png`` and, when agents have prices,
    ``cost_curve.png`` in ``out``; returns the Markdown."""
    markdown = sweep_markdown(result)
    plot_cost(result, out / "cost_curve.png")
    if not plot_sweep(result, out / "curve.png"):
        markdown += '\n- no curve.png: matplotlib is missing (pip install "relaygraph[eval]")'
    write_outputs(result, out, markdown)
    return markdown
