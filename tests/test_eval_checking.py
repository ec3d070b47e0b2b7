"""Datasets (what a problem and its gold answer are, deterministic subsets) and answer
checking (math-verify on ``\\boxed{}``, the GSM8K numeric fallback, unparseable answers)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from relaygraph.errors import ConfigError
from relaygraph.eval.checking import check, check_math, equivalent
from relaygraph.eval.datasets import Problem, gold_answer, load_problems, select


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------- datasets

def test_gsm8k_answers_give_the_number_after_the_marks(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [
        {"question": "Q1", "answer": "She sells 16 - 3 = <<16-3=13>>13.\n#### 1,300"},
        {"question": "Q2", "answer": "The area is \\boxed{\\frac{1}{2}} square units."},
        {"question": "Q3", "answer": "42"},
    ])
    p1, p2, p3 = load_problems(path)
    assert (p1.id, p1.answer, p1.solution) == ("0", "1,300", "She sells 16 - 3 = <<16-3=13>>13.\n#### 1,300")
    assert (p2.answer, p2.solution is not None) == ("\\frac{1}{2}", True)
    assert (p3.id, p3.answer, p3.solution) == ("2", "42", None)
    assert gold_answer("x\n####  7 ") == ("7", "x\n####  7 ")


def test_csv_json_and_named_fields(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("problem,final_answer\nWhat is 1+1?,2\nWhat is 2+2?,4\n")
    assert [(p.question, p.answer) for p in load_problems(tmp_path / "d.csv")] == [
        ("What is 1+1?", "2"), ("What is 2+2?", "4")]
    (tmp_path / "d.json").write_text(json.dumps([{"q": "A?", "a": "1"}]))
    assert load_problems(tmp_path / "d.json", question_field="q", answer_field="a")[0].answer == "1"
    with pytest.raises(ConfigError, match="no question field .*--question-field"):
        load_problems(tmp_path / "d.json")
    with pytest.raises(ConfigError, match="cannot read dataset"):
        load_problems(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="not valid JSONL"):
        load_problems(tmp_path / "bad.jsonl")


def test_subsets_are_deterministic_and_a_larger_limit_extends_a_smaller_one() -> None:
    problems = [Problem(id=str(i), question=f"q{i}", answer=str(i)) for i in range(20)]
    assert [p.id for p in select(problems, 3, None)] == ["0", "1", "2"]
    five = [p.id for p in select(problems, 5, seed=7)]
    assert [p.id for p in select(problems, 3, seed=7)] == five[:3]
    assert five == [p.id for p in select(problems, 5, seed=7)]
    assert five != [p.id for p in select(problems, 5, seed=8)]
    assert five != ["0", "1", "2", "3", "4"]
    assert len(select(problems, None, None)) == 20
    with pytest.raises(ConfigError, match="--limit"):
        select(problems, 0, None)


def test_reasoning_gym_problems_are_generated_from_the_seed_and_graded_by_the_task() -> None:
    pytest.importorskip("reasoning_gym")
    first = load_problems("reasoning-gym:basic_arithmetic", limit=3, seed=5)
    again = load_problems("reasoning-gym:basic_arithmetic", limit=3, seed=5)
    other = load_problems("reasoning-gym:basic_arithmetic", limit=3, seed=6)
    assert [p.question for p in first] == [p.question for p in again] != [p.question for p in other]
    problem = first[0]
    assert problem.grader == "reasoning-gym"
    assert check(f"so \\boxed{{{problem.answer}}}", problem).correct
    assert not check(f"so \\boxed{{{int(problem.answer) + 1}}}", problem).correct
    with pytest.raises(ConfigError, match="unknown reasoning-gym task"):
        load_problems("reasoning-gym:no_such_task")


def test_hugging_face_datasets_from_a_local_folder(tmp_path: Path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [{"question": "Q?", "answer": "x\n#### 5"}])
    (problem,) = load_problems(f"hf:{folder}@test")
    assert (problem.question, problem.answer) == ("Q?", "5")
    with pytest.raises(ConfigError, match="cannot load Hugging Face dataset"):
        load_problems(f"hf:{folder}@no_such_split")


# ---------------------------------------------------------------------- checking

@pytest.mark.parametrize(("text", "gold", "correct"), [
    ("so the answer is \\boxed{18}.", "18", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),          # symbolic equivalence
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{\\$18.00}", "18", True),
    ("\\boxed{18 \\text{ dollars}}", "18", True),
    ("first \\boxed{3} then \\boxed{17}", "18", False),  # the last box counts
    ("\\boxed{17}", "18", False),
    ("\\boxed{\\frac{1}{2}}", "\\frac{2}{4}", True),
])
def test_boxed_answers_are_checked_symbolically(text: str, gold: str, correct: bool) -> None:
    verdict = check_math(text, gold)
    assert (verdict.correct, verdict.parsed, verdict.method) == (correct, True, "math-verify")


def test_without_a_box_the_last_number_is_compared_numerically() -> None:
    verdict = check_math("She makes 9 * 2 = $18 every day, so 18 dollars", "18")
    assert (verdict.correct, verdict.parsed, verdict.predicted, verdict.method) == (True, True, "18", "numeric")
    assert not check_math("18 eggs, minus 3 is 15", "18").correct
    assert check_math("about 1,234.5 units", "1234.5").correct


def test_a_text_cut_off_by_the_budget_has_no_last_number_answer() -> None:
    cut = "We need these steps:\n1. Count the blue bolts.\n2. Add the white ones.\n3."
    assert check_math(cut, "3").correct  # complete, the last number would be taken
    verdict = check_math(cut, "3", complete=False)
    assert (verdict.correct, verdict.parsed) == (False, False)
    assert check_math("so \\boxed{3}", "3", complete=False).correct  # a box is an answer


def test_unparseable_answers_are_told_apart_from_wrong_ones() -> None:
    for text in ("I am not sure about that one.", "\\boxed{}", ""):
        verdict = check_math(text, "18")
        assert (verdict.correct, verdict.parsed, verdict.method) == (False, False, "none")
    wrong = check_math("\\boxed{19}", "18")
    assert (wrong.correct, wrong.parsed) == (False, True)


def test_checking_works_off_the_main_thread() -> None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set
    out: list = []
    thread = threading.Thread(target=lambda: out.append(check_math("\\boxed{\\frac{1}{2}}", "0.5")))
    thread.start()
    thread.join()
    assert out[0].correct
    assert equivalent("0.5", "\\frac{1}{2}") and not equivalent("2", "3")
