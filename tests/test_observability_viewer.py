"""``relaygraph show``: the terminal view, ``--follow`` on a running relay, and the HTML page
checked in headless Chromium (a real browser screenshot, decoded and inspected)."""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest
from rich.console import Console

from relaygraph.trajectory import RedisStore, Segment, Task, Trajectory
from relaygraph.viewer.summary import handoffs, summarize
from relaygraph.viewer.terminal import follow_trajectory, render_trajectory
from tests import tiny_models as tiny
from tests.test_observability import make_relay


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; CI must apt-get install chromium")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def browser(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=60)


def read_png(path: Path) -> tuple[int, int, set[tuple[int, int, int]]]:
    """Width, height and the set of RGB colours of an 8-bit, non-interlaced PNG (what
    Chromium writes), decoded here: zlib + the five PNG row filters."""
    import numpy as np

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + size]
        pos += 12 + size
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and interlace == 0 and colour in (2, 6), header
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(b"".join(idat)), width * bpp
    image = np.zeros((height, stride), dtype=np.int64)
    prior = np.zeros(stride, dtype=np.int64)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: a running sum per channel
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:  # Up
            cur = (line + prior) % 256
        else:  # Average, Paeth: byte by byte
            out, ln, up = bytearray(stride), line.tolist(), prior.tolist()
            for x in range(stride):
                a = out[x - bpp] if x >= bpp else 0
                b = up[x]
                if kind == 3:
                    pred = (a + b) >> 1
                else:
                    c = up[x - bpp] if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                out[x] = (ln[x] + pred) & 255
            cur = np.frombuffer(bytes(out), np.uint8).astype(np.int64)
        image[y] = cur
        prior = cur
    pixels = image.reshape(height * width, bpp)[:, :3]
    return width, height, {tuple(c) for c in np.unique(pixels, axis=0).tolist()}


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def test_html_page_of_a_real_run_in_headless_chromium(backends, redis_server, tmp_path) -> None:
    from typer.testing import CliRunner

    from relaygraph.cli import app
    from relaygraph.viewer.html import COLOURS

    store = RedisStore.from_url(redis_server.url)
    result = make_relay(backends, store).run(tiny.QUESTION)
    page = tmp_path / "trajectory.html"
    res = CliRunner().invoke(app, ["show", result.trajectory_id, "--redis", redis_server.url,
                                   "--html", str(page), "--trust-stored"])  # tiny model folders
    assert res.exit_code == 0, res.output
    assert f"wrote {page}" in res.stdout
    text = page.read_text()
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org", "")

    # what the browser built from it
    dom = browser("--dump-dom", page.as_uri(), profile=tmp_path / "profile").stdout
    tokens = re.findall(r'<span class="t" style="([^"]*)" title="([^"]*)" data-p="([0-9.]+)">', dom)
    assert len(tokens) == sum(result.tokens_by_agent.values())  # one span per generated token
    for style, title, p in tokens:  # shading follows the probability shown on hover
        alpha = re.search(r"rgba\(220,38,38,([0-9.]+)\)", style)
        assert float(alpha.group(1) if alpha else 0) == pytest.approx((1 - float(p)) * 0.75, abs=0.011)
        assert float(re.search(r"p=([0-9.]+)", title).group(1)) == pytest.approx(float(p), abs=6e-4)
    assert "controller → expert · call · 3" in dom and "expert → controller · call_done" in dom
    assert dom.count("<tr><td>") == 2  # the handoff list
    assert f"{result.call_ratio:.1%}" in dom and ">7</b>" in dom  # totals: call ratio, answer

    # what it looks like
    shot = tmp_path / "trajectory.png"
    run = browser(f"--screenshot={shot}", "--window-size=1000,700", page.as_uri(),
                  profile=tmp_path / "profile")
    assert shot.is_file(), run.stderr[-2000:]
    if keep := os.environ.get("RELAYGRAPH_SCREENSHOT_DIR"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "trajectory.png")
        shutil.copy(page, Path(keep) / "trajectory.html")
    width, height, seen = read_png(shot)
    assert (width, height) == (1000, 700)
    (c_text, c_tint, c_swatch), (e_text, e_tint, e_swatch) = COLOURS[:2]
    assert rgb("#f8fafc") in seen  # the page background
    for colour in (c_tint, c_swatch, e_tint, e_swatch):  # each author's text tint and legend swatch
        assert rgb(colour) in seen, colour
    assert rgb("#1e293b") in seen  # the handoff markers


