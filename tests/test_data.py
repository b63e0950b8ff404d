"""The shipped synthetic datasets: seeded determinism, the committed files are current, train and
held-out files are disjoint, every answer is right (recomputed here from the text), every code
task's tests pass against its reference solution and fail against a wrong one, and the sorting
chats have long answers and fit two 32-token blocks."""

from __future__ import annotations

import json
import os
import re

import pytest

import llada_train
from llada_train.data import synthetic as generate

SHIPPED_DIR = os.path.join(llada_train.DATA_DIR, "shipped")
EVAL_DIR = os.path.join(llada_train.REPO_ROOT, "eval", "data")
SHIPPED_FILES = [
    "cpt.jsonl",
    "sft_train.jsonl",
    "sft_eval.jsonl",
    "rl_math_train.jsonl",
    "rl_math_eval.jsonl",
    "rl_code_train.jsonl",
]
EVAL_FILES = ["arith_gen.jsonl", "arith_mc.jsonl", "code_tasks.jsonl"]
SORT_SHIPPED_FILES = [
    "sort_sft_train.jsonl",
    "sort_sft_eval.jsonl",
    "sort_rl_train.jsonl",
    "sort_rl_eval.jsonl",
]
SORT_EVAL_FILES = ["sort_gen.jsonl"]
ALL_SHIPPED_FILES = SHIPPED_FILES + SORT_SHIPPED_FILES
ALL_EVAL_FILES = EVAL_FILES + SORT_EVAL_FILES

# A chain of integers joined by + followed by "= result": "45 + 89 = 134", and the column steps
# "4 + 9 + 1 = 14". Only two-operand chains are problems; longer ones are digit steps.
EQUATION = re.compile(r"(\d+(?: \+ \d+)+) = (\d+)")
EXPRESSION = re.compile(r"^\D*?(\d+) (\+) (\d+)\D*$")  # a question stating one problem


def _generate(root, seed: int) -> dict[str, list[dict]]:
    out, eval_out = os.path.join(root, "shipped"), os.path.join(root, "eval")
    generate.generate_all(out, eval_out, seed=seed)
    return {name: _read(os.path.join(out, name)) for name in ALL_SHIPPED_FILES} | {
        name: _read(os.path.join(eval_out, name)) for name in ALL_EVAL_FILES
    }


def _read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _paths(root) -> dict[str, str]:
    return {n: os.path.join(root, "shipped", n) for n in ALL_SHIPPED_FILES} | {
        n: os.path.join(root, "eval", n) for n in ALL_EVAL_FILES
    }


@pytest.fixture(scope="module")
def gen_root(tmp_path_factory):
    roots = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        roots[name] = tmp_path_factory.mktemp(name)
        _generate(roots[name], seed)
    return roots


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict]]:
    files = {name: _read(os.path.join(SHIPPED_DIR, name)) for name in ALL_SHIPPED_FILES}
    return files | {name: _read(os.path.join(EVAL_DIR, name)) for name in ALL_EVAL_FILES}


def _key(op: str, a: int, b: int) -> tuple[str, int, int]:
    assert op == "+", op
    return (op, min(a, b), max(a, b))


def _solve(op: str, a: int, b: int) -> int:
    assert op == "+", op
    return a + b


def _question(text: str) -> tuple[str, int, int]:
    """The problem a question (user message, RL prompt, eval question) asks: "a + b"."""
    match = EXPRESSION.match(text)
    assert match, text
    return (match.group(2), int(match.group(1)), int(match.group(3)))


def _equations(text: str) -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2))) for m in EQUATION.finditer(text)]


def _problem_keys_in(text: str) -> set:
    keys = set()
    for lhs, _ in _equations(text):
        parts = lhs.split(" ")
        if len(parts) == 3:
            keys.add(_key(parts[1], int(parts[0]), int(parts[2])))
    return keys


