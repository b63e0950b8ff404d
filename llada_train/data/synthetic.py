"""Seeded generators of the small synthetic datasets shipped for offline use.

Contract:
- `generate_all(out_dir, eval_dir, seed)` writes, in a second or two:
    out_dir/cpt.jsonl            {"text"}: addition facts, worked sums (column method), word
                                 stories, simple sentences, tiny Python functions
    out_dir/sft_train.jsonl      {"messages"}: one user question, one direct answer ("134"), in
    out_dir/sft_eval.jsonl         three phrasings ("What is 45 + 89?", "Compute ...", "... = ?")
    out_dir/rl_math_train.jsonl  {"prompt", "answer", "reward": "math"}: the same questions
    out_dir/rl_math_eval.jsonl
    out_dir/rl_code_train.jsonl  {"prompt", "entry_point", "tests", "reward": "code"}
    eval_dir/arith_gen.jsonl     {"question", "answer"}: exact-match generation
    eval_dir/arith_mc.jsonl      {"question", "choices", "gold"}: log-likelihood multiple choice
    eval_dir/code_tasks.jsonl    {"prompt", "entry_point", "tests"}
  and the sorting task (long answers whose tokens depend on each other), kept apart in its own
  files so that the addition files and the tokenizer corpus do not change:
    out_dir/sort_sft_train.jsonl {"messages"}: "Sort these numbers: 47 12 89 33 15 71" ->
    out_dir/sort_sft_eval.jsonl    "12 15 33 47 71 89", in three phrasings (`SORT_TEMPLATES`)
    out_dir/sort_rl_train.jsonl  {"prompt", "answer", "reward": "sort"}: the same questions
    out_dir/sort_rl_eval.jsonl
    eval_dir/sort_gen.jsonl      {"question", "answer"}: exact-match generation
  and the sum task (several valid answers per question), in its own files likewise:
    out_dir/sum_sft_train.jsonl  {"messages"}: "Write the number 231 as a sum of four 2-digit
    out_dir/sum_sft_eval.jsonl     numbers." -> "48 + 62 + 47 + 74", in three phrasings
                                   (`SUM_TEMPLATES`), one answer drawn uniformly per chat
    out_dir/sum_rl_train.jsonl   {"prompt", "answer" (the target), "terms", "reward": "sum"}
    out_dir/sum_rl_eval.jsonl
    eval_dir/sum_gen.jsonl       {"question", "answer" (the target), "terms"}: generation, scored
                                 by the sum reward (any valid answer)
- Same seed -> byte-identical files; another seed -> other samples.
- Held-out files (`*_eval`, `eval_dir/*`) are disjoint from training files (CPT, SFT train, RL
  train) **by construction, independent of the seed**: an arithmetic problem (op, a, b) and a
  code task (its entry point) belong to the held-out split iff a fixed hash says so
  (`is_heldout_problem`, `is_heldout_code_task`), and training files draw only from the other
  split. Commutative problems are keyed in canonical order, so "456 + 123" never leaks "123 + 456".
  A sorting problem is keyed by its sorted multiset (`sort_key`), so no order of a held-out list
  appears in a training file (`is_heldout_sort`). A sum problem is keyed by its target and
  number of terms (`is_heldout_sum`, 20% of targets), so a held-out target is asked in no
  phrasing in a training file.
  The working steps of the column method only ever contain digit-sized operands, outside the
  problem range, so they can never state a held-out problem either.
- Problems are 2-digit additions, a + b with 10 <= a, b <= 99, and the chats answer them directly.
  SPEC section 3 quotes 3-digit addition; a 6.5M-parameter tiny model on 2 CPU cores does not
  learn 3-digit (or mixed +, -, *) arithmetic in the minutes a demo has (measured: 0/400 held-out
  after CPT 300 + SFT 1,500 steps), while 2-digit direct addition reaches a clearly non-zero
  held-out accuracy in ~1,500 SFT steps. The problem table (`OPERAND_RANGES`) is one place to
  widen for bigger models.
- Sorting problems: `SORT_LENGTH` = 6 numbers drawn independently and uniformly from 10..99
  (repeats allowed: ~16% of lists hold a repeated number, which the answer repeats); the answer is
  the numbers in ascending order joined by single spaces. With the shipped tokenizer every digit
  is one token and every space before a digit is one token ("Ġ"), so every answer is exactly 17
  tokens (18 with EOS), every prompt 32-44 tokens (the chat template's generation prompt
  included) and every chat 50-62 tokens: prompt + answer + EOS fit one 64-token block (what
  recipes/tiny_sort.yaml trains with) or two 32-token blocks, the answer with its EOS then whole
  in the second block.
- Sum problems: write a target as a sum of `SUM_TERMS` = 4 numbers of 10..99. Targets run from
  40 + `SUM_TARGET_MARGIN` to 396 - `SUM_TARGET_MARGIN` (45..391: every target has at least 56
  ordered answers, `count_sum_answers`); a training chat's answer is drawn uniformly from all
  ordered answers of its target (`sample_sum_answer`), so the ~29 chats per training target show
  ~29 different answers. Four terms, not three: the answer "48 + 62 + 47 + 74" is 14 tokens
  (every digit one token, every " + " two: "Ġ+", "Ġ"), 15 with EOS, 8 digits all coupled through
  the sum (three terms: 10 tokens). Prompts are 32-39 tokens (chat template included), so with
  32-token blocks the answer and its EOS lie whole in the second block (a chat is 47-54 tokens).
  Held out: 20% of targets (10% would leave ~38 targets, too few for 200 distinct held-out
  questions); the held-out files draw distinct question texts (target x phrasing) from all
  three phrasings, the lm-eval file too (the first phrasing alone gives only ~71 questions).
- `code_tasks()` holds every code task with its reference solution (the files do not carry it).

CLI: `python -m llada_train.data.synthetic [--out data/shipped] [--eval-out eval/data] [--seed 0]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import random
from collections.abc import Callable

import llada_train

DEFAULT_OUT = os.path.join(llada_train.DATA_DIR, "shipped")
DEFAULT_EVAL_OUT = os.path.join(llada_train.REPO_ROOT, "eval", "data")

# Sizes: all files together stay well under 3 MB (they are committed).
NUM_CPT_FACT_DOCS = 2500
NUM_CPT_WORKED_DOCS = 500
NUM_CPT_STORY_DOCS = 1000
NUM_CPT_SENTENCE_DOCS = 1000
CPT_CODE_REPEATS = 2  # every training code task appears this many times in the CPT corpus
NUM_SFT_TRAIN = 8000
NUM_SFT_EVAL = 200  # held-out files draw unique problems from the ~410 held-out ones
NUM_RL_MATH_TRAIN = 2000
NUM_RL_MATH_EVAL = 200
NUM_ARITH_GEN = 200
NUM_ARITH_MC = 200
NUM_SORT_SFT_TRAIN = 20000  # the tiny recipe's 1,500 steps of batch 64 see each chat ~5 times
NUM_SORT_SFT_EVAL = 200
NUM_SORT_RL_TRAIN = 2000
NUM_SORT_RL_EVAL = 200
NUM_SORT_GEN = 200
NUM_SUM_SFT_TRAIN = 8000
NUM_SUM_SFT_EVAL = 200  # distinct questions, from the ~213 held-out ones (71 targets x 3)
NUM_SUM_RL_EVAL = 200  # the RL training file holds every training question once (~828)
NUM_SUM_GEN = 200

HELDOUT_PERCENT_PROBLEMS = 10
HELDOUT_PERCENT_CODE = 20

# ---------------------------------------------------------------------------------------------
# Arithmetic problems
# ---------------------------------------------------------------------------------------------

OPERAND_RANGES = {"+": ((10, 99), (10, 99))}  # op -> inclusive (a range, b range)


def solve(op: str, a: int, b: int) -> int:
    if op != "+":
        raise ValueError(f"unsupported operation {op!r}")
    return a + b


def problem_key(op: str, a: int, b: int) -> tuple[str, int, int]:
    """Canonical identity of a problem: commutative operands sorted."""
    if op == "+":
        a, b = min(a, b), max(a, b)
    return (op, a, b)


def _stable_percent(text: str) -> int:
    # Python's hash() is salted per process; a digest gives the same split everywhere.
    return int(hashlib.blake2b(text.encode(), digest_size=8).hexdigest(), 16) % 100


def is_heldout_problem(op: str, a: int, b: int) -> bool:
    return (
        _stable_percent("problem:{}:{}:{}".format(*problem_key(op, a, b)))
        < HELDOUT_PERCENT_PROBLEMS
    )


def sample_problem(rng: random.Random, heldout: bool) -> tuple[str, int, int]:
    """(op, a, b) from the requested split, by rejection."""
    op = rng.choice(sorted(OPERAND_RANGES))
    (a_lo, a_hi), (b_lo, b_hi) = OPERAND_RANGES[op]
    while True:
        a, b = rng.randint(a_lo, a_hi), rng.randint(b_lo, b_hi)
        if is_heldout_problem(op, a, b) == heldout:
            return op, a, b


def sample_unique_problems(
    rng: random.Random, heldout: bool, count: int
) -> list[tuple[str, int, int]]:
    """`count` distinct problems (by canonical key) from one split."""
    problems, seen = [], set()
    for _ in range(count * 100):
        op, a, b = sample_problem(rng, heldout)
        if problem_key(op, a, b) not in seen:
            seen.add(problem_key(op, a, b))
            problems.append((op, a, b))
            if len(problems) == count:
                return problems
    raise RuntimeError(f"could not draw {count} distinct problems; lower the count")


def column_steps(op: str, a: int, b: int) -> list[str]:
    """Working of the column method, one line per digit (ones, tens, hundreds). Operands are
    single digits plus a carry, so no step states a 2-digit problem."""
    if op != "+":
        raise ValueError(f"unsupported operation {op!r}")
    da, db = str(a).zfill(3)[::-1], str(b).zfill(3)[::-1]
    steps, carry = [], 0
    for name, x, y in zip(("ones", "tens", "hundreds"), map(int, da), map(int, db), strict=True):
        value = x + y + carry
        steps.append(f"{name}: {x} + {y} + {carry} = {value}, carry {value // 10}")
        carry = value // 10
    return steps


def worked_solution(op: str, a: int, b: int) -> str:
    c = solve(op, a, b)
    return "\n".join([*column_steps(op, a, b), f"So {a} {op} {b} = {c}.", f"#### {c}"])


# Word problems (CPT stories). Each contains exactly the two operands as numbers.
NAMES = {
    "Tom": "he",
    "Anna": "she",
    "Ben": "he",
    "Lucy": "she",
    "Sam": "he",
    "Mia": "she",
    "Leo": "he",
    "Emma": "she",
    "Omar": "he",
    "Nina": "she",
}
ITEMS = [
    "apples",
    "pens",
    "marbles",
    "stickers",
    "books",
    "cards",
    "shells",
    "coins",
    "stamps",
    "beads",
]
WORD_TEMPLATES = {
    "+": [
        "{name} has {a} {item}. {Pron} gets {b} more {item}. How many {item} does {name} have now?",
        "A library has {a} {item} on one shelf and {b} {item} on another shelf. How many {item} "
        "are on the two shelves together?",
        "{name} collected {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did "
        "{name} collect in total?",
    ],
}


def word_problem(rng: random.Random, op: str, a: int, b: int) -> str:
    name = rng.choice(list(NAMES))
    pron = NAMES[name]
    template = rng.choice(WORD_TEMPLATES[op])
    item = rng.choice(ITEMS)
    return template.format(name=name, Pron=pron.capitalize(), item=item, a=a, b=b)


# ---------------------------------------------------------------------------------------------
# Sorting problems
# ---------------------------------------------------------------------------------------------

SORT_LENGTH = 6  # numbers per list
SORT_RANGE = (10, 99)  # inclusive; 2-digit numbers, so every answer has the same token count
SORT_TEMPLATES = [
    "Sort these numbers: {numbers}",
    "Sort from smallest to largest: {numbers}",
    "Put these numbers in order from smallest to largest: {numbers}",
]
SORT_EVAL_TEMPLATE = SORT_TEMPLATES[0]  # the lm-eval file asks in the first phrasing only


def sort_key(numbers: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Canonical identity of a sorting problem: its multiset, as a sorted tuple (any order of
    the same numbers is the same problem)."""
    return tuple(sorted(numbers))


