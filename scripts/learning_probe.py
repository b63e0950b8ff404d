"""Exact match of every checkpoint of an SFT run on held-out and training questions.

    python scripts/learning_probe.py RUN_DIR [--n 200] [--task addition|sort]

For each `RUN_DIR/checkpoints/step_*/hf` export: the first `--n` questions of the shipped
held-out chats (data/shipped/sft_eval.jsonl, or sort_sft_eval.jsonl with --task sort) and of the
training chats (sft_train.jsonl / sort_sft_train.jsonl), decoded greedily by the shared sampler
(Quality preset, 32 tokens, the run's block length, chat template): exact match of the stripped
answer, and the held-out accuracy per place (addition: units, tens, hundreds digit; sorting: the
k-th number). Prints one JSON line per checkpoint and writes RUN_DIR/probe.json. Held-out close
to train means the model under-fits rather than memorises (issue 17).

Two figures separate M2T from T2T: `heldout_em_no_edit`, the same decoding with T2T editing off
(editing_threshold null), and `gold_edit_rate`, the share of held-out questions where the T2T
rule at the Quality preset's editing threshold would change the *gold* answer shown fully
visible in its block (no mask left, the state of every post-fill iteration; one forward,
block-causal attention). A model that fills answers right but rewrites them once the block is
full has a high gold_edit_rate and a no-edit EM far above its Quality EM (docs/learning.md).
`heldout_acc_by_mask_ratio`: one-forward accuracy of the masked answer tokens with a share t of
the gold answer masked (t = 0.1 ... 1.0); a flat curve means the model reads the question, a
steep fall towards t = 1 that it leans on the visible answer (`accuracy_by_mask_ratio`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import torch

from llada_train import DATA_DIR
from llada_train.data.pipeline import build_sft_example
from llada_train.masks import block_causal_mask
from llada_train.model.io import from_pretrained
from llada_train.sampler import (
    Sampler,
    SamplerConfig,
    adjust_logits,
    joint_threshold_step,
    sample_candidates,
)
from llada_train.tokenizer import encode_prompt, load_tokenizer, special_ids


def questions(path: str, n: int) -> list[tuple[str, str]]:
    pairs = []
    with open(path) as f:
        for line in f:
            messages = json.loads(line)["messages"]
            pairs.append((messages[0]["content"], messages[-1]["content"]))
            if len(pairs) == n:
                break
    return pairs


def place_accuracy(answers: list[str], golds: list[str]) -> list[float]:
    """Per-place accuracy of decoded answers: for a spaced gold (sorting) the k-th number, else
    the k-th character from the right (addition: units, tens, hundreds). Place k counts only
    questions whose gold has it."""
    spaced = all(" " in g for g in golds)
    split = (lambda s: s.split()) if spaced else (lambda s: list(reversed(s)))  # noqa: E731
    places = max(len(split(g)) for g in golds)
    acc = []
    for k in range(places):
        pairs = [(split(a), split(g)) for a, g in zip(answers, golds, strict=True)]
        pairs = [(a, g) for a, g in pairs if k < len(g)]
        acc.append(round(sum(k < len(a) and a[k] == g[k] for a, g in pairs) / len(pairs), 3))
    return acc


@torch.no_grad()
def exact_match(
    model, tokenizer, pairs: list[tuple[str, str]], block_length: int = 32, editing: bool = True
):
    """(exact match, TPF, per-place accuracy) of greedy Quality-preset answers; `editing=False`
    turns the preset's T2T editing off."""
    ids = special_ids(tokenizer)
    prompts = [encode_prompt(tokenizer, q, None, True) for q, _ in pairs]
    config = SamplerConfig.from_preset("quality", gen_length=32, block_length=block_length)
    if not editing:
        config = config.replace(editing_threshold=None)
    out = Sampler(model, ids.mask_id, ids.eos_id, config).generate(prompts)
    answers = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.tokens]
    hits = sum(a == gold for a, (_, gold) in zip(answers, pairs, strict=True))
    places = place_accuracy(answers, [g for _, g in pairs])
    return hits / len(pairs), out.stats.tpf, places


def gold_layout(tokenizer, ids, question: str, gold: str, block_length: int):
    """(x (L,), answer (L,) bool, block-causal mask (1, 1, L, L)) of one held-out pair in the SFT
    layout: the gold answer + EOS visible, EOS padding to the block end; with unsupervised
    padding `maskable` marks exactly the answer + EOS."""
    record = {"messages": [{"role": "user", "content": question},
                           {"role": "assistant", "content": gold}]}  # fmt: skip
    example = build_sft_example(record, "held-out", tokenizer, ids, 1 << 30, block_length,
                                pad_supervised=False, supervise="last")  # fmt: skip
    x = torch.tensor(example.input_ids)
    positions = torch.arange(len(x))[None]
    return x, torch.tensor(example.maskable), block_causal_mask(positions, positions, block_length)