def _split_keys(files: dict[str, list[dict]]) -> tuple[set, set]:
    """(training problem keys, held-out problem keys) stated anywhere in the files."""
    train, heldout = set(), set()
    for record in files["cpt.jsonl"]:
        train |= _problem_keys_in(record["text"])
    for name, keys in (("sft_train.jsonl", train), ("sft_eval.jsonl", heldout)):
        for record in files[name]:
            messages = record["messages"]
            for message in messages:
                keys |= _problem_keys_in(message["content"])
            keys.add(_key(*_question(messages[-2]["content"])))
    for record in files["rl_math_train.jsonl"]:
        train.add(_key(*_question(record["prompt"])))
    for record in files["rl_math_eval.jsonl"]:
        heldout.add(_key(*_question(record["prompt"])))
    for name in ("arith_gen.jsonl", "arith_mc.jsonl"):
        heldout |= {_key(*_question(r["question"])) for r in files[name]}
    return train, heldout


def _code_entry_points(files: dict[str, list[dict]]) -> tuple[set, set]:
    train = {r["entry_point"] for r in files["rl_code_train.jsonl"]}
    heldout = {r["entry_point"] for r in files["code_tasks.jsonl"]}
    for record in files["cpt.jsonl"]:
        train |= set(re.findall(r"^def (\w+)\(", record["text"], flags=re.M))
    return train, heldout


# --- determinism and the committed files ---------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_files(gen_root):
    a, b, c = (_paths(gen_root[n]) for n in "abc")
    for name in a:
        with open(a[name], "rb") as fa, open(b[name], "rb") as fb, open(c[name], "rb") as fc:
            data_a, data_b, data_c = fa.read(), fb.read(), fc.read()
        assert data_a == data_b, name
        assert data_a != data_c, name


def test_shipped_files_are_current(gen_root):
    # The committed files are what `python -m llada_train.data.synthetic` writes (seed 0).
    paths = _paths(gen_root["a"])
    shipped_paths = {n: os.path.join(SHIPPED_DIR, n) for n in ALL_SHIPPED_FILES} | {
        n: os.path.join(EVAL_DIR, n) for n in ALL_EVAL_FILES
    }
    for name, path in paths.items():
        with open(path, "rb") as f, open(shipped_paths[name], "rb") as g:
            assert f.read() == g.read(), f"{name}: run `python -m llada_train.data.synthetic`"


def test_sizes_and_schemas(shipped):
    total = sum(
        os.path.getsize(os.path.join(d, n))
        for d, names in ((SHIPPED_DIR, SHIPPED_FILES), (EVAL_DIR, EVAL_FILES))
        for n in names
    )
    assert total < 3_000_000
    assert 2000 <= len(shipped["cpt.jsonl"]) and all(
        set(r) == {"text"} for r in shipped["cpt.jsonl"]
    )
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        for record in shipped[name]:
            assert [m["role"] for m in record["messages"]] == ["user", "assistant"], record
    for name in ("rl_math_train.jsonl", "rl_math_eval.jsonl"):
        assert all(set(r) == {"prompt", "answer", "reward"} for r in shipped[name])
        assert {r["reward"] for r in shipped[name]} == {"math"}
    assert {r["reward"] for r in shipped["rl_code_train.jsonl"]} == {"code"}
    code_fields = {"prompt", "entry_point", "tests"}
    assert all(set(r) == code_fields | {"reward"} for r in shipped["rl_code_train.jsonl"])
    assert all(set(r) == code_fields for r in shipped["code_tasks.jsonl"])
    assert all(set(r) == {"question", "answer"} for r in shipped["arith_gen.jsonl"])
    assert all(set(r) == {"question", "choices", "gold"} for r in shipped["arith_mc.jsonl"])


# --- disjointness ---------------------------------------------------------------------------------


