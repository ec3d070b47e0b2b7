"""The twin tests' and the reasoning relay's definitions on hand-made cases: which problems
qualify, where a cut goes (sentence ends), how long the steer is, what counts as a
spoiler, where a log-prob threshold cuts; and the process reward model interface with a
tiny real judge model."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygraph.eval.chains import Chain, cut_at_sentence, first_sentence, given, sentence_ends
from relaygraph.eval.relay_experiment import (
    JudgePRM,
    fraction_cut,
    prm_summary,
    split_steps,
    stage,
    surprisal_cut,
    threshold_cut,
)
from relaygraph.eval.twins import distractor, is_spoiler, recoverable, steer_tokens, unsolved
from tests import tiny_models as tiny


def chars(text: str) -> list[int]:
    """A chain whose tokens are its characters (so cuts can be read off the text)."""
    return [ord(c) for c in text]


def decode(ids) -> str:
    return "".join(chr(i) for i in ids)


# ---------------------------------------------------------------------- which problems qualify

def test_recoverability_uses_only_problems_the_model_solves_alone() -> None:
    assert recoverable({"correct": True}) and not recoverable({"correct": False})


def test_guidability_uses_only_problems_solved_in_at_most_one_of_k_samples() -> None:
    k8 = lambda n: [{"correct": i < n} for i in range(8)]  # noqa: E731
    assert unsolved(k8(0)) and unsolved(k8(1))
    assert not unsolved(k8(2)) and not unsolved(k8(8))
    assert unsolved(k8(2), max_solved=2) and not unsolved(k8(1), max_solved=0)


def test_the_distractor_is_another_problem_chosen_per_problem_by_the_seed() -> None:
    ids = [str(i) for i in range(10)]
    picks = {pid: distractor(pid, ids, seed=0) for pid in ids}
    assert all(pick != pid and pick in ids for pid, pick in picks.items())
    assert picks == {pid: distractor(pid, list(reversed(ids)), seed=0) for pid in ids}
    assert picks != {pid: distractor(pid, ids, seed=1) for pid in ids}
    assert distractor("0", ["0"]) is None


# ---------------------------------------------------------------------- where cuts go

TEXT = "We need the total cost. Each box costs 3.5 dollars!\nSo 4 boxes cost 14. Done"


def test_sentence_ends_are_after_end_marks_followed_by_space_and_at_line_breaks() -> None:
    ids = chars(TEXT)
    ends = sentence_ends(decode, ids)
    assert [TEXT[:k][-3:] for k in ends] == [
        "st.", "rs!", "s!\n", "14."]  # not inside 3.5, not at the very end
    assert TEXT[:ends[0]] == "We need the total cost."


def test_insertion_points_snap_to_the_nearest_sentence_end() -> None:
    ids = chars(TEXT)  # 76 characters; sentence ends after 23, 51, 52, 71
    assert cut_at_sentence(decode, ids, 0.0) == (0, True)      # m = 0: before everything
    assert cut_at_sentence(decode, ids, 0.2) == (23, True)     # 15.2 -> 23
    assert cut_at_sentence(decode, ids, 0.6) == (51, True)     # 45.6 -> 51 (nearer than 23)
    assert cut_at_sentence(decode, ids, 0.8) == (52, True)     # 60.8 -> 52 (nearer than 71)
    assert cut_at_sentence(decode, ids, 0.95) == (71, True)    # 72.2 -> 71 (never the end)
    # equally near two ends: the earlier one
    tie = chars("Aaaa. Bbbb. Cccc")  # ends after 5 and 11; 8 is 3 from each
    assert cut_at_sentence(decode, tie, 8 / 16) == (5, True)
    # no sentence end at all: the exact token position
    assert cut_at_sentence(decode, chars("x" * 10), 0.4) == (4, False)


def test_the_initial_restatement_is_the_first_sentence() -> None:
    ids = chars(TEXT)
    assert decode(ids[:first_sentence(decode, ids)]) == "We need the total cost."
    assert first_sentence(decode, chars("no end here")) is None


def test_sentence_ends_work_on_real_token_boundaries(backends) -> None:
    controller = backends[0]
    ids = controller.encode("Let me think. two plus five is seven. The answer is \\boxed{7}.")
    ends = sentence_ends(controller.decode, ids)
    assert [controller.decode(ids[:k]) for k in ends] == [
        "Let me think.", "Let me think. two plus five is seven."]


def test_the_steer_is_the_first_share_of_a_trajectory() -> None:
    assert steer_tokens(100, 0.2) == 20 and steer_tokens(7, 0.2) == 1 and steer_tokens(3, 0.1) == 1
    assert steer_tokens(0, 0.2) == 0 and steer_tokens(10, 1.0) == 10
    chain = Chain("m", chars("abcdef"), [-0.1] * 6, "tok", "abcdef")
    seg = given(chain, steer_tokens(6, 0.5), decode, author="steer", role="r_steer")
    assert (seg.text, seg.author, seg.logprobs, seg.meta) == ("abc", "steer", [-0.1] * 3, {"role": "r_steer"})


# ---------------------------------------------------------------------- spoilers

@pytest.mark.parametrize(("text", "gold", "spoiler"), [
    ("So the total is \\boxed{18}.", "18", True),
    ("She makes 9 * 2 = $18 every day", "18", True),         # the answer already appears
    ("She sells 16 - 3 - 4 = 9 eggs", "18", False),
    ("There are 180 of them", "18", False),                   # a whole number, not a digit run
    ("That is 1,800 in all", "1800", True),
    ("Half of it: \\boxed{\\frac{1}{2}}", "0.5", True),       # equivalent boxed answer
    ("The colour is blue, not red", "blue", True),
    ("The colour is not yet known", "blue", False),
    ("We keep 2.5 and 18.5 apart", "18", False),
])
def test_a_spoiler_already_contains_the_final_answer(text: str, gold: str, spoiler: bool) -> None:
    assert is_spoiler(text, gold) is spoiler


# ---------------------------------------------------------------------- reasoning relay cuts

def test_a_threshold_cut_goes_before_the_first_token_below_it() -> None:
    logprobs = [-0.1, -0.2, -2.5, -0.1, -4.0, -0.3]
    assert threshold_cut(logprobs, -2.0) == 2          # keeps tokens 0..1, drops token 2
    assert threshold_cut(logprobs, -3.0) == 4          # a lower threshold cuts later
    assert threshold_cut(logprobs, -0.15) == 1         # one closer to 0 cuts earlier
    assert threshold_cut(logprobs, -5.0) is None       # nothing below: no cut
    assert threshold_cut(logprobs, -2.0, warmup=3) == 4
    assert [fraction_cut(10, f) for f in (0.2, 0.4, 0.6, 0.8)] == [2, 4, 6, 8]
    assert [stage(x) for x in (0.1, 0.4, 0.7)] == ["early", "mid", "late"]


def test_a_surprisal_budget_cut_goes_where_the_accumulated_surprisal_exceeds_it() -> None:
    """The article's rule: "lower thresholds result in earlier truncations" — true of a budget
    on the chain's accumulated surprisal, the opposite of the per-token threshold above."""
    logprobs = [-0.1, -0.2, -2.5, -0.1, -4.0, -0.3]   # accumulated: 0.1 0.3 2.8 2.9 6.9 7.2
    assert surprisal_cut(logprobs, 2.0) == 2           # keeps tokens 0..1, drops token 2
    assert surprisal_cut(logprobs, 5.0) == 4           # a higher budget cuts later
    assert surprisal_cut(logprobs, 0.2) == 1           # a lower one earlier
    assert surprisal_cut(logprobs, 10.0) is None       # never exceeded: no cut
    assert surprisal_cut(logprobs, 0.2, warmup=3) == 3
    cuts = [surprisal_cut(logprobs, b) for b in (0.2, 2.0, 5.0)]
    assert cuts == sorted(cuts)  # monotone in the budget
    thresholds = [threshold_cut(logprobs, t) for t in (-0.15, -2.0, -3.0)]
    assert thresholds == sorted(thresholds)  # per token: lower (more negative) cuts later


