"""The call-command parser: exact semantics and never a crash."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relaygraph.policies import parse_call


def test_valid_commands() -> None:
    assert parse_call("think <call>3</call>").n == 3
    assert parse_call("think <call> 300 </call>").n == 300  # whitespace as in the paper
    assert parse_call("a<call>007</call>").n == 7
    cmd = parse_call("step one.<call>12</call>")
    assert cmd.start == len("step one.") and cmd.raw == "<call>12</call>"


def test_no_command() -> None:
    assert parse_call("plain text") is None
    assert parse_call("<call>3") is None  # unterminated: no closing tag, nothing to parse


def test_malformed_commands_are_reported_not_raised() -> None:
    for text in ("<call>abc</call>", "<call>0</call>", "<call>-1</call>", "<call></call>",
                 "<call>3.5</call>", "<call>٣</call>", "<call>１２</call>", "x </call>",
                 "<call>1e3</call>", "<call>3 4</call>"):
        cmd = parse_call(text)
        assert cmd is not None and cmd.n is None, text


def test_huge_numbers_parse_and_are_left_to_clipping() -> None:
    assert parse_call("<call>" + "9" * 5000 + "</call>").n >= 10**18
    assert parse_call("<call>" + "0" * 4000 + "5</call>").n == 5


def test_last_command_wins_and_nested_tags() -> None:
    assert parse_call("<call>2</call> and <call>5</call>").n == 5
    cmd = parse_call("<call><call>4</call>")
    assert cmd.n == 4 and cmd.start == len("<call>")


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(["<call>", "</call>", "<", ">", "/", "call", "0", "7", "42",
                                  " ", "-", "٣", "x", "\n", "99999999999999999999"])
                | st.text(max_size=3), max_size=12).map("".join))
def test_fuzz_never_crashes_and_agrees_with_the_spec(text: str) -> None:
    cmd = parse_call(text)
    if "</call>" not in text:
        assert cmd is None
        return
    assert cmd is not None
    assert text[cmd.start:].startswith(cmd.raw)
    if cmd.n is not None:
        body = cmd.raw[len("<call>"):-len("</call>")].strip()
        assert body.isascii() and body.isdigit() and min(int(body), 10**18) == cmd.n > 0