def test_train_and_heldout_problems_are_disjoint(shipped, gen_root):
    train, heldout = _split_keys(shipped)
    # 4,095 distinct 2-digit additions, ~10% of them held out.
    assert len(train) > 3000 and 300 < len(heldout) < 500
    assert not train & heldout
    # The split does not depend on the seed: seed 1's held-out problems never appear in seed 0's
    # training files, and the reverse.
    other_train, other_heldout = _split_keys(_generate(gen_root["c"], 1))
    assert not train & other_heldout
    assert not other_train & heldout
    # Held-out files of one kind hold no duplicates (every eval item counts once).
    for name, field in (
        ("sft_eval.jsonl", None),
        ("rl_math_eval.jsonl", "prompt"),
        ("arith_gen.jsonl", "question"),
        ("arith_mc.jsonl", "question"),
    ):
        texts = [r[field] if field else r["messages"][-2]["content"] for r in shipped[name]]
        keys = [_key(*_question(text)) for text in texts]
        assert len(keys) == len(set(keys)), name


def test_train_and_heldout_code_tasks_are_disjoint(shipped):
    train, heldout = _code_entry_points(shipped)
    assert len(train) > 150 and len(heldout) > 30
    assert not train & heldout
    all_tasks = {t.entry_point for t in generate.code_tasks()}
    assert train | heldout == all_tasks  # every task is used, on one side only


# --- answers --------------------------------------------------------------------------------------


def test_every_stated_equation_is_right(shipped):
    num_checked = 0
    texts = [r["text"] for r in shipped["cpt.jsonl"]]
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        texts += [m["content"] for r in shipped[name] for m in r["messages"]]
    for text in texts:
        for lhs, result in _equations(text):
            assert sum(map(int, lhs.split(" + "))) == result, (lhs, result, text)
            num_checked += 1
    assert num_checked > 20_000


def test_sft_chats_fit_one_block():
    # The tiny recipes rely on it: prompt + answer + EOS of every chat fit one 32-token block.
    from llada_train.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        for record in _read(os.path.join(SHIPPED_DIR, name)):
            text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
            assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 32, record


def test_sft_final_answers(shipped):
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        for record in shipped[name]:
            messages = record["messages"]
            assert messages[-1]["content"] == str(_solve(*_question(messages[-2]["content"])))


def test_rl_math_answers(shipped):
    for name in ("rl_math_train.jsonl", "rl_math_eval.jsonl"):
        for record in shipped[name]:
            assert record["answer"] == str(_solve(*_question(record["prompt"]))), record


def test_arith_eval_answers(shipped):
    for record in shipped["arith_gen.jsonl"]:
        assert record["answer"] == str(_solve(*_question(record["question"])))
    for record in shipped["arith_mc.jsonl"]:
        correct = str(_solve(*_question(record["question"])))
        choices = record["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        assert choices[record["gold"]] == correct and choices.count(correct) == 1
        assert all(c.isdigit() for c in choices)
    golds = [r["gold"] for r in shipped["arith_mc.jsonl"]]
    assert len(set(golds)) == 4  # the answer is not always in the same slot


def _run(source: str, tests: str) -> None:
    namespace: dict = {}
    exec(source, namespace)  # trusted code: our own reference solutions and tests
    exec(tests, namespace)


def test_code_tests_pass_reference_and_fail_wrong_solution():
    tasks = generate.code_tasks()
    assert len({t.entry_point for t in tasks}) == len(tasks)
    for task in tasks:
        _run(task.solution, task.tests)
        _run(task.docstring_solution, task.tests)
        wrong = f"def {task.entry_point}(*args):\n    return None\n"
        with pytest.raises(AssertionError):
            _run(wrong, task.tests)


def test_code_files_run_against_reference(shipped):
    solutions = generate.reference_solutions()
    for name in ("rl_code_train.jsonl", "code_tasks.jsonl"):
        for record in shipped[name]:
            assert f"`{record['entry_point']}(" in record["prompt"]
            _run(solutions[record["entry_point"]], record["tests"])


# --- sorting --------------------------------------------------------------------------------------

# A sorting question: one of the phrasings, a colon, six numbers apart by single spaces.
SORT_QUESTION = re.compile(r"^([A-Za-z ]+): ((?:\d+ ){5}\d+)$")


def _sort_question(text: str) -> tuple[str, list[int]]:
    """(phrasing before the colon, the numbers in asked order) of a sorting question."""
    match = SORT_QUESTION.match(text)
    assert match, text
    return match.group(1), [int(x) for x in match.group(2).split(" ")]


def _sort_questions(files: dict[str, list[dict]], name: str) -> list[tuple[str, str]]:
    """(question, gold answer) of every record of a sorting file."""
    records = files[name]
    if name.startswith("sort_sft"):
        return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in records]
    field = "question" if name == "sort_gen.jsonl" else "prompt"
    return [(r[field], r["answer"]) for r in records]


