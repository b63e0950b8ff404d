"""Forward+backward training throughput of LLaDA2-MoE: our grouped MoE vs a per-expert loop.

Both variants run the same weights on the same batch; the baseline replaces every MoE layer's
dispatch with the per-expert Python loop of the official training code
(`llada_train.model.reference.naive_moe_forward`). Two measurements, each printing tokens/s of
ours and of the loop and their ratio: one MoE layer alone (the dispatch itself), and the whole
model (attention, dense layer and lm_head included). On CUDA it also prints the model FLOPs
utilisation (MFU) of ours.

    python scripts/bench_model.py                          # CPU default: 64 experts, top-8
    python scripts/bench_model.py --model mini --num-layers 4 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from llada_train import CONF_DIR
from llada_train.masks import training_inputs
from llada_train.model.config import LLaDA2MoeConfig
from llada_train.model.modeling import LLaDA2MoeModelLM, SparseMoE
from llada_train.model.reference import naive_moe_forward

# CPU default: small widths so a step takes well under a second, but the routing of a real
# layer (64 experts in 8 groups, top-8 of 4 kept groups).
CPU_DEFAULT = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    num_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4,
)  # fmt: skip


def build_config(args) -> LLaDA2MoeConfig:
    if args.model == "default":
        d = dict(CPU_DEFAULT)
    elif os.path.exists(args.model):
        d = LLaDA2MoeConfig.from_json(args.model).to_dict()
    else:
        from omegaconf import OmegaConf

        d = OmegaConf.to_container(
            OmegaConf.load(os.path.join(CONF_DIR, "model", f"{args.model}.yaml"))
        )
    for key in ("num_hidden_layers", "num_experts", "num_experts_per_tok"):
        value = getattr(args, key)
        if value is not None:
            d[key] = value
    return LLaDA2MoeConfig.from_dict(d)


def training_step_flops(
    config: LLaDA2MoeConfig, batch: int, seq_len: int, block_length: int, visible_pairs=None
) -> float:
    """Model FLOPs of one forward+backward (3x forward) of a training batch (B, L).

    Layout [x_t ; x_0] (2L positions) when block_length < L, else x_t alone (L). Counted:
    2 FLOPs per multiply-add of every active matmul parameter (embedding lookup excluded) on
    every position, the lm_head on the L logit positions only, and attention scores and values
    (2 x 2 x heads x head_dim per visible query-key pair per layer) on the pairs the mask
    allows (`visible_pairs`: their number per row, default from the block-diffusion mask);
    the skipped half of the score matrix is not counted as useful work.
    """
    from llada_train.masks import block_diffusion_mask

    h, v = config.hidden_size, config.vocab_size
    _, active = config.num_parameters()
    body = active - 2 * v * h  # embeddings and lm_head out
    positions = 2 * seq_len if block_length < seq_len else seq_len
    if visible_pairs is None:
        if block_length < seq_len:
            visible_pairs = int(block_diffusion_mask(seq_len, block_length).sum())
        else:
            visible_pairs = seq_len * seq_len
    attn_fwd = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    forward = (2 * body * positions + 2 * v * h * seq_len + attn_fwd * visible_pairs) * batch
    return 3.0 * forward


def median_seconds(step, steps: int, warmup: int, cuda: bool) -> float:
    """Median wall time of `step()` over `steps` runs after `warmup` runs."""
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def use_naive_moe(model: LLaDA2MoeModelLM, naive: bool) -> None:
    """Switch every MoE layer between our dispatch and the per-expert loop (same weights)."""
    for moe in model.modules():
        if isinstance(moe, SparseMoE):
            if naive:
                moe.forward = lambda x, _m=moe: naive_moe_forward(_m, x)
            else:
                moe.__dict__.pop("forward", None)


def training_step_fn(model: LLaDA2MoeModelLM, batch: int, seq_len: int, block_length: int):
    """A closure running one forward+backward of a random training batch (B, L) on the
    [x_t ; x_0] layout with its block-diffusion mask (an `AttentionMask`: SDPA or FlexAttention
    according to `model.attention_backend`)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=gen).to(device)
    ids, mask, positions, logits_slice = training_inputs(x0, x0, block_length)

    def step():
        logits = model(ids, attention_mask=mask, position_ids=positions, logits_slice=logits_slice)
        logits.logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def moe_layer_step_fn(moe: SparseMoE, tokens: int):
    """A closure running forward+backward of one MoE layer on `tokens` random hidden states."""
    p = moe.experts.gate_up_proj
    x = torch.randn(tokens, p.shape[1], device=p.device, dtype=p.dtype, requires_grad=True)

    def step():
        y = moe(x)
        y.backward(torch.ones_like(y))
        x.grad = None
        moe.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default="default", help="'default', a conf/model name, or a config.json"
    )
    p.add_argument("--num-layers", dest="num_hidden_layers", type=int)
    p.add_argument("--num-experts", dest="num_experts", type=int)
    p.add_argument("--top-k", dest="num_experts_per_tok", type=int)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="clean length L; the model sees 2L")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100/H200 bf16)"
    )
    p.add_argument("--skip-naive", action="store_true", help="only time our MoE")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flex"])
    args = p.parse_args(argv)

    config = build_config(args)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = LLaDA2MoeModelLM(config).to(dtype).train()
    model.attention_backend = args.attention
    tokens = args.batch * 2 * args.seq
    total, active = config.num_parameters()
    print(
        f"config: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_experts} experts top-{config.num_experts_per_tok}, "
        f"{total / 1e6:.1f}M params ({active / 1e6:.1f}M active); "
        f"batch {args.batch} x 2x{args.seq} tokens on {device} {args.dtype}, "
        f"attention {args.attention}"
    )
    cuda = device.type == "cuda"
    model_step = training_step_fn(model, args.batch, args.seq, args.block_length)
    moe = next(m for m in model.modules() if isinstance(m, SparseMoE))
    layer_step = moe_layer_step_fn(moe, tokens)

    for label, step in (("one MoE layer", layer_step), ("whole model  ", model_step)):
        use_naive_moe(model, False)
        ours = median_seconds(step, args.steps, args.warmup, cuda)
        line = f"{label}: ours {tokens / ours:10.0f} tokens/s ({ours * 1e3:7.1f} ms)"
        if not args.skip_naive:
            use_naive_moe(model, True)
            naive = median_seconds(step, args.steps, args.warmup, cuda)
            line += f" | per-expert loop {tokens / naive:10.0f} tokens/s ({naive * 1e3:7.1f} ms)"
            line += f" | speed-up {naive / ours:.2f}x"
        print(line, flush=True)
        if cuda and step is model_step:
            flops = training_step_flops(config, args.batch, args.seq, args.block_length) / ours
            mfu = 100 * flops / (args.peak_tflops * 1e12)
            print(f"MFU (ours): {mfu:.1f}% of {args.peak_tflops} TFLOP/s")
            print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    use_naive_moe(model, False)


if __name__ == "__main__":
    sys.exit(main())
