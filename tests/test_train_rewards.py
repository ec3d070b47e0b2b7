"""RelayLLM's rewards on hand-made groups: the three scenarios and their boundaries."""

from __future__ import annotations

import pytest

from relaygraph.train.rewards import difficulty_aware, scenario, simple


def test_simple_reward_is_correctness_minus_call_ratio() -> None:
    assert simple(True, 0.0) == 1.0
    assert simple(True, 0.25) == 0.75
    assert simple(False, 0.0) == 0.0
    assert simple(False, 0.3) == pytest.approx(-0.3)
    assert simple(True, 1.0) == 0.0
    with pytest.raises(ValueError, match="call ratio"):
        simple(True, 1.5)
    with pytest.raises(ValueError, match="call ratio"):
        simple(True, -0.1)


def test_student_solvable_group_rewards_independence() -> None:
    correct = [True, True, False, True, False]
    ratios = [0.0, 0.2, 0.0, 0.5, 0.3]
    assert scenario(correct, ratios) == "student-solvable"
    assert difficulty_aware(correct, ratios) == pytest.approx([1.5, 0.8, 0.0, 0.5, 0.0])


def test_teacher_dependent_group_penalises_stubbornness() -> None:
    correct = [False, True, False, False, True]
    ratios = [0.0, 0.1, 0.3, 0.0, 0.4]
    assert scenario(correct, ratios) == "teacher-dependent"
    # no call -1; correct with a call: simple; wrong with a call: 0
    assert difficulty_aware(correct, ratios) == pytest.approx([-1.0, 0.9, 0.0, -1.0, 0.6])


def test_unsolvable_group_rewards_exploration() -> None:
    correct = [False, False, False, False]
    ratios = [0.0, 0.2, 0.05, 1.0]
    assert scenario(correct, ratios) == "unsolvable"
    assert difficulty_aware(correct, ratios) == pytest.approx([0.0, 0.2, 0.05, 1.0])


def test_boundaries_between_scenarios() -> None:
    # one independent success is enough to make the question student-solvable
    assert scenario([False, True, True], [0.0, 0.0, 0.9]) == "student-solvable"
    # a correct answer with the smallest call is not independent
    assert scenario([True, False], [1e-9, 0.0]) == "teacher-dependent"
    assert difficulty_aware([True, False], [1e-9, 0.0]) == pytest.approx([1.0, -1.0])
    # correct but called everywhere: every sample gets the simple reward, none the bonus
    assert difficulty_aware([True, True], [0.5, 1.0]) == pytest.approx([0.5, 0.0])
    # all correct alone: all get the bonus
    assert difficulty_aware([True] * 3, [0.0] * 3) == [1.5, 1.5, 1.5]
    # a group of one, each scenario
    assert difficulty_aware([True], [0.0]) == [1.5]
    assert difficulty_aware([True], [0.3]) == pytest.approx([0.7])
    assert difficulty_aware([False], [0.0]) == [0.0]
    assert difficulty_aware([False], [0.3]) == pytest.approx([0.3])
    # no call at all and nobody right: nothing to learn from
    assert difficulty_aware([False, False], [0.0, 0.0]) == [0.0, 0.0]


def test_malformed_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="as many"):
        difficulty_aware([True, False], [0.0])
    with pytest.raises(ValueError, match="at least one"):
        difficulty_aware([], [])
    with pytest.raises(ValueError, match="call ratio"):
        difficulty_aware([True], [2.0])


