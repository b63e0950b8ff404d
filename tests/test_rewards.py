"""The answer checkers shared by RL and evaluation (llada_train/rl/rewards.py), on the answer
formats models actually write, and the error accounting that keeps training alive."""

from __future__ import annotations

import json
import os
import threading

import pytest

import llada_train
from llada_train.data.synthetic import reference_solutions
from llada_train.rl import rewards
from llada_train.rl.rewards import (
    REWARDS,
    RewardResult,
    answers_match,
    code_reward,
    extract_answer,
    extract_code,
    format_reward,
    math_reward,
    score,
    score_batch,
    sort_reward,
)


def _records(path: str) -> list[dict]:
    with open(os.path.join(llada_train.REPO_ROOT, path)) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------------


# The table follows the answer conventions of lm-eval's gsm8k task (strict-match: the number
# after "####"; flexible-extract: the last number) and of Minerva's MATH evaluation (the last
# \\boxed{}, normalised, compared by symbolic equivalence). Each case: completion, gold answer,
# expected reward, why.
MATH_CASES = [
    # GSM8K strict-match: the number after "####", commas and "$" stripped
    (
        "ones: 4 + 9 = 13, write 3 carry 1 ... So 964 + 529 = 1493.\n#### 1493",
        "1493",
        1.0,
        "GSM8K strict: the number after ####",
    ),
    ("#### 1,234", "1234", 1.0, "GSM8K strict: thousands separators are stripped"),
    ("#### $1,234.", "1234", 1.0, "GSM8K strict: currency sign and trailing period stripped"),
    (
        "#### 1493 beads",
        "1493",
        1.0,
        "GSM8K strict reads the number; the unit word after it is ignored",
    ),
    ("3 + 4 = 7\n#### 8", "7", 0.0, "GSM8K strict: the marked answer wins over numbers above it"),
    ("#### 41\n#### 42", "42", 1.0, "the last #### answer is the final one"),
    ("#### -17", "-17", 1.0, "negative answers"),
    ("#### \u221217", "-17", 1.0, "the Unicode minus sign is a minus, not nothing"),
    ("#### 17", "-17", 0.0, "the sign matters"),
    ("####\nso it is 12", "12", 1.0, "an empty #### marks nothing: flexible extraction reads on"),
    (
        "A long solution...\n#### 72",
        "Natalia sold 48/2 = 24 clips in May.\n#### 72",
        1.0,
        "a GSM8K gold solution: its answer is the text after ####",
    ),
    # GSM8K flexible-extract: the last number in the text
    ("579", "579", 1.0, "GSM8K flexible: a bare number"),
    ("The answer is 42.", "42", 1.0, "GSM8K flexible: the last number, trailing period stripped"),
    (
        "We have 3 apples, and 4 more, so 7 in total",
        "7",
        1.0,
        "GSM8K flexible: the last number of the text",
    ),
    ("The answer is 1 2", "12", 0.0, "two numbers are not one: spaces are not deleted"),
    ("134 134", "134", 1.0, "GSM8K flexible: a repeated answer is the last number, not 134134"),
    ("#### 1 234", "1234", 0.0, "GSM8K strict reads 1 here: a space is no thousands separator"),
    ("I do not know.", "42", 0.0, "no answer at all"),
    ("", "42", 0.0, "an empty completion"),
    # integers exactly
    (
        "#### 1234568",
        "1234567",
        0.0,
        "integers compare exactly: a 7-digit answer off by one is wrong",
    ),
    ("\\boxed{12345678901234568}", "12345678901234567", 0.0, "exact beyond float precision"),
    (
        "#### 1234567.0000001",
        "1234567",
        0.0,
        "an integer gold answer is not matched by a non-integer",
    ),
    ("#### 12.0", "12", 1.0, "12.0 is the integer 12"),
    ("12", "12.0", 1.0, "a decimal gold answer with a zero fraction"),
    # Minerva / MATH: the last \boxed{}, LaTeX, symbolic equivalence
    ("Adding the two shelves gives \\boxed{1493}.", "1493", 1.0, "Minerva: the boxed answer"),
    ("#### 41\nWait, redo: \\boxed{42}", "42", 1.0, "a \\boxed answer wins over ####"),
    ("\\boxed{41} then \\boxed{42}", "42", 1.0, "the last \\boxed is the final answer"),
    ("\\boxed{42} and then \\boxed{41", "42", 1.0, "a truncated (unclosed) box is ignored"),
    ("\\boxed{\\frac12}", "0.5", 1.0, "Minerva: \\frac12 without braces is one half"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0, "\\dfrac is \\frac; a fraction equals its decimal"),
    ("\\boxed{3/4}", "\\frac{3}{4}", 1.0, "a slash fraction equals the LaTeX fraction"),
    ("\\boxed{0.33}", "\\frac{1}{3}", 0.0, "0.33 is not 1/3 (math-verify rounds to 6 decimals)"),
    ("\\boxed{0.3333333}", "\\frac{1}{3}", 1.0, "within math-verify's 6-decimal rounding"),
    ("\\boxed{2^{10}}", "1024", 1.0, "powers are evaluated"),
    ("\\boxed{3\\sqrt{3}}", "\\sqrt{27}", 1.0, "symbolic equivalence of roots"),
    ("\\boxed{\\sqrt 2}", "\\sqrt{2}", 1.0, "a non-numeric gold answer scores"),
    ("\\boxed{\\pi}", "3.14159", 0.0, "pi is not a 6-digit decimal"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0, "equivalent expressions"),
    ("\\boxed{(1, 2]}", "(1,2]", 1.0, "intervals"),
    ("\\boxed{[1, 2]}", "(1,2]", 0.0, "an interval's closedness matters"),
    ("\\boxed{(2, 1)}", "(1,2)", 0.0, "tuples are ordered"),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", 1.0, "sets are not"),
    ("\\boxed{x = 5}", "5", 1.0, "an equation's right side is the answer"),
    ("\\boxed{1493 \\text{ beads}}", "1493", 1.0, "Minerva: units in \\text are removed"),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0, "Minerva: unit removal"),
    ("\\boxed{\\$5}", "5", 1.0, "a dollar sign is not part of the number"),
    ("\\boxed{1,234}", "1234", 1.0, "a thousands separator inside a box"),
    ("\\boxed{\\text{Monday}}", "\\text{Monday}", 1.0, "a text answer"),
    ("\\boxed{B}", "B", 1.0, "a choice letter"),
    ("\\boxed{(B)}", "B", 1.0, "a choice letter in parentheses"),
    ("\\boxed{C}", "B", 0.0, "another letter"),
    (
        "Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.",
        "\\frac34",
        1.0,
        "Minerva's answer sentence, no box",
    ),
    # percentages: the number written (our choice, see the module docstring)
    ("\\boxed{50\\%}", "50", 1.0, "a percent sign is dropped: 50% is 50"),
    ("#### 50%", "50", 1.0, "the same in GSM8K form"),
    ("\\boxed{0.5}", "50\\%", 0.0, "0.5 is not the 50 of a gold 50%"),
    ("\\boxed{forty-two}", "42", 0.0, "numbers in words are not read"),
]


