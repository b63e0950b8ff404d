"""Chat dataset formats and multi-turn SFT labels (data/formats.py, pipeline.build_sft_example)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from llada_train.data.formats import BadRecord, to_messages
from llada_train.data.pipeline import build_sft_example, load_sft_examples
from llada_train.tokenizer import load_tokenizer, special_ids


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def example(tok, record, **kw):
    args = dict(max_length=256, block_length=32, pad_supervised=True)
    return build_sft_example(record, "f.jsonl:1", tok, special_ids(tok), **{**args, **kw})


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42"},
]
SAME_CHAT = {
    "messages": {"messages": MESSAGES},
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What is 12 + 30?"},
            {"from": "gpt", "value": "42"},
        ]
    },
    "alpaca": {
        "system": "Be brief.",
        "instruction": "What is 12 + 30?",
        "input": "",
        "output": "42",
    },
}


@pytest.mark.parametrize("fmt", sorted(SAME_CHAT))
@pytest.mark.parametrize("explicit", [False, True])
def test_every_format_gives_the_same_example(tok, fmt, explicit):
    record = SAME_CHAT[fmt]
    got = example(tok, record, fmt=fmt if explicit else "auto")
    want = example(tok, {"messages": MESSAGES}, fmt="messages")
    assert got == want


def test_prompt_completion_and_alpaca_input(tok):
    pc = example(tok, {"prompt": "What is 12 + 30?", "completion": "42"})
    assert pc == example(tok, {"messages": MESSAGES[1:]})
    alpaca = to_messages({"instruction": "Add.", "input": "12 + 30", "output": "42"}, "x")
    assert alpaca[0] == {"role": "user", "content": "Add.\n\n12 + 30"}


def test_custom_messages_field(tok):
    got = example(tok, {"chat": MESSAGES}, field="chat")
    assert got == example(tok, {"messages": MESSAGES})


def test_multi_turn_labels_by_hand(tok):
    """3 turns (user/assistant x 3). Written out token by token, 1 = maskable (a response):
    the content and closing <|role_end|> of both earlier assistant turns, the last answer and
    its EOS, and the EOS padding up to 64 (two 32-token blocks); user turns and the template's
    role markers never."""
    chat = [
        {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "4 + 4?"},
        {"role": "assistant", "content": "8"},
    ]

    def user(d: str) -> list[tuple[str, int]]:  # "d + d?" as the shipped BPE splits it
        question = [(d, 0), ("Ġ+", 0), ("Ġ", 0), (d, 0), ("?", 0)]
        return [("<role>", 0), ("HUMAN", 0), ("</role>", 0), *question, ("<|role_end|>", 0)]

    assistant = [("<role>", 0), ("ASSISTANT", 0), ("</role>", 0)]
    want = (
        user("1") + assistant + [("2", 1), ("<|role_end|>", 1)]
        + user("2") + assistant + [("4", 1), ("<|role_end|>", 1)]
        + user("4") + assistant + [("8", 1), ("<|endoftext|>", 1)]
    )  # fmt: skip
    want += [("<|endoftext|>", 1)] * (64 - len(want))  # padding to the block multiple
    ex = example(tok, {"messages": chat})
    got = [
        (t, int(m))
        for t, m in zip(tok.convert_ids_to_tokens(ex.input_ids), ex.maskable, strict=True)
    ]
    assert got == want
    last_only = example(tok, {"messages": chat}, supervise="last")
    assert last_only.input_ids == ex.input_ids  # same layout, only the labels differ
    assert last_only.maskable == [m == 1 and i >= 40 for i, (_, m) in enumerate(want)]


def test_single_turn_is_unchanged_by_supervise(tok):
    record = {"messages": MESSAGES}
    assert example(tok, record, supervise="all") == example(tok, record, supervise="last")


def test_template_and_block_layout_are_the_official_ones(tok):
    """The ids are the chat template's rendering (no special-token text in the contents), then
    the answer and EOS, padded with EOS to a multiple of block_length."""
    chat = MESSAGES + [
        {"role": "user", "content": "And 1 + 1?"},
        {"role": "assistant", "content": "2"},
    ]
    ex = example(tok, {"messages": chat})
    rendered = tok.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=False)
    prompt = tok(rendered, add_special_tokens=False)["input_ids"]
    eos = special_ids(tok).eos_id
    assert ex.input_ids[: len(prompt) + 2] == prompt + tok("2")["input_ids"] + [eos]
    assert len(ex.input_ids) % 32 == 0 and set(ex.input_ids[len(prompt) + 1 :]) == {eos}


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "tool", "content": "x"},
                    {"role": "assistant", "content": "ok"},
                ]
            },
            "no tool role",
        ),  # fmt: skip
        (
            {
                "messages": [
                    {"role": "robot", "content": "hi"},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "unknown role 'robot'",
        ),  # fmt: skip
        ({"question": "hi", "answer": "x"}, "cannot tell the chat format"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "must be the assistant's"),
        ({"instruction": "hi", "output": 3}, "field 'output' must be a string"),
        ({"prompt": "hi", "completion": "  "}, "empty assistant response"),
        ({"conversations": [{"from": "human", "text": "hi"}]}, "needs string fields 'from' and"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_records_name_the_origin(tok, record, message):
    with pytest.raises(BadRecord) as err:
        example(tok, record)
    assert str(err.value).startswith("f.jsonl:1: ") and message in str(err.value)


def test_a_file_of_mixed_formats_loads(tok, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SAME_CHAT.values()))
    cfg = OmegaConf.create(
        {
            "train_files": [str(path)],
            "hub_dataset": None,
            "hub_split": "train",
            "field": None,
            "max_length": 64,
            "pad_supervised": True,
            "on_bad_record": "error",
            "format": "auto",
            "supervise": "all",
        }  # fmt: skip
    )
    examples, skipped = load_sft_examples(cfg, tok, special_ids(tok), 32)
    assert skipped == 0 and len(examples) == 3
    assert examples[0] == examples[1] == examples[2]


def test_heldout_questions_from_chats_and_rl_records(tok, tmp_path):
    """The in-run held-out check reads chats (gold: the answer, by exact match) and RL prompt
    records (scored by their reward: a sum has several valid answers); both prompts are laid
    out alike, and a record its reward cannot score is refused with its file and line."""
    from llada_train.data.pipeline import heldout_right, load_heldout_questions

    ask = "Write the number 231 as a sum of four 2-digit numbers."
    rows = [
        {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": " 9 "}]},
        {"prompt": ask, "answer": "231", "terms": 4, "reward": "sum"},
    ]
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat, rl = load_heldout_questions([str(path)], tok, 5)
    assert chat.prompt_ids == rl.prompt_ids and (chat.gold, chat.record) == ("9", None)
    assert rl.gold == "231" and rl.record["reward"] == "sum"
    assert heldout_right([" 9\n", "19"], [chat, chat]) == [True, False]
    answers = [
        ("48 + 62 + 47 + 74", True),  # the sum's answers: any valid one is right
        ("74 + 47 + 62 + 48", True),
        ("10 + 99 + 99 + 23", True),
        ("48 + 62 + 47 + 75", False),  # sums to 232
        ("48 + 62 + 121", False),  # three terms, one not 2-digit
        ("231", False),
    ]
    texts = [a for a, _ in answers] + ["9", "9"]  # chats and RL records in one batch
    assert heldout_right(texts, [rl] * len(answers) + [chat, rl]) == [
        *(r for _, r in answers),
        True,
        False,
    ]
    with pytest.raises(ValueError, match="1 completions for 2 questions"):
        heldout_right(["9"], [chat, rl])
    assert len(load_heldout_questions([str(path)], tok, 1)) == 1
    # a chat with an extra reward key stays a chat, whatever the key holds
    chats = [
        {"prompt": ask, "completion": "4", "reward": 0.8},
        {"prompt": ask, "completion": "4", "reward": "math", "answer": "5"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in chats))
    for q in load_heldout_questions([str(path)], tok, 5):
        assert (q.gold, q.record) == ("4", None) and q.prompt_ids == rl.prompt_ids
    # an RL record is one whatever data.format says
    path.write_text(json.dumps(rows[1]) + "\n")
    assert load_heldout_questions([str(path)], tok, 5, fmt="messages")[0].record == rows[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": ask, "answer": "231", "reward": "sum"}) + "\n")
    with pytest.raises(BadRecord, match=r"bad.jsonl:1: sum record with terms None"):
        load_heldout_questions([str(bad)], tok, 5)
