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
from omegaconf import OmegaConf

from llada_train import CONF_DIR
from llada_train.masks import block_diffusion_mask
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
        d = OmegaConf.to_container(
            OmegaConf.load(os.path.join(CONF_DIR, "model", f"{args.model}.yaml"))
        )
    for key in ("num_hidden_layers", "num_experts", "num_experts_per_tok"):
        value = getattr(args, key)
        if value is not None:
            d[key] = value
    return LLaDA2MoeConfig.from_dict(d)


def training_flops_per_token(config: LLaDA2MoeConfig, seq_len: int) -> float:
    """6 x active matmul parameters (embedding lookup excluded) + attention scores and values.

    The [x_t ; x_0] layout doubles the sequence: tokens counted are the 2L processed positions.
    """
    _, active = config.num_parameters()
    matmul_params = active - config.vocab_size * config.hidden_size
    attn = 2 * 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matmul_params + 3 * attn


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
        "--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 bf16)"
    )
    p.add_argument("--skip-naive", action="store_true", help="only time our MoE")
    args = p.parse_args(argv)

    config = build_config(args)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = LLaDA2MoeModelLM(config).to(dtype).train()
    ids = torch.randint(0, config.vocab_size, (args.batch, 2 * args.seq), device=device)
    mask = block_diffusion_mask(args.seq, args.block_length, device)
    tokens = args.batch * 2 * args.seq
    total, active = config.num_parameters()
    print(
        f"config: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_experts} experts top-{config.num_experts_per_tok}, "
        f"{total / 1e6:.1f}M params ({active / 1e6:.1f}M active); "
        f"batch {args.batch} x 2x{args.seq} tokens on {device} {args.dtype}"
    )
    cuda = device.type == "cuda"

    def model_step():
        logits = model(ids, attention_mask=mask, logits_slice=slice(0, args.seq))
        logits.logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    moe = next(m for m in model.modules() if isinstance(m, SparseMoE))
    x = torch.randn(tokens, config.hidden_size, device=device, dtype=dtype, requires_grad=True)

    def layer_step():
        y = moe(x)
        y.backward(torch.ones_like(y))
        x.grad = None
        model.zero_grad(set_to_none=True)

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
            flops = training_flops_per_token(config, 2 * args.seq) * tokens / ours
            mfu = 100 * flops / (args.peak_tflops * 1e12)
            print(f"MFU (ours): {mfu:.1f}% of {args.peak_tflops} TFLOP/s")
            print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    use_naive_moe(model, False)


if __name__ == "__main__":
    sys.exit(main())