def _sort_split_keys(files: dict[str, list[dict]]) -> tuple[set, set]:
    """(training multisets, held-out multisets) asked anywhere in the sorting files."""
    train, heldout = set(), set()
    for name in SORT_SHIPPED_FILES + SORT_EVAL_FILES:
        keys = train if name.endswith("_train.jsonl") else heldout
        for question, _ in _sort_questions(files, name):
            keys.add(tuple(sorted(_sort_question(question)[1])))
    return train, heldout


def test_sort_sizes_and_schemas(shipped):
    sizes = {
        "sort_sft_train.jsonl": 20000,
        "sort_sft_eval.jsonl": 200,
        "sort_rl_train.jsonl": 2000,
        "sort_rl_eval.jsonl": 200,
        "sort_gen.jsonl": 200,
    }
    assert {name: len(shipped[name]) for name in sizes} == sizes
    total = sum(os.path.getsize(os.path.join(SHIPPED_DIR, n)) for n in SORT_SHIPPED_FILES)
    assert total + os.path.getsize(os.path.join(EVAL_DIR, "sort_gen.jsonl")) < 4_000_000
    for name in ("sort_sft_train.jsonl", "sort_sft_eval.jsonl"):
        for record in shipped[name]:
            assert set(record) == {"messages"}, record
            assert [m["role"] for m in record["messages"]] == ["user", "assistant"], record
    for name in ("sort_rl_train.jsonl", "sort_rl_eval.jsonl"):
        assert all(set(r) == {"prompt", "answer", "reward"} for r in shipped[name])
        assert {r["reward"] for r in shipped[name]} == {"sort"}
    assert all(set(r) == {"question", "answer"} for r in shipped["sort_gen.jsonl"])


def test_sort_answers_are_the_sorted_questions(shipped):
    phrasings = {t.split(":")[0] for t in generate.SORT_TEMPLATES}
    num_repeats = 0
    for name in SORT_SHIPPED_FILES + SORT_EVAL_FILES:
        used = set()
        for question, answer in _sort_questions(shipped, name):
            phrasing, numbers = _sort_question(question)
            used.add(phrasing)
            assert len(numbers) == 6 and all(10 <= x <= 99 for x in numbers), question
            assert answer == " ".join(str(x) for x in sorted(numbers)), (question, answer)
            num_repeats += len(set(numbers)) < 6
        # the eval file asks in the first phrasing only; the others use all three
        assert used == ({"Sort these numbers"} if name == "sort_gen.jsonl" else phrasings), name
    # repeats are allowed (~16% of lists: 1 - 90*89*88*87*86*85 / 90**6) and kept in the answer
    num_lists = sum(len(shipped[n]) for n in SORT_SHIPPED_FILES + SORT_EVAL_FILES)
    assert 0.13 < num_repeats / num_lists < 0.19


def test_sort_train_and_heldout_lists_are_disjoint(shipped, gen_root):
    train, heldout = _sort_split_keys(shipped)
    assert len(train) > 20000 and len(heldout) > 200
    assert not train & heldout
    assert all(generate.is_heldout_sort(k) for k in heldout)
    assert not any(generate.is_heldout_sort(k) for k in train)
    # the split is a fixed hash of the multiset, not of the order or the seed
    assert generate.is_heldout_sort((47, 12, 89, 33, 15, 71)) == generate.is_heldout_sort(
        (12, 15, 33, 47, 71, 89)
    )
    other_train, other_heldout = _sort_split_keys(_generate(gen_root["c"], 1))
    assert not train & other_heldout and not other_train & heldout
    # held-out files hold each list once (every eval item counts once)
    for name in ("sort_sft_eval.jsonl", "sort_rl_eval.jsonl", "sort_gen.jsonl"):
        keys = [tuple(sorted(_sort_question(q)[1])) for q, _ in _sort_questions(shipped, name)]
        assert len(keys) == len(set(keys)), name