@torch.no_grad()
def gold_edit_rate(model, tokenizer, pairs: list[tuple[str, str]], block_length: int) -> float:
    """Share of `pairs` whose gold answer (+ EOS, EOS padding to the block end, no mask) the T2T
    rule of the Quality preset (`sampler.joint_threshold_step`: cand != token and conf >
    editing_threshold) would edit."""
    ids = special_ids(tokenizer)
    preset = SamplerConfig.from_preset("quality")
    edited = 0
    for question, gold in pairs:
        x, answer, mask = gold_layout(tokenizer, ids, question, gold, block_length)
        positions = torch.arange(len(x))[None]
        logits = adjust_logits(  # the sampler's candidate rule: penalty, no mask id, greedy
            model(x[None], attention_mask=mask).float(), x.roll(1)[None], positions > 0,
            ids.mask_id, preset.repetition_penalty,
        )  # fmt: skip
        cand, conf = sample_candidates(logits, 0.0, None, None, None)  # (1, L) each
        _, _, edit = joint_threshold_step(
            x[None],
            cand,
            conf,
            answer[None],
            ids.mask_id,
            preset.threshold,
            preset.editing_threshold,
        )  # the sampler's own M2T + T2T rule; with no mask left only T2T can act
        edited += bool(edit.any())
    return edited / len(pairs)


RATIOS = (0.1, 0.3, 0.5, 0.8, 1.0)


@torch.no_grad()
def accuracy_by_mask_ratio(
    model, tokenizer, pairs: list[tuple[str, str]], block_length: int, seed: int = 0
) -> dict[str, float]:
    """One-forward accuracy of masked answer tokens (answer + EOS) at each mask ratio t in
    `RATIOS`: max(1, round(t * n)) of a pair's n answer tokens, chosen at random (torch seed
    `seed`), are masked, the rest of the gold answer stays visible (`gold_layout`, (L,)); the
    model's logits (1, L, V) are read greedily at the masked positions, the mask id excluded
    as in the sampler, and compared with gold, summed over `pairs`. Returns {str(t): share}.
    A model that predicts answer tokens from the visible answer around them instead of from
    the question scores high at t = 0.1 and falls at t = 1, where nothing of the answer is
    shown (the sorting cliff, docs/learning.md). Raises ValueError on empty `pairs`."""
    if not pairs:
        raise ValueError("accuracy_by_mask_ratio: no question/answer pairs")
    ids = special_ids(tokenizer)
    layouts = [gold_layout(tokenizer, ids, q, gold, block_length) for q, gold in pairs]
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for t in RATIOS:
        hits = total = 0
        for x, answer, mask in layouts:
            where = answer.nonzero().squeeze(1)
            chosen = where[torch.randperm(len(where), generator=generator)]
            chosen = chosen[: max(1, round(t * len(where)))]
            noisy = x.clone()
            noisy[chosen] = ids.mask_id
            logits = adjust_logits(  # the sampler's rule: the mask id is never a candidate
                model(noisy[None], attention_mask=mask).float(), noisy.roll(1)[None],
                torch.arange(len(noisy))[None] > 0, ids.mask_id, 0.0,
            )  # fmt: skip  # no repetition penalty (as the Quality preset)
            pred = logits[0, chosen].argmax(-1)
            hits += int((pred == x[chosen]).sum())
            total += len(chosen)
        out[str(t)] = hits / total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--task", choices=("addition", "sort"), default="addition")
    args = parser.parse_args()
    prefix = "" if args.task == "addition" else "sort_"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = load_tokenizer()
    heldout = questions(os.path.join(DATA_DIR, "shipped", f"{prefix}sft_eval.jsonl"), args.n)
    train = questions(os.path.join(DATA_DIR, "shipped", f"{prefix}sft_train.jsonl"), args.n)
    rows = []
    for hf in sorted(glob.glob(os.path.join(args.run_dir, "checkpoints", "step_*", "hf"))):
        step = int(os.path.basename(os.path.dirname(hf)).removeprefix("step_"))
        model = from_pretrained(hf).eval()
        facts_path = os.path.join(hf, "llada_train.json")  # the block length the run trained
        block = json.load(open(facts_path))["block_length"] if os.path.exists(facts_path) else 32
        heldout_em, tpf, places = exact_match(model, tokenizer, heldout, block)
        train_em, _, _ = exact_match(model, tokenizer, train, block)
        no_edit_em, _, _ = exact_match(model, tokenizer, heldout, block, editing=False)
        rows.append(
            {"step": step, "heldout_em": heldout_em, "train_em": train_em, "tpf": tpf,
             "heldout_place_acc": places, "heldout_em_no_edit": no_edit_em,
             "gold_edit_rate": gold_edit_rate(model, tokenizer, heldout, block),
             "heldout_acc_by_mask_ratio": accuracy_by_mask_ratio(model, tokenizer, heldout, block)}
        )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.run_dir, "probe.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
