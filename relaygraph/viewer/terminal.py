"""Terminal rendering of trajectories: text coloured by author, with handoff markers.

:class:`TrajectoryPrinter` prints a stored trajectory, or one segment at a time while a
run is going (``relaygraph show ID --follow`` feeds it from blocking stream reads);
:class:`LivePrinter` prints a running relay's token and handoff events.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.text import Text

from relaygraph.trajectory.liveness import effective_status
from relaygraph.trajectory.models import Segment, Trajectory, retracted
from relaygraph.viewer.summary import Handoff, HandoffTracker, Summary, format_cost, summarize

PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "red")
_SHOWN = {"\n", "\t"}


def printable(text: str) -> str:
    """``text`` with control characters (terminal escape sequences, bells, C1 controls,
    bidirectional overrides) shown escaped, so stored text cannot drive the terminal."""
    return "".join(ch if ch in _SHOWN or unicodedata.category(ch) not in ("Cc", "Cf")
                   else ch.encode("unicode_escape").decode("ascii") for ch in text)


class Styles:
    """A stable colour per author, in order of first appearance."""

    def __init__(self, authors: Sequence[str] = ()) -> None:
        self._styles: dict[str, str] = {}
        for author in authors:
            self[author]

    def __getitem__(self, author: str) -> str:
        if author not in self._styles:
            self._styles[author] = PALETTE[len(self._styles) % len(PALETTE)]
        return self._styles[author]

    def legend(self, models: dict[str, str] | None = None) -> Text:
        text = Text()
        text.append("authors: ", style="dim")
        for author, style in self._styles.items():
            model = f" ({models[author]})" if models and author in models else ""
            text.append(printable(f"■ {author}{model}  "), style=style)
        return text


def segment_text(segment: Segment, styles: Styles, retracted: bool = False) -> Text:
    """One segment as styled text; commands, steers and errors are shown as markers."""
    style = styles[segment.author] + (" strike dim" if retracted else "")
    if segment.kind == "call":
        granted = segment.meta.get("granted")
        text = Text()
        text.append(printable(segment.text), style=f"bold {style} reverse")
        text.append(printable(f"[→ {granted} tokens]" if granted else
                    f"[refused: {segment.meta.get('refused')}]"), style="dim")
        return text
    if segment.kind in ("steer", "error"):
        return Text(printable(f"\n[{segment.kind} by {segment.author}] {segment.text}\n"),
                    style=f"italic {style}")
    if segment.kind == "mark":
        return Text("")
    if segment.kind == "retract":
        gone = ", ".join(f"#{i}" for i in segment.meta.get("retracts", ()))
        why = f": {segment.meta['reason']}" if segment.meta.get("reason") else ""
        return Text(printable(f" ⟲ rollback of {gone}{why} "), style="bold red")
    return Text(printable(segment.text), style=style)


def handoff_marker(handoff: Handoff) -> Text:
    """``⟨from→to: reason⟩`` (the live printer's marker), dim."""
    note = f" ({handoff.note})" if handoff.note else ""
    return Text(printable(f" ⟨{handoff.label}{note}⟩ "), style="dim")


class TrajectoryPrinter:
    """Prints segments in order with a handoff marker wherever the writer changes."""

    def __init__(self, console: Console, styles: Styles, retracted: Iterable[int] = ()) -> None:
        self.console = console
        self.styles = styles
        self.retracted = set(retracted)
        self.tracker = HandoffTracker()
        self.count = 0

    def add(self, position: int, segment: Segment) -> None:
        self.console.print(segment_text(segment, self.styles, position in self.retracted),
                           end="", soft_wrap=True)
        handoff = self.tracker.push(position, segment)
        if handoff is not None:
            self.console.print(handoff_marker(handoff), end="", soft_wrap=True)
        self.count += 1

    def add_all(self, segments: Iterable[tuple[int, Segment]]) -> None:
        for position, segment in segments:
            self.add(position, segment)


def header(trajectory: Trajectory, console: Console, styles: Styles) -> None:
    console.print(Text(printable(trajectory.task.question), style="bold"))
    console.print(styles.legend(trajectory.task.agents))


def footer(trajectory: Trajectory, totals: Summary, status: str, console: Console) -> None:
    tokens = ", ".join(f"{k} {v}" for k, v in totals.tokens_by_agent.items())
    console.print()
    console.print(Text(printable(f"answer: {totals.answer or '(none)'}"), style="bold"))
    console.print(Text(printable(
        f"status {status}" + (f" ({totals.finish_reason})" if totals.finish_reason else "")
        + f" · {totals.segments} segments · policy {trajectory.task.policy} · "
        f"tokens {tokens} · call ratio {totals.call_ratio:.1%} · handoffs {totals.handoffs}"
        + (f" · cost {format_cost(totals.cost)}" if totals.cost is not None else "")
        + (f" · {totals.retracted} rolled back" if totals.retracted else "")), style="dim"))



def render_trajectory(trajectory: Trajectory, console: Console, status: str | None = None) -> None:
    """A stored trajectory: header, coloured text with handoff markers, totals."""
    styles = Styles(list(trajectory.task.agents))
    header(trajectory, console, styles)
    printer = TrajectoryPrinter(console, styles, retracted(trajectory.segments))
    printer.add_all(enumerate(trajectory.segments))
    footer(trajectory, summarize(trajectory), status or trajectory.status, console)


def follow_trajectory(store: Any, trajectory_id: str, console: Console,
                      block_ms: int = 1000) -> Trajectory:
    """Print a (running) trajectory as its segments arrive, by blocking reads on its stream,
    until the run ends; returns the finished trajectory."""
    trajectory = store.load(trajectory_id)
    styles = Styles(list(trajectory.task.agents))
    header(trajectory, console, styles)
    printer = TrajectoryPrinter(console, styles)
    printer.add_all(store.follow(trajectory_id, 0, block_ms=block_ms))
    trajectory = store.load(trajectory_id)
    footer(trajectory, summarize(trajectory),
           effective_status(trajectory_id, trajectory.status, trajectory.info), console)
    return trajectory


def list_trajectories(store: Any, limit: int, console: Console, width: int = 60) -> int:
    """The newest ``limit`` trajectories, one line each: id, when, status (``interrupted``
    for a run whose process is gone), policy and the start of the question. Returns how
    many were listed."""
    import time

    ids = store.list_ids(limit)
    if hasattr(store, "headers"):
        headers = store.headers(ids)
    else:  # another store: the whole trajectories
        headers = [store.load(tid) for tid in ids]
    rows = []
    for header in headers:
        if header is None:
            continue
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(header.task.created_at))
        status = effective_status(header.id, header.status, header.info)
        question = " ".join(header.task.question.split())
        question = question if len(question) <= width else question[:width - 1] + "…"
        rows.append((header.id, when, status, header.task.policy, question))
    if not rows:
        console.print("no trajectories yet — `relaygraph run \"...\"` starts one", style="dim")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    console.print(Text("  ".join(h.ljust(w) for h, w in zip(
        ("id", "created", "status", "policy"), widths, strict=True)) + "  question", style="dim"))
    for row in rows:
        line = "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True))
        console.print(Text(printable(f"{line}  {row[4]}")), soft_wrap=True)
    return len(rows)


def render_segments(segments: Iterable[Segment], console: Console, styles: Styles) -> None:
    printer = TrajectoryPrinter(console, styles)
    printer.add_all(enumerate(segments))
    console.print()


class LivePrinter:
    """Prints token and handoff events of a running relay as they arrive."""

    def __init__(self, console: Console, styles: Styles) -> None:
        self.console = console
        self.styles = styles

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("type") == "token":
            self.console.print(Text(printable(event["text"]), style=self.styles[event["agent"]]),
                               end="",
                               soft_wrap=True)
        elif event.get("type") == "handoff" and event["to"] != "finish":
            self.console.print(Text(printable(f" ⟨{event['from']}→{event['to']}: {event['reason']}⟩ "),
                                    style="dim"), end="")