def test_sort_heldout_share_is_ten_percent():
    import random

    rng = random.Random(0)
    lists = [[rng.randint(10, 99) for _ in range(6)] for _ in range(20000)]
    share = sum(map(generate.is_heldout_sort, lists)) / len(lists)
    assert 0.09 < share < 0.11, share


def test_sort_chats_fit_two_blocks_with_long_answers(shipped):
    """Every sorting answer is 17 tokens (each digit one token, each space one "Ġ"; >= 16 is
    what the task is for) and every question's length is fixed by its phrasing (all 20,400 SFT
    and RL texts, batch-encoded as `encode_text` encodes them). Then through the SFT pipeline
    itself, on the held-out chats and the first 1,000 training ones: a chat is 64 tokens with
    its padding (two 32-token blocks, data.max_length 64) and its prompt (32, 35 or 44 tokens
    by phrasing) fills the first block, so the answer and its EOS lie whole in the second."""
    from llada_train.data.pipeline import build_sft_example
    from llada_train.tokenizer import encode_text, load_tokenizer, special_ids

    tokenizer = load_tokenizer()
    ids = special_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(encode_text(tokenizer, "12 15 33 47 71 89")) == [
        "1", "2", "Ġ", "1", "5", "Ġ", "3", "3", "Ġ", "4", "7", "Ġ", "7", "1", "Ġ", "8", "9"
    ]  # fmt: skip
    pairs = [p for name in SORT_SHIPPED_FILES for p in _sort_questions(shipped, name)]
    questions, answers = zip(*pairs, strict=True)

    def lengths(texts):
        out = tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)
        return [len(x) for x in out["input_ids"]]

    assert set(lengths(answers)) == {17}
    by_phrasing: dict[str, set[int]] = {}
    for question, length in zip(questions, lengths(questions), strict=True):
        by_phrasing.setdefault(_sort_question(question)[0], set()).add(length)
    assert sorted(map(len, by_phrasing.values())) == [1, 1, 1], by_phrasing
    prompt_lengths = set()
    sft = [("sort_sft_eval.jsonl", shipped["sort_sft_eval.jsonl"])]
    sft.append(("sort_sft_train.jsonl", shipped["sort_sft_train.jsonl"][:1000]))
    for name, records in sft:
        for i, record in enumerate(records):
            example = build_sft_example(record, f"{name}:{i + 1}", tokenizer, ids, 64, 32, True)
            answer = encode_text(tokenizer, record["messages"][1]["content"])
            prompt_length = example.maskable.index(True)
            assert len(example.input_ids) == 64, record
            assert example.input_ids[prompt_length : prompt_length + 18] == answer + [ids.eos_id]
            prompt_lengths.add(prompt_length)
    assert prompt_lengths == {32, 35, 44}  # the longest chat: 44 + 17 + EOS = 62 tokens


# --- sums (several valid answers) -----------------------------------------------------------------

SUM_SHIPPED_FILES = [
    "sum_sft_train.jsonl",
    "sum_sft_eval.jsonl",
    "sum_rl_train.jsonl",
    "sum_rl_eval.jsonl",
]
SUM_EVAL_FILES = ["sum_gen.jsonl"]
# A sum question: one of the phrasings, the target its one number besides the "2" of "2-digit".
SUM_QUESTION = re.compile(r"^\D*?(\d+)\D*$")


def _sum_records(root_shipped: str, root_eval: str) -> dict[str, list[dict]]:
    return {n: _read(os.path.join(root_shipped, n)) for n in SUM_SHIPPED_FILES} | {
        n: _read(os.path.join(root_eval, n)) for n in SUM_EVAL_FILES
    }


