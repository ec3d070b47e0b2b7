"""One self-contained HTML page of a trajectory (``relaygraph show ID --html FILE``).

No external resources and no script: the text coloured by author (a tint per author),
every token shaded by how unsure its author was (red underlay, stronger for lower
probability; hover a token for its probability and log-prob), handoff markers in the
text, a legend, totals, and the list of handoffs. A checkbox turns the shading off.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relaygraph.policies.base import SUPERVISOR
from relaygraph.trajectory.models import Segment, Trajectory, retracted
from relaygraph.viewer.summary import (
    Handoff,
    HandoffTracker,
    Summary,
    format_cost,
    load_decoders,
    summarize,
    token_pieces,
)

# (text, tint, swatch) per author, in order of appearance; the terminal's palette order
COLOURS = (
    ("#0e7490", "#cffafe", "#06b6d4"),  # cyan
    ("#a21caf", "#fae8ff", "#d946ef"),  # magenta
    ("#15803d", "#dcfce7", "#22c55e"),  # green
    ("#a16207", "#fef9c3", "#eab308"),  # yellow
    ("#1d4ed8", "#dbeafe", "#3b82f6"),  # blue
    ("#b91c1c", "#fee2e2", "#ef4444"),  # red
)
SUPERVISOR_COLOURS = ("#475569", "#e2e8f0", "#64748b")

Decoder = Callable[[list[int]], str]

_CSS = """
:root { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #0f172a; }
body { margin: 0 auto; max-width: 60rem; padding: 1.5rem; background: #f8fafc; }
h1 { font-size: 1.35rem; margin: 0 0 .3rem; }
h2 { font-size: 1.05rem; margin: 1.6rem 0 .5rem; }
.meta { color: #64748b; font-size: .85rem; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: .85em; }
.legend { display: flex; flex-wrap: wrap; gap: .5rem 1.2rem; align-items: center;
          margin: 1rem 0; font-size: .9rem; }
.chip { display: inline-flex; align-items: center; gap: .4rem; }
.sw { display: inline-block; width: 16px; height: 16px; border-radius: 3px; }
.scale { display: inline-block; width: 110px; height: 12px; border-radius: 3px;
         background: linear-gradient(90deg, rgba(220,38,38,.75), rgba(220,38,38,0)); }
.muted { color: #64748b; }
.totals { display: grid; grid-template-columns: repeat(auto-fill, minmax(9.5rem, 1fr));
          gap: .6rem; margin: 1rem 0; }
.card { background: #fff; border: 1px solid #e2e8f0; border-radius: 8px; padding: .55rem .7rem; }
.card b { display: block; font-size: 1.15rem; }
.card span { color: #64748b; font-size: .75rem; text-transform: uppercase; letter-spacing: .04em; }
.bar { display: flex; height: 8px; border-radius: 4px; overflow: hidden; margin-top: .35rem;
       background: #e2e8f0; }
.bar i { display: block; height: 100%; }
main { background: #fff; border: 1px solid #e2e8f0; border-radius: 8px; padding: 1rem 1.2rem;
       white-space: pre-wrap; line-height: 1.75; font-family: ui-monospace, Menlo, monospace;
       font-size: .92rem; overflow-wrap: anywhere; }
.seg { border-radius: 3px; padding: 1px 0; }
.t { border-radius: 2px; }
.call { outline: 1.5px dashed currentColor; outline-offset: 1px; font-weight: 600; }
.gone { text-decoration: line-through; opacity: .55; }
.ho { display: inline-block; white-space: nowrap; font-family: system-ui, sans-serif;
      font-size: .72rem; line-height: 1.2; margin: 0 .3rem; padding: .1rem .45rem;
      border-radius: 999px; background: #1e293b; color: #f8fafc; vertical-align: 1px; }
.ho.rb { background: #b91c1c; }
.steer { display: block; margin: .4rem 0; padding: .3rem .6rem; border-left: 3px solid #64748b;
         background: #f1f5f9; font-style: italic; font-family: system-ui, sans-serif; }
.err { color: #b91c1c; font-weight: 600; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: .88rem; }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #e2e8f0; }
th { color: #475569; font-weight: 600; background: #f1f5f9; }
label { cursor: pointer; user-select: none; }
body:has(#shade:not(:checked)) .t { background: none !important; }
footer { margin-top: 1.5rem; color: #94a3b8; font-size: .75rem; }
"""


class _Authors:
    def __init__(self, names: list[str]) -> None:
        self.index: dict[str, int] = {}
        for name in names:
            self.cls(name)

    def cls(self, author: str) -> str:
        if author == SUPERVISOR:
            return "sv"
        if author not in self.index:
            self.index[author] = len(self.index)
        return f"a{self.index[author] % len(COLOURS)}"

    def css(self) -> str:
        rules = [f".sv {{ color: {SUPERVISOR_COLOURS[0]}; }} .sv.seg {{ background: "
                 f"{SUPERVISOR_COLOURS[1]}; }} .sv .sw, .sw.sv {{ background: {SUPERVISOR_COLOURS[2]}; }}"]
        for i, (text, tint, swatch) in enumerate(COLOURS):
            rules.append(f".a{i} {{ color: {text}; }} .a{i}.seg {{ background: {tint}; }} "
                         f".sw.a{i}, .bar .a{i} {{ background: {swatch}; }}")
        return "\n".join(rules)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _shade(prob: float) -> str:
    """Red underlay whose strength grows as the token's probability falls."""
    alpha = round(max(0.0, min(1.0, 1.0 - prob)) * 0.75, 3)
    return f"background:rgba(220,38,38,{alpha})" if alpha >= 0.01 else ""


def _token_spans(seg: Segment, position: int, decode: Decoder | None, first_token: int) -> str:
    pieces = token_pieces(seg, decode) if seg.logprobs else None
    logprobs = seg.logprobs or []
    if pieces is None or len(pieces) != len(logprobs):
        if logprobs:  # one piece: the segment's mean probability
            mean = sum(math.exp(lp) for lp in logprobs) / len(logprobs)
            tip = (f"{seg.author} · segment #{position} · {len(logprobs)} tokens · "
                   f"mean p={mean:.3f}")
            return f'<span class="t" style="{_shade(mean)}" title="{_esc(tip)}">{_esc(seg.text)}</span>'
        return _esc(seg.text)
    out = []
    for k, (piece, lp) in enumerate(zip(pieces, logprobs, strict=True)):
        p = math.exp(lp)
        tip = (f"{seg.author} · token {first_token + k} (segment #{position}) · "
               f"p={p:.3f} · logprob {lp:.3f}")
        out.append(f'<span class="t" style="{_shade(p)}" title="{_esc(tip)}" '
                   f'data-p="{p:.4f}">{_esc(piece)}</span>')
    return "".join(out)


def _marker(h: Handoff, number: int) -> str:
    extra = f" · {h.requested_tokens}" if h.reason == "call" and h.requested_tokens else ""
    tip = h.label + (f" ({h.note})" if h.note else "")
    return (f'<span class="ho" id="h{number}" title="{_esc(tip)}">{_esc(h.from_)} → '
            f'{_esc(h.to)} · {_esc(h.reason)}{_esc(extra)}</span>')


def _body(trajectory: Trajectory, authors: _Authors, decoders: dict[str, Decoder]
          ) -> tuple[str, list[tuple[Handoff, int]]]:
    segments = trajectory.segments
    gone = retracted(segments)
    tracker = HandoffTracker()
    parts: list[str] = []
    handoffs: list[tuple[Handoff, int]] = []
    tokens_so_far = 0
    for i, seg in enumerate(segments):
        _segment_html(parts, seg, i, i in gone, authors, decoders, tokens_so_far)
        tokens_so_far += seg.n_tokens if seg.kind in ("text", "call") else 0
        handoff = tracker.push(i, seg)
        if handoff is not None:
            handoffs.append((handoff, tokens_so_far))
            parts.append(_marker(handoff, len(handoffs)))
    return "".join(parts), handoffs


def _segment_html(parts: list[str], seg: Segment, i: int, gone: bool, authors: _Authors,
                  decoders: dict[str, Decoder], tokens_so_far: int) -> None:
    cls = authors.cls(seg.author)
    why = f"{seg.meta['reason']}" if seg.meta.get("reason") else ""
    if seg.kind == "mark":
        return
    if seg.kind == "steer":
        parts.append(f'<span class="steer {cls}">{_esc(seg.author)} steers'
                     f'{_esc(f" ({why})" if why else "")}: {_esc(seg.text)}</span>')
        return
    if seg.kind == "retract":
        which = ", ".join(f"#{j}" for j in seg.meta.get("retracts", ()))
        parts.append(f'<span class="ho rb">⟲ rollback of {_esc(which)}'
                     f'{_esc(f": {why}" if why else "")}</span>')
        return
    if seg.kind == "error":
        parts.append(f'<span class="err">[error by {_esc(seg.author)}] {_esc(seg.text)}</span>')
        return
    extra = (" call" if seg.kind == "call" else "") + (" gone" if gone else "")
    tip = f"{seg.author} · segment #{i} · {seg.kind} · {seg.n_tokens} tokens"
    if seg.finish_reason:
        tip += f" · ended: {seg.finish_reason}"
    if seg.kind == "call":
        granted = seg.meta.get("granted")
        tip += f" · call for {seg.meta.get('requested')} tokens, granted {granted}"
    parts.append(f'<span class="seg {cls}{extra}" data-seq="{i}" title="{_esc(tip)}">'
                 f'{_token_spans(seg, i, decoders.get(seg.author), tokens_so_far)}</span>')


def _cards(totals: Summary, authors: _Authors) -> str:
    total = totals.total_tokens or 1
    bar = "".join(f'<i class="{authors.cls(a)}" style="width:{100 * n / total:.2f}%"></i>'
                  for a, n in totals.tokens_by_agent.items() if n)
    per_agent = " · ".join(f"{_esc(a)} {n}" for a, n in totals.tokens_by_agent.items())
    cards = [
        ("answer", _esc(totals.answer or "(none)"), ""),
        ("tokens", str(totals.total_tokens),
         f"<div class='bar'>{bar}</div><small class='muted'>{per_agent}</small>"),
        ("call ratio", f"{totals.call_ratio:.1%}", ""),
        *([("cost", format_cost(totals.cost), "<small class='muted'>" + " · ".join(
            f"{_esc(a)} {format_cost(c)}" for a, c in (totals.cost_by_agent or {}).items())
            + "</small>")] if totals.cost is not None else []),
        ("handoffs", str(totals.handoffs), ""),
        ("segments", str(totals.segments),
         f"<small class='muted'>{totals.retracted} rolled back</small>" if totals.retracted else ""),
        ("unsure tokens", str(totals.low_tokens), "<small class='muted'>p &lt; 0.5</small>"),
    ]
    return "".join(f'<div class="card"><span>{k}</span><b>{v}</b>{extra}</div>'
                   for k, v, extra in cards)


def render_html(trajectory: Trajectory, decoders: dict[str, Decoder] | None = None,
                status: str | None = None) -> str:
    """The page as a string. ``decoders`` (author -> ids -> text) split segments into
    tokens; without one, an author's segments are shaded as a whole."""
    from relaygraph import __version__

    decoders = decoders or {}
    task = trajectory.task
    authors = _Authors(list(task.agents))
    totals = summarize(trajectory)
    body, handoffs = _body(trajectory, authors, decoders)
    legend = []
    for name, model in task.agents.items():
        mean = totals.mean_prob_by_agent.get(name)
        stats = f"{totals.tokens_by_agent.get(name, 0)} tokens" + (
            f" · mean p {mean:.2f}" if mean is not None else "")
        legend.append(f'<span class="chip"><i class="sw {authors.cls(name)}"></i><b class="'
                      f'{authors.cls(name)}">{_esc(name)}</b> <span class="muted">{_esc(model)} · '
                      f'{stats}</span></span>')
    if any(s.author == SUPERVISOR for s in trajectory.segments):
        legend.append('<span class="chip"><i class="sw sv"></i><b class="sv">supervisor</b></span>')
    legend.append('<span class="chip muted">low confidence <i class="scale"></i> high</span>')
    legend.append('<label class="chip"><input type="checkbox" id="shade" checked> shade tokens by '
                  'confidence</label>')
    rows = "".join(
        f"<tr><td>{n}</td><td>#{h.position}</td><td>{tok}</td><td><b class='{authors.cls(h.from_)}'>"
        f"{_esc(h.from_)}</b> → <b class='{authors.cls(h.to)}'>{_esc(h.to)}</b></td>"
        f"<td>{_esc(h.reason)}{(' — ' + _esc(h.note)) if h.note else ''}</td>"
        f"<td>{'' if h.requested_tokens is None else h.requested_tokens}</td>"
        f"<td>{'' if h.confidence is None else f'{h.confidence:.3f}'}</td></tr>"
        for n, (h, tok) in enumerate(handoffs, 1))
    handoff_table = (
        "<table><thead><tr><th>#</th><th>segment</th><th>after token</th><th>from → to</th>"
        f"<th>reason</th><th title='token budget of the next turn (for a call: the tokens "
        f"granted)'>budget</th><th>confidence</th></tr></thead><tbody>{rows}"
        "</tbody></table>" if handoffs else "<p class='muted'>No handoffs: one agent wrote "
        "everything.</p>")
    ended = f" ({_esc(totals.finish_reason)})" if totals.finish_reason else ""
    created = dt.datetime.fromtimestamp(task.created_at, dt.UTC).strftime(
        "%Y-%m-%d %H:%M:%S UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="relaygraph {_esc(__version__)}">
<title>relaygraph · {_esc(task.question[:80])}</title>
<style>{_CSS}
{authors.css()}</style></head>
<body>
<header><h1>{_esc(task.question)}</h1>
<div class="meta">trajectory <code>{_esc(trajectory.id)}</code> · policy <b>{_esc(task.policy)}</b>
· status <b>{_esc(status or trajectory.status)}</b>{ended} · {created}</div></header>
<section class="legend" aria-label="legend">{''.join(legend)}</section>
<section class="totals" aria-label="totals">{_cards(totals, authors)}</section>
<main id="trajectory">{body}</main>
<h2>Handoffs</h2>
<section id="handoffs">{handoff_table}</section>
<footer>relaygraph {_esc(__version__)} · hover a token for its probability · the shared
trajectory lives in the store under <code>{_esc(trajectory.id)}</code></footer>
</body></html>
"""


def write_html(trajectory: Trajectory, path: str | Path,
               decoders: dict[str, Decoder] | None = None, status: str | None = None,
               trust_stored: bool = False) -> Path:
    """Write the page to ``path``; ``decoders=None`` loads each agent's tokenizer when it
    is available offline (for per-token confidence): catalog models, and with
    ``trust_stored`` the local folders the store names."""
    if decoders is None:
        decoders = load_decoders(trajectory, trust_stored)
    path = Path(path)
    path.write_text(render_html(trajectory, decoders, status), encoding="utf-8")
    return path


def decoders_from_agents(agents: Any) -> dict[str, Decoder]:
    """Decoders taken from live :class:`~relaygraph.agents.agent.Agent` objects."""
    return {a.name: a.backend.decode for a in agents}