@pytest.mark.parametrize("completion, answer, expected, reason", MATH_CASES)
def test_math_reward(completion, answer, expected, reason):
    assert math_reward(completion, {"answer": answer}) == expected, reason


def test_math_table_is_large_enough():
    assert len(MATH_CASES) >= 40


@pytest.mark.parametrize(
    "text, answer",
    [
        ("So 964 + 529 = 1493.\n#### 1493", "1493"),
        ("\\boxed{\\frac{3}{4}} and 9", "\\frac{3}{4}"),
        ("\\boxed{a{b}c} then \\boxed{d", "a{b}c"),  # nested braces; a truncated box is ignored
        ("#### 1493 beads", "1493 beads"),
        ("####\nso it is 12", None),  # an empty marker marks nothing
        ("\\boxed{}", None),
        ("no digits", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_answer_is_linear_in_unclosed_boxes():
    text = "\\boxed{" * 200_000  # quadratic scanning would take minutes here
    assert extract_answer(text) is None


def test_unreadable_gold_answer_is_a_record_error():
    for answer in ("", "\\", "#### "):
        result = score("math", "#### 3", {"answer": answer})
        assert result.value == 0.0 and "cannot be read" in result.error, answer


def test_math_check_time_is_bounded(monkeypatch):
    # math-verify's own limit (1 s) stops this one inside the worker...
    assert math_reward("\\boxed{9^{9^{9^{9}}}}", {"answer": "1"}) == 0.0
    # ...and past MATH_TIMEOUT_S the worker is killed: the call returns 0 and the next works
    monkeypatch.setattr(rewards, "MATH_TIMEOUT_S", 0.2)
    assert math_reward("\\boxed{9^{9^{9^{9}}}}", {"answer": "1"}) == 0.0
    monkeypatch.undo()
    assert math_reward("#### 3", {"answer": "3"}) == 1.0


def test_answers_match():
    assert answers_match("1,234", "1234")
    assert not answers_match(None, "1234")
    assert not answers_match("1233", "1234")


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
        ("\\boxed{\\sqrt{2}}", 1.0),  # any marked answer, not only numbers (MATH)
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
# Sorting
# ---------------------------------------------------------------------------------------------

SORT_GOLD = "12 15 33 47 71 89"  # for "Sort these numbers: 47 12 89 33 15 71"
SORT_CASES = [
    ("12 15 33 47 71 89", 1.0, "right: the shipped answer form"),
    ("12, 15, 33, 47, 71, 89", 1.0, "separators are not numbers"),
    ("[12, 15, 33, 47, 71, 89]", 1.0, "brackets are not numbers"),
    ("The sorted list is 12 15 33 47 71 89.", 1.0, "extra words around the list are ignored"),
    ("12 15 33 47 71 89.0", 1.0, "numbers compare by value"),
    ("\\boxed{12, 15, 33, 47, 71, 89}", 1.0, "a marked answer is read (the math extraction)"),
    ("47 12 89 33 15 71\n#### 12 15 33 47 71 89", 1.0, "the marked answer wins over the text"),
    ("12 15 33 71 47 89", 0.0, "wrong order (two swapped)"),
    ("89 71 47 33 15 12", 0.0, "descending"),
    ("47 12 89 33 15 71", 0.0, "the question's order"),
    ("12 15 33 47 71", 0.0, "a number missing"),
    ("12 15 33 47 71 89 90", 0.0, "an extra number"),
    ("12 15 33 47 71 89 89", 0.0, "a number repeated"),
    ("All 6 numbers: 12 15 33 47 71 89", 0.0, "extra text holding a number"),
    ("12 15 33 47 71 88", 0.0, "a wrong number"),
    ("1215 33 47 71 89", 0.0, "two numbers run together are one number"),
    ("12 15 33 47 71 -89", 0.0, "a sign changes the value"),
    ("12 15 33\n#### 47 71 89", 0.0, "only the marked answer is read"),
    ("", 0.0, "empty"),
]


@pytest.mark.parametrize("completion, expected, reason", SORT_CASES)
def test_sort_reward(completion, expected, reason):
    assert sort_reward(completion, {"answer": SORT_GOLD}) == expected, reason


def test_sort_reward_keeps_repeats():
    assert sort_reward("57 57 63 70 82 89", {"answer": "57 57 63 70 82 89"}) == 1.0
    assert sort_reward("57 63 70 82 89", {"answer": "57 57 63 70 82 89"}) == 0.0


def test_sort_gold_without_numbers_is_a_record_error():
    with pytest.raises(ValueError, match="holds no number"):
        sort_reward("12", {"answer": "twelve"})
    assert score("sort", "12", {"answer": ""}).error.startswith("sort: ValueError")


def test_sort_reward_on_shipped_records():
    records = _records("data/shipped/sort_rl_train.jsonl")[:20]
    records += _records("data/shipped/sort_rl_eval.jsonl")[:20]
    for record in records:
        asked = record["prompt"].split(": ")[1]
        assert sort_reward(record["answer"], record) == 1.0
        assert sort_reward(" ".join(record["answer"].split()[::-1]), record) == 0.0
        assert sort_reward(asked, record) == (1.0 if asked == record["answer"] else 0.0)
    values, num_errors = score_batch(None, [r["answer"] for r in records], records)
    assert (sum(values), num_errors) == (len(records), 0)  # the records name the reward "sort"


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


# ---------------------------------------------------------------------------------------------
# Code reward: HumanEval-style records, forgery
# ---------------------------------------------------------------------------------------------

HUMANEVAL_RECORD = {
    "task_id": "Test/0",
    "prompt": "from typing import List\n\n\ndef scale(xs: List[int], k: int) -> List[int]:\n"
    '    """Each x times k, then clipped by helper_clip."""\n\n\n'
    "def helper_clip(x: int) -> int:\n    return min(x, 100)\n",
    "entry_point": "scale",
    "test": "METADATA = {}\n\n\ndef check(candidate):\n"
    "    assert candidate([1, 2], 3) == [3, 6]\n"
    "    assert candidate([60], 2) == [helper_clip(120)]\n",
}


@pytest.mark.parametrize(
    "completion, expected",
    [
        # a whole function in a chat answer (the prompt's imports and helpers are there)
        ("```python\ndef scale(xs: List[int], k: int) -> List[int]:\n"
         "    return [helper_clip(x * k) for x in xs]\n```", 1.0),
        # a continuation of the prompt (HumanEval's completion format)
        ("    return [helper_clip(x * k) for x in xs]\n", 0.0),  # the helper follows the stub
        ("```python\ndef scale(xs, k):\n    return [x * k for x in xs]\n```", 0.0),  # no clip
    ],
)  # fmt: skip
def test_code_reward_on_humaneval_records(completion, expected):
    assert code_reward(completion, HUMANEVAL_RECORD) == expected


def test_code_reward_on_humaneval_continuation():
    record = dict(HUMANEVAL_RECORD, prompt="def scale(xs, k):\n    ")
    record["test"] = "def check(candidate):\n    assert candidate([1, 2], 3) == [3, 6]\n"
    assert code_reward("return [x * k for x in xs]\n", record) == 1.0
    assert code_reward("return xs\n", record) == 0.0


@pytest.mark.parametrize(
    "attack",
    [
        # frames up to whatever ran the code, looking for anything to write success with
        "import sys, os\nf = sys._getframe()\nwhile f:\n    for v in list(f.f_locals.values()):\n"
        "        if isinstance(v, dict) and 'verdict_fd' in v:\n"
        '            os.write(v[\'verdict_fd\'], b\'{"status": "ok", "layers": []}\')\n'
        "    f = f.f_back\nos._exit(0)\n",
        # an answer that equals everything
        "class A:\n    def __eq__(self, other):\n        return True\n",
    ],
)
def test_code_reward_cannot_be_forged(code_records, attack):
    record, solution = code_records[0]
    signature = solution.splitlines()[0]
    completion = f"```python\n{attack}\n{signature}\n    return A() if 'A' in globals() else 0\n```"
    assert code_reward(completion, record) == 0.0
