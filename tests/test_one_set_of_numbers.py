"""One trajectory, one set of numbers: ``run --json``, ``show --json``, ``show`` (and
``--follow``), the HTML page, ``resume --json`` and ``relaygraph serve`` (its trajectory
route and a served run's usage) all report the same handoffs, records, tokens, counters,
call ratio, answer and finish reason — each folded once from the stored step records.

The run is a real relay of the tiny pair under the confidence policy, tuned so it hands
off several times, records per-handoff confidences and a ``fallbacks`` counter, and ends on
the token budget (the shape of the run in the issue that found three handoff counts)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from relaygraph.serve import create_app
from relaygraph.serve.registry import Registry, ServeConfig
from relaygraph.serve.server import BackgroundServer
from relaygraph.trajectory import RedisStore
from tests import tiny_models as tiny
from tests.test_cli import cli

RELAY = ["--policy", "confidence", "--threshold", "-0.01", "--fallback-tokens", "3",
         "--max-tokens", "12", "--dtype", "float32"]


@pytest.fixture(scope="module")
def run_json(tiny_pair, redis_server) -> dict[str, Any]:
    controller, expert = tiny_pair
    proc = cli("run", tiny.QUESTION, "--controller", str(controller), "--expert", str(expert),
               *RELAY, "--redis", redis_server.url, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # a run worth comparing: several handoffs with confidences, a counter, a budget end
    assert out["handoffs"] >= 4 and out["handoffs"] == len(out["handoff_records"])
    assert any(r["confidence"] is not None for r in out["handoff_records"])
    assert out["counters"].get("fallbacks", 0) >= 2
    assert out["finish_reason"] == "budget" and out["status"] == "finished"
    return out


def numbers(view: dict[str, Any]) -> dict[str, Any]:
    keys = ("answer", "finish_reason", "tokens_by_agent", "call_ratio", "handoffs",
            "handoff_records", "counters")
    return {k: view[k] for k in keys}


def test_show_json_and_resume_json_print_what_run_json_printed(run_json, redis_server) -> None:
    tid = run_json["trajectory_id"]
    shown = cli("show", tid, "--json", "--redis", redis_server.url)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == run_json  # every field, wall time and thread included
    resumed = cli("resume", tid, "--json", "--redis", redis_server.url)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == run_json  # a finished run is returned as it is
    assert "has finished; nothing to resume" in resumed.stderr
    assert "loading" not in resumed.stderr  # and no model is loaded for it


def test_the_terminal_views_print_the_same_totals(run_json, redis_server) -> None:
    tid = run_json["trajectory_id"]
    tokens = ", ".join(f"{k} {v}" for k, v in run_json["tokens_by_agent"].items())
    expected = (f"status finished ({run_json['finish_reason']}) · {len(run_json['segments'])} "
                f"segments · policy confidence · tokens {tokens} · call ratio "
                f"{run_json['call_ratio']:.1%} · handoffs {run_json['handoffs']}")
    for extra in ([], ["--follow"]):
        shown = cli("show", tid, *extra, "--redis", redis_server.url)
        assert shown.returncode == 0, shown.stderr
        text = " ".join(shown.stdout.split())  # the console wraps long lines
        assert expected in text, (extra, shown.stdout)
        assert f"answer: {run_json['answer']}" in text
        # one marker per handoff record, in order
        markers = re.findall(r"⟨(\w+)→(\w+): (\w+)", text)
        assert markers == [(r["from"], r["to"], r["reason"]) for r in run_json["handoff_records"]]


class _Page(HTMLParser):
    """The HTML page's totals cards and handoff table, as text."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: dict[str, str] = {}
        self.rows: list[list[str]] = []
        self._stack: list[str] = []
        self._card_key: str | None = None
        self._cell: list[str] | None = None
        self._in_card = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = dict(attrs).get("class") or ""
        if tag == "div" and "card" in classes.split():
            self._in_card, self._card_key = True, None
        if tag == "tr":
            self.rows.append([])
        if tag == "td":
            self._cell = []
        self._stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "div":
            self._in_card = False
        if self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_card and self._stack:
            if self._stack[-1] == "span" and self._card_key is None:
                self._card_key = data.strip()
            elif self._stack[-1] == "b" and self._card_key and self._card_key not in self.cards:
                self.cards[self._card_key] = data.strip()


