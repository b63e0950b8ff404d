"""A minimal masked-diffusion reference for the tiny addition task, outside the library.

Why it exists (docs/learning.md, issue 26): the framework's tiny recipe learned 2-digit addition
only after a plateau whose end float rounding moves. This script trains a plain masked-diffusion
transformer on the same chats (data/shipped/sft_train.jsonl), with the same tokenizer, as
directly as possible, and reports the held-out exact match every `--eval-every` steps, so the
steps it needs can be set beside the framework's. Switches walk it towards the framework one
difference at a time:

    --layout chat     the framework's token layout: the chat template, response + EOS, EOS
                      padding to 32 tokens, every padding position maskable (default: "plain",
                      the question's text, one separator, the answer, EOS padding to the
                      longest answer + 1)
    --model llada     the framework's model class (LLaDA2MoeModelLM, conf/model/tiny.yaml
                      shapes; `--dense` makes every layer dense) instead of a plain PyTorch
                      encoder (learned positions, LayerNorm, GELU)
    --t-min/--t-max   mask ratio t ~ U[t_min, t_max] (reference: U[0, 1], each maskable token
                      masked with probability t, at least one masked)
    --noise/--keep    T2T random-token noise ratio r ~ U[0, noise] of the visible maskable
                      tokens and keep supervision share (the framework's `corruption=sft`)
    --lr/--beta2/--batch/--wd/--clip  AdamW settings and batch size

Decoding for the held-out check: every maskable position of the question masked, then one
forward per position, committing the most confident masked position each time (greedy), and the
answer read up to the first EOS. The 200 held-out questions of data/shipped/sft_eval.jsonl.

Usage: python scripts/minimal_reference.py [--layout chat] [--model llada] [--steps 1500] ...
Prints one line per check: step, held-out exact match, seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from llada_train.tokenizer import encode_chat_spans, encode_text, load_tokenizer, special_ids


def read_chats(path: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in open(path)]
    return [(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in rows]


def encode(tok, ids, chats, layout: str, length: int | None):
    """(x0 (N, L) long, maskable (N, L) bool)."""
    seqs, masks = [], []
    for q, a in chats:
        if layout == "chat":
            prompt, _ = encode_chat_spans(tok, [{"role": "user", "content": q}])
        else:
            prompt = encode_text(tok, q) + [tok.convert_tokens_to_ids("<|role_end|>")]
        resp = encode_text(tok, a) + [ids.eos_id]
        seqs.append(prompt + resp)
        masks.append([False] * len(prompt) + [True] * len(resp))
    if length is None or length == 0:  # the layout's own: chat 32 (one block), plain tight
        length = 32 if layout == "chat" else -1
    if length < 0:  # every row padded to the longest row + 1
        length = max(len(s) for s in seqs) + 1
    x0 = torch.full((len(seqs), length), ids.eos_id, dtype=torch.long)
    maskable = torch.zeros(len(seqs), length, dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        x0[i, : len(s)] = torch.tensor(s)
        maskable[i, : len(s)] = torch.tensor(m)
        maskable[i, len(s) :] = True  # EOS padding is maskable and supervised
    return x0, maskable, length


class PlainEncoder(nn.Module):
    """A plain bidirectional transformer: token + learned position embeddings, pre-LN blocks."""

    def __init__(self, vocab: int, length: int, width: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(length, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))[None]
        return self.head(self.norm(self.blocks(h)))


def llada_model(vocab: int, dense: bool, seed: int, width: int = 256):
    from omegaconf import OmegaConf

    from llada_train.model.config import LLaDA2MoeConfig
    from llada_train.model.modeling import LLaDA2MoeModelLM

    cfg = OmegaConf.to_container(OmegaConf.load("conf/model/tiny.yaml"))
    cfg.update(vocab_size=vocab, eos_token_id=0, pad_token_id=0, mask_token_id=1)
    if dense:
        cfg["first_k_dense_replace"] = cfg["num_hidden_layers"]
    if width != cfg["hidden_size"]:  # scale the FFN widths with the model width
        scale = width / cfg["hidden_size"]
        cfg.update(hidden_size=width, intermediate_size=int(cfg["intermediate_size"] * scale),
                   moe_intermediate_size=int(cfg["moe_intermediate_size"] * scale))  # fmt: skip
    model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**cfg))
    model.reset_parameters(torch.Generator().manual_seed(seed))

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)

    return Wrap(model)


def corrupt(x0, maskable, g, args, mask_id, vocab, special):
    """(xt, supervised): mask with t ~ U[t_min, t_max] (at least one masked), then the optional
    T2T noise and keep supervision."""
    n, length = x0.shape
    t = args.t_min + (args.t_max - args.t_min) * torch.rand(n, 1, generator=g)
    u = torch.rand(n, length, generator=g)
    is_masked = (u < t) & maskable
    none = ~is_masked.any(1)
    if none.any():  # mask one maskable position of rows that drew none
        pick = torch.multinomial(maskable[none].float(), 1, generator=g)
        is_masked[none.nonzero()[:, 0], pick[:, 0]] = True
    xt = torch.where(is_masked, torch.full_like(x0, mask_id), x0)
    supervised = is_masked.clone()
    if args.noise > 0 or args.keep > 0:
        visible = maskable & ~is_masked
        r = args.noise * torch.rand(n, 1, generator=g)
        is_noised = visible & (torch.rand(n, length, generator=g) < r)
        allowed = torch.tensor([i for i in range(vocab) if i not in special])
        sub = allowed[torch.randint(len(allowed), (n, length), generator=g)]
        sub = torch.where(
            sub == x0, allowed[(torch.searchsorted(allowed, sub) + 1) % len(allowed)], sub
        )
        xt = torch.where(is_noised, sub, xt)
        is_kept = visible & ~is_noised & (torch.rand(n, length, generator=g) < args.keep)
        supervised |= is_noised | is_kept
    return xt, supervised


@torch.no_grad()
def exact_match(model, x0, maskable, mask_id, eos_id, tok, answers) -> float:
    model.eval()
    x = torch.where(maskable, torch.full_like(x0, mask_id), x0)
    for _ in range(int(maskable.sum(1).max())):
        still = x == mask_id
        if not still.any():
            break
        logits = model(x).float()
        logits[..., mask_id] = -math.inf
        conf, cand = logits.softmax(-1).max(-1)
        conf = torch.where(still, conf, -1.0)
        best = conf.argmax(1)
        rows = still.any(1).nonzero()[:, 0]
        x[rows, best[rows]] = cand[rows, best[rows]]
    model.train()
    hits = 0
    for i, a in enumerate(answers):
        out = x[i][maskable[i]].tolist()
        out = out[: out.index(eos_id)] if eos_id in out else out
        hits += tok.decode(out).strip() == a
    return hits / len(answers)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layout", choices=("plain", "chat"), default="plain")
    p.add_argument("--model", choices=("plain", "llada"), default="plain")
    p.add_argument("--dense", action="store_true")
    p.add_argument("--length", type=int, default=0,
                   help="padded length: 0 = the layout's own (chat 32, plain the longest row "
                   "+ 1), -1 = the longest row + 1, N = N tokens")  # fmt: skip
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--wd", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--t-min", type=float, default=0.0)
    p.add_argument("--t-max", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--keep", type=float, default=0.0)
    p.add_argument("--pad-weight", type=float, default=1.0,
                   help="loss weight of the EOS padding after the response's own EOS")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--target", type=float, default=0.95)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    tok = load_tokenizer("data/tokenizer")
    ids = special_ids(tok)
    vocab = len(tok)
    train = read_chats("data/shipped/sft_train.jsonl")
    held = read_chats("data/shipped/sft_eval.jsonl")
    x0, maskable, length = encode(tok, ids, train, args.layout, args.length)
    # padding: EOS positions after the response's own EOS (the first EOS of the maskable span)
    first_eos = torch.where(maskable & (x0 == ids.eos_id), torch.arange(length), length).min(1)
    is_pad = torch.arange(length)[None] > first_eos.values[:, None]  # (N, L)
    hx0, hmask, _ = encode(tok, ids, held, args.layout, length)
    if args.model == "llada":
        model = llada_model(vocab, args.dense, args.seed, args.width)
    else:
        model = PlainEncoder(vocab, length, args.width, args.layers, 4)
    print(
        f"params {sum(p.numel() for p in model.parameters()):,} length {length} args {vars(args)}"
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, args.beta2),
                            weight_decay=args.wd)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    g = torch.Generator().manual_seed(args.seed)
    special = set(ids.all_special)
    start, first = time.time(), None
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(x0), (args.batch,), generator=g)
        xt, sup = corrupt(x0[idx], maskable[idx], g, args, ids.mask_id, vocab, special)
        logits = model(xt)
        ce = F.cross_entropy(logits[sup].float(), x0[idx][sup], reduction="none")
        w = torch.where(is_pad[idx][sup], args.pad_weight, 1.0)
        loss = (w * ce).sum() / w.sum().clamp_min(1e-9)
        opt.zero_grad()
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sched.step()
        if step % args.eval_every == 0:
            em = exact_match(model, hx0, hmask, ids.mask_id, ids.eos_id, tok, [a for _, a in held])
            if first is None and em >= args.target:
                first = step
            print(f"step {step} loss {loss.item():.4f} heldout_em {em:.3f} "
                  f"s {time.time() - start:.0f}", flush=True)  # fmt: skip
    print(f"first step with >= {args.target}: {first}")


if __name__ == "__main__":
    main()