def is_heldout_sort(numbers: tuple[int, ...] | list[int]) -> bool:
    """Whether a list belongs to the held-out split: a fixed hash of its sorted multiset, the
    same `HELDOUT_PERCENT_PROBLEMS` share as the additions, whatever the seed."""
    key = " ".join(map(str, sort_key(numbers)))
    return _stable_percent("sort:" + key) < HELDOUT_PERCENT_PROBLEMS


def sort_answer(numbers: tuple[int, ...] | list[int]) -> str:
    """The gold answer: the numbers in ascending order (repeats kept), single spaces."""
    return " ".join(map(str, sort_key(numbers)))


def sample_sort_problem(
    rng: random.Random, heldout: bool, length: int = SORT_LENGTH
) -> tuple[int, ...]:
    """`length` numbers in the order they are asked, from the requested split (rejection)."""
    lo, hi = SORT_RANGE
    while True:
        numbers = tuple(rng.randint(lo, hi) for _ in range(length))
        if is_heldout_sort(numbers) == heldout:
            return numbers


def sample_unique_sort_problems(
    rng: random.Random, heldout: bool, count: int, length: int = SORT_LENGTH
) -> list[tuple[int, ...]]:
    """`count` lists of `length` numbers with distinct multisets from one split."""
    problems, seen = [], set()
    for _ in range(count * 100):
        numbers = sample_sort_problem(rng, heldout, length)
        if sort_key(numbers) not in seen:
            seen.add(sort_key(numbers))
            problems.append(numbers)
            if len(problems) == count:
                return problems
    raise RuntimeError(f"could not draw {count} distinct lists; lower the count")


