"""Rewards: one answer checker per task, shared by RL (as the reward) and evaluation (as the
scorer), so that what is trained for is exactly what is measured (SPEC section 5).

Contract:
- A reward is a plain function `fn(completion: str, example: dict) -> float`, `example` being the
  dataset record (math: {"prompt", "answer"}; code: {"prompt", "entry_point", "tests"}). Rewards
  are picked by name from `REWARDS` (a config value, or the record's "reward" field).
- `math_reward`: 1.0 iff the final answer of the completion equals example["answer"]. The final
  answer is, in priority order, the content of the last `\\boxed{...}` (nested braces allowed),
  the number after the last `#### `, or the last number in the text (`extract_answer`). Numbers
  are compared as exact rationals after normalisation, with a relative tolerance of 1e-6
  (`normalize_number`, `answers_match`): "1,234" = "1234.0" = "$1234." and "3/4" = "0.75".
- `code_reward`: 1.0 iff the code (the last ```python block, else the whole completion) followed
  by example["tests"] runs to the end in the sandbox (`llada_train.rl.sandbox`).
- `format_reward`: 1.0 iff the completion ends its answer the expected way: a `#### N` line or a
  `\\boxed{N}` with a number for math, a fenced code block for code records.
- `score` / `score_batch` never raise on a failing reward: a reward that raises (or, in a batch,
  runs past the deadline) scores 0.0 and is counted as an error. An unknown reward name is a
  configuration error and raises ValueError before anything runs.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction

from llada_train.rl.sandbox import run_python

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, dict], float]

CODE_TIMEOUT_S = 5.0  # wall clock per code completion; a record may override with "timeout_s"
REL_TOL = 1e-6  # numbers closer than this (relative) are the same answer
MAX_NUMBER_CHARS = 64  # longer "numbers" are not parsed (no giant-integer work on model output)

# A number in running text: optional sign (not a hyphen inside a word or expression such as
# "964-529"), thousands groups or plain digits, optional decimals, optional "/denominator".
_NUMBER = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?"  # 1,234.5 / -12 / 3/4
    r"|(?<!\w)\.\d+"  # .5
)
_HASH_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{[^{}]*\}")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:/\d+)?")
_GROUPED_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FENCED = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n")
_PYTHON_LANGS = ("python", "python3", "py")


# ---------------------------------------------------------------------------------------------
# Math answers
# ---------------------------------------------------------------------------------------------


def _last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...}, braces balanced; None if there is none."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
        # unbalanced (e.g. a truncated generation): try an earlier one
    return None


def _marked_answer(text: str) -> str | None:
    """The answer the completion marks as final (\\boxed or ####), without the fallback."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for line in reversed(_HASH_ANSWER.findall(text)):
        line = line.strip()
        if not line:
            continue  # an empty "####": look further up
        if normalize_number(line) is not None:
            return line
        number = _NUMBER.search(line)  # "#### 1493 apples"
        return number.group(0) if number else line
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, as written (not normalised): the last \\boxed{...},
    else the last `#### ...`, else the last number in the text; None if there is none."""
    marked = _marked_answer(text)
    if marked is not None:
        return marked
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _parse_number(s: str) -> Fraction | None:
    """Exact value of a written number ("$1,234.", "3/4", "\\frac{3}{4}", "x = -5"), or None."""
    s = _TEXT.sub("", s)
    s = _FRAC.sub(r"(\1)/(\2)", s)
    for junk in ("\\!", "\\,", "\\;", "\\ ", "\\$", "\\%", "$", "%", "{", "}", "(", ")", " "):
        s = s.replace(junk, "")
    s = s.rsplit("=", 1)[-1].rstrip(".")  # "x=5" -> "5"; "1493." -> "1493"
    if _GROUPED_NUMBER.fullmatch(s):
        s = s.replace(",", "")
    if len(s) > MAX_NUMBER_CHARS or not _PLAIN_NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_number(s: str) -> str | None:
    """Canonical form of a written number, None if `s` is not one: "1,234" / "1234.0" / "$1234."
    -> "1234"; "3/4" / "0.75" -> "0.75"; "-12.50" -> "-12.5"; "1/3" -> "1/3". Equal values give
    equal strings."""
    value = _parse_number(s)
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:  # no finite decimal expansion
        return f"{value.numerator}/{value.denominator}"
    with localcontext() as ctx:
        ctx.prec = 2 * MAX_NUMBER_CHARS  # exact for every parsable terminating decimal
        decimal = Decimal(value.numerator) / Decimal(value.denominator)
    return format(decimal.normalize(), "f")


def answers_match(predicted: str | None, gold: str) -> bool:
    """Whether two written numbers are the same answer (exactly, or within REL_TOL)."""
    if predicted is None:
        return False
    a, b = _parse_number(predicted), _parse_number(gold)
    if a is None or b is None:
        return False
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=0.0)
    except OverflowError:
        return False


def math_reward(completion: str, example: dict) -> float:
    """1.0 iff the completion's final answer equals example["answer"] (see the module doc)."""
    return 1.0 if answers_match(extract_answer(completion), str(example["answer"])) else 0.0


# ---------------------------------------------------------------------------------------------
# Code
# ---------------------------------------------------------------------------------------------


def extract_code(text: str) -> str:
    """The code of a completion: the last ```python block (else the last unlabelled one), else
    the rest after an opening fence never closed (a truncated generation), else the whole text."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCED.finditer(text)]
    for wanted in (_PYTHON_LANGS, ("",)):
        chosen = [code for lang, code in blocks if lang in wanted]
        if chosen:
            return chosen[-1]
    last_end = max((m.end() for m in _FENCED.finditer(text)), default=0)
    opening = _OPEN_FENCE.search(text, last_end)
    if opening:
        return text[opening.end() :]
    return text


def code_program(completion: str, example: dict) -> dict[str, str | None]:
    """The sandbox job of a code record: the candidate's code, the trusted tests and setup.

    Our records {"prompt", "entry_point", "tests"}: code = the extracted code; tests = the
    record's asserts. HumanEval-style records {"prompt" (code: signature and docstring),
    "entry_point", "test" (defines `check(candidate)`)}: code = the prompt followed by the
    extracted code when that defines the entry point (a whole function written in a chat), else
    by the completion (a continuation of the prompt); tests = `test` + `check(entry_point)`;
    setup = the prompt, so helpers it defines are there for the tests. Raises ValueError for a
    record with neither "tests" nor "test".
    """
    entry_point = example["entry_point"]
    code = extract_code(completion)
    if "tests" in example:
        return {"code": code, "tests": example["tests"], "entry_point": entry_point, "setup": None}
    if "test" not in example:
        raise ValueError(f"code record without 'tests' or 'test': keys {sorted(example)}")
    prompt = example.get("prompt", "")
    defines = re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE)
    code = prompt + "\n" + code if defines else prompt + completion
    tests = f"{example['test']}\n\ncheck({entry_point})\n"
    return {"code": code, "tests": tests, "entry_point": entry_point, "setup": prompt}


def code_reward(completion: str, example: dict) -> float:
    """1.0 iff the record's tests pass against the completion's entry point in the sandbox: the
    tests run in a process of their own and reach the candidate only through calls of the entry
    point (see `llada_train.rl.sandbox`), so no code of the candidate can fake a pass."""
    job = code_program(completion, example)
    result = run_python(
        job["code"],
        tests=job["tests"],
        entry_point=job["entry_point"],
        setup=job["setup"],
        timeout_s=float(example.get("timeout_s", CODE_TIMEOUT_S)),
    )
    if result.status == "sandbox_error":  # our failure, not the model's: count it as an error
        raise RuntimeError(f"sandbox failed: {result.stderr}")
    return 1.0 if result.passed else 0.0


# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------


def format_reward(completion: str, example: dict) -> float:
    """1.0 iff the answer is given in the expected form: for code records (with "tests") a
    fenced code block; otherwise a `#### N` line or `\\boxed{N}` holding a number."""
    if "tests" in example:
        return 1.0 if _FENCED.search(completion) else 0.0
    marked = _marked_answer(completion)
    return 1.0 if marked is not None and normalize_number(marked) is not None else 0.0


# ---------------------------------------------------------------------------------------------
# Registry and safe scoring
# ---------------------------------------------------------------------------------------------

REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "code": code_reward,
    "format": format_reward,
}


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}: set it to one of {sorted(REWARDS)}")
    return REWARDS[name]


@dataclass(frozen=True)
class RewardResult:
    value: float
    error: str | None  # why the reward failed (value is then 0.0), None if it did not


def score(name: str, completion: str, example: dict) -> RewardResult:
    """Run reward `name`; a reward that raises or returns a non-finite value scores 0.0 with the
    error, so a faulty reward cannot stop training. Raises ValueError for an unknown name."""
    fn = get_reward(name)
    try:
        value = float(fn(completion, example))
        if not math.isfinite(value):
            raise ValueError(f"non-finite reward {value}")
        return RewardResult(value, None)
    except Exception as e:
        return RewardResult(0.0, f"{name}: {type(e).__name__}: {e}")


def score_batch(
    names: str | Sequence[str] | None,
    completions: Sequence[str],
    examples: Sequence[dict],
    max_workers: int = 8,
    timeout_s: float | None = None,
) -> tuple[list[float], int]:
    """Score a batch on a thread pool (code rewards wait on sandbox subprocesses).

    names: one reward for all, one per example, or None for each example's "reward" field.
    timeout_s: deadline for the whole batch; rewards still running then score 0.0 as errors
    (their threads cannot be stopped and finish in the background; the sandbox bounds code).
    Returns (values in input order, number of errors).
    """
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
    if names is None:
        names = [example["reward"] for example in examples]
    elif isinstance(names, str):
        names = [names] * len(examples)
    if len(names) != len(examples):
        raise ValueError(f"{len(names)} reward names for {len(examples)} examples")
    for name in set(names):
        get_reward(name)  # fail on a typo before running anything
    if not examples:
        return [], 0
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(examples))))
    try:
        jobs = zip(names, completions, examples, strict=True)
        futures = [pool.submit(score, *job) for job in jobs]
        wait(futures, timeout=timeout_s)
        results = [
            f.result() if f.done() else RewardResult(0.0, f"{name}: timeout after {timeout_s} s")
            for f, name in zip(futures, names, strict=True)
        ]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    errors = [r.error for r in results if r.error is not None]
    if errors:
        logger.warning("%d of %d rewards failed, first: %s", len(errors), len(results), errors[0])
    return [r.value for r in results], len(errors)
