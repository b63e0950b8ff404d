"""From records on disk to model-ready batches for CPT and SFT.

Contract:
- Sources: local `.jsonl` / `.json` / `.parquet` files (several allowed), or a `datasets` hub
  name / a directory written by `Dataset.save_to_disk`. Every record keeps its origin
  ("file:line" for jsonl) so a bad record is reported where it is.
- Text is text: record text is encoded by `tokenizer.encode_text` / `encode_chat`, so a
  special-token string inside a record (`<|mask|>`, `<|endoftext|>`, `<role>`) is ordinary
  tokens; the mask id is never a target and the only EOS of a response is the appended one.
- SFT (`messages`): the prompt is every message before the last, rendered by the tokenizer's
  chat template with the generation prompt; the response is the last message (must be the
  assistant's, non-empty) followed by EOS. The example is padded with EOS to a multiple of
  block_length. Prompt tokens are never maskable; response and EOS are; the padding is when
  `pad_supervised` (the official model learned to stop by predicting EOS into the padding).
- CPT (`text`): documents + EOS are concatenated and cut into sequences of `max_length`; every
  token is maskable; `doc_ids` numbers the documents inside each sequence (document mask). A
  chat record (any SFT format) in a CPT corpus is one document: its SFT layout without the
  block padding (a mid-training mix).
- Bad records (missing/empty field, wrong types, too long) raise a ValueError naming origin and
  what to change, or with on_bad_record=skip are dropped and counted.
- `GlobalBatches`: the example order is a seeded permutation per epoch, identical on every rank;
  global step s takes the next `global_batch_size` examples, sorted by length, and rank r takes
  its contiguous share, split into micro-batches. A position is a pure function of the step,
  so resume is exact and 2 processes see exactly the examples 1 process sees.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from llada_train.data.formats import BadRecord, detect_format, to_messages
from llada_train.tokenizer import (
    ROLE_END_TOKEN,
    SpecialIds,
    encode_chat_spans,
    encode_prompt,
    encode_text,
)


@dataclass
class Example:
    input_ids: list[int]
    maskable: list[bool]
    doc_ids: list[int] | None = None


@dataclass
class Batch:
    x0: torch.Tensor  # (B, L) clean tokens
    maskable: torch.Tensor  # (B, L) bool
    doc_ids: torch.Tensor | None  # (B, L) or None
    example_index: list[int]  # global index of each row inside its optimizer step


SUPERVISE = ("all", "last")  # SFT: which assistant turns are responses (maskable)


# ---------------------------------------------------------------------------- reading
def read_records(files: list[str], hub_dataset: str | None = None, hub_split: str = "train"):
    """Yield (record dict, origin string) from local files or a datasets source."""
    if hub_dataset:
        import datasets

        if os.path.isdir(hub_dataset) and os.path.exists(
            os.path.join(hub_dataset, "dataset_info.json")
        ):
            ds = datasets.load_from_disk(hub_dataset)
        elif os.path.isdir(hub_dataset) and os.path.exists(os.path.join(hub_dataset, "state.json")):
            ds = datasets.load_from_disk(hub_dataset)
        else:
            ds = datasets.load_dataset(hub_dataset, split=hub_split)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[hub_split]
        for i, rec in enumerate(ds):
            yield rec, f"{hub_dataset}[{hub_split}] row {i}"
        return
    if not files:
        raise ValueError("data.train_files is empty: give local files or data.hub_dataset")
    for path in files:
        if not os.path.exists(path):
            raise ValueError(f"data file not found: {path}")
        if not path.endswith((".jsonl", ".json", ".parquet")):
            raise ValueError(f"{path}: unsupported data file type (use .jsonl, .json or .parquet)")
        count = 0
        for rec, origin in _read_file(path):
            count += 1
            yield rec, origin
        if count == 0:
            raise ValueError(f"{path}: no records (the file is empty); remove it from the list")


def _text_line(raw: bytes, path: str, lineno: int | None) -> str:
    """Decode UTF-8 or name the place: a BadRecord with file, line and byte column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}:{lineno}" if lineno is not None else path
        raise BadRecord(
            f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "re-save the file as UTF-8"
        ) from None


