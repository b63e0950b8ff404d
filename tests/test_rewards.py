"""The answer checkers shared by RL and evaluation (llada_train/rl/rewards.py), on the answer
formats models actually write, and the error accounting that keeps training alive."""

from __future__ import annotations

import json
import os
import threading

import pytest

import llada_train
from llada_train.data.generate import reference_solutions
from llada_train.rl.rewards import (
    REWARDS,
    RewardResult,
    code_reward,
    extract_answer,
    extract_code,
    format_reward,
    math_reward,
    normalize_number,
    score,
    score_batch,
)


def _records(path: str) -> list[dict]:
    with open(os.path.join(llada_train.REPO_ROOT, path)) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        # direct, worked (the SFT format), boxed
        ("579", "579", 1.0),
        ("ones: 4 + 9 = 13, write 3 carry 1 ... So 964 + 529 = 1493.\n#### 1493", "1493", 1.0),
        ("Adding the two shelves gives \\boxed{1493}.", "1493", 1.0),
        # thousands separators, currency, trailing period
        ("\\boxed{1,234}", "1234", 1.0),
        ("#### 1,234", "1234", 1.0),
        ("#### $1,234.", "1234", 1.0),
        ("The answer is 42.", "42", 1.0),
        # trailing text after the answer
        ("The answer is 42. Hope that helps!", "42", 1.0),
        ("#### 42\nI hope this helps with your 3 questions.", "42", 1.0),
        ("\\boxed{42} since 6 * 7 = 42 and 2 < 3", "42", 1.0),
        # negative numbers; a hyphen is not a minus sign
        ("#### -17", "-17", 1.0),
        ("The temperature drops to -5 degrees.", "-5", 1.0),
        ("964-529=435", "435", 1.0),
        # decimals and fractions compare as numbers
        ("#### 12.0", "12", 1.0),
        ("12", "12.0", 1.0),
        ("\\boxed{12.50}", "12.5", 1.0),
        ("\\boxed{3/4}", "0.75", 1.0),
        ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
        ("#### 0.75", "3/4", 1.0),
        ("#### 0.3333333", "1/3", 1.0),  # within the relative tolerance 1e-6
        ("#### 0.33", "1/3", 0.0),
        # boxed extras: nested braces, units, an equation
        ("\\boxed{{1,234}}", "1234", 1.0),
        ("\\boxed{1493 \\text{ beads}}", "1493", 1.0),
        ("\\boxed{x = 5}", "5", 1.0),
        # priority: \boxed, then ####, then the last number
        ("#### 41\nWait, redo: \\boxed{42}", "42", 1.0),
        ("\\boxed{41}\n#### 42", "42", 0.0),
        ("3 + 4 = 7\n#### 8", "7", 0.0),
        # no number at all, a wrong number, a non-numeric box
        ("I do not know.", "42", 0.0),
        ("", "42", 0.0),
        ("#### 41", "42", 0.0),
        ("So 964 + 529 = 1492.\n#### 1492", "1493", 0.0),
        ("\\boxed{forty-two}", "42", 0.0),
    ],
)
def test_math_reward(completion, answer, expected):
    assert math_reward(completion, {"answer": answer}) == expected


@pytest.mark.parametrize(
    "text, answer",
    [
        ("So 964 + 529 = 1493.\n#### 1493", "1493"),
        ("\\boxed{\\frac{3}{4}} and 9", "\\frac{3}{4}"),
        ("#### 1493 beads", "1493"),
        ("####\nso it is 12", "12"),  # an empty marker falls back to the last number
        ("\\boxed{12", "12"),  # a truncated box is ignored
        ("no digits", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "written, canonical",
    [
        ("1,234", "1234"),
        ("1234.0", "1234"),
        ("$1,234.", "1234"),
        (" 1234 ", "1234"),
        ("-12.50", "-12.5"),
        ("3/4", "0.75"),
        ("0.75", "0.75"),
        ("1/3", "1/3"),
        ("\\frac{6}{8}", "0.75"),
        ("1,2", None),  # not a thousands separator
        ("1e999999999", None),  # exponents are not parsed (no giant integers from model output)
        ("five", None),
    ],
)
def test_normalize_number(written, canonical):
    assert normalize_number(written) == canonical


def test_math_reward_on_shipped_records():
    records = _records("data/shipped/rl_math_train.jsonl")[:20]
    for record in records:
        right = f"We work it out step by step.\n#### {record['answer']}"
        wrong = f"We work it out step by step.\n#### {int(record['answer']) + 1}"
        assert math_reward(right, record) == 1.0
        assert math_reward(wrong, record) == 0.0


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("So 964 + 529 = 1493.\n#### 1493", 1.0),
        ("\\boxed{1493}", 1.0),
        ("1493", 0.0),
        ("The answer is 1493.", 0.0),
        ("####", 0.0),
        ("\\boxed{}", 0.0),
    ],
)
def test_format_reward_math(completion, expected):
    assert format_reward(completion, {"answer": "1493", "reward": "math"}) == expected


