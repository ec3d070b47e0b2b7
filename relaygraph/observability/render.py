"""Terminal rendering of trajectories: text coloured by author, with handoff markers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.text import Text

from relaygraph.trajectory.models import Segment

PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "red")


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

    def legend(self) -> Text:
        text = Text("authors: ", style="dim")
        for author, style in self._styles.items():
            text.append(f"■ {author}  ", style=style)
        return text


def segment_text(segment: Segment, styles: Styles) -> Text:
    """One segment as styled text; commands, steers and errors are shown as markers."""
    style = styles[segment.author]
    if segment.kind == "call":
        granted = segment.meta.get("granted")
        return Text(f"{segment.text}", style=f"bold {style} reverse") + Text(
            f"[→ {granted} tokens]" if granted else f"[refused: {segment.meta.get('refused')}]",
            style="dim")
    if segment.kind in ("steer", "error"):
        return Text(f"\n[{segment.kind} by {segment.author}] {segment.text}\n", style=f"italic {style}")
    return Text(segment.text, style=style)


def render_segments(segments: Iterable[Segment], console: Console, styles: Styles) -> None:
    for segment in segments:
        console.print(segment_text(segment, styles), end="")
    console.print()


class LivePrinter:
    """Prints token and handoff events of a running relay as they arrive."""

    def __init__(self, console: Console, styles: Styles) -> None:
        self.console = console
        self.styles = styles

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("type") == "token":
            self.console.print(Text(event["text"], style=self.styles[event["agent"]]), end="",
                               soft_wrap=True)
        elif event.get("type") == "handoff" and event["to"] != "finish":
            self.console.print(Text(f" ⟨{event['from']}→{event['to']}: {event['reason']}⟩ ",
                                    style="dim"), end="")
