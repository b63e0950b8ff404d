"""Rewards: one answer checker per task, shared by RL (as the reward) and evaluation (as the
scorer), so that what is trained for is exactly what is measured (SPEC section 5).

Contract:
- A reward is a plain function `fn(completion: str, example: dict) -> float`, `example` being the
  dataset record (math: {"prompt", "answer"}; code: {"prompt", "entry_point", "tests" or
  "test"}). Rewards are picked by name from `REWARDS` (a config value, or the record's "reward"
  field).
- `math_reward`: 1.0 iff the final answer of the completion is example["answer"], by HF's
  math-verify (extraction, LaTeX normalisation, symbolic equivalence; the checker of TRL and
  open-r1). The answer read is, in priority order: the content of the last complete
  `\\boxed{...}` (MATH/Minerva), the rest of the line after the last `####` (GSM8K strict), or
  math-verify's reading of the whole text, last answer first (GSM8K flexible). A completion that
  ends inside an unclosed `\\boxed{` (its final answer cut off) scores 0: no earlier answer
  stands in for it. The gold answer is the text after `####` (a GSM8K solution), a solution's
  \\boxed{}, or a bare LaTeX answer. Numbers, fractions, powers, roots, intervals, sets, tuples,
  equations ("x = 5" = 5), \\text{} around the answer and choice letters are math-verify's. Our
  choices on top (`_normalize_math`, `bare_number`, `check_math_answer`): against a gold answer
  that is a number, a marked answer that is a number in common dress is read as that number:
  unit words after it ("5 apples", "12 \\text{ cm}", "3 square feet", "60 km/h"; a bare word of
  one letter is not a unit, "5 x" may be 5x, nor is a word that changes the value: "5 hundred",
  "3 quarters", "5 or more"), thousands separators ("1,234", "1{,}234", "1\\,234"), a currency sign
  ("\\$5", "$5.00", "5€") and a degree sign ("90^\\circ", "90°") are dropped (math-verify
  alone reads "5 dollars" as a product and "90°" not at all); digits apart by a space are two
  numbers (GSM8K's extraction; math-verify would read "134 134" as 134134); the Unicode minus is
  a minus; a percent sign is dropped ("50%" is the number 50, as GSM8K writes percentages and
  Minerva's normalisation does, so 0.5 does not match a gold 50%); an integer gold answer must
  be matched exactly (1234568 for 1234567 is wrong; 12.0 = 12), other numbers as math-verify
  rounds them (6 decimals). Time: each check runs in one of a few long-lived worker processes
  (`python -I`) where math-verify's own signal-based limits work (1 s to parse, 1 s to compare;
  they need a main thread, which reward threads are not); past MATH_TIMEOUT_S the worker is
  killed and replaced and the answer scores 0, so no input can stall the trainer or hold its
  GIL. An
  unreadable gold answer is a bad record: ValueError (an error in `score`).
- `code_reward`: 1.0 iff the record's tests pass against the completion's code in the sandbox
  (`llada_train.rl.sandbox`: the tests run in a process of their own and see only plain data
  returned by calls of the candidate's functions). Records: ours {"prompt", "entry_point",
  "tests" (asserts)} or HumanEval's {"prompt" (code), "entry_point", "test" (defines
  `check(candidate)`)}; see `code_program`. Helpers the tests call: the prompt's own
  definitions (`trusted_definitions`: HumanEval/32's `poly`, /38's `encode_cyclic`) run in the
  tests' process; one that only the candidate's code defines is called across the same
  plain-data boundary as the entry point. `code_verdict` says why a completion scores 0 ("tests
  failed: AssertionError at <tests> line 3: ...", "entry point not defined: ...", "timeout:
  ..."), which `score` returns as `reason`.
- `sort_reward`: 1.0 iff the numbers of the completion's answer, in order, are the numbers of
  example["answer"] (the shipped sorting task: "12 15 33 47 71 89"). The answer read is the
  math reward's marked answer (`extract_answer`: the last \\boxed{...}, else the rest of the last
  `####` line), else the whole completion; a truncated last \\boxed{ scores 0, as in math.
  Numbers are the maximal runs of ASCII digits, with an optional leading "-" and decimal part,
  compared by value (so "12.0" is 12); all other text (words, commas, brackets) is ignored. A
  missing, extra, repeated or misplaced number scores 0. A gold answer without a number is a
  bad record: ValueError (an error in `score`).
- `sum_reward`: 1.0 iff the completion's answer is exactly example["terms"] numbers of 10..99
  (two ASCII digits, no sign, no leading zero) joined by "+" (spaces around each "+" free),
  summing to example["answer"] (the target; the shipped sum task: "48 + 62 + 47 + 74" for 231
  and four terms, and every other valid answer). The answer read is the marked answer
  (`extract_answer`), else the last non-empty line of the completion, so text after the sum
  (a period, "= 231", a remark on a new line) scores 0; a truncated last \\boxed{ scores 0. A
  record without an integer "answer" or a positive integer "terms" is a bad record: ValueError.
- `format_reward`: 1.0 iff the completion gives its answer the expected way: a non-empty
  `\\boxed{...}` or `#### ...` for math (not one ending in an unclosed `\\boxed{`), a fenced
  code block for code records.
- `score` / `score_batch` never raise on a failing reward: a reward that raises (or, in a batch,
  runs past the deadline) scores 0.0 and is counted as an error. A wrong answer is no error;
  `score`'s `reason` says why it scores 0 where the reward can (code). An unknown reward name is
  a configuration error and raises ValueError before anything runs.
- `check_record(name, record)`: ValueError for a record the reward cannot score (code: no
  `entry_point`, no tests, tests that do not compile; math and sort: no answer; sum: no integer
  answer or terms), so that data loading refuses it with its file and line
  (`llada_train.rl.loop.load_prompts`).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from decimal import Decimal

from llada_train.rl.sandbox import run_python

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, dict], float]

CODE_TIMEOUT_S = 5.0  # wall clock per code completion; a record may override with "timeout_s"
MATH_TIMEOUT_S = 5.0  # wall clock per math check; past it the worker is killed and it scores 0
MATH_VERIFY_TIMEOUT_S = 1  # math-verify's own limits on parsing and on comparing (whole seconds)
MATH_WORKER_START_S = 120.0  # a worker's start (imports sympy); not counted in MATH_TIMEOUT_S
MATH_WORKER_MEMORY_MB = 4096  # address space of a math worker
MAX_MATH_WORKERS = 8  # math worker processes at most (score_batch threads share them)

_SPACED_DIGITS = re.compile(r"(?<=\d)[ \t]+(?=\d)")  # math-verify would join "134 134"
_HASH_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FENCED = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n")
_PYTHON_LANGS = ("python", "python3", "py")
_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign, ast.ClassDef)
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")  # sort reward: "12", "-3", "12.0"
_SUM_TERM = re.compile(r"[1-9][0-9]")  # sum reward: 10..99 in ASCII (\d: any Unicode digit)


# ---------------------------------------------------------------------------------------------
# Math answers: extraction here, equivalence by math-verify in worker processes
# ---------------------------------------------------------------------------------------------


def _scan_boxes(text: str) -> tuple[str | None, bool]:
    """(content of the last complete \\boxed{...} (or \\fbox{...}), braces balanced, or None;
    whether the text ends inside a box never closed: a truncated answer). One pass over the text
    (linear time, whatever the nesting or truncation)."""
    opens: list[int | None] = []  # per open brace: where its boxed content starts, if a box
    starts = {m.end() - 1 for m in _BOXED.finditer(text)}  # positions of a boxed's "{"
    last = None
    for i, char in enumerate(text):
        if char == "{":
            opens.append(i + 1 if i in starts else None)
        elif char == "}" and opens:
            start = opens.pop()
            if start is not None:
                last = text[start:i]
    return last, any(start is not None for start in opens)


def _marked_answer(text: str) -> tuple[str | None, str]:
    """(the final answer the completion marks, how): "boxed" (the last complete \\boxed{...},
    MATH/Minerva), else "hash" (the rest of the line after the last non-empty `####`, GSM8K);
    (None, "truncated") if the text ends inside an unclosed \\boxed{ (the final answer was cut
    off: no earlier answer stands in for it); (None, "none") if it marks none."""
    boxed, is_truncated = _scan_boxes(text)
    if is_truncated:
        return None, "truncated"
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed"
    for line in reversed(_HASH_ANSWER.findall(text)):
        if line.strip():
            return line.strip(), "hash"
    return None, "none"


def extract_answer(text: str) -> str | None:
    """The final answer the completion marks, as written: the content of the last complete
    \\boxed{...} (MATH/Minerva), else the rest of the line after the last non-empty `####`
    (GSM8K); None if it marks none (math-verify then reads the whole text, last answer first:
    GSM8K's flexible extraction) or if it ends inside an unclosed \\boxed{ (a truncated answer,
    which scores 0: see `is_truncated`)."""
    return _marked_answer(text)[0]


def is_truncated(text: str) -> bool:
    """Whether the completion ends inside a \\boxed{ never closed: its final answer was cut off,
    and the math and sort rewards score it 0 (no earlier answer stands in for it)."""
    return _scan_boxes(text)[1]


def _normalize_math(text: str) -> str:
    """Choices made before math-verify reads a text: the Unicode minus is a minus; a percent
    sign is dropped, so "50%" is the number 50 (GSM8K writes percentages as the bare number and
    Minerva's normalisation removes "\\%"): "50%" matches 50, not 0.5."""
    return text.replace("\u2212", "-").replace("\\%", "").replace("%", "")


# A number as answers dress it: a sign, a currency sign before or after, thousands separators
# ("1,234", LaTeX's "1{,}234" and "1\,234"; never a plain space: "1 234" is two numbers), a
# decimal part; then the rest, which must be units (`_is_unit_tail`).
_CURRENCY = r"(?:\\\$|\$|€|£|¥|₹|\\euro\b|\\pounds\b|\\yen\b)"
_DRESSED_NUMBER = re.compile(
    rf"(?P<sign>-)?\s*(?:{_CURRENCY}\s*)?(?:(?P<sign2>-)\s*)?"
    r"(?P<int>[0-9]{1,3}(?:(?:,|\{,\}|\\,)[0-9]{3})+|[0-9]+)(?P<frac>\.[0-9]+)?"
    rf"(?:\s*{_CURRENCY})?(?P<tail>.*)",
    re.DOTALL,
)
_UNIT_TOKEN = re.compile(
    r"(?P<sep>(?:\s|~|\\[ ,;:!]|\\q?quad\b|/)+)"
    r"|(?P<degree>\^\s*\{\s*\\circ\s*\}|\^\s*\\circ\b|°|\\degree\b)"
    r"|\\(?:text|textrm|textnormal|mathrm|mbox|operatorname)\s*\{(?P<text>[^{}]*)\}"
    r"|(?P<word>[A-Za-z]+)\.?"
    r"|(?P<power>\^\s*\{\s*[23]\s*\}|\^\s*[23]|[²³])"
)
# Words that change a number's value, never read as its unit: "5 hundred" is not 5.
_VALUE_WORDS = frozenset(
    "hundred hundreds thousand thousands million millions billion billions trillion trillions "
    "dozen dozens half halves third thirds quarter quarters fourth fourths fifth fifths sixth "
    "sixths seventh sevenths eighth eighths ninth ninths tenth tenths hundredth hundredths "
    "thousandth thousandths squared cubed times plus minus over divided pi sqrt root roots "
    "power or and point dot comma below above under less more than negative minus not no "
    "approximately about around nearly almost roughly exactly least most zero one two three "
    "four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety".split()
)  # words that change or qualify the value: the number then is not the answer alone


def _is_unit_word(word: str, is_short_ok: bool = False) -> bool:
    """A unit's word: letters, two at least ("cm", "apples"; one only where it must be a unit:
    after a degree sign as in 90°C, after "km/" as in km/h; "5 x" may be 5x), and not a word that
    changes the value ("hundred", "or")."""
    return (len(word) >= 2 or is_short_ok) and word.lower() not in _VALUE_WORDS


def _is_unit_tail(tail: str) -> bool:
    """Whether the text after a number is only its unit: words (apart from the number by a
    space), \\text{...} words, a degree sign, powers of a unit (cm^2), separators, a period."""
    tail = tail.rstrip().removesuffix(".")
    pos, previous, last_unit = 0, "number", "number"  # the last token; the last but separators
    is_per_unit = False  # after "km/": a one-letter unit may follow (km/h)
    while pos < len(tail):
        m = _UNIT_TOKEN.match(tail, pos)
        if m is None:
            return False
        kind = m.lastgroup
        if kind == "word":
            is_short_ok = last_unit == "degree" or is_per_unit
            if previous not in ("sep", "degree") or not _is_unit_word(m["word"], is_short_ok):
                return False
        elif kind == "text":
            words = [w for w in re.split(r"[\s~/]+", m["text"]) if w]
            if not all(re.fullmatch(r"[A-Za-z]+\.?", w) for w in words):
                return False
            if not all(_is_unit_word(w.rstrip("."), True) for w in words):
                return False
        elif kind == "power" and previous not in ("word", "text"):
            return False
        is_per_unit = kind == "sep" and "/" in m.group() and last_unit in ("word", "text")
        previous, last_unit = kind, (last_unit if kind == "sep" else kind)
        pos = m.end()
    return True


_NUMBER_THEN_WORDS = re.compile(r"\s*[-+]?\\?\$?\s*\d[\d,.]*\s+[A-Za-z]")


def bare_number(answer: str) -> str | None:
    """The number of an answer written as a number in common dress, else None: "\\$1,234.50"
    -> "1234.50", "5 apples" and "12 \\text{ cm}" -> "5", "12", "90^\\circ" and "90°" -> "90"
    (`_DRESSED_NUMBER`, `_is_unit_tail`). Used when the gold answer is a number, so that the
    dress is not read as part of the answer (math-verify reads "5 dollars" as a product)."""
    m = _DRESSED_NUMBER.fullmatch(_normalize_math(answer).strip())
    if m is None or (m["sign"] and m["sign2"]) or not _is_unit_tail(m["tail"]):
        return None
    digits = re.sub(r"[^0-9]", "", m["int"])
    return ("-" if m["sign"] or m["sign2"] else "") + digits + (m["frac"] or "")


def _parse_gold(gold: str) -> list:
    """math-verify's reading of a gold answer: the text after `####` (a GSM8K solution), a
    solution with \\boxed{} (MATH), or a bare answer in LaTeX ("\\frac{1}{2}", "1,234", "B")."""
    from math_verify import parse

    gold = _normalize_math(gold)
    if "####" in gold:
        gold = gold.rsplit("####", 1)[1]
    text = gold if ("\\boxed" in gold or "\\fbox" in gold) else f"${gold.strip()}$"
    parsed = parse(text, parsing_timeout=MATH_VERIFY_TIMEOUT_S)
    if not parsed:
        raise ValueError(f"gold answer {gold!r} cannot be read: write it as LaTeX or a number")
    return parsed


def check_math_answer(completion: str, gold: str) -> bool:
    """Whether the completion's final answer is the gold answer (math-verify's extraction and
    symbolic equivalence; runs in a math worker, see `math_reward`). An integer gold answer must
    be matched exactly (no rounding); other numbers as math-verify compares them (6 decimals).
    Raises ValueError for an unreadable gold answer."""
    from math_verify import parse, verify
    from sympy import Number, Rational

    gold_parsed = _parse_gold(str(gold))
    marked, how = _marked_answer(completion)
    if how == "truncated":
        return False  # the final answer was cut off
    bare = bare_number(completion if marked is None else marked)
    if bare is not None and isinstance(gold_parsed[0], Number):
        text = f"${bare}$"  # a number gold: the marked number without its dress (units, $, ...)
    elif (
        marked is not None
        and isinstance(gold_parsed[0], Number)
        and _NUMBER_THEN_WORDS.match(_normalize_math(marked))
    ):
        # a number followed by words that are not its unit ("5 below zero", "2 point five",
        # "5 feet six inches"): math-verify would read the first number alone
        return False
    elif how == "none":
        text = completion  # no marked answer: math-verify's reading of the whole text
    elif how == "boxed":
        text = "\\boxed{" + marked + "}"  # boxed: math-verify's LaTeX normalisation of a box
    else:
        text = marked  # the rest of a `####` line
    text = _SPACED_DIGITS.sub("\n", _normalize_math(text))  # "1 2" is two numbers, not 12
    predicted = parse(text, parsing_timeout=MATH_VERIFY_TIMEOUT_S)
    if not predicted:
        return False
    gold_value, value = gold_parsed[0], predicted[0]
    if getattr(gold_value, "is_Integer", False) and isinstance(value, Number):
        return bool(Rational(value) == gold_value)  # integers exactly
    return verify(gold_parsed, predicted, timeout_seconds=MATH_VERIFY_TIMEOUT_S)


def _serve_math() -> None:
    """The math worker: one JSON request a line on stdin ({"completion", "gold"}), one reply a
    line on stdout ({"ok": bool} or {"error": message}); math-verify's own signal-based time
    limits work here, in a main thread; the parent kills the worker past `MATH_TIMEOUT_S`."""
    import json
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MATH_WORKER_MEMORY_MB << 20,) * 2)
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the reply stream
    check_math_answer("#### 1", "1")  # import and warm up before saying ready
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"ok": check_math_answer(request["completion"], request["gold"])}
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _MathWorker:
    """One worker process and its pipes."""

    def __init__(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        program = (
            f"import sys; sys.path.insert(0, {root!r}); "
            "from llada_train.rl.rewards import _serve_math; _serve_math()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", program],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.buffer = b""
        if self._receive(MATH_WORKER_START_S) != {"ready": True}:
            raise RuntimeError("the math worker did not start")

    def _receive(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"the math worker died (exit {self.proc.wait()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def check(self, completion: str, gold: str) -> bool:
        request = json.dumps({"completion": completion, "gold": gold}) + "\n"
        self.proc.stdin.write(request.encode("utf-8", "surrogatepass"))
        self.proc.stdin.flush()
        reply = self._receive(MATH_TIMEOUT_S)
        if "error" in reply:
            raise ValueError(reply["error"])
        return bool(reply["ok"])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class _MathWorkers:
    """Up to MAX_MATH_WORKERS worker processes (~64 MB each), started on demand and reused; a
    worker past its time limit or broken is killed and replaced. After a fork the child starts
    its own."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.idle: list[_MathWorker] = []
        self.slots = threading.BoundedSemaphore(MAX_MATH_WORKERS)
        # No atexit hook: a worker ends by itself at EOF on its stdin, i.e. when this process
        # exits (an atexit hook here kept lm-eval's watcher from ending on SIGTERM).

    def check(self, completion: str, gold: str) -> bool:
        with self.lock:
            if self.pid != os.getpid():  # forked: the inherited workers belong to the parent
                self.pid, self.idle = os.getpid(), []
                self.slots = threading.BoundedSemaphore(MAX_MATH_WORKERS)
            slots = self.slots
        with slots:
            with self.lock:
                worker = self.idle.pop() if self.idle else None
            if worker is None:
                worker = _MathWorker()
            try:
                is_correct = worker.check(completion, gold)
            except TimeoutError:  # unverifiable in the time limit: not a verified answer
                worker.close()
                logger.info("math check past %s s: scored 0", MATH_TIMEOUT_S)
                return False
            except ValueError:  # a bad gold answer: the worker itself is fine
                with self.lock:
                    self.idle.append(worker)
                raise
            except BaseException:
                worker.close()
                raise
            with self.lock:
                self.idle.append(worker)
            return is_correct

    def close(self) -> None:
        with self.lock:
            workers, self.idle = self.idle, []
        if self.pid == os.getpid():
            for worker in workers:
                worker.close()


_math_workers = _MathWorkers()


def answers_match(predicted: str | None, gold: str) -> bool:
    """Whether a written answer (e.g. from `extract_answer`) is the gold answer, by the math
    reward's checker; False for None."""
    return predicted is not None and _math_workers.check(predicted, str(gold))


def math_reward(completion: str, example: dict) -> float:
    """1.0 iff the completion's final answer is example["answer"] (see the module docstring)."""
    return 1.0 if _math_workers.check(completion, str(example["answer"])) else 0.0


# ---------------------------------------------------------------------------------------------
# Sorting
# ---------------------------------------------------------------------------------------------


def read_numbers(text: str) -> list[Decimal]:
    """The numbers of a text in order of appearance: maximal runs of ASCII digits with an
    optional leading "-" and decimal part ("a: 12, -3 and 4.50" -> [12, -3, 4.5] by value)."""
    return [Decimal(m) for m in _NUMBER.findall(text)]


def sort_reward(completion: str, example: dict) -> float:
    """1.0 iff the numbers of the completion's answer are exactly example["answer"]'s, in the
    same order (see the module docstring: the marked answer if any, else the whole text; text
    other than numbers is ignored). Raises ValueError for a gold answer without a number."""
    gold = read_numbers(str(example["answer"]))
    if not gold:
        raise ValueError(f"gold answer {example['answer']!r} holds no number: write the list")
    if is_truncated(completion):
        return 0.0  # the final answer was cut off
    marked = extract_answer(completion)
    return 1.0 if read_numbers(completion if marked is None else marked) == gold else 0.0


# ---------------------------------------------------------------------------------------------
# Sums (several valid answers)
# ---------------------------------------------------------------------------------------------


def _sum_spec(example: dict) -> tuple[int, int]:
    """(target, number of terms) of a sum record; ValueError saying what to set otherwise."""
    target, terms = str(example.get("answer", "")).strip(), example.get("terms")
    if not re.fullmatch(r"[0-9]+", target):
        raise ValueError(f"sum record with answer {example.get('answer')!r}: set it to the target")
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 1:
        raise ValueError(f"sum record with terms {terms!r}: set it to the number of terms (>= 1)")
    return int(target), terms


def sum_reward(completion: str, example: dict) -> float:
    """1.0 iff the completion's answer is example["terms"] 2-digit numbers (10..99) joined by
    "+", summing to example["answer"] (see the module docstring: the marked answer if any, else
    the last non-empty line). Raises ValueError for a bad record (`_sum_spec`)."""
    target, terms = _sum_spec(example)
    if is_truncated(completion):
        return 0.0  # the final answer was cut off
    answer = extract_answer(completion)
    if answer is None:
        lines = [line for line in completion.split("\n") if line.strip()]
        answer = lines[-1] if lines else ""
    parts = [part.strip() for part in answer.split("+")]
    if len(parts) != terms or not all(_SUM_TERM.fullmatch(part) for part in parts):
        return 0.0
    return 1.0 if sum(map(int, parts)) == target else 0.0


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


def _is_stub(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether a function is a stub: its body only a docstring, `pass`, `...` or a raise of
    NotImplementedError (a signature for the candidate to fill in)."""
    for statement in node.body:
        if isinstance(statement, ast.Pass):
            continue
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # the docstring, or `...`
        if isinstance(statement, ast.Raise) and "NotImplementedError" in ast.unparse(statement):
            continue
        return False
    return True


def trusted_definitions(source: str, entry_point: str) -> str | None:
    """The definitions a record's prompt gives the tests, as source: its imports, assignments,
    classes, and the functions it defines with a body (HumanEval/32's `poly`, /38's
    `encode_cyclic`), in order; None if `source` is not Python or gives none. Left out: the
    entry point and stubs (the candidate's to write: a call of one from the tests goes to the
    candidate's function), and every statement that does something (expressions, loops, ...),
    so that prose which happens to parse runs nothing."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: a null byte
        return None
    kept = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name != entry_point and not _is_stub(node):
                kept.append(node)
        elif isinstance(node, _DEFINITIONS):
            kept.append(node)
    if not kept:
        return None
    return ast.unparse(ast.Module(body=kept, type_ignores=[])) + "\n"


def _prompt_code(prompt: str) -> str:
    """The code of a record's prompt: all its fenced code blocks, in order, if it has any,
    else the prompt itself (a reference helper in an earlier block is trusted code too)."""
    blocks = [m.group(2) for m in _FENCED.finditer(prompt)]
    return "\n".join(blocks) if blocks else prompt


def declared_helpers(example: dict) -> list[str]:
    """The names a code record lets the candidate supply besides its entry point: the stubs of
    its prompt's code (signatures for the candidate to write) and its optional "helpers" list.
    Any other name the tests call must come from trusted code (the prompt's definitions)."""
    names = set(example.get("helpers") or ())
    try:
        tree = ast.parse(_prompt_code(example.get("prompt") or ""))
    except (SyntaxError, ValueError):
        tree = None
    for node in tree.body if tree is not None else ():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_stub(node):
            names.add(node.name)
    names.discard(example.get("entry_point"))
    return sorted(names)


def code_program(completion: str, example: dict) -> dict[str, str | None]:
    """The sandbox job of a code record: the candidate's code, the trusted tests and setup.

    Our records {"prompt", "entry_point", "tests"}: code = the extracted code; tests = the
    record's asserts. HumanEval-style records {"prompt" (code: signature and docstring),
    "entry_point", "test" (defines `check(candidate)`)}: code = the prompt followed by the
    extracted code when that defines the entry point (a whole function written in a chat), else
    by the completion (a continuation of the prompt); tests = `test` + `check(entry_point)`.
    Both: setup = `trusted_definitions` of the prompt's code (all its fenced blocks, or the
    prompt itself), so that helpers the prompt defines (HumanEval/32's `poly`) are there for
    the tests as trusted code, run in the harness; helpers = `declared_helpers` (the prompt's
    stubs and the record's "helpers" list): only those are called in the candidate when the
    tests name them and no trusted code defines them (see `llada_train.rl.sandbox`). Raises
    ValueError for a record with neither "tests" nor "test", KeyError without "entry_point"
    (`check_record` refuses both when data is loaded).
    """
    entry_point = example["entry_point"]
    code = extract_code(completion)
    prompt = example.get("prompt") or ""
    if "tests" in example:
        setup = trusted_definitions(_prompt_code(prompt), entry_point)
        return {"code": code, "tests": example["tests"], "entry_point": entry_point,
                "setup": setup, "helpers": declared_helpers(example)}  # fmt: skip
    if "test" not in example:
        raise ValueError(f"code record without 'tests' or 'test': keys {sorted(example)}")
    defines = re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE)
    code = prompt + "\n" + code if defines else prompt + completion
    tests = f"{example['test']}\n\ncheck({entry_point})\n"
    setup = trusted_definitions(prompt, entry_point)  # HumanEval's prompt is a whole stub
    helpers = declared_helpers({**example, "prompt": prompt})
    return {"code": code, "tests": tests, "entry_point": entry_point, "setup": setup,
            "helpers": helpers}  # fmt: skip


def code_verdict(completion: str, example: dict) -> tuple[float, str | None]:
    """(1.0, None) iff the record's tests pass against the completion's code in the sandbox,
    else (0.0, why): the sandbox's one-line reason, e.g. "tests failed: AssertionError at
    <tests> line 3: assert f(2) == 4", "entry point not defined: ...", "timeout: ...". The tests
    run in a process of their own and reach the candidate only through calls of its functions
    that return plain data (see `llada_train.rl.sandbox`), so no code of the candidate can fake
    a pass. A failure of the sandbox itself raises RuntimeError (an error in `score`)."""
    job = code_program(completion, example)
    result = run_python(
        job["code"],
        tests=job["tests"],
        entry_point=job["entry_point"],
        setup=job["setup"],
        helpers=job["helpers"],
        timeout_s=float(example.get("timeout_s", CODE_TIMEOUT_S)),
    )
    if result.status == "sandbox_error":  # our failure, not the model's: count it as an error
        raise RuntimeError(f"sandbox failed: {result.stderr}")
    if result.passed:
        return 1.0, None
    return 0.0, result.reason or result.status


def code_reward(completion: str, example: dict) -> float:
    """1.0 iff the record's tests pass against the completion's code in the sandbox (see
    `code_verdict`, which also says why a completion scores 0)."""
    return code_verdict(completion, example)[0]


def check_code_record(example: dict) -> None:
    """Raise ValueError, saying what to change, for a code record that cannot be scored: no
    "entry_point" (a function name), no "tests" or "test", tests that do not compile, or tests
    that call a name neither trusted code defines nor the record declares the candidate's."""
    entry_point = example.get("entry_point")
    if not isinstance(entry_point, str) or not entry_point.isidentifier():
        raise ValueError(
            f"code record with entry_point {entry_point!r}: set 'entry_point' to the name of "
            "the function the tests call"
        )
    if isinstance(example.get("tests"), str):
        tests = example["tests"]
    elif isinstance(example.get("test"), str):
        tests = f"{example['test']}\n\ncheck({entry_point})\n"
    else:
        raise ValueError(
            "code record without tests: give 'tests' (asserts calling the entry point) or "
            "HumanEval's 'test' (defining check(candidate))"
        )
    try:
        compile(tests, "<tests>", "exec")
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"the record's tests do not compile: {e}") from None
    # Every name the tests expect from elsewhere must come from trusted code (the built-ins,
    # the prompt's definitions), be the entry point, or be declared the candidate's to write
    # (`declared_helpers`): otherwise any answer would meet a NameError, or a candidate could
    # stand in for a reference the tests rely on.
    import builtins

    from llada_train.rl.sandbox_child import global_reads

    job = code_program("", example)
    trusted: set[str] = set(dir(builtins)) | {entry_point, *job["helpers"]}
    if job["setup"]:
        trusted |= _module_bindings(job["setup"])
    missing = sorted(global_reads(job["tests"]) - trusted)
    if missing:
        raise ValueError(
            f"the tests call {', '.join(missing)}, which no trusted code of the record defines: "
            "define it in the prompt's code (a reference the tests rely on) or, if the candidate "
            "is to write it next to the entry point, list it in 'helpers' or give its stub in "
            "the prompt"
        )


def _module_bindings(source: str) -> set[str]:
    """Names `source` binds at module level (def, class, import, assignment)."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------


def format_reward(completion: str, example: dict) -> float:
    """1.0 iff the answer is given in the expected form: for code records (with "tests" or
    "test") a fenced code block; otherwise a non-empty `\\boxed{...}` or `#### ...` answer
    (`extract_answer`: none where the text ends in an unclosed \\boxed{)."""
    if "tests" in example or "test" in example:
        return 1.0 if _FENCED.search(completion) else 0.0
    return 1.0 if extract_answer(completion) is not None else 0.0


# ---------------------------------------------------------------------------------------------
# Registry and safe scoring
# ---------------------------------------------------------------------------------------------

REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "code": code_reward,
    "sort": sort_reward,
    "sum": sum_reward,
    "format": format_reward,
}


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}: set it to one of {sorted(REWARDS)}")
    return REWARDS[name]


# Rewards that can say why a completion scores 0: reward function -> (value, reason) function.
_VERDICTS: dict[RewardFn, Callable[[str, dict], tuple[float, str | None]]] = {
    code_reward: code_verdict,
}


def check_record(name: str, example: dict) -> None:
    """Raise ValueError, saying what to change, for a record that reward `name` cannot score
    (the fields it reads are missing or malformed), so that data loading refuses it with its
    file and line instead of every score of it failing later. Unknown names: ValueError."""
    get_reward(name)
    if name in ("math", "sort") and example.get("answer") in (None, ""):
        raise ValueError(f"record without 'answer': the {name} reward compares with it")
    if name == "code":
        check_code_record(example)
    if name == "sum":
        _sum_spec(example)


@dataclass(frozen=True)
class RewardResult:
    value: float
    error: str | None  # why the reward failed (value is then 0.0), None if it did not
    reason: str | None = None  # why the value is 0 where the reward says (code), or the error


def score(name: str, completion: str, example: dict) -> RewardResult:
    """Run reward `name`; a reward that raises or returns a non-finite value scores 0.0 with the
    error, so a faulty reward cannot stop training. A wrong answer is no error: where the reward
    says why it scores 0 (code: "tests failed: ..."), that is `reason`. Raises ValueError for an
    unknown name."""
    fn = get_reward(name)
    try:
        verdict = _VERDICTS.get(fn)
        value, reason = verdict(completion, example) if verdict else (fn(completion, example), None)
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"non-finite reward {value}")
        return RewardResult(value, None, reason)
    except Exception as e:
        error = f"{name}: {type(e).__name__}: {e}"
        return RewardResult(0.0, error, error)


def _timed_out(name: str, timeout_s: float | None) -> RewardResult:
    error = f"{name}: timeout after {timeout_s} s"
    return RewardResult(0.0, error, error)


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
            f.result() if f.done() else _timed_out(name, timeout_s)
            for f, name in zip(futures, names, strict=True)
        ]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    errors = [r.error for r in results if r.error is not None]
    if errors:
        logger.warning("%d of %d rewards failed, first: %s", len(errors), len(results), errors[0])
    return [r.value for r in results], len(errors)
