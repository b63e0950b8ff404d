"""The offline tokenizer: build it, load it, and read its special ids.

Contract:
- `build_tokenizer(files, out_dir, vocab_size)` trains a byte-level BPE (the `tokenizers`
  library) and writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`,
  which `transformers.AutoTokenizer.from_pretrained(out_dir)` loads as a fast tokenizer. The same
  input files give byte-identical output files.
- The special tokens sit at fixed ids 0..4 in `SPECIAL_TOKENS` order, are registered as special
  added tokens and are never split: `<|endoftext|>` (EOS and pad), `<|mask|>` (the diffusion
  mask), and the chat markers `<role>`, `</role>`, `<|role_end|>`.
- The vocabulary has exactly `vocab_size` entries: when the corpus runs out of merges first, the
  last ids are unused special tokens `<|reserved_N|>`.
- Byte level, no normalizer: `decode(encode(s)) == s` for any text (ASCII or unicode).
- Digits are always split into single tokens, so "579" is three tokens whatever the corpus; a
  tiny model learns digit-wise arithmetic much faster when a number is never one opaque token.
- The chat template is the LLaDA2 one: every message renders as
  `<role>ROLE</role>CONTENT<|role_end|>` with ROLE in SYSTEM / HUMAN / ASSISTANT for the roles
  system / user / assistant, and `add_generation_prompt=True` appends `<role>ASSISTANT</role>`.
  Unlike the official template, no default system prompt is inserted.
- Text is text: `encode_text` encodes user and data text with every special-token string in it
  (`<|mask|>`, `<role>`, `<|endoftext|>`, ...) split into ordinary tokens, so no text can
  produce a control id; `encode_chat` renders the chat template and encodes the template's own
  pieces with their control ids and every message content with `encode_text`. For contents
  that sit between control tokens (our template and the LLaDA2 one) this gives the same ids as
  encoding the rendered string when the contents hold no special-token string.
- `encode_prompt` (over `prompt_messages`) is the one place a user prompt is put into the chat
  template: the chat CLI, RL prompts and evaluation requests.
- `special_ids(tokenizer)` reads the mask / EOS / pad ids from any tokenizer that has a `<|mask|>`
  token (ours or the official LLaDA2 one: mask 156895, EOS = pad 156892). Library code gets ids
  from here and never hard-codes them.

CLI: `python -m llada_train.tokenizer` rebuilds the shipped tokenizer (`data/tokenizer/`) from
the shipped CPT corpus and SFT training chats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

import llada_train

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
ROLE_END_TOKEN = "<|role_end|>"  # closes every turn in the LLaDA2 chat template
ROLE_TOKENS = ("<role>", "</role>", ROLE_END_TOKEN)
SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN, *ROLE_TOKENS)  # ids 0..4, in this order
RESERVED_TOKEN = "<|reserved_{}|>"  # fills the vocabulary up to vocab_size (ids at the end)

# Chat role -> the role name the LLaDA2 template writes between <role> and </role>.
ROLE_NAMES = {"system": "SYSTEM", "user": "HUMAN", "assistant": "ASSISTANT"}

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set role = 'SYSTEM' -%}"
    "{%- elif message['role'] == 'user' -%}{%- set role = 'HUMAN' -%}"
    "{%- elif message['role'] == 'assistant' -%}{%- set role = 'ASSISTANT' -%}"
    "{%- else -%}{{- raise_exception('Unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<role>' + role + '</role>' + message['content'] + '<|role_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<role>ASSISTANT</role>' -}}{%- endif -%}"
)

# Files that make a folder a tokenizer: fast (tokenizer.json), sentencepiece, or BPE files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SHIPPED_CORPUS = ("shipped/cpt.jsonl", "shipped/sft_train.jsonl")  # relative to DATA_DIR


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the diffusion code needs. `all_special` holds every special id of the
    tokenizer (never a target of random-token noise)."""

    mask_id: int
    eos_id: int
    pad_id: int
    all_special: tuple[int, ...]