def test_terminal_view_colours_authors_and_marks_handoffs(backends, redis_store) -> None:
    result = make_relay(backends, redis_store).run(tiny.QUESTION)
    trajectory = redis_store.load(result.trajectory_id)
    buf = io.StringIO()
    render_trajectory(trajectory, Console(file=buf, force_terminal=True, color_system="standard",
                                          width=200))
    out = buf.getvalue()
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert "⟨controller→expert: call, 3 tokens⟩" in plain
    assert "⟨expert→controller: call_done⟩" in plain
    assert "answer: 7" in plain and "handoffs 2" in plain and "status finished (eos)" in plain
    assert f"call ratio {result.call_ratio:.1%}" in plain
    expert_text = trajectory.segments[2].text
    assert f"\x1b[35m{expert_text}" in out  # the expert in magenta
    assert f"\x1b[36m{tiny.CONTROLLER_SUFFIX}" in out  # the controller in cyan
    totals = summarize(trajectory)
    assert totals.tokens_by_agent == result.tokens_by_agent and totals.answer == result.answer
    assert [(h.from_, h.to, h.position) for h in handoffs(trajectory.segments)] == [
        (r.from_, r.to, r.position) for r in result.handoff_records]


def test_follow_shows_a_running_trajectory_as_it_grows(backends, redis_store) -> None:
    relay = make_relay(backends, redis_store)
    relay.run(tiny.QUESTION)  # warm
    tid = f"follow-{time.time_ns()}"

    def slow(event: dict) -> None:  # the graph waits while the consumer handles an event
        if event["type"] == "handoff":
            time.sleep(0.4)

    ended: list[float] = []
    runner = threading.Thread(target=lambda: (relay.run(tiny.QUESTION, trajectory_id=tid,
                                                        on_event=slow),
                                              ended.append(time.monotonic())))
    runner.start()
    deadline = time.monotonic() + 10
    while not redis_store.exists(tid):
        assert time.monotonic() < deadline
        time.sleep(0.005)

    class Stamped(io.StringIO):
        stamps: list[tuple[float, str]] = []

        def write(self, s: str) -> int:
            self.stamps.append((time.monotonic(), s))
            return super().write(s)

    buf = Stamped()
    trajectory = follow_trajectory(redis_store, tid, Console(file=buf, width=200), block_ms=100)
    runner.join()
    assert trajectory.status == "finished" and len(trajectory.segments) == 4
    out = buf.getvalue()
    assert "Let me think" in out and "⟨controller→expert: call, 3 tokens⟩" in out
    assert "⟨expert→controller: call_done⟩" in out and "answer: 7" in out
    first = next(t for t, s in buf.stamps if "Let me think" in s)
    assert first < ended[0] - 0.6  # printed while the run was still going (two 0.4 s pauses left)


def test_summary_of_a_supervised_trajectory_with_rollback_and_stored_handoffs() -> None:
    """Steer, rollback and the recorded steps (``meta["step"]``) are rendered and counted."""
    from relaygraph.viewer.html import render_html

    segs = [
        Segment(author="a", text="one ", token_ids=[1, 2], logprobs=[-0.1, -2.0],
                meta={"step": {"author": "a", "tokens": 2, "to": "supervisor", "budget": 0,
                               "reason": "review", "counters": {}, "moved": False}}),
        Segment(author="supervisor", kind="retract", text="", meta={"retracts": [0], "reason": "bad"}),
        Segment(author="supervisor", kind="steer", text="try again",
                meta={"reason": "bad", "step": {"author": "a", "tokens": 0, "to": "b", "budget": 4,
                                                "reason": "rollback", "counters": {"rollbacks": 1},
                                                "moved": True}}),
        Segment(author="b", text="two ", token_ids=[3], logprobs=[-0.5],
                meta={"step": {"author": "b", "tokens": 1, "to": "a", "budget": 7,
                               "reason": "fallback_done", "counters": {}, "moved": True}}),
        Segment(author="a", text="<b>3</b>", token_ids=[4], logprobs=[0.0], finish_reason="eos",
                meta={"step": {"author": "a", "tokens": 1, "to": "finish", "budget": 0,
                               "reason": "eos", "counters": {}, "moved": False}}),
    ]
    trajectory = Trajectory(id="t1", task=Task(question="Q & A?", policy="supervisor",
                                                agents={"a": "m1", "b": "m2"}),
                            segments=segs, status="finished")
    hs = handoffs(segs)
    assert [(h.from_, h.to, h.reason, h.position, h.note) for h in hs] == [
        ("a", "b", "rollback", 3, "bad"), ("b", "a", "fallback_done", 4, "")]
    assert hs[1].requested_tokens == 7  # the recorded step, not a guess
    totals = summarize(trajectory)
    assert totals.tokens_by_agent == {"a": 3, "b": 1} and totals.retracted == 1
    assert totals.call_ratio == pytest.approx(1 / 4) and totals.low_tokens == 1
    assert totals.finish_reason == "eos"
    decoders = {"a": lambda ids: "".join({1: "on", 2: "e ", 4: "<b>3</b>"}[i] for i in ids)}
    page = render_html(trajectory, decoders)
    assert "Q &amp; A?" in page and "&lt;b&gt;3&lt;/b&gt;" in page and "<b>3</b>" not in page
    assert 'class="seg a0 gone"' in page and "rollback of #0: bad" in page
    assert "supervisor steers (bad): try again" in page
    assert f'data-p="{math.exp(-2.0):.4f}"' in page  # per-token for a (decoder), whole for b
    assert "b · segment #3 · 1 tokens · mean p=0.607" in page