def test_trl_reward_function_scores_each_group_of_a_batch() -> None:
    """TRL hands the reward function consecutive groups of num_generations completions."""
    from relaygraph.train.grpo import GroupReward, accuracy, call_ratio_metric

    reward = GroupReward("difficulty-aware", num_generations=3)
    answers = ["7", "7", "7", "9", "9", "9"]
    relay_texts = [f"... so it is \\boxed{{{a}}}." for a in ["7", "7", "1", "9", "3", "3"]]
    # group 1 is solvable alone, group 2 needs calls
    ratios = [0.0, 0.2, 0.0, 0.25, 0.0, 0.1]
    kwargs = dict(prompts=[""] * 6, completions=[""] * 6, answer=answers,
                  relay_text=relay_texts, call_ratio=ratios, finished=[True] * 6)
    assert reward(**kwargs) == pytest.approx([1.5, 0.8, 0.0, 0.75, -1.0, 0.0])
    # an answer in a response the budget cut off does not count: the group needs calls now
    cut = {**kwargs, "finished": [False, True, True, True, True, True]}
    assert reward(**cut)[:3] == pytest.approx([-1.0, 0.8, -1.0])
    assert reward.__name__ == "difficulty_aware"
    assert GroupReward("simple", 3)(**kwargs) == pytest.approx([1, 0.8, 0, 0.75, 0, -0.1])
    assert accuracy(**kwargs) == [1, 1, 0, 1, 0, 0]
    assert call_ratio_metric(**kwargs) == ratios and call_ratio_metric.__name__ == "call_ratio"
    with pytest.raises(ValueError, match="groups of 4"):
        GroupReward("difficulty-aware", 4)(**kwargs)


@pytest.mark.parametrize(("text", "gold", "right"), [
    ("the side is \\boxed{\\sqrt{2}}", "2", False),       # last number 2, but not the answer
    ("the ratio is \\boxed{\\frac{3}{2}}", "2", False),
    ("so \\boxed{2^{10}} ways", "10", False),
    ("half: \\boxed{\\frac12}", "0.5", True),             # the same number written as LaTeX
    ("She pays $1,234.", "#### 1234", True),                 # no box: the last number
    ("We get \\boxed{72}.", "Natalia ... #### 72", True),   # a GSM8K solution as the gold
])
def test_training_grades_exactly_as_evaluation(text: str, gold: str, right: bool) -> None:
    """One grader: rewards, the teacher-pass filter and evaluation agree on every answer."""
    from relaygraph.eval.answers import gsm8k_gold
    from relaygraph.eval.checking import check_math
    from relaygraph.train.data import is_correct
    from relaygraph.train.grpo import graded

    assert is_correct(text, gold) is right
    assert check_math(text, gsm8k_gold(gold)).correct is right
    assert graded([gold], [text], [True]) == [right]
    assert graded([gold], [text], [False]) == [False]  # cut off by the budget: never right


def test_grpo_presets_set_lengths_and_turns_and_explicit_fields_win(tmp_path) -> None:
    from relaygraph.train.grpo import GrpoSettings

    base = {"controller": "c", "expert": "e", "data": str(tmp_path / "q.jsonl"),
            "output_dir": str(tmp_path / "out")}
    paper = GrpoSettings.model_validate({**base, "preset": "paper"})
    assert (paper.max_tokens, paper.max_call_tokens, paper.max_calls) == (8192, None, 2)
    assert (paper.num_generations, paper.learning_rate, paper.beta, paper.temperature) == \
        (8, 1e-6, 0.01, 1.0)
    cpu = GrpoSettings.model_validate(base)
    assert (cpu.preset, cpu.max_tokens, cpu.max_call_tokens) == ("cpu", 512, 1024)
    mine = GrpoSettings.model_validate({**base, "preset": "paper", "max_tokens": 1024})
    assert mine.max_tokens == 1024 and mine.max_call_tokens is None


def test_the_teacher_pass_filter_keeps_exactly_half_and_above() -> None:
    """The paper keeps questions the large model solves in >= 50% of its samples."""
    from relaygraph.train.filtering import FilterSettings, keep

    assert FilterSettings.model_fields["min_pass_rate"].default == 0.5
    assert keep(5 / 10) and keep(1.0) and keep(1 / 2)
    assert not keep(4 / 10) and not keep(0.0) and not keep(0.4999)
    assert keep(0.6, min_pass_rate=0.6) and not keep(0.5, min_pass_rate=0.6)