def test_format_reward_code():
    record = {"entry_point": "f", "tests": "assert f() == 1", "reward": "code"}
    assert format_reward("```python\ndef f():\n    return 1\n```", record) == 1.0
    assert format_reward("def f():\n    return 1", record) == 0.0


# ---------------------------------------------------------------------------------------------
# Code
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def code_records():
    """A few training tasks and a few held-out evaluation tasks, with reference solutions."""
    solutions = reference_solutions()
    records = _records("data/shipped/rl_code_train.jsonl")[:3]
    records += _records("eval/data/code_tasks.jsonl")[:2]
    return [(record, solutions[record["entry_point"]]) for record in records]


def test_code_reward_reference_solutions_pass(code_records):
    for record, solution in code_records:
        completion = f"Here is the function:\n```python\n{solution}```\nIt returns the result."
        assert code_reward(completion, record) == 1.0, record["entry_point"]
    record, solution = code_records[0]
    assert code_reward(solution, record) == 1.0  # bare code, no fence


def test_code_reward_broken_solutions_fail(code_records):
    record, solution = code_records[0]
    signature = solution.splitlines()[0]
    broken = [
        f"```python\n{signature}\n    return None\n```",  # wrong answer
        f"```python\n{signature}\n    return (\n```",  # syntax error
        "```python\nprint('no function at all')\n```",  # NameError in the tests
        f"```python\n{solution}import sys\nsys.exit(0)\n```",  # exits before the tests
    ]
    for completion in broken:
        assert code_reward(completion, record) == 0.0, completion


def test_extract_code():
    text = "Code:\n```python\ndef f(x):\n    return x\n```\nOutput:\n```\n3\n```\n"
    assert extract_code(text) == "def f(x):\n    return x\n"  # the python block, not the output
    text = "```py\ndef f(x):\n    return 1\n```\nBetter:\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(text) == "def f(x):\n    return x\n"  # the last python block
    assert extract_code("```python\ndef f(x):\n    return x\n") == "def f(x):\n    return x\n"
    assert extract_code("def f(x):\n    return x") == "def f(x):\n    return x"


# ---------------------------------------------------------------------------------------------
# Safe scoring
# ---------------------------------------------------------------------------------------------


def _boom(completion: str, example: dict) -> float:
    return 1 / 0


def test_score_turns_a_raising_reward_into_zero_with_the_error(monkeypatch):
    monkeypatch.setitem(REWARDS, "boom", _boom)
    result = score("boom", "anything", {})
    assert result.value == 0.0
    assert "ZeroDivisionError" in result.error
    assert score("math", "#### 3", {"answer": "3"}) == RewardResult(1.0, None)
    assert score("math", "#### 3", {}).error.startswith("math: KeyError")  # a bad record


def test_score_rejects_non_finite_values(monkeypatch):
    monkeypatch.setitem(REWARDS, "nan", lambda completion, example: float("nan"))
    result = score("nan", "x", {})
    assert result.value == 0.0 and "non-finite" in result.error


def test_unknown_reward_name_is_a_config_error():
    with pytest.raises(ValueError, match="unknown reward 'maths'"):
        score("maths", "1", {"answer": "1"})
    with pytest.raises(ValueError, match="unknown reward"):
        score_batch("maths", ["1"], [{"answer": "1"}])


def test_score_batch_counts_errors(monkeypatch, code_records):
    monkeypatch.setitem(REWARDS, "boom", _boom)
    record, solution = code_records[0]
    names = ["math", "math", "boom", "code", "code"]
    completions = ["#### 7", "#### 8", "x", f"```python\n{solution}```", "```python\npass\n```"]
    examples = [{"answer": "7"}, {"answer": "7"}, {}, record, record]
    values, num_errors = score_batch(names, completions, examples, max_workers=4)
    assert values == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert num_errors == 1


def test_score_batch_reads_names_from_records(code_records):
    record, solution = code_records[0]
    examples = [{"answer": "7", "reward": "math"}, record]
    values, num_errors = score_batch(None, ["#### 7", f"```python\n{solution}```"], examples)
    assert (values, num_errors) == ([1.0, 1.0], 0)


def test_score_batch_deadline(monkeypatch):
    release = threading.Event()
    monkeypatch.setitem(REWARDS, "hang", lambda completion, example: float(release.wait(10)))
    try:
        values, num_errors = score_batch(
            ["hang", "math"], ["x", "#### 1"], [{}, {"answer": "1"}], timeout_s=0.3
        )
    finally:
        release.set()  # let the stuck thread finish
    assert (values, num_errors) == ([0.0, 1.0], 1)