def sort_question(numbers: tuple[int, ...] | list[int], template: str = SORT_EVAL_TEMPLATE) -> str:
    return template.format(numbers=" ".join(map(str, numbers)))


# ---------------------------------------------------------------------------------------------
# Sum problems: several valid answers per question
# ---------------------------------------------------------------------------------------------

SUM_TERMS = 4  # numbers per answer: 14 answer tokens, 8 digits coupled by the sum
SUM_TERM_RANGE = (10, 99)  # inclusive: 2-digit numbers
SUM_TARGET_MARGIN = 5  # targets stay this far inside the reachable sums: >= 56 answers each
HELDOUT_PERCENT_SUM = 20  # of the targets (see the module docstring)
SUM_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
SUM_TEMPLATES = [  # all 32-39 tokens with the chat template for four terms
    "Write the number {target} as a sum of {count} 2-digit numbers.",
    "Express {target} as the sum of {count} 2-digit numbers.",
    "Find {count} 2-digit numbers that add up to exactly {target}.",
]


def sum_targets(terms: int = SUM_TERMS) -> list[int]:
    """Every target asked, both splits: the reachable sums less `SUM_TARGET_MARGIN` at each end
    (near the ends a target has one or a handful of answers)."""
    lo, hi = SUM_TERM_RANGE
    return list(range(terms * lo + SUM_TARGET_MARGIN, terms * hi - SUM_TARGET_MARGIN + 1))