def iter_corpus_texts(path: str) -> Iterator[str]:
    """Texts of one corpus file. `.jsonl`: the `text` field, and for chats (`messages`) each
    message's content and role name (the special markers themselves are never trained on, as
    BPE training does not split added tokens out). Any other file: its lines."""
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            yield from f
            return
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if "text" in record:
                yield record["text"]
            for message in record.get("messages", []):
                yield ROLE_NAMES.get(message["role"], message["role"])
                yield message["content"]


def _tokenizer_config(reserved: list[str]) -> dict:
    # Written by hand (not by save_pretrained) so that the files are stable across transformers
    # versions and load in both 4.x (additional_special_tokens) and 5.x.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN,
        "additional_special_tokens": [*ROLE_TOKENS, *reserved],
        "clean_up_tokenization_spaces": False,  # cleanup would break decode(encode(s)) == s
        "model_max_length": 32768,  # the context length of the LLaDA2.x configs
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }


def _special_tokens_map(reserved: list[str]) -> dict:
    return {
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN,
        "additional_special_tokens": [*ROLE_TOKENS, *reserved],
    }


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def build_tokenizer(corpus_files: list[str], out_dir: str, vocab_size: int = 1024) -> None:
    """Train a byte-level BPE of `vocab_size` entries on `corpus_files` and save it to `out_dir`
    in HF format. Deterministic: the same files give byte-identical output."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{256 + len(SPECIAL_TOKENS)} entries (256 bytes + {len(SPECIAL_TOKENS)} specials)."
        )
    for path in corpus_files:
        if not os.path.isfile(path):
            raise ValueError(f"Corpus file {path!r} does not exist.")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # Listed first, so they get ids 0..4 whatever the corpus.
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        show_progress=False,
    )
    texts = (text for path in corpus_files for text in iter_corpus_texts(path))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, (token, tokenizer.token_to_id(token))
    # A small corpus can run out of merges before vocab_size; fill up with reserved specials so
    # that len(tokenizer) == vocab_size == the model's embedding rows, and no id is undecodable.
    reserved = [RESERVED_TOKEN.format(i) for i in range(vocab_size - tokenizer.get_vocab_size())]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in reserved])
    assert tokenizer.get_vocab_size() == vocab_size, tokenizer.get_vocab_size()

    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), _tokenizer_config(reserved))
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), _special_tokens_map(reserved))


def load_tokenizer(path: str | None = None) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(path)`; `path` defaults to the shipped tokenizer."""
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

    path = path or llada_train.DEFAULT_TOKENIZER_DIR
    if not os.path.exists(path):
        raise ValueError(
            f"Tokenizer path {path!r} does not exist. Pass the folder of a saved HF tokenizer (or "
            "of a model), or rebuild the shipped one with `python -m llada_train.tokenizer`."
        )
    if os.path.isdir(path) and not any(
        os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES
    ):
        raise ValueError(
            f"{path}: no tokenizer files (any of {', '.join(TOKENIZER_FILES)}); copy the "
            "tokenizer of the model this directory came from into it, or pass tokenizer=DIR"
        )
    tok_config = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(tok_config) and os.path.exists(os.path.join(path, "tokenizer.json")):
        with open(tok_config) as f:
            tok_class = json.load(f).get("tokenizer_class")
        if tok_class in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            # Load the class directly: AutoTokenizer would also parse a model config.json in the
            # same folder and warn about the (non-transformers) llada2_moe model type.
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ordinary text (user input, data records): special-token strings inside it
    are split like any other text (`split_special_tokens=True`), so `<|mask|>` typed by a user
    is the characters `<|mask|>`, never the mask id. No BOS/EOS is added."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


