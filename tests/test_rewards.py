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
    (
        "\\boxed{42} and then \\boxed{41",
        "42",
        0.0,
        "a truncated last box: the final answer was cut off, no fallback to an earlier box",
    ),
    ("\\boxed{42} and then \\boxed{4", "4", 0.0, "even where the cut-off text is the gold"),
    ("#### 42\nSo \\boxed{\\frac{4", "42", 0.0, "nor to an earlier #### answer"),
    ("\\boxed{42} {", "42", 1.0, "an unclosed brace outside any box truncates nothing"),
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
    # a number gold answer: the marked number in common dress (`bare_number`, our choice)
    ("\\boxed{5 apples}", "5", 1.0, "a unit word after the number is not part of it"),
    ("\\boxed{5 dollars}", "5", 1.0, "math-verify alone reads 5*d*o*l*l*a*r*s"),
    ("\\boxed{6 apples}", "5", 0.0, "the unit goes, the number still has to be right"),
    ("\\boxed{12 \\text{ cm}}", "12", 1.0, "a unit in \\text"),
    ("\\boxed{12 cm^2}", "12", 1.0, "a unit with a power"),
    ("\\boxed{3 square feet}", "3", 1.0, "a unit of two words"),
    ("\\boxed{60 km/h}", "60", 1.0, "a unit per unit"),
    ("\\boxed{5 x}", "5", 0.0, "a bare letter may be a variable: 5x is not 5"),
    ("\\boxed{5 hundred}", "5", 0.0, "a word that changes the value is no unit"),
    ("\\boxed{5 or more}", "5", 0.0, "nor is a hedge"),
    # words after the number that change or qualify it are not a unit, and math-verify's reading
    # of the first number alone is not taken either (review of issue 29)
    ("\\boxed{2 point five}", "2", 0.0, "a spelled-out decimal is not 2"),
    ("#### 5 feet six inches", "5", 0.0, "a second quantity follows"),
    ("#### 5 below zero", "5", 0.0, "'below zero' negates"),
    ("\\boxed{5 ten}", "5", 0.0, "a number word follows"),
    ("\\boxed{50 percent}", "50", 1.0, "as 50%: GSM8K writes percentages as the number"),
    ("\\boxed{1,234,567}", "1234567", 1.0, "thousands separators, several"),
    ("\\boxed{1,235}", "1234", 0.0, "the separator goes, the digits still have to be right"),
    ("#### 1,235", "1234", 0.0, "the same in GSM8K form"),
    ("\\boxed{1{,}234}", "1234", 1.0, "LaTeX's thousands separator {,}"),
    ("\\boxed{1\\,234}", "1234", 1.0, "LaTeX's thin space as thousands separator"),
    ("\\boxed{12,34}", "1234", 0.0, "a comma before two digits is no thousands separator"),
    ("\\boxed{$5.00}", "5", 1.0, "a dollar sign and zero cents"),
    ("\\boxed{\\$1,234.50}", "1234.5", 1.0, "currency, separator and cents together"),
    ("\\boxed{€5}", "5", 1.0, "another currency sign"),
    ("\\boxed{\\$6}", "5", 0.0, "the sign goes, the number still has to be right"),
    ("\\boxed{90^\\circ}", "90", 1.0, "a LaTeX degree sign"),
    ("\\boxed{90°}", "90", 1.0, "a Unicode degree sign (math-verify alone reads nothing)"),
    ("\\boxed{90\\degree}", "90", 1.0, "the \\degree macro"),
    ("\\boxed{100^\\circ C}", "100", 1.0, "degrees Celsius"),
    ("\\boxed{91^\\circ}", "90", 0.0, "the degree sign goes, the number still has to be right"),
    ("7 dollars", "7", 1.0, "an unmarked completion that is only a dressed number"),
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
        ("\\boxed{a{b}c} then \\boxed{e}", "e"),  # nested braces; the last box
        ("\\boxed{a{b}c} then \\boxed{d", None),  # a truncated last box: no answer, no fallback
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
        ("\\boxed{1493} so \\boxed{14", 0.0),  # a truncated last box
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
    ("\\boxed{12 15 33 47 71 89", 0.0, "a truncated last box: the answer was cut off"),
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


# ---------------------------------------------------------------------------------------------
# Code reward: tests that call helpers defined next to the entry point (HumanEval/32, /38, /50)
# ---------------------------------------------------------------------------------------------

