"""Write the shipped held-out evaluation data again in the public benchmarks' record formats, so
that the tasks reading those formats run offline and a user's full benchmark files drop in:

    eval/data/code_humaneval.jsonl   HumanEval's {"task_id", "prompt", "canonical_solution",
                                     "test", "entry_point"}, from eval/data/code_tasks.jsonl
    eval/data/math_gsm8k.jsonl       GSM8K's {"question", "answer": "solution\\n#### N"}, from
                                     eval/data/arith_gen.jsonl

Deterministic (the same inputs give byte-identical files); run after
`python -m llada_train.data.synthetic`:

    python scripts/benchmark_format_data.py
"""

from __future__ import annotations

import json
import os
import re

from llada_train import REPO_ROOT
from llada_train.data.synthetic import reference_solutions

EVAL_DATA = os.path.join(REPO_ROOT, "eval", "data")


def humaneval_record(index: int, record: dict, solution: str) -> dict:
    """One of our code records in HumanEval's format: the prompt is the function's signature
    with the task as its docstring, the tests a `check(candidate)` function."""
    entry_point = record["entry_point"]
    signature, _, body = solution.partition("\n")
    task = record["prompt"].split(". ", 1)[1]  # "Write a Python function `f(x)`. It should ..."
    task = task.removeprefix("It should ")
    task = task[:1].upper() + task[1:]
    prompt = f'{signature}\n    """{task}"""\n'
    asserts = re.sub(rf"\b{re.escape(entry_point)}\(", "candidate(", record["tests"])
    test = "def check(candidate):\n" + "".join(f"    {line}\n" for line in asserts.splitlines())
    return {
        "task_id": f"llada/{index}",
        "prompt": prompt,
        "canonical_solution": body,
        "test": test,
        "entry_point": entry_point,
    }


def gsm8k_record(record: dict) -> dict:
    """One held-out addition in GSM8K's format: a one-line solution ending in `#### N`."""
    a, b = re.fullmatch(r"What is (\d+) \+ (\d+)\?", record["question"]).groups()
    answer = record["answer"]
    return {"question": record["question"], "answer": f"{a} + {b} = {answer}.\n#### {answer}"}


def _read(name: str) -> list[dict]:
    with open(os.path.join(EVAL_DATA, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write(name: str, records: list[dict]) -> None:
    with open(os.path.join(EVAL_DATA, name), "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"wrote {len(records)} records to eval/data/{name}")


def main() -> None:
    solutions = reference_solutions()
    code = _read("code_tasks.jsonl")
    _write(
        "code_humaneval.jsonl",
        [humaneval_record(i, r, solutions[r["entry_point"]]) for i, r in enumerate(code)],
    )
    _write("math_gsm8k.jsonl", [gsm8k_record(r) for r in _read("arith_gen.jsonl")])


if __name__ == "__main__":
    main()
