"""The benchmark-format offline tasks (eval/tasks/llada_humaneval.yaml, llada_gsm8k.yaml): their
wiring through lm-eval scores an oracle exactly, they are scored by the RL rewards, and records
in the public benchmarks' own formats (HumanEval, GSM8K, MATH-500, Hendrycks MATH) score too.
The shipped data is the held-out data in those formats (scripts/benchmark_format_data.py).
The sorting task (eval/tasks/llada_sort.yaml) likewise: an oracle scores exactly through lm-eval,
its metric is the RL sort reward, and its data is the generator's held-out lists."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest

from llada_train.eval.evaluate import TASKS_DIR

FORMAT_TASKS = ["llada_humaneval", "llada_gsm8k"]


def _utils():
    spec = importlib.util.spec_from_file_location("task_utils", os.path.join(TASKS_DIR, "utils.py"))
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    return utils


def _reverse_list(doc: dict) -> str:
    """A wrong sorting answer: the gold list in descending order."""
    return " ".join(doc["answer"].split(" ")[::-1])


def _oracle(correct: bool, wrong=lambda doc: "#### -1"):
    """Answers from the document: the reference solution (code) or the gold answer (math,
    sorting); when not `correct`, a failing body (code) or `wrong(doc)`."""
    from lm_eval.api.model import LM

    class Oracle(LM):
        def generate_until(self, requests, disable_tqdm=False):
            out = []
            for r in requests:
                doc = r.doc
                if "entry_point" in doc:
                    body = doc["canonical_solution"] if correct else "    return None\n"
                    out.append(f"Here it is:\n```python\n{doc['prompt']}{body}```")
                else:
                    out.append(doc["answer"] if correct else wrong(doc))
            return out

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return Oracle()


@pytest.mark.parametrize("correct", [True, False])
def test_format_tasks_score_an_oracle_exactly(correct):
    import lm_eval
    from lm_eval.tasks import TaskManager

    raw = lm_eval.simple_evaluate(
        model=_oracle(correct),
        tasks=FORMAT_TASKS,
        limit=4,
        task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False),
        log_samples=False,
        bootstrap_iters=0,
    )
    expected = 1.0 if correct else 0.0
    assert raw["results"]["llada_humaneval"]["pass@1,none"] == expected
    assert raw["results"]["llada_gsm8k"]["exact_match,none"] == expected


def test_shipped_format_data_matches_the_source_data():
    """Every shipped record is the held-out task in the benchmark's format, and its reference
    passes its own tests through the code reward (all 50, in one batch)."""
    from llada_train.rl.rewards import score_batch

    utils = _utils()
    code = utils.load_jsonl({"test": "../data/code_humaneval.jsonl"})["test"]
    source = utils.load_jsonl({"test": "../data/code_tasks.jsonl"})["test"]
    assert [r["entry_point"] for r in code] == [r["entry_point"] for r in source]
    completions = [f"```python\n{r['prompt']}{r['canonical_solution']}```" for r in code]
    values, num_errors = score_batch("code", completions, list(code))
    assert (sum(values), num_errors) == (len(code), 0)
    math = utils.load_jsonl({"test": "../data/math_gsm8k.jsonl"})["test"]
    gen = utils.load_jsonl({"test": "../data/arith_gen.jsonl"})["test"]
    assert [r["question"] for r in math] == [r["question"] for r in gen]
    assert all(r["answer"].endswith(f"#### {g['answer']}") for r, g in zip(math, gen, strict=True))


# Records exactly as the public files hold them (HumanEval/0 of openai/human-eval; GSM8K test;
# MATH-500 and Hendrycks MATH style), to show the full benchmarks drop in.
HUMANEVAL_0 = {
    "task_id": "HumanEval/0",
    "prompt": "from typing import List\n\n\ndef has_close_elements(numbers: List[float], "
    'threshold: float) -> bool:\n    """ Check if in given list of numbers, are any two numbers '
    "closer to each other than\n    given threshold.\n    >>> has_close_elements([1.0, 2.0, "
    "3.0], 0.5)\n    False\n    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n"
    '    True\n    """\n',
    "canonical_solution": "    for idx, elem in enumerate(numbers):\n        for idx2, elem2 in "
    "enumerate(numbers):\n            if idx != idx2:\n                distance = abs(elem - "
    "elem2)\n                if distance < threshold:\n                    return True\n\n"
    "    return False\n",
    "test": "\n\nMETADATA = {\n    'author': 'jt',\n    'dataset': 'test'\n}\n\n\ndef "
    "check(candidate):\n    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
    "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n    assert "
    "candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n    assert candidate([1.0, 2.0, 5.9, "
    "4.0, 5.0], 0.8) == False\n    assert candidate([1.0, 2.0, 3.0, 4.0, 5.0, 2.0], 0.1) == "
    "True\n    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True\n    assert "
    "candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False\n\n",
    "entry_point": "has_close_elements",
}