def test_the_html_page_shows_the_same_totals_and_handoffs(run_json, redis_server, tmp_path) -> None:
    page = tmp_path / "run.html"
    shown = cli("show", run_json["trajectory_id"], "--html", str(page), "--redis", redis_server.url)
    assert shown.returncode == 0, shown.stderr
    parsed = _Page()
    parsed.feed(page.read_text())
    assert parsed.cards["answer"] == run_json["answer"]
    assert parsed.cards["handoffs"] == str(run_json["handoffs"])
    assert parsed.cards["tokens"] == str(sum(run_json["tokens_by_agent"].values()))
    assert parsed.cards["call ratio"] == f"{run_json['call_ratio']:.1%}"
    assert parsed.cards["segments"] == str(len(run_json["segments"]))
    rows = [r for r in parsed.rows if r]  # the handoff table's body
    assert len(rows) == run_json["handoffs"]
    for row, record in zip(rows, run_json["handoff_records"], strict=True):
        assert row[1] == f"#{record['position']}"
        assert row[3].split() == [record["from"], "→", record["to"]]
        assert row[4] == record["reason"]
        assert row[5] == ("" if record["requested_tokens"] is None else str(record["requested_tokens"]))
        assert row[6] == ("" if record["confidence"] is None else f"{record['confidence']:.3f}")
    assert any(row[6] for row in rows)  # the confidence column is filled where records have one


def _serve_config(tiny_pair: tuple[Path, Path]) -> ServeConfig:
    controller, expert = tiny_pair
    agents = {"controller": {"model": str(controller), "dtype": "float32"},
              "expert": {"model": str(expert), "dtype": "float32"}}
    return ServeConfig.parse({"relays": {"relay-confidence": {
        "agents": agents, "max_tokens": 12,
        "policy": {"type": "confidence", "threshold": -0.01, "fallback_tokens": 3}}}})


def test_serve_reports_the_same_numbers(run_json, tiny_pair, redis_server) -> None:
    store = RedisStore.from_url(redis_server.url)
    registry = Registry.build(_serve_config(tiny_pair), store)
    with BackgroundServer(create_app(registry)) as server:
        # the trajectory route, for the CLI's run
        view = httpx.get(f"{server.url}/v1/trajectories/{run_json['trajectory_id']}").json()
        assert view["answer"] == run_json["answer"]
        assert view["finish_reason"] == run_json["finish_reason"]
        assert view["handoff_records"] == run_json["handoff_records"]
        for key in ("tokens_by_agent", "call_ratio", "handoffs", "counters",
                    "input_tokens_by_agent"):
            assert view["usage"][key] == run_json[key], key
        # a served run: its usage, its trajectory route and `show --json` agree
        client = OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)
        done = client.chat.completions.create(
            model="relay-confidence", messages=[{"role": "user", "content": tiny.QUESTION}])
        served = done.model_extra["relaygraph"]
        usage = done.usage.model_extra["relaygraph"]
        tid = served["trajectory_id"]
        shown = json.loads(cli("show", tid, "--json", "--redis", redis_server.url).stdout)
        assert numbers(shown) == numbers({**served, **usage})
        assert usage["handoffs"] >= 4 and shown["counters"].get("fallbacks", 0) >= 2
        route = httpx.get(f"{server.url}/v1/trajectories/{tid}").json()
        assert route["handoff_records"] == shown["handoff_records"]
        assert route["usage"]["counters"] == shown["counters"]
    store.close()