# The three HumanEval records whose tests call a helper of the prompt (openai/human-eval's
# text; /32's docstring shortened). Through our record form they scored 0 even for the canonical
# solution: the tests met a NameError, the helper being defined only in the candidate's code.
HUMANEVAL_HELPER_RECORDS = [
    {
        "task_id": "HumanEval/32",
        "prompt": "import math\n\n\ndef poly(xs: list, x: float):\n"
        '    """\n    Evaluates polynomial with coefficients xs at point x.\n'
        '    return xs[0] + xs[1] * x + xs[1] * x^2 + .... xs[n] * x^n\n    """\n'
        "    return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])\n\n\n"
        'def find_zero(xs: list):\n    """ xs are coefficients of a polynomial.\n'
        "    find_zero find x such that poly(x) = 0.\n"
        '    >>> round(find_zero([1, 2]), 2) # f(x) = 1 + 2x\n    -0.5\n    """\n',
        "canonical_solution": "    begin, end = -1., 1.\n"
        "    while poly(xs, begin) * poly(xs, end) > 0:\n        begin *= 2.0\n        end *= 2.0\n"
        "    while end - begin > 1e-10:\n        center = (begin + end) / 2.0\n"
        "        if poly(xs, center) * poly(xs, begin) > 0:\n            begin = center\n"
        "        else:\n            end = center\n    return begin\n",
        "wrong_solution": "    return -xs[0] / xs[1]\n",  # the root of the linear part only
        "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    import math\n"
        "    import random\n    rng = random.Random(42)\n    import copy\n"
        "    for _ in range(100):\n        ncoeff = 2 * rng.randint(1, 4)\n"
        "        coeffs = []\n        for _ in range(ncoeff):\n"
        "            coeff = rng.randint(-10, 10)\n            if coeff == 0:\n"
        "                coeff = 1\n            coeffs.append(coeff)\n"
        "        solution = candidate(copy.deepcopy(coeffs))\n"
        "        assert math.fabs(poly(coeffs, solution)) < 1e-4\n\n",
        "entry_point": "find_zero",
    },
    {
        "task_id": "HumanEval/38",
        "prompt": "\n\ndef encode_cyclic(s: str):\n"
        '    """\n    returns encoded string by cycling groups of three characters.\n    """\n'
        "    # split string to groups. Each of length 3.\n"
        "    groups = [s[(3 * i):min((3 * i + 3), len(s))] for i in range((len(s) + 2) // 3)]\n"
        "    # cycle elements in each group. Unless group has fewer elements than 3.\n"
        "    groups = [(group[1:] + group[0]) if len(group) == 3 else group for group in groups]\n"
        '    return "".join(groups)\n\n\ndef decode_cyclic(s: str):\n    """\n'
        "    takes as input string encoded with encode_cyclic function. Returns decoded string.\n"
        '    """\n',
        "canonical_solution": "    return encode_cyclic(encode_cyclic(s))\n",
        "wrong_solution": "    return encode_cyclic(s)\n",
        "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n"
        "    from random import randint, choice\n    import string\n\n"
        "    letters = string.ascii_lowercase\n    for _ in range(100):\n"
        "        str = ''.join(choice(letters) for i in range(randint(10, 20)))\n"
        "        encoded_str = encode_cyclic(str)\n"
        "        assert candidate(encoded_str) == str\n\n",
        "entry_point": "decode_cyclic",
    },
    {
        "task_id": "HumanEval/50",
        "prompt": '\n\ndef encode_shift(s: str):\n    """\n'
        "    returns encoded string by shifting every character by 5 in the alphabet.\n"
        '    """\n    return "".join([chr(((ord(ch) + 5 - ord("a")) % 26) + ord("a")) for ch in s])'
        '\n\n\ndef decode_shift(s: str):\n    """\n'
        "    takes as input string encoded with encode_shift function. Returns decoded string.\n"
        '    """\n',
        "canonical_solution": '    return "".join([chr(((ord(ch) - 5 - ord("a")) % 26) + '
        'ord("a")) for ch in s])\n',
        "wrong_solution": '    return "".join([chr(((ord(ch) - 4 - ord("a")) % 26) + '
        'ord("a")) for ch in s])\n',
        "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n"
        "    from random import randint, choice\n    import copy\n    import string\n\n"
        "    letters = string.ascii_lowercase\n    for _ in range(100):\n"
        "        str = ''.join(choice(letters) for i in range(randint(10, 20)))\n"
        "        encoded_str = encode_shift(copy.deepcopy(str))\n"
        "        assert candidate(copy.deepcopy(encoded_str)) == str\n\n",
        "entry_point": "decode_shift",
    },
]
HELPER_IDS = [r["task_id"] for r in HUMANEVAL_HELPER_RECORDS]