def is_heldout_sum(target: int, terms: int = SUM_TERMS) -> bool:
    """Whether a sum problem belongs to the held-out split: a fixed hash of (terms, target),
    whatever the seed and the phrasing."""
    return _stable_percent(f"sum:{terms}:{target}") < HELDOUT_PERCENT_SUM


@functools.cache
def _sum_counts(terms: int) -> tuple[tuple[int, ...], ...]:
    """counts[j][s]: how many ordered j-tuples of numbers in `SUM_TERM_RANGE` sum to s, for
    j = 0..terms and s = 0..terms * hi."""
    lo, hi = SUM_TERM_RANGE
    counts = [[1] + [0] * (terms * hi)]
    for _ in range(terms):
        previous = counts[-1]
        counts.append(
            [sum(previous[s - x] for x in range(lo, min(hi, s) + 1)) for s in range(len(previous))]
        )
    return tuple(map(tuple, counts))


def count_sum_answers(target: int, terms: int = SUM_TERMS) -> int:
    """How many ordered answers (terms-tuples of 2-digit numbers) sum to `target`."""
    counts = _sum_counts(terms)[terms]
    return counts[target] if 0 <= target < len(counts) else 0


def sample_sum_answer(rng: random.Random, target: int, terms: int = SUM_TERMS) -> tuple[int, ...]:
    """One ordered answer drawn uniformly from all `count_sum_answers(target, terms)`: each term
    in turn, with the probability of the number of ways to complete the rest (exact integers)."""
    lo, hi = SUM_TERM_RANGE
    counts = _sum_counts(terms)
    if count_sum_answers(target, terms) == 0:
        raise ValueError(f"{target} is no sum of {terms} numbers in {lo}..{hi}")
    parts, rest = [], target
    for j in range(terms, 0, -1):
        r = rng.randrange(counts[j][rest])
        for x in range(lo, hi + 1):
            ways = counts[j - 1][rest - x] if 0 <= rest - x < len(counts[j - 1]) else 0
            if r < ways:
                break
            r -= ways
        parts.append(x)
        rest -= x
    assert rest == 0, (target, parts)
    return tuple(parts)


def sum_answer(parts: tuple[int, ...] | list[int]) -> str:
    return " + ".join(map(str, parts))


def sum_question(target: int, template: str = SUM_TEMPLATES[0], terms: int = SUM_TERMS) -> str:
    return template.format(target=target, count=SUM_COUNT_WORDS[terms])


def sum_questions(heldout: bool, terms: int = SUM_TERMS) -> list[tuple[int, str]]:
    """Every (target, question text) of one split, every phrasing, in a fixed order."""
    return [
        (target, sum_question(target, template, terms))
        for target in sum_targets(terms)
        if is_heldout_sum(target, terms) == heldout
        for template in SUM_TEMPLATES
    ]


# ---------------------------------------------------------------------------------------------
# Code tasks
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CodeTask:
    entry_point: str
    prompt: str
    tests: str  # assert lines, one per input
    solution: str  # reference solution (source of the function)
    docstring_solution: str  # the same function with a docstring (for the CPT corpus)
    is_heldout: bool