def _sum_questions(files: dict[str, list[dict]], name: str) -> list[tuple[str, str]]:
    """(question, answer) of every record: the SFT answer, or the target of RL and eval."""
    if name.startswith("sum_sft"):
        return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in files[name]]
    field = "question" if name == "sum_gen.jsonl" else "prompt"
    return [(r[field], r["answer"]) for r in files[name]]


def _sum_target(question: str) -> int:
    match = SUM_QUESTION.match(question.replace("2-digit", "two-digit"))
    assert match, question
    return int(match.group(1))


def test_sum_shipped_files_are_the_generators_bytes(gen_root):
    """`python -m llada_train.data.synthetic` writes the committed sum files byte for byte (seed
    0); the same seed twice gives the same bytes, another seed other ones."""
    for names, shipped_dir, sub in (
        (SUM_SHIPPED_FILES, SHIPPED_DIR, "shipped"),
        (SUM_EVAL_FILES, EVAL_DIR, "eval"),
    ):
        for name in names:
            a, b, c = (os.path.join(gen_root[r], sub, name) for r in "abc")
            with open(a, "rb") as fa, open(b, "rb") as fb, open(c, "rb") as fc:
                data_a, data_b, data_c = fa.read(), fb.read(), fc.read()
            with open(os.path.join(shipped_dir, name), "rb") as f:
                assert f.read() == data_a, f"{name}: run `python -m llada_train.data.synthetic`"
            assert data_a == data_b and data_a != data_c, name


def test_sum_sizes_schemas_and_answers():
    files = _sum_records(SHIPPED_DIR, EVAL_DIR)
    sizes = {n: len(files[n]) for n in files}
    num_train_questions = len(generate.sum_questions(heldout=False))
    assert sizes == {
        "sum_sft_train.jsonl": 8000,
        "sum_sft_eval.jsonl": 200,
        "sum_rl_train.jsonl": num_train_questions,  # every training question once
        "sum_rl_eval.jsonl": 200,
        "sum_gen.jsonl": 200,
    }
    assert 800 < num_train_questions < 900
    for name in ("sum_rl_train.jsonl", "sum_rl_eval.jsonl"):
        assert all(set(r) == {"prompt", "answer", "terms", "reward"} for r in files[name])
        assert {(r["reward"], r["terms"]) for r in files[name]} == {("sum", 4)}
    assert all(set(r) == {"question", "answer", "terms"} for r in files["sum_gen.jsonl"])
    phrasings = {t[:4] for t in generate.SUM_TEMPLATES}  # "Writ", "Expr", "Find"
    for name in SUM_SHIPPED_FILES + SUM_EVAL_FILES:
        used = set()
        for question, answer in _sum_questions(files, name):
            target = _sum_target(question)
            assert 45 <= target <= 391, question
            used.add(question[:4])
            if name.startswith("sum_sft"):  # four 2-digit numbers summing to the target
                terms = [int(x) for x in answer.split(" + ")]
                assert len(terms) == 4 and all(10 <= x <= 99 for x in terms), answer
                assert sum(terms) == target and answer == " + ".join(map(str, terms)), question
            else:
                assert answer == str(target), question
        assert used == phrasings, name  # every file asks in all three phrasings


def test_sum_training_answers_vary_per_question():
    """The training data itself shows that a question has many answers: each training target
    is asked ~29 times, with (nearly) as many different answers."""
    records = _read(os.path.join(SHIPPED_DIR, "sum_sft_train.jsonl"))
    answers: dict[int, set[str]] = {}
    for record in records:
        question, answer = (m["content"] for m in record["messages"])
        answers.setdefault(_sum_target(question), set()).add(answer)
    assert len(answers) == len({t for t, _ in generate.sum_questions(heldout=False)})
    assert sum(map(len, answers.values())) > 0.95 * len(records)