def _ours(record: dict, prompt: str | None = None) -> dict:
    """A HumanEval record in our form {"prompt", "entry_point", "tests"}, as a converter writes
    it: the tests are HumanEval's `test` followed by the call of `check`."""
    tests = f"{record['test']}\n\ncheck({record['entry_point']})\n"
    prompt = record["prompt"] if prompt is None else prompt
    return {"prompt": prompt, "entry_point": record["entry_point"], "tests": tests}


@pytest.mark.parametrize("record", HUMANEVAL_HELPER_RECORDS, ids=HELPER_IDS)
def test_humaneval_helper_records_score_through_our_form(record):
    """Our form with the prompt (its code holds the helper): the canonical solution, written out
    whole next to the helper, scores 1; a wrong one scores 0 and says where the tests failed."""
    ours = _ours(record)
    right = f"```python\n{record['prompt']}{record['canonical_solution']}```"
    wrong = f"```python\n{record['prompt']}{record['wrong_solution']}```"
    assert score("code", right, ours) == RewardResult(1.0, None, None)
    result = score("code", wrong, ours)
    assert (result.value, result.error) == (0.0, None)  # a wrong answer, not a reward error
    assert result.reason.startswith("tests failed: AssertionError at <tests> line "), result
    assert "assert " in result.reason


@pytest.mark.parametrize("record", HUMANEVAL_HELPER_RECORDS, ids=HELPER_IDS)
def test_humaneval_helper_records_score_in_humaneval_form(record):
    assert code_reward(record["canonical_solution"], record) == 1.0  # a continuation
    assert code_reward(record["wrong_solution"], record) == 0.0


@pytest.mark.parametrize("record", HUMANEVAL_HELPER_RECORDS, ids=HELPER_IDS)
def test_helpers_the_record_declares_are_called_in_the_candidate(record):
    """Our form with a prose prompt and the helper listed in "helpers": no trusted code defines
    it, so the tests' calls of it go to the candidate's own helper, across the same plain-data
    boundary as the entry point. The canonical solution scores 1, a wrong one 0 with the reason.
    Without the "helpers" list the record is refused at loading (what would answer the call?)."""
    prose = f"Write `{record['entry_point']}` and the helper it uses."
    helper = {"HumanEval/32": "poly", "HumanEval/38": "encode_cyclic"}.get(
        record["task_id"], "encode_shift"
    )
    ours = {**_ours(record, prompt=prose), "helpers": [helper]}
    right = f"```python\n{record['prompt']}{record['canonical_solution']}```"
    wrong = f"```python\n{record['prompt']}{record['wrong_solution']}```"
    assert code_reward(right, ours) == 1.0
    result = score("code", wrong, ours)
    assert result.value == 0.0 and result.reason.startswith("tests failed: AssertionError")
    undeclared = _ours(record, prompt=prose)
    with pytest.raises(ValueError, match=f"the tests call {helper}"):
        rewards.check_code_record(undeclared)
    assert code_reward(right, undeclared) == 0.0  # and scored anyway: a NameError, never 1


def test_a_helper_the_prompt_defines_is_the_trusted_one():
    """HumanEval/38 with identity encode and decode: a helper the record declares is trusted as
    far as the tests trust it, like the entry point (the record asks for both functions); one
    the record does not declare is never the candidate's, so the forgery scores 0; where the
    record's prompt defines it (in any fenced block), the tests use that trusted copy."""
    record = HUMANEVAL_HELPER_RECORDS[1]
    forged = (
        "```python\ndef encode_cyclic(s):\n    return s\n\n\n"
        "def decode_cyclic(s):\n    return s\n```"
    )
    prose = _ours(record, prompt="Write encode_cyclic and its inverse decode_cyclic.")
    assert code_reward(forged, {**prose, "helpers": ["encode_cyclic"]}) == 1.0  # declared
    assert code_reward(forged, prose) == 0.0  # undeclared: NameError, not the candidate's
    in_a_block = _ours(record, prompt=f"Complete this:\n```python\n{record['prompt']}```\n")
    assert code_reward(forged, in_a_block) == 0.0
    two_blocks = _ours(
        record, prompt=f"```python\n{record['prompt']}```\nthen\n```python\nx = 1\n```"
    )
    assert code_reward(forged, two_blocks) == 0.0  # an earlier block's reference is trusted
    assert code_reward(forged, _ours(record)) == 0.0  # the prompt is the code itself