@dataclasses.dataclass(frozen=True)
class _CodeFamily:
    name: str  # format string of the entry point, over the parameters
    arg: str
    description: str  # imperative, over the parameters ("return x plus {k}")
    body: str  # the returned expression, over the parameters
    params: list[dict]
    fn: Callable  # (**params) -> the reference function, written independently of `body`
    inputs: Callable  # (**params) -> list of inputs for the tests


WORDS = ["banana", "apple", "", "cherry pie", "aardvark", "mississippi", "hello world", "zigzag"]
LISTS = [[1, 2, 3], [], [5, 5, 0, 7], [9, 8, 7, 6, 5, 4], [3], [0, 0, 1, 2, 3, 0]]
NONEMPTY_LISTS = [[1, 2, 3], [5, 5, 0, 7], [-4, -2, -9], [3], [10, 20, 15]]
LETTERS = "abcdefghijklmnopqrstuvwxyz"

CODE_FAMILIES = [
    _CodeFamily(
        "add_{k}",
        "x",
        "return x plus {k}",
        "x + {k}",
        [{"k": k} for k in range(1, 61)],
        lambda k: lambda x: x + k,
        lambda k: [0, 1, 5, -3, 100],
    ),
    _CodeFamily(
        "times_{k}",
        "x",
        "return x multiplied by {k}",
        "x * {k}",
        [{"k": k} for k in range(2, 31)],
        lambda k: lambda x: sum([x] * k),
        lambda k: [0, 1, 4, -2, 11],
    ),
    _CodeFamily(
        "is_multiple_of_{k}",
        "n",
        "return True if n is divisible by {k}, else False",
        "n % {k} == 0",
        [{"k": k} for k in range(2, 31)],
        lambda k: lambda n: (n // k) * k == n,
        lambda k: [0, 1, k, k + 1, 3 * k, 7 * k - 1],
    ),
    _CodeFamily(
        "count_value_{k}",
        "items",
        "return how many times {k} appears in the list items",
        "items.count({k})",
        [{"k": k} for k in range(10)],
        lambda k: lambda items: len([x for x in items if x == k]),
        lambda k: LISTS,
    ),
    _CodeFamily(
        "sum_above_{k}",
        "nums",
        "return the sum of the numbers in nums that are greater than {k}",
        "sum(x for x in nums if x > {k})",
        [{"k": k} for k in range(21)],
        lambda k: lambda nums: sum(filter(lambda x: x > k, nums)),
        lambda k: [[1, 5, 10, 20, 30], [], [k, k + 1, k - 1], [100, -100]],
    ),
    _CodeFamily(
        "repeat_{k}",
        "s",
        "return the string s repeated {k} times",
        "s * {k}",
        [{"k": k} for k in range(2, 10)],
        lambda k: lambda s: "".join(s for _ in range(k)),
        lambda k: WORDS[:4],
    ),
    _CodeFamily(
        "count_char_{c}",
        "s",
        "return how many times the letter '{c}' appears in s",
        "s.count('{c}')",
        [{"c": c} for c in LETTERS],
        lambda c: lambda s: sum(ch == c for ch in s),
        lambda c: WORDS + [c * 3],
    ),
    _CodeFamily(
        "power_{k}",
        "x",
        "return x to the power {k}",
        "x ** {k}",
        [{"k": k} for k in range(2, 7)],
        lambda k: lambda x: _repeated_product(x, k),
        lambda k: [0, 1, 2, -3, 5],
    ),
    _CodeFamily(
        "clamp_{lo}_{hi}",
        "x",
        "return x limited to the range from {lo} to {hi}",
        "max({lo}, min({hi}, x))",
        [{"lo": lo, "hi": hi} for lo in range(6) for hi in (10, 20, 50)],
        lambda lo, hi: lambda x: lo if x < lo else hi if x > hi else x,
        lambda lo, hi: [-5, lo, (lo + hi) // 2, hi, hi + 7],
    ),
    _CodeFamily(
        "last_{k}",
        "items",
        "return a list of the last {k} elements of the list items",
        "items[-{k}:]",
        [{"k": k} for k in range(1, 10)],
        lambda k: lambda items: items[max(len(items) - k, 0) :],
        lambda k: LISTS,
    ),
    _CodeFamily(
        "starts_with_{c}",
        "s",
        "return True if the string s starts with '{c}', else False",
        "s.startswith('{c}')",
        [{"c": c} for c in LETTERS],
        lambda c: lambda s: s[:1] == c,
        lambda c: WORDS + [c + "xyz"],
    ),
    _CodeFamily(
        "max_plus_{k}",
        "nums",
        "return the largest number in nums plus {k}",
        "max(nums) + {k}",
        [{"k": k} for k in range(1, 21)],
        lambda k: lambda nums: sorted(nums)[-1] + k,
        lambda k: NONEMPTY_LISTS,
    ),
]


def _repeated_product(x: int, k: int) -> int:
    result = 1
    for _ in range(k):
        result *= x
    return result


def is_heldout_code_task(entry_point: str) -> bool:
    return _stable_percent("code:" + entry_point) < HELDOUT_PERCENT_CODE


def code_tasks() -> list[CodeTask]:
    """Every code task (both splits), in a fixed order, with reference solutions. The expected
    values of the tests come from `fn`, written independently of the solution source, so the
    tests check that source (tests/test_data.py runs it)."""
    tasks = []
    for family in CODE_FAMILIES:
        for params in family.params:
            entry_point = family.name.format(**params)
            description = family.description.format(**params)
            body = family.body.format(**params)
            fn = family.fn(**params)
            signature = f"{entry_point}({family.arg})"
            tests = "\n".join(
                f"assert {entry_point}({x!r}) == {fn(x)!r}" for x in family.inputs(**params)
            )
            docstring = '"""' + description[0].upper() + description[1:] + '."""'
            tasks.append(
                CodeTask(
                    entry_point=entry_point,
                    prompt=f"Write a Python function `{signature}`. It should {description}.",
                    tests=tests,
                    solution=f"def {signature}:\n    return {body}\n",
                    docstring_solution=f"def {signature}:\n    {docstring}\n    return {body}\n",
                    is_heldout=is_heldout_code_task(entry_point),
                )
            )
    return tasks


def reference_solutions() -> dict[str, str]:
    """entry point -> reference solution source, for every code task."""
    return {task.entry_point: task.solution for task in code_tasks()}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

DIRECT_TEMPLATES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"]
EVAL_TEMPLATE = DIRECT_TEMPLATES[0]  # the eval files ask in the first phrasing only
SENTENCE_TEMPLATES = [
    "{name} likes {color} {item}.",
    "The {animal} is {adj}.",
    "{name} went to the {place} with {name2}.",
    "In the morning, {name} drinks {drink}.",
    "The {color} {animal} sleeps near the {place}.",
    "{name} and {name2} play in the {place}.",
]
WORDBANK = {
    "color": ["red", "blue", "green", "yellow", "black", "white"],
    "animal": ["cat", "dog", "bird", "horse", "fox", "rabbit"],
    "adj": ["small", "happy", "quick", "sleepy", "brave", "quiet"],
    "place": ["park", "market", "river", "school", "garden", "beach"],
    "drink": ["tea", "milk", "water", "coffee", "juice"],
    "item": ITEMS,
}


def _sentence(rng: random.Random) -> str:
    names = rng.sample(list(NAMES), 2)
    fields = {key: rng.choice(values) for key, values in WORDBANK.items()}
    return rng.choice(SENTENCE_TEMPLATES).format(name=names[0], name2=names[1], **fields)


def make_cpt(rng: random.Random, train_code: list[CodeTask]) -> list[dict]:
    docs = []
    for _ in range(NUM_CPT_FACT_DOCS):
        facts = [sample_problem(rng, heldout=False) for _ in range(rng.randint(4, 10))]
        docs.append("\n".join(f"{a} {op} {b} = {solve(op, a, b)}." for op, a, b in facts))
    for _ in range(NUM_CPT_WORKED_DOCS):
        op, a, b = sample_problem(rng, heldout=False)
        docs.append(f"{a} {op} {b} by the column method:\n{worked_solution(op, a, b)}")
    for _ in range(NUM_CPT_STORY_DOCS):
        stories = []
        for _ in range(rng.randint(1, 3)):
            op, a, b = sample_problem(rng, heldout=False)
            stories.append(f"{word_problem(rng, op, a, b)} {a} {op} {b} = {solve(op, a, b)}.")
        docs.append(" ".join(stories))
    for _ in range(NUM_CPT_SENTENCE_DOCS):
        if rng.random() < 0.2:  # counting runs: numbers without operators
            start = rng.randint(0, 990)
            docs.append(f"Counting from {start}: " + ", ".join(map(str, range(start, start + 8))))
        else:
            docs.append(" ".join(_sentence(rng) for _ in range(rng.randint(3, 6))))
    for _ in range(CPT_CODE_REPEATS):
        docs.extend(task.docstring_solution for task in train_code)
    rng.shuffle(docs)
    return [{"text": doc} for doc in docs]


def _question(rng: random.Random, op: str, a: int, b: int) -> str:
    return rng.choice(DIRECT_TEMPLATES).format(a=a, op=op, b=b)


def make_sft(rng: random.Random, num: int, heldout: bool) -> list[dict]:
    """Direct-answer chats; unique problems for the held-out split. Chats stay under one 32-token
    block (prompt, answer and EOS), which keeps tiny SFT steps cheap."""
    problems = (
        sample_unique_problems(rng, heldout=True, count=num)
        if heldout
        else [sample_problem(rng, heldout=False) for _ in range(num)]
    )
    return [
        {
            "messages": [
                {"role": "user", "content": _question(rng, op, a, b)},
                {"role": "assistant", "content": str(solve(op, a, b))},
            ]
        }
        for op, a, b in problems
    ]


def make_rl_math(rng: random.Random, num: int, heldout: bool) -> list[dict]:
    problems = sample_unique_problems(rng, heldout=heldout, count=num)
    return [
        {"prompt": _question(rng, op, a, b), "answer": str(solve(op, a, b)), "reward": "math"}
        for op, a, b in problems
    ]


def make_rl_code(rng: random.Random, tasks: list[CodeTask]) -> list[dict]:
    records = [
        {"prompt": t.prompt, "entry_point": t.entry_point, "tests": t.tests, "reward": "code"}
        for t in tasks
    ]
    rng.shuffle(records)
    return records


def make_arith_gen(rng: random.Random) -> list[dict]:
    problems = sample_unique_problems(rng, heldout=True, count=NUM_ARITH_GEN)
    return [
        {"question": EVAL_TEMPLATE.format(a=a, op=op, b=b), "answer": str(solve(op, a, b))}
        for op, a, b in problems
    ]


def make_arith_mc(rng: random.Random) -> list[dict]:
    records = []
    for op, a, b in sample_unique_problems(rng, heldout=True, count=NUM_ARITH_MC):
        c = solve(op, a, b)
        # Near misses (one digit off) make the task about exact arithmetic, not magnitude.
        near = sorted({c + d for d in (-100, -10, -1, 1, 10, 100) if c + d > 0})
        choices = [c, *rng.sample(near, 3)]
        rng.shuffle(choices)
        records.append(
            {
                "question": EVAL_TEMPLATE.format(a=a, op=op, b=b),
                "choices": [str(x) for x in choices],
                "gold": choices.index(c),
            }
        )
    return records


def make_code_eval(rng: random.Random, tasks: list[CodeTask]) -> list[dict]:
    records = [{"prompt": t.prompt, "entry_point": t.entry_point, "tests": t.tests} for t in tasks]
    rng.shuffle(records)
    return records


def make_sort_sft(
    rng: random.Random, num: int, heldout: bool, length: int = SORT_LENGTH
) -> list[dict]:
    """Sorting chats in the three phrasings, lists of `length` numbers (the shipped files: 6;
    scripts/make_sort_mix.py adds shorter ones); unique lists (by multiset) for the held-out
    split. Every chat fits one 64-token block (see the module docstring)."""
    problems = (
        sample_unique_sort_problems(rng, heldout=True, count=num, length=length)
        if heldout
        else [sample_sort_problem(rng, heldout=False, length=length) for _ in range(num)]
    )
    return [
        {
            "messages": [
                {"role": "user", "content": sort_question(xs, rng.choice(SORT_TEMPLATES))},
                {"role": "assistant", "content": sort_answer(xs)},
            ]
        }
        for xs in problems
    ]


def make_sort_rl(rng: random.Random, num: int, heldout: bool) -> list[dict]:
    problems = sample_unique_sort_problems(rng, heldout=heldout, count=num)
    return [
        {
            "prompt": sort_question(xs, rng.choice(SORT_TEMPLATES)),
            "answer": sort_answer(xs),
            "reward": "sort",
        }
        for xs in problems
    ]


def make_sort_gen(rng: random.Random) -> list[dict]:
    problems = sample_unique_sort_problems(rng, heldout=True, count=NUM_SORT_GEN)
    return [{"question": sort_question(xs), "answer": sort_answer(xs)} for xs in problems]


def _sum_problems(rng: random.Random, num: int | None, heldout: bool) -> list[tuple[int, str]]:
    """(target, question) pairs: held-out, or `num` None: distinct questions (`num` of them, or
    every one, shuffled); training with a `num`: drawn with repeats (target, then phrasing)."""
    questions = sum_questions(heldout)
    if heldout or num is None:
        num = len(questions) if num is None else num
        if num > len(questions):
            raise RuntimeError(f"only {len(questions)} distinct questions; lower the count")
        return rng.sample(questions, num)
    targets = sorted({target for target, _ in questions})
    return [(t, sum_question(t, rng.choice(SUM_TEMPLATES))) for t in rng.choices(targets, k=num)]


def make_sum_sft(rng: random.Random, num: int, heldout: bool) -> list[dict]:
    """Sum chats, each with one answer drawn uniformly from its target's answers; distinct
    questions for the held-out split. Every chat fits two 32-token blocks, the answer whole in
    the second (see the module docstring)."""
    return [
        {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": sum_answer(sample_sum_answer(rng, target))},
            ]
        }
        for target, question in _sum_problems(rng, num, heldout)
    ]


def make_sum_rl(rng: random.Random, num: int | None, heldout: bool) -> list[dict]:
    """RL records: the target as "answer" and the number of terms, so that the sum reward reads
    no prompt. `num` None: every question of the split once."""
    return [
        {"prompt": question, "answer": str(target), "terms": SUM_TERMS, "reward": "sum"}
        for target, question in _sum_problems(rng, num, heldout)
    ]


def make_sum_gen(rng: random.Random) -> list[dict]:
    return [
        {"question": question, "answer": str(target), "terms": SUM_TERMS}
        for target, question in _sum_problems(rng, NUM_SUM_GEN, heldout=True)
    ]


def write_jsonl(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def generate_all(
    out_dir: str = DEFAULT_OUT, eval_dir: str = DEFAULT_EVAL_OUT, seed: int = 0
) -> dict[str, int]:
    """Write every shipped data file; returns {path: number of records}."""

    def rng(name: str) -> random.Random:
        # One stream per file (str seeds are hashed with SHA-512: stable across processes), so
        # resizing one file leaves the others unchanged.
        return random.Random(f"{seed}:{name}")

    tasks = code_tasks()
    train_code = [t for t in tasks if not t.is_heldout]
    heldout_code = [t for t in tasks if t.is_heldout]
    files = {
        os.path.join(out_dir, "cpt.jsonl"): make_cpt(rng("cpt"), train_code),
        os.path.join(out_dir, "sft_train.jsonl"): make_sft(
            rng("sft_train"), NUM_SFT_TRAIN, heldout=False
        ),
        os.path.join(out_dir, "sft_eval.jsonl"): make_sft(rng("sft_eval"), NUM_SFT_EVAL, True),
        os.path.join(out_dir, "rl_math_train.jsonl"): make_rl_math(
            rng("rl_math_train"), NUM_RL_MATH_TRAIN, heldout=False
        ),
        os.path.join(out_dir, "rl_math_eval.jsonl"): make_rl_math(
            rng("rl_math_eval"), NUM_RL_MATH_EVAL, heldout=True
        ),
        os.path.join(out_dir, "rl_code_train.jsonl"): make_rl_code(rng("rl_code"), train_code),
        os.path.join(eval_dir, "arith_gen.jsonl"): make_arith_gen(rng("arith_gen")),
        os.path.join(eval_dir, "arith_mc.jsonl"): make_arith_mc(rng("arith_mc")),
        os.path.join(eval_dir, "code_tasks.jsonl"): make_code_eval(rng("code_eval"), heldout_code),
        os.path.join(out_dir, "sort_sft_train.jsonl"): make_sort_sft(
            rng("sort_sft_train"), NUM_SORT_SFT_TRAIN, heldout=False
        ),
        os.path.join(out_dir, "sort_sft_eval.jsonl"): make_sort_sft(
            rng("sort_sft_eval"), NUM_SORT_SFT_EVAL, heldout=True
        ),
        os.path.join(out_dir, "sort_rl_train.jsonl"): make_sort_rl(
            rng("sort_rl_train"), NUM_SORT_RL_TRAIN, heldout=False
        ),
        os.path.join(out_dir, "sort_rl_eval.jsonl"): make_sort_rl(
            rng("sort_rl_eval"), NUM_SORT_RL_EVAL, heldout=True
        ),
        os.path.join(eval_dir, "sort_gen.jsonl"): make_sort_gen(rng("sort_gen")),
        os.path.join(out_dir, "sum_sft_train.jsonl"): make_sum_sft(
            rng("sum_sft_train"), NUM_SUM_SFT_TRAIN, heldout=False
        ),
        os.path.join(out_dir, "sum_sft_eval.jsonl"): make_sum_sft(
            rng("sum_sft_eval"), NUM_SUM_SFT_EVAL, heldout=True
        ),
        os.path.join(out_dir, "sum_rl_train.jsonl"): make_sum_rl(
            rng("sum_rl_train"), None, heldout=False
        ),
        os.path.join(out_dir, "sum_rl_eval.jsonl"): make_sum_rl(
            rng("sum_rl_eval"), NUM_SUM_RL_EVAL, heldout=True
        ),
        os.path.join(eval_dir, "sum_gen.jsonl"): make_sum_gen(rng("sum_gen")),
    }
    for path, records in files.items():
        write_jsonl(path, records)
    return {path: len(records) for path, records in files.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the shipped synthetic datasets.")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder of the CPT/SFT/RL files")
    parser.add_argument("--eval-out", default=DEFAULT_EVAL_OUT, help="folder of the eval data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = generate_all(args.out, args.eval_out, args.seed)
    for path, count in counts.items():
        print(f"{path}: {count} records, {os.path.getsize(path) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