def test_sum_train_and_heldout_questions_are_disjoint(gen_root):
    """No held-out question text (nor target, in any phrasing) is in a training file, whatever
    the seed; the held-out files hold each question once."""

    def split(files):
        train, heldout = set(), set()
        for name in SUM_SHIPPED_FILES + SUM_EVAL_FILES:
            side = train if name.endswith("_train.jsonl") else heldout
            side |= {q for q, _ in _sum_questions(files, name)}
        return train, heldout

    train, heldout = split(_sum_records(SHIPPED_DIR, EVAL_DIR))
    assert len(train) > 800 and len(heldout) > 200 and not train & heldout
    train_targets, heldout_targets = ({_sum_target(q) for q in s} for s in (train, heldout))
    assert not train_targets & heldout_targets
    assert all(generate.is_heldout_sum(t) for t in heldout_targets)
    assert not any(generate.is_heldout_sum(t) for t in train_targets)
    root = gen_root["c"]
    other = _sum_records(os.path.join(root, "shipped"), os.path.join(root, "eval"))
    other_train, other_heldout = split(other)
    assert not train & other_heldout and not other_train & heldout
    for name in ("sum_sft_eval.jsonl", "sum_rl_eval.jsonl", "sum_gen.jsonl"):
        questions = [q for q, _ in _sum_questions(_sum_records(SHIPPED_DIR, EVAL_DIR), name)]
        assert len(questions) == len(set(questions)), name


def test_sum_answers_are_drawn_uniformly():
    """count_sum_answers by hand for the smallest targets (stars and bars: 4 terms of 10..99
    summing to 40 + e, e <= 89, is C(e + 3, 3)), and the sampler draws every answer of target
    45 (56 of them) about equally often."""
    import collections
    import random

    assert [generate.count_sum_answers(40 + e) for e in range(6)] == [1, 4, 10, 20, 35, 56]
    assert generate.count_sum_answers(39) == generate.count_sum_answers(397) == 0
    assert generate.count_sum_answers(45) == generate.count_sum_answers(391)  # symmetric
    rng = random.Random(0)
    counts = collections.Counter(generate.sample_sum_answer(rng, 45) for _ in range(5600))
    assert len(counts) == 56 and all(sum(a) == 45 for a in counts)
    assert 60 <= min(counts.values()) and max(counts.values()) <= 145  # ~100 each


def test_sum_chats_fit_two_blocks_answer_whole_in_the_second():
    """Every sum answer is 14 tokens (digits one token each, " + " two: "Ġ+", "Ġ"); through the
    SFT pipeline, the held-out chats and the first 500 training ones are 64 tokens with their
    padding and their prompts (32-39 tokens) fill the first 32-token block, so the answer and
    its EOS lie whole in the second."""
    from llada_train.data.pipeline import build_sft_example
    from llada_train.tokenizer import encode_text, load_tokenizer, special_ids

    tokenizer = load_tokenizer()
    ids = special_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(encode_text(tokenizer, "48 + 62 + 47 + 74")) == [
        "4", "8", "Ġ+", "Ġ", "6", "2", "Ġ+", "Ġ", "4", "7", "Ġ+", "Ġ", "7", "4"
    ]  # fmt: skip
    records = _read(os.path.join(SHIPPED_DIR, "sum_sft_eval.jsonl"))
    records += _read(os.path.join(SHIPPED_DIR, "sum_sft_train.jsonl"))[:500]
    prompt_lengths = set()
    for i, record in enumerate(records):
        example = build_sft_example(record, f"sum:{i + 1}", tokenizer, ids, 64, 32, True)
        answer = encode_text(tokenizer, record["messages"][1]["content"])
        prompt_length = example.maskable.index(True)
        assert len(answer) == 14 and len(example.input_ids) == 64, record
        assert example.input_ids[prompt_length : prompt_length + 15] == answer + [ids.eos_id]
        prompt_lengths.add(prompt_length)
    assert min(prompt_lengths) >= 32 and max(prompt_lengths) + 15 <= 64, prompt_lengths