def test_trusted_definitions():
    prompt = (
        "import math\nfrom typing import List\nLIMIT = 3\n\n"
        "def helper(x):\n    return math.floor(x)\n\n"
        "def stub(x):\n    '''Write me.'''\n\n"
        "def other_stub(x):\n    raise NotImplementedError\n\n"
        "def entry(xs: List[int]):\n    '''Write me too.'''\n    return helper(xs[0])\n\n"
        "print('run nothing')\n"
    )
    assert rewards.trusted_definitions(prompt, "entry") == (
        "import math\nfrom typing import List\nLIMIT = 3\n\n"
        "def helper(x):\n    return math.floor(x)\n"
    )  # the entry point (even with a body) and stubs are the candidate's; the print is dropped
    assert rewards.trusted_definitions("Write a Python function `f(x)`.", "f") is None
    assert rewards.trusted_definitions("Fibonacci", "f") is None  # prose that parses
    assert rewards.trusted_definitions("def f(x):\n    '''Doc.'''\n", "f") is None


def test_every_code_zero_says_why(code_records):
    record, solution = code_records[0]
    signature = solution.splitlines()[0]
    entry_point = record["entry_point"]
    cases = [
        (f"```python\n{signature}\n    return None\n```", "tests failed: AssertionError at"),
        ("```python\ndef other():\n    return 1\n```", "entry point not defined"),
        ("", "entry point not defined"),
        (f"```python\n{signature}\n    return (\n```", "the code raised SyntaxError"),
        (f"```python\n{signature}\n    while True:\n        pass\n```", "timeout"),
        (f"```python\n{signature}\n    return 1 / 0\n```", "raised by the candidate's"),
    ]
    for completion, reason in cases:
        result = score("code", completion, {**record, "timeout_s": 2.0})
        assert (result.value, result.error) == (0.0, None), completion
        assert reason in result.reason, (completion, result.reason)
    assert entry_point in score("code", "", record).reason
    right = score("code", f"```python\n{solution}```", record)
    assert right == RewardResult(1.0, None, None)


def test_a_code_record_without_entry_point_is_refused_at_loading(tmp_path):
    """Data loading refuses it naming file and line (scoring it would fail on every
    completion); so are one without tests and one whose tests do not compile."""
    from omegaconf import OmegaConf

    from llada_train.data.formats import BadRecord
    from llada_train.rl.loop import load_prompts

    good = {"prompt": "Write f(x).", "entry_point": "f", "tests": "assert f(1) == 1"}
    bad = [
        ({"prompt": "Write f(x).", "tests": "assert f(1) == 1"}, "entry_point"),
        ({"prompt": "Write f(x).", "entry_point": "f"}, "without tests"),
        ({"prompt": "Write f(x).", "entry_point": "f", "tests": "assert f(1) =="}, "compile"),
    ]
    cfg = OmegaConf.create(
        {"data": {"prompt_field": "prompt", "reward": "code", "system": None}, "rollout": {}}
    )
    for record, message in bad:
        path = tmp_path / "code.jsonl"
        path.write_text("\n" + json.dumps(record) + "\n")  # line 2 (no tokenizer needed)
        with pytest.raises(BadRecord, match=f"^{path}:2: .*{message}"):
            load_prompts([str(path)], cfg, tokenizer=None)
    with pytest.raises(ValueError, match="answer"):
        rewards.check_record("math", {"prompt": "1 + 1?"})
    rewards.check_record("code", good)
    rewards.check_record("code", HUMANEVAL_RECORD)


# ---------------------------------------------------------------------------------------------
# Sums (several valid answers)
# ---------------------------------------------------------------------------------------------

