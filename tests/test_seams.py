"""Cross-tokenizer seams: a view mixing an agent's own token ids with another tokenizer's
text renders to exactly the concatenated text — nothing merged, split, added or lost at a
boundary — and the agent's own ids are passed through untouched."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygraph.agents.backend import Prompt
from relaygraph.agents.transformers_backend import TransformersBackend
from relaygraph.trajectory.models import Segment
from tests import tiny_models as tiny

TEXT = ("Let me think. two plus five is seven, so 2 + 5 = 7 — naïve café ∑ 😀.\n\n"
        "The answer is \\boxed{7}.")


@pytest.fixture(scope="module")
def smol() -> TransformersBackend:
    from relaygraph.agents import catalog

    catalog.pull("smollm2-135m")
    return TransformersBackend("smollm2-135m", dtype="float32")


def _view(cuts: list[int], owners: list[TransformersBackend]) -> list[Segment]:
    """TEXT cut at ``cuts``; piece i written by ``owners[i % len(owners)]`` with its ids."""
    bounds = [0, *sorted(set(cuts)), len(TEXT)]
    view = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if a == b:
            continue
        owner = owners[i % len(owners)]
        piece = TEXT[a:b]
        view.append(Segment(author=f"agent{i % len(owners)}", kind="text", text=piece,
                            token_ids=owner.encode(piece), tokenizer=owner.tokenizer_id))
    return view


def _check(backend: TransformersBackend, view: list[Segment]) -> None:
    head = backend.render(Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT))
    ids = backend.render(Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT, tuple(view)))
    assert ids[:len(head)] == head
    assert backend.decode(ids[len(head):]) == "".join(s.text for s in view)
    # own segments' ids pass through untouched; runs of foreign text are encoded whole
    expected, pending = list(head), ""
    for seg in view:
        if seg.tokenizer == backend.tokenizer_id:
            expected += backend.encode(pending) if pending else []
            expected += seg.token_ids
            pending = ""
        else:
            pending += seg.text
    expected += backend.encode(pending) if pending else []
    assert ids == expected


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, len(TEXT) - 1), min_size=1, max_size=6))
def test_mixed_views_render_to_the_exact_text(backends, smol, cuts) -> None:
    tiny_backend = backends[1]
    assert tiny_backend.tokenizer_id != smol.tokenizer_id
    view = _view(cuts, [tiny_backend, smol])
    _check(tiny_backend, view)
    _check(smol, view)


def test_consecutive_foreign_segments_are_encoded_together(backends, smol) -> None:
    """Two foreign pieces cut mid-word ("sev" + "en") become the ids of "seven", not two
    half-words: the seam does not show in the tokens either."""
    view = [Segment(author="a", kind="text", text="is sev"), Segment(author="b", kind="text", text="en")]
    head = smol.render(Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT))
    ids = smol.render(Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT, tuple(view)))
    assert ids[len(head):] == smol.encode("is seven")


def test_a_task_head_is_rendered_once_and_kept_per_task(backends) -> None:
    """A relay renders the same task every turn: the chat template runs once per task (and
    per template option), and the kept head is the one the template gives."""
    from relaygraph.agents.rendering import Renderer

    renderer = Renderer(backends[0].tokenizer)
    calls: list[str] = []
    template = renderer.tokenizer.apply_chat_template

    def counted(*args, **kwargs):
        calls.append(args[0][-1]["content"])
        return template(*args, **kwargs)

    renderer.tokenizer = type("Counting", (), {"__getattr__": lambda _, name: getattr(
        backends[0].tokenizer, name), "apply_chat_template": staticmethod(counted),
        "__call__": lambda _, *a, **k: backends[0].tokenizer(*a, **k)})()
    first = renderer.render(Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT))
    view = (Segment(author="a", text="Let me think."),)
    again = renderer.render(Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT, view))
    other = renderer.render(Prompt(tiny.NOCALL_QUESTION, tiny.SYSTEM_PROMPT))
    assert calls == [tiny.QUESTION, tiny.NOCALL_QUESTION]
    assert again[:len(first)] == first == backends[0].render(Prompt(tiny.QUESTION, tiny.SYSTEM_PROMPT))
    assert other == backends[0].render(Prompt(tiny.NOCALL_QUESTION, tiny.SYSTEM_PROMPT))
    for i in range(Renderer.HEADS + 5):  # bounded
        renderer.render(Prompt(f"question {i}", None))
    assert len(renderer._heads) == Renderer.HEADS
