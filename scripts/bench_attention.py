"""Training attention alone: block-sparse FlexAttention vs dense-mask SDPA, at several lengths.

The training layout [x_t ; x_0] (2L positions, block diffusion mask, no documents): about half
of the (2L x 2L) scores are masked out; SDPA computes them all, FlexAttention skips the 128 x 128
blocks that are entirely masked. Times q/k/v (B, heads, 2L, head_dim) -> output, median of
`--steps`, each backend compiled-or-not as the model runs it:

- CUDA: SDPA (its dense-mask kernel) vs compiled FlexAttention, forward + backward.
- CPU: SDPA vs compiled FlexAttention (the inductor C++ kernel), forward only: FlexAttention
  has no backward on CPU. The first compile per shape takes ~20 s on 2 cores and is not timed.
  `--eager` times the model's CPU FlexAttention path instead (dense math, for reference).

It prints a table (tokens = 2L) and asserts nothing. Default widths: the official mini's
attention (16 query heads, 4 key/value heads, head_dim 128).

    python scripts/bench_attention.py --lengths 512 1024 2048 --batch 1 --threads 2
    python scripts/bench_attention.py --device cuda --dtype bfloat16 --lengths 1024 2048 4096 8192
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from llada_train.masks import training_inputs
from llada_train.model.attention import attend


def time_attention(
    tokens: int,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_length: int,
    device: torch.device,
    dtype: torch.dtype,
    steps: int = 5,
    backward: bool | None = None,
    eager_flex: bool = False,
) -> dict:
    """{'tokens', 'sdpa_ms', 'flex_ms', 'speedup', 'density', 'backward'} for one length.

    `tokens` = 2L (must be even). `backward` defaults to True on CUDA, False on CPU.
    """
    from torch.nn.attention.flex_attention import flex_attention

    seq_len = tokens // 2
    backward = device.type == "cuda" if backward is None else backward
    x = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    mask = training_inputs(x, x, block_length)[1]
    dense, block_mask = mask.dense(), mask.block_mask()
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(h):
        t = torch.randn(batch, h, tokens, head_dim, generator=gen, dtype=torch.float32)
        return t.to(device=device, dtype=dtype).requires_grad_(backward)

    q, k, v = rand(heads), rand(kv_heads), rand(kv_heads)
    gqa = heads != kv_heads
    compiled = torch.compile(flex_attention)

    def sdpa():  # the model's SDPA path (on CUDA: key/value heads repeated, see attend)
        return attend(q, k, v, dense)

    def flex():
        if eager_flex:
            return attend(q, k, v, block_mask)
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    def timed(fn) -> float:
        cuda = device.type == "cuda"
        times = []
        for i in range(steps + 1):  # the first call compiles / warms up
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.set_grad_enabled(backward):
                out = fn()
                if backward:
                    out.sum().backward()
            if cuda:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
            q.grad = k.grad = v.grad = None
        return sorted(times)[len(times) // 2] * 1e3

    sdpa_ms, flex_ms = timed(sdpa), timed(flex)
    return {
        "tokens": tokens,
        "sdpa_ms": sdpa_ms,
        "flex_ms": flex_ms,
        "speedup": sdpa_ms / flex_ms,
        "density": float(dense.float().mean()),
        "backward": backward,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048], help="2L")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--eager", action="store_true", help="CPU: the model's eager FlexAttention")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    print(
        f"attention: batch {args.batch}, {args.heads}/{args.kv_heads} heads x {args.head_dim}, "
        f"block {args.block_length}, {device} {str(dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads"
    )
    header = ("tokens", "mask kept", "pass", "SDPA ms", "Flex ms", "speed-up")
    print(" ".join(f"{h:>9}" for h in header))
    for n in args.lengths:
        r = time_attention(
            n, args.batch, args.heads, args.kv_heads, args.head_dim, args.block_length,
            device, dtype, args.steps, eager_flex=args.eager,
        )  # fmt: skip
        kind = "fwd+bwd" if r["backward"] else "fwd"
        print(
            f"{n:>9} {r['density']:>9.3f} {kind:>8} {r['sdpa_ms']:>9.2f} {r['flex_ms']:>9.2f} "
            f"{r['speedup']:>8.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