_SLOT = re.compile("\ue000(\\d+)\ue001")  # a content placeholder (private-use code points)


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template, where only the
    template emits control ids: the template is rendered with a placeholder per message
    content, its own pieces are encoded with special tokens parsed and each content with
    `encode_text`. Raises ValueError (the template's message) for an unknown role."""
    return encode_chat_spans(tokenizer, messages, add_generation_prompt)[0]


def encode_chat_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode_chat`, plus the token span [start, end) of every message's content in the ids
    (message order), so multi-turn SFT can supervise the assistant turns and nothing else."""
    slots = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(
        slots, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    ids: list[int] = []
    spans: dict[int, tuple[int, int]] = {}
    pos = 0
    for m in _SLOT.finditer(rendered):
        if m.start() > pos:
            ids += tokenizer(rendered[pos : m.start()], add_special_tokens=False)["input_ids"]
        k = int(m.group(1))
        start = len(ids)
        ids += encode_text(tokenizer, messages[k]["content"])
        spans[k] = (start, len(ids))
        pos = m.end()
    if pos < len(rendered):
        ids += tokenizer(rendered[pos:], add_special_tokens=False)["input_ids"]
    if sorted(spans) != list(range(len(messages))):
        raise ValueError("the chat template must render every message content exactly once")
    return ids, [spans[k] for k in range(len(messages))]


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    """Mask, EOS and pad ids of `tokenizer`, looked up by token string, never hard-coded."""
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if mask_id is None or mask_id == tokenizer.unk_token_id or mask_id < 0:
        raise ValueError(
            f"The tokenizer has no mask token {MASK_TOKEN!r}. Add it as a special token, e.g. "
            f"`tokenizer.add_special_tokens({{'mask_token': '{MASK_TOKEN}'}})`, and resize the "
            "model's embeddings to the new vocabulary size."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "The tokenizer has no EOS token. Set one, e.g. "
            f"`tokenizer.add_special_tokens({{'eos_token': '{EOS_TOKEN}'}})`."
        )
    eos_id = int(tokenizer.eos_token_id)
    # SFT pads with EOS (SPEC section 3.7), so EOS is the pad when none is set.
    pad_id = eos_id if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
    all_special = tuple(sorted({*tokenizer.all_special_ids, int(mask_id), eos_id, pad_id}))
    return SpecialIds(mask_id=int(mask_id), eos_id=eos_id, pad_id=pad_id, all_special=all_special)


def prompt_messages(text: str, system: str | None = None) -> list[dict[str, str]]:
    """`text` as one user turn, after an optional system message."""
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, text: str, system: str | None, chat_template: bool
) -> list[int]:
    """Prompt ids of a user text: with `chat_template`, one user turn (`prompt_messages`) and the
    generation prompt, encoded by `encode_chat` (the template supplies the only control ids);
    else the raw text (`encode_text`). Special-token strings in `text` and `system` stay text.
    The one place a prompt is put into the template: chat CLI, RL prompts, evaluation."""
    if not chat_template:
        return encode_text(tokenizer, text)
    return encode_chat(tokenizer, prompt_messages(text, system), add_generation_prompt=True)


def resolve_tokenizer(spec: str | None, model_dir: str | None = None):
    """The tokenizer a config names: 'default' -> the shipped one (`data/tokenizer`); a path ->
    that tokenizer; None -> the tokenizer inside `model_dir` (a model directory), or None when
    no `model_dir` is given either (the model config then supplies the special ids)."""
    if spec is None:
        return load_tokenizer(model_dir) if model_dir else None
    return load_tokenizer(llada_train.DEFAULT_TOKENIZER_DIR if spec == "default" else spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--corpus",
        nargs="+",
        default=[os.path.join(llada_train.DATA_DIR, p) for p in SHIPPED_CORPUS],
        help="text or jsonl files to train on (default: the shipped CPT + SFT train data)",
    )
    parser.add_argument("--out", default=llada_train.DEFAULT_TOKENIZER_DIR)
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args(argv)
    build_tokenizer(args.corpus, args.out, args.vocab_size)
    tokenizer = load_tokenizer(args.out)
    ids = special_ids(tokenizer)
    print(
        f"tokenizer: {args.out} | vocab {len(tokenizer)} | mask {ids.mask_id} eos {ids.eos_id} "
        f"pad {ids.pad_id} | {len(ids.all_special)} special ids"
    )


if __name__ == "__main__":
    main()
