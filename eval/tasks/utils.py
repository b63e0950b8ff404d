"""Helpers of the shipped offline lm-eval tasks (`!function utils.NAME` in the YAMLs here).

Contract:
- `load_jsonl(data_files=...)` is the tasks' `custom_dataset`: lm-eval calls it with the YAML's
  `dataset_kwargs` (and task metadata, ignored) and it returns a `datasets.DatasetDict` with one
  split per entry of `data_files`. Relative paths are resolved against this folder, not the
  working directory: `datasets.load_dataset("json", data_files=...)` would resolve them against
  the cwd, and lm-eval 0.4.13 has no YAML-relative path substitution, while `!function` is
  resolved next to the YAML. Nothing is downloaded or cached.
- Scores come from the one answer checker per task shared with RL (`llada_train.rl.rewards`):
  `process_arith_gen` and `process_math` -> exact_match = the math reward (math-verify's
  extraction and equivalence); `process_code` -> pass@1 = the code reward (the completion's
  code against the record's tests in the sandbox; our records and HumanEval's); `process_sort`
  -> exact_match = the sort reward (the answer's numbers, in order, are the gold list);
  `process_sum` -> exact_match = the sum reward (any valid answer). A reward that fails scores 0
  (rewards.score never raises).
"""

from __future__ import annotations

import json
import os

import datasets

from llada_train.rl.rewards import score

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))


def load_jsonl(data_files: dict[str, str] | None = None, **_: object) -> datasets.DatasetDict:
    """{split: path} -> DatasetDict; paths relative to this folder (see the module docstring)."""
    if not data_files:
        raise ValueError("load_jsonl needs dataset_kwargs: {data_files: {test: PATH}}")
    splits = {}
    for split, path in data_files.items():
        path = os.path.normpath(os.path.join(TASKS_DIR, os.path.expanduser(path)))
        if not os.path.isfile(path):
            raise ValueError(f"task data file {path!r} (split {split!r}) does not exist")
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def process_arith_gen(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match: 1.0 iff the completion's final number equals doc["answer"] (math reward)."""
    return {"exact_match": score("math", results[0], {"answer": doc["answer"]}).value}


def process_math(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match: the math reward against the record's gold answer: GSM8K's and MATH-500's
    "answer" (a solution ending in `#### N`, or a bare LaTeX answer), else a MATH "solution"
    (its \\boxed{} answer)."""
    gold = doc["answer"] if doc.get("answer") is not None else doc["solution"]
    return {"exact_match": score("math", results[0], {"answer": gold}).value}


def process_code(doc: dict, results: list[str]) -> dict[str, float]:
    """pass@1: 1.0 iff the completion's code passes the record's tests in the sandbox (the code
    reward; our {"tests"} records and HumanEval's {"prompt", "test", "entry_point"} alike)."""
    return {"pass@1": score("code", results[0], doc).value}


def process_sort(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match: 1.0 iff the completion's numbers, in order, are doc["answer"]'s (the sort
    reward: "12 15 33 47 71 89" for "Sort these numbers: 47 12 89 33 15 71")."""
    return {"exact_match": score("sort", results[0], {"answer": doc["answer"]}).value}


def process_sum(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match: 1.0 iff the completion is doc["terms"] 2-digit numbers joined by "+" summing
    to doc["answer"] (the sum reward: "48 + 62 + 47 + 74", or any other valid answer, for
    "Write the number 231 as a sum of four 2-digit numbers.")."""
    example = {"answer": doc["answer"], "terms": doc["terms"]}
    return {"exact_match": score("sum", results[0], example).value}