SUM_RECORD = {"prompt": "Write the number 231 as a sum of four 2-digit numbers.", "answer": "231"}
SUM_RECORD |= {"terms": 4, "reward": "sum"}
# Completion, expected reward, why. 48 + 62 + 47 + 74 = 231.
SUM_CASES = [
    ("48 + 62 + 47 + 74", 1.0, "the shipped answer format"),
    ("74 + 47 + 62 + 48", 1.0, "another order is another valid answer"),
    ("99 + 99 + 23 + 10", 1.0, "another decomposition: the largest and smallest terms"),
    ("58 + 58 + 58 + 57", 1.0, "repeated terms are allowed"),
    ("48+62+47+74", 1.0, "spaces around + are free"),
    ("  48  +  62 +47 + 74  ", 1.0, "any amount of them"),
    ("Here you go:\n48 + 62 + 47 + 74\n", 1.0, "the last non-empty line is the answer"),
    ("#### 48 + 62 + 47 + 74", 1.0, "a marked answer is read"),
    ("\\boxed{48 + 62 + 47 + 74}", 1.0, "so is a boxed one"),
    ("48 + 62 + 47 + 75", 0.0, "wrong sum (232)"),
    ("48 + 62 + 47 + 73", 0.0, "wrong sum (230)"),
    ("8 + 102 + 47 + 74", 0.0, "a 1-digit and a 3-digit term (the sum is right)"),
    ("148 + 9 + 37 + 37", 0.0, "a 3-digit term"),
    ("48 + 62 + 47 + 7 + 67", 0.0, "five terms, one of 1 digit"),
    ("90 + 94 + 47", 0.0, "three terms (sum right)"),
    ("48 + 62 + 47 + 37 + 37", 0.0, "five 2-digit terms"),
    ("48 + 62 + 47 + 74 = 231", 0.0, "extra text after the sum"),
    ("48 + 62 + 47 + 74.", 0.0, "even a period"),
    ("48 + 62 + 47 + 74\nDone.", 0.0, "a remark after the answer line"),
    ("The numbers are 48 + 62 + 47 + 74", 0.0, "extra text before, on the answer line"),
    ("48, 62, 47, 74", 0.0, "not joined by +"),
    ("48 + 62 + 47 + + 74", 0.0, "an empty term"),
    ("+48 + 62 + 47 + 74", 0.0, "a leading sign"),
    ("07 + 62 + 88 + 74", 0.0, "a leading zero: 07 is no 2-digit number"),
    ("-10 + 99 + 99 + 43", 0.0, "negative"),
    ("48 + 62 + 47 + ٧٤", 0.0, "non-ASCII digits"),
    ("4 8 + 62 + 47 + 74", 0.0, "a space inside a number"),
    ("\\boxed{48 + 62 + 47 + 74", 0.0, "a truncated last box: the answer was cut off"),
    ("48 + 62 + 47 + 74\n\\boxed{48 + 62", 0.0, "no earlier answer stands in for a cut-off one"),
    ("", 0.0, "empty"),
    ("\n  \n", 0.0, "blank"),
]


@pytest.mark.parametrize("completion, expected, reason", SUM_CASES)
def test_sum_reward(completion, expected, reason):
    assert rewards.sum_reward(completion, SUM_RECORD) == expected, reason
    assert score("sum", completion, SUM_RECORD) == RewardResult(expected, None, None), reason


def test_sum_reward_reads_target_and_terms_from_the_record():
    assert rewards.sum_reward("90 + 94 + 47", {"answer": "231", "terms": 3}) == 1.0
    assert rewards.sum_reward("10", {"answer": 10, "terms": 1}) == 1.0  # an int answer too
    for bad in ({"answer": "231"}, {"answer": "231", "terms": 0}, {"answer": "x", "terms": 4}):
        with pytest.raises(ValueError, match="sum record"):
            rewards.check_record("sum", bad)
        assert score("sum", "48 + 62 + 47 + 74", bad).error.startswith("sum: ValueError")
    rewards.check_record("sum", SUM_RECORD)


def test_every_shipped_sum_answer_scores_one():
    """Every SFT answer, as the reward reads it, against its question's target (parsed here from
    the question text); and every RL and eval record's target has valid answers."""
    from llada_train.data.synthetic import count_sum_answers

    for name in ("sum_sft_train.jsonl", "sum_sft_eval.jsonl"):
        for record in _records(f"data/shipped/{name}"):
            question, answer = (m["content"] for m in record["messages"])
            words = question.replace("2-digit", "").rstrip(".").split()
            (target,) = [int(w) for w in words if w.isdigit()]  # the one number asked
            assert rewards.sum_reward(answer, {"answer": str(target), "terms": 4}) == 1.0, record
    for name in ("data/shipped/sum_rl_train.jsonl", "data/shipped/sum_rl_eval.jsonl"):
        records = _records(name)
        values, num_errors = score_batch(None, ["10 + 10 + 10 + 10"] * len(records), records)
        assert num_errors == 0 and sum(values) == 0  # 40 is no shipped target
        assert all(count_sum_answers(int(r["answer"]), r["terms"]) >= 56 for r in records)