# ---------------------------------------------------------------------- process reward model

QUESTION = "What is 2 + 5?"
GOOD, BAD = "Two plus five is seven.", "So the answer is eight."


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> JudgePRM:
    """A tiny model trained to judge GOOD good and BAD (after GOOD) bad."""
    from relaygraph.agents.transformers_backend import TransformersBackend

    good = JudgePRM.prompt(QUESTION, [], GOOD).question
    bad = JudgePRM.prompt(QUESTION, [GOOD], BAD).question
    folder = tiny.build_tiny_model(Path(tmp_path_factory.getbasetemp()) / "tiny-judge",
                                   [(JudgePRM.SYSTEM, good, " good"), (JudgePRM.SYSTEM, bad, " bad")])
    return JudgePRM(TransformersBackend(str(folder), dtype="float32"))


def test_a_judge_model_scores_each_step_given_the_previous_ones(judge: JudgePRM) -> None:
    good, bad = judge.score_steps(QUESTION, [GOOD, BAD])
    assert good > 0.9 and bad < 0.1
    summary = prm_summary(judge, QUESTION, GOOD, BAD)  # cut between the two steps
    assert summary["cut_step"] == 1 and summary["first_low"] == "continuation"
    assert summary["prefix_mean"] == pytest.approx(good) and summary["continuation_mean"] == pytest.approx(bad)


def test_steps_are_paragraphs_else_lines() -> None:
    assert split_steps("a\nb\n\nc\n") == ["a\nb", "c"]
    assert split_steps("a\nb\n") == ["a", "b"]
    assert split_steps("   ") == []


def test_the_relay_experiment_scores_every_chain_with_the_prm(judge, backends, redis_store,
                                                               tmp_path: Path) -> None:
    from relaygraph.eval.datasets import Problem
    from relaygraph.eval.models import ModelPool, agent_config
    from relaygraph.eval.relay_experiment import run_relay_experiment
    from relaygraph.eval.runner import FileResults

    models = {name: agent_config(b.model_id, "float32") for name, b in zip(("c", "e"), backends)}
    results = FileResults(tmp_path)
    result = run_relay_experiment(models, [Problem(id="0", question=tiny.QUESTION, answer="7")],
                                  redis_store, results, ModelPool(), max_tokens=16,
                                  thresholds=[], fractions=[0.5], budgets=[], prm=judge)
    results.close()
    chains = result["items"]["solo"] + result["items"]["hybrids"]
    assert len(chains) == 4 and all(0 < s < 1 for c in chains for s in c["prm"]["steps"])
    for hybrid in result["items"]["hybrids"]:
        given = [s.text for s in redis_store.read(hybrid["trajectory_id"]) if s.meta.get("given")]
        assert hybrid["prm"]["cut_step"] == len(split_steps("".join(given)))
    assert all("prm" in row for row in result["hybrids"])