def _read_file(path: str) -> Iterator[tuple[dict, str]]:
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _text_line(raw, path, lineno)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadRecord(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                yield rec, f"{path}:{lineno}"
    elif path.endswith(".json"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # name the line: decode it alone for the message
            start = raw.rfind(b"\n", 0, e.start) + 1
            end = raw.find(b"\n", e.start)
            lineno = raw[:start].count(b"\n") + 1
            _text_line(raw[start : end if end >= 0 else len(raw)], path, lineno)
            raise AssertionError("unreachable: the line holds the bad byte") from None
        if not text.strip():
            return
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecord(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(recs, list):
            raise BadRecord(f"{path}: expected a JSON list of records")
        for i, rec in enumerate(recs):
            yield rec, f"{path}[{i}]"
    else:
        import datasets

        for i, rec in enumerate(datasets.Dataset.from_parquet(path)):
            yield rec, f"{path} row {i}"


# ---------------------------------------------------------------------------- SFT
def _prompt_spans(tokenizer, messages: list[dict], origin: str):
    """(prompt ids, spans): every message before the last rendered by the chat template with
    the generation prompt (`tokenizer.encode_chat_spans`). Raises BadRecord naming `origin`
    for what the template refuses (an unknown role)."""
    try:
        return encode_chat_spans(tokenizer, messages[:-1], add_generation_prompt=True)
    except ValueError as e:  # the template's own check
        raise BadRecord(f"{origin}: {e}") from None


def build_sft_example(
    record: dict,
    origin: str,
    tokenizer,
    ids: SpecialIds,
    max_length: int,
    block_length: int,
    pad_supervised: bool,
    field: str | None = None,
    fmt: str = "auto",
    supervise: str = "all",
) -> Example:
    """One chat record (any format of `formats.FORMATS`) -> token ids and maskable flags.

    Layout (SPEC section 3.7): the chat template's rendering of every message before the last,
    with the generation prompt, then the last (assistant) message and EOS, then EOS padding to
    a multiple of `block_length`. Maskable: the last response and its EOS; the padding when
    `pad_supervised`; with supervise="all" also every earlier assistant turn's content and the
    `<|role_end|>` that closes it (so the model learns to end a turn as the template does);
    system and user turns and the template's own tokens never.
    Raises BadRecord naming `origin` for a record that does not fit.
    """
    if supervise not in SUPERVISE:
        raise ValueError(f"data.supervise must be one of {SUPERVISE}, got {supervise!r}")
    messages = to_messages(record, origin, fmt, field)
    # Text is text: special-token strings in the messages are encoded as ordinary tokens; only
    # the chat template emits control ids, and the response ends with the one real EOS.
    prompt_ids, spans = _prompt_spans(tokenizer, messages, origin)
    prompt_maskable = [False] * len(prompt_ids)
    if supervise == "all":
        role_end = tokenizer.convert_tokens_to_ids(ROLE_END_TOKEN)
        for message, (begin, stop) in zip(messages[:-1], spans, strict=True):
            if message["role"] != "assistant":
                continue
            prompt_maskable[begin:stop] = [True] * (stop - begin)
            if stop < len(prompt_ids) and prompt_ids[stop] == role_end:
                prompt_maskable[stop] = True  # the end of the turn is part of the answer
    response_ids = encode_text(tokenizer, messages[-1]["content"]) + [ids.eos_id]
    n = len(prompt_ids) + len(response_ids)
    if n > max_length:
        raise BadRecord(
            f"{origin}: {n} tokens exceed data.max_length={max_length} (raise it or skip)"
        )
    input_ids = prompt_ids + response_ids
    assert ids.mask_id not in input_ids, origin  # the mask id is never a training target
    padded = -(-n // block_length) * block_length
    pad = padded - n
    return Example(
        input_ids=input_ids + [ids.eos_id] * pad,
        maskable=prompt_maskable + [True] * len(response_ids) + [pad_supervised] * pad,
    )


def load_sft_examples(
    data_cfg, tokenizer, ids: SpecialIds, block_length: int
) -> tuple[list[Example], int]:
    """All SFT examples of the configured source and the number of skipped bad records."""
    examples, skipped = [], 0
    for rec, origin in read_records(
        list(data_cfg.train_files), data_cfg.hub_dataset, data_cfg.hub_split
    ):
        try:
            examples.append(
                build_sft_example(
                    rec,
                    origin,
                    tokenizer,
                    ids,
                    data_cfg.max_length,
                    block_length,
                    data_cfg.pad_supervised,
                    data_cfg.field,
                    data_cfg.format,
                    data_cfg.supervise,
                )  # fmt: skip
            )
        except BadRecord:
            if data_cfg.on_bad_record != "skip":
                raise
            skipped += 1
    if not examples:
        raise ValueError("no usable SFT examples in the configured data")
    return examples, skipped


class HeldoutQuestion(NamedTuple):
    """One question of the in-run held-out check (`heldout.files`)."""

    prompt_ids: list[int]  # the prompt as SFT lays it out, chat template and generation prompt
    gold: str  # the gold answer, stripped (an RL record's "answer"; "" where it has none)
    record: dict | None = None  # an RL prompt record: scored by its "reward" (rl/rewards.py)


def load_heldout_questions(
    files: list[str], tokenizer, num_questions: int, fmt: str = "auto", field: str | None = None
) -> list[HeldoutQuestion]:
    """The first `num_questions` records of `files` as held-out questions. Two kinds of record:
    - a chat (any SFT format; `fmt` and `field` are the training data's, `data.format` and
      `data.field`): the prompt is every message before the last rendered with the generation
      prompt, exactly as SFT lays it out (`build_sft_example`); the gold is the last
      (assistant) message, stripped, and a completion is right iff it equals the gold;
    - an RL prompt record, one that fits no chat format and has a "prompt" and a "reward"
      name (the RL data format, e.g. data/shipped/sum_rl_eval.jsonl; whatever `fmt` says): the
      prompt is one user turn without a system message (`encode_prompt`, as RL with no
      `data.system` and the evaluation put it), and a completion is right iff the record's
      reward (`rl.rewards.score`) is 1. For tasks with several valid answers (the sum task),
      where no single gold exists. Only the "prompt" and "reward" fields are read for this
      (RL's `data.prompt_field`, `data.reward` and `data.system` do not apply).
    Raises BadRecord naming the file and line of a bad record (also an RL record its reward
    cannot score, `rewards.check_record`), ValueError when there is none."""
    from llada_train.rl.rewards import check_record

    questions = []
    for rec, origin in read_records(files):
        if _is_rl_prompt_record(rec, field):
            prompt = rec["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise BadRecord(
                    f"{origin}: field 'prompt' of an RL prompt record must be a non-empty string"
                )
            try:
                check_record(rec["reward"], rec)
            except ValueError as e:
                raise BadRecord(f"{origin}: {e}") from None
            prompt_ids = encode_prompt(tokenizer, prompt, None, True)
            questions.append(HeldoutQuestion(prompt_ids, str(rec.get("answer", "")).strip(), rec))
        else:
            messages = to_messages(rec, origin, fmt, field)
            prompt_ids, _ = _prompt_spans(tokenizer, messages, origin)
            questions.append(HeldoutQuestion(prompt_ids, messages[-1]["content"].strip()))
        if len(questions) == num_questions:
            break
    if not questions:
        raise ValueError(
            f"heldout.files {files}: no records; name a file of SFT chats or RL prompt records"
        )
    return questions


def _is_rl_prompt_record(rec: object, field: str | None) -> bool:
    """An RL prompt record for the held-out check: a "prompt", a reward name (a string) and no
    chat format that fits (a chat with an extra "reward" key stays a chat)."""
    return (
        isinstance(rec, dict)
        and "prompt" in rec
        and isinstance(rec.get("reward"), str)
        and detect_format(rec, field) is None
    )


def heldout_right(completions: list[str], questions: list[HeldoutQuestion]) -> list[bool]:
    """Whether each decoded completion answers its held-out question: a chat's stripped
    completion equals its gold; an RL record's reward is 1, scored together by
    `rl.rewards.score_batch` (a thread pool, as RL scores rollouts; a reward that fails is
    logged and scores 0). Raises ValueError when the two lists differ in length."""
    if len(completions) != len(questions):
        raise ValueError(f"{len(completions)} completions for {len(questions)} questions")
    pairs = zip(completions, questions, strict=True)
    right = [q.record is None and c.strip() == q.gold for c, q in pairs]
    rl = [i for i, q in enumerate(questions) if q.record is not None]
    if rl:
        from llada_train.rl.rewards import score_batch

        values, _ = score_batch(
            None, [completions[i] for i in rl], [questions[i].record for i in rl]
        )
        for i, value in zip(rl, values, strict=True):
            right[i] = value >= 1.0
    return right


# ---------------------------------------------------------------------------- SFT packing
PACK = ("auto", "always", "never")


def pack_examples(examples: list[Example], max_length: int, seed: int) -> list[Example]:
    """Several SFT chats per sequence of at most `max_length` tokens (SPEC section 3.7).

    Every chat keeps its own block-multiple padding, so its blocks stay aligned to positions
    that are multiples of block_length and, with the document mask (`doc_ids` numbers the chats
    of a sequence), its loss is the one it has alone (RoPE sees relative positions only). Chats
    are taken in a seeded random order (so a sequence mixes lengths and sources) and added to
    the current sequence while they fit (next fit); a chat longer than max_length cannot occur
    (`build_sft_example` rejects it). Returns the packed examples; the input is not changed.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + 500_000)  # not any epoch's stream
    order = torch.randperm(len(examples), generator=g).tolist()
    packed: list[Example] = []
    ids: list[int] = []
    maskable: list[bool] = []
    docs: list[int] = []
    for i in order:
        e = examples[i]
        if ids and len(ids) + len(e.input_ids) > max_length:
            packed.append(Example(ids, maskable, docs))
            ids, maskable, docs = [], [], []
        doc = docs[-1] + 1 if docs else 0
        ids = ids + e.input_ids
        maskable = maskable + e.maskable
        docs = docs + [doc] * len(e.input_ids)
    if ids:
        packed.append(Example(ids, maskable, docs))
    return packed


def forward_tokens(
    lengths: list[int], global_batch_size: int, micro_batch_size: int, block_length: int
) -> int:
    """Tokens the model processes for one pass over examples of these lengths (in this order),
    batched as `GlobalBatches` does: each global batch sorted by length, each micro-batch
    padded to its longest row, and doubled by the [x_t ; x_0] layout when that row spans more
    than one block. A cost model for `data.pack=auto`, not a measurement."""
    total = 0
    for g in range(0, len(lengths) - global_batch_size + 1, global_batch_size):
        batch = sorted(lengths[g : g + global_batch_size])
        for m in range(0, global_batch_size, micro_batch_size):
            longest = max(batch[m : m + micro_batch_size])
            total += micro_batch_size * longest * (2 if longest > block_length else 1)
    return total


def choose_packing(
    examples: list[Example],
    mode: str,
    max_length: int,
    block_length: int,
    global_batch_size: int,
    micro_batch_size: int,
    seed: int,
    block_sparse: bool = True,
) -> tuple[list[Example], dict[str, float]]:
    """The SFT examples to train on, packed or not, and the figures behind the choice.

    mode "always" packs, "never" does not, "auto" packs iff the attention is block-sparse
    (`block_sparse`: FlexAttention, where a document mask only skips tiles) and the cost model
    (`forward_tokens` per chat, over one pass) is at least 10% lower packed: short single-block
    chats are cheaper alone (one block needs no clean copy, SPEC section 2), long-tailed lengths
    are cheaper packed (no micro-batch padding to the longest chat). With dense SDPA attention
    (the CPU default) the per-batch document mask and the longer rows cost more than packing
    saves (measured: `scripts/bench_packing.py`, docs/finetune.md "Packing"), so auto does
    not pack there. Note that
    `global_batch_size` then counts packed sequences. Raises ValueError for an unknown mode.
    """
    if mode not in PACK:
        raise ValueError(f"data.pack must be one of {PACK}, got {mode!r}")
    if mode == "never":
        return examples, {"packed": 0.0}
    packed = pack_examples(examples, max_length, seed)
    order = epoch_order(len(examples), seed, 0)
    plain_cost = forward_tokens(
        [len(examples[i].input_ids) for i in order], global_batch_size, micro_batch_size,
        block_length,
    )  # fmt: skip
    packed_cost = forward_tokens(
        [len(e.input_ids) for e in packed], global_batch_size, micro_batch_size, block_length
    )
    # per chat: the plain pass covers whole global batches of chats, the packed one of sequences
    plain_per_chat = plain_cost / max(len(examples) // global_batch_size * global_batch_size, 1)
    chats_per_seq = len(examples) / len(packed)
    covered = len(packed) // global_batch_size * global_batch_size
    packed_per_chat = packed_cost / max(covered * chats_per_seq, 1)
    cheaper = covered > 0 and packed_per_chat <= 0.9 * plain_per_chat
    use = mode == "always" or (block_sparse and cheaper)
    figures = {
        "packed": float(use),
        "chats_per_sequence": chats_per_seq,
        "forward_tokens_per_chat_plain": plain_per_chat,
        "forward_tokens_per_chat_packed": packed_per_chat,
    }
    return (packed if use else examples), figures


# ---------------------------------------------------------------------------- CPT
def cpt_document_tokens(
    record: object, origin: str, field: str, tokenizer, ids: SpecialIds
) -> list[int]:
    """One CPT record as the token ids of one document, EOS-terminated; every token a target.

    A text document is `record[field]` + EOS. A record with no `field` whose keys fit a chat
    format (`formats.detect_format`: messages, conversations, instruction+output,
    prompt+completion) is a chat: its SFT layout (`build_sft_example`) without the block
    padding, i.e. the chat template's prompt, the assistant's response and EOS. That is how a
    CPT corpus mixes in instruction data (a mid-training mix, seen in the template the SFT and
    the sampler use). Raises BadRecord naming `origin` for a record that is neither."""
    text = record.get(field) if isinstance(record, dict) else None
    if text is None and isinstance(record, dict) and detect_format(record) is not None:
        # block_length 1: no padding; no length bound (a CPT document spans windows)
        return build_sft_example(record, origin, tokenizer, ids, sys.maxsize, 1, False).input_ids
    if not isinstance(text, str) or not text.strip():
        what = "missing" if text is None else "empty or not a string"
        raise BadRecord(
            f"{origin}: field '{field}' is {what} (a CPT record is a text document, or a "
            "chat in one of the SFT formats: messages, conversations, instruction+output, "
            "prompt+completion)"
        )
    return encode_text(tokenizer, text) + [ids.eos_id]  # special strings stay text


def load_cpt_examples(data_cfg, tokenizer, ids: SpecialIds) -> tuple[list[Example], int]:
    """Pack documents (+EOS) into sequences of data.max_length with per-sequence doc ids.

    A record is a text document (`data.field`, default "text") or, when it has no such field
    and its keys fit a chat format, a chat rendered by the chat template
    (`cpt_document_tokens`), so one corpus may mix both.
    Raises BadRecord naming the file and line for a record that is neither (unless
    data.on_bad_record=skip) and ValueError when fewer than data.max_length tokens remain."""
    field = data_cfg.field or "text"
    stream: list[int] = []
    docs: list[int] = []
    skipped = 0
    for doc, (rec, origin) in enumerate(
        read_records(list(data_cfg.train_files), data_cfg.hub_dataset, data_cfg.hub_split)
    ):
        try:
            tokens = cpt_document_tokens(rec, origin, field, tokenizer, ids)
        except BadRecord:
            if data_cfg.on_bad_record != "skip":
                raise
            skipped += 1
            continue
        assert ids.mask_id not in tokens, origin  # the mask id is never a training target
        stream.extend(tokens)
        docs.extend([doc] * len(tokens))
    n = data_cfg.max_length
    examples = []
    for start in range(0, len(stream) - n + 1, n):  # the last partial sequence is dropped
        d = docs[start : start + n]
        first = d[0]
        examples.append(Example(stream[start : start + n], [True] * n, [x - first for x in d]))
    if not examples:
        raise ValueError(f"the CPT corpus has fewer than data.max_length={n} tokens")
    return examples, skipped


# ---------------------------------------------------------------------------- batching
def collate(
    examples: list[Example], eos_id: int, pad_maskable: bool, example_index: list[int]
) -> Batch:
    """Pad to the longest example with EOS (maskable = pad_maskable; SFT lengths are already
    multiples of block_length)."""
    length = max(len(e.input_ids) for e in examples)
    x0 = torch.full((len(examples), length), eos_id, dtype=torch.long)  # (B, L)
    maskable = torch.full((len(examples), length), pad_maskable, dtype=torch.bool)
    has_docs = examples[0].doc_ids is not None
    doc_ids = torch.zeros((len(examples), length), dtype=torch.long) if has_docs else None
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        x0[i, :n] = torch.tensor(e.input_ids)
        maskable[i, :n] = torch.tensor(e.maskable)
        if has_docs:
            doc_ids[i, :n] = torch.tensor(e.doc_ids)
            doc_ids[i, n:] = doc_ids[i, n - 1] + 1
    return Batch(x0, maskable, doc_ids, example_index)


def epoch_order(num: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of `num` records for one epoch (identical on every rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num, generator=g).tolist()


class GlobalBatches:
    """Deterministic global batches; `micro_batches(step)` gives this rank's share of a step."""

    def __init__(
        self,
        examples: list[Example],
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        eos_id: int,
        pad_maskable: bool,
    ):
        if global_batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a multiple of micro_batch_size "
                f"({micro_batch_size}) x processes ({world_size})"
            )
        self.examples = examples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.accumulation_steps = global_batch_size // (micro_batch_size * world_size)
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.eos_id, self.pad_maskable = eos_id, pad_maskable
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            n = len(self.examples)
            order = epoch_order(n, self.seed, epoch) if self.shuffle else list(range(n))
            self._orders = {epoch: order}
        return self._orders[epoch]

    def example_ids(self, step: int) -> list[int]:
        """Dataset indices of the whole global batch of `step`."""
        n = len(self.examples)
        start = step * self.global_batch_size
        return [self._order(p // n)[p % n] for p in range(start, start + self.global_batch_size)]

    def epoch(self, step: int) -> float:
        return step * self.global_batch_size / len(self.examples)

    def micro_batches(self, step: int) -> Iterator[Batch]:
        # Sorting the global batch by length (stable) before the split keeps the step's
        # examples but gives micro-batches of similar lengths: less EOS padding to compute.
        ids = sorted(self.example_ids(step), key=lambda i: len(self.examples[i].input_ids))
        per_rank = self.global_batch_size // self.world_size
        first = self.rank * per_rank
        for a in range(self.accumulation_steps):
            lo = first + a * self.micro_batch_size
            rows = list(range(lo, lo + self.micro_batch_size))
            yield collate(
                [self.examples[ids[i]] for i in rows], self.eos_id, self.pad_maskable, rows
            )