@pytest.mark.parametrize(
    "completion, expected",
    [
        # the chat form: the whole function in a block (the prompt's import is kept)
        ("```python\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
         "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)\n"
         "               for j, b in enumerate(numbers) if i != j)\n```", 1.0),
        # HumanEval's own form: a continuation of the prompt
        (HUMANEVAL_0["canonical_solution"], 1.0),
        ("    return False\n", 0.0),
    ],
)  # fmt: skip
def test_a_humaneval_record_is_scored(completion, expected):
    assert _utils().process_code(HUMANEVAL_0, [completion]) == {"pass@1": expected}


@pytest.mark.parametrize(
    "doc, completion, expected",
    [
        # GSM8K test.jsonl: the gold is the number after "####" of the reference solution
        ({"question": "Janet's ducks lay 16 eggs per day...",
          "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
                    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18"},
         "She sells 9 eggs for $2 each, so she makes $18.\n#### 18", 1.0),
        # MATH-500: a bare LaTeX answer
        ({"problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
          "answer": "\\left( 3, \\frac{\\pi}{2} \\right)"},
         "So the point is $\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}$.", 1.0),
        ({"problem": "...", "answer": "\\frac{14}{3}"}, "\\boxed{4.67}", 0.0),
        # Hendrycks MATH: no "answer", the gold is the solution's \boxed{}
        ({"problem": "What is $\\sqrt{8}$?",
          "solution": "We have $\\sqrt{8} = \\sqrt{4 \\cdot 2} = \\boxed{2\\sqrt{2}}$."},
         "The answer is $\\boxed{\\sqrt{8}}$", 1.0),
    ],
)  # fmt: skip
def test_gsm8k_and_math_records_are_scored(doc, completion, expected):
    assert _utils().process_math(doc, [completion]) == {"exact_match": expected}


def test_pointing_a_task_at_a_full_benchmark_file(tmp_path):
    """What docs/evaluate.md shows: a copy of the task file, renamed, whose data_files is the full
    benchmark file (here a one-record HumanEval.jsonl), next to a copy of utils.py."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "HumanEval.jsonl"
    data.write_text(json.dumps(HUMANEVAL_0) + "\n")
    with open(os.path.join(TASKS_DIR, "llada_humaneval.yaml")) as f:
        yaml_text = f.read()
    yaml_text = yaml_text.replace("task: llada_humaneval", "task: humaneval_full")
    yaml_text = yaml_text.replace("test: ../data/code_humaneval.jsonl", f"test: {data}")
    (tmp_path / "humaneval_full.yaml").write_text(yaml_text)
    shutil.copy(os.path.join(TASKS_DIR, "utils.py"), tmp_path / "utils.py")
    raw = lm_eval.simple_evaluate(
        model=_oracle(True),
        tasks=["humaneval_full"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=False,
        bootstrap_iters=0,
    )
    assert raw["results"]["humaneval_full"]["pass@1,none"] == 1.0
    assert raw["n-samples"]["humaneval_full"]["effective"] == 1


# ---------------------------------------------------------------------------------------------
# Sorting (eval/tasks/llada_sort.yaml)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("correct", [True, False])
def test_sort_task_scores_an_oracle_exactly(correct):
    import lm_eval
    from lm_eval.tasks import TaskManager

    raw = lm_eval.simple_evaluate(
        model=_oracle(correct, wrong=_reverse_list),
        tasks=["llada_sort"],
        limit=8,
        task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False),
        log_samples=False,
        bootstrap_iters=0,
    )
    assert raw["results"]["llada_sort"]["exact_match,none"] == (1.0 if correct else 0.0)
    assert raw["n-samples"]["llada_sort"]["effective"] == 8


def test_sort_metric_is_the_sort_reward():
    utils = _utils()
    doc = {"question": "Sort these numbers: 47 12 89 33 15 71", "answer": "12 15 33 47 71 89"}
    assert utils.process_sort(doc, ["12 15 33 47 71 89"]) == {"exact_match": 1.0}
    assert utils.process_sort(doc, ["Sorted: 12, 15, 33, 47, 71, 89."]) == {"exact_match": 1.0}
    assert utils.process_sort(doc, ["12 15 33 47 89 71"]) == {"exact_match": 0.0}
    assert utils.process_sort(doc, ["12 15 33 47 71"]) == {"exact_match": 0.0}


def test_shipped_sort_data_is_the_generators_heldout_lists():
    """Every record is a held-out list asked in the first phrasing, with its sorted answer, and
    the lists differ from each other (as multisets)."""
    from llada_train.data import synthetic

    docs = _utils().load_jsonl({"test": "../data/sort_gen.jsonl"})["test"]
    assert len(docs) == synthetic.NUM_SORT_GEN
    keys = set()
    for doc in docs:
        numbers = [int(x) for x in doc["question"].split(": ")[1].split(" ")]
        assert doc["question"] == synthetic.sort_question(numbers)
        assert doc["answer"] == " ".join(map(str, sorted(numbers)))
        assert synthetic.is_heldout_sort(numbers)
        keys.add(synthetic.sort_key(numbers))
    assert len(keys) == len(docs)


# ---------------------------------------------------------------------------------------------
# Sums with several valid answers (eval/tasks/llada_sum.yaml)
# ---------------------------------------------------------------------------------------------


def _a_sum(doc: dict) -> str:
    """A valid answer written here (no gold answer is shipped: any valid one scores): the terms
    filled greedily from 99 down, the rest 10s."""
    rest, terms = int(doc["answer"]) - 10 * doc["terms"], []
    for _ in range(doc["terms"]):
        terms.append(10 + min(89, rest))
        rest -= terms[-1] - 10
    return " + ".join(map(str, terms))


@pytest.mark.parametrize("correct", [True, False])
def test_sum_task_scores_an_oracle_exactly(correct):
    import lm_eval
    from lm_eval.tasks import TaskManager

    oracle = _oracle(True)
    oracle.generate_until = lambda requests, disable_tqdm=False: [
        _a_sum(r.doc) if correct else "10 + 10 + 10 + 10" for r in requests
    ]
    raw = lm_eval.simple_evaluate(
        model=oracle,
        tasks=["llada_sum"],
        limit=8,
        task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False),
        log_samples=False,
        bootstrap_iters=0,
    )
    assert raw["results"]["llada_sum"]["exact_match,none"] == (1.0 if correct else 0.0)
    assert raw["n-samples"]["llada_sum"]["effective"] == 8


def test_sum_metric_is_the_sum_reward():
    utils = _utils()
    doc = {"question": "Write the number 231 as a sum of four 2-digit numbers."}
    doc |= {"answer": "231", "terms": 4}
    for right in ("48 + 62 + 47 + 74", "99 + 99 + 23 + 10", "Sure:\n58+58+58+57"):
        assert utils.process_sum(doc, [right]) == {"exact_match": 1.0}, right
    for wrong in ("48 + 62 + 47 + 75", "90 + 94 + 47", "48 + 62 + 47 + 74 = 231", "231"):
        assert utils.process_sum(doc, [wrong]) == {"exact_match": 0.0}, wrong
    docs = utils.load_jsonl({"test": "../data/sum_gen.jsonl"})["test"]
    assert len(docs) == 200
    assert all(utils.process_sum(d, [_a_sum(d)]) == {"exact_match": 1.0} for d in docs)
