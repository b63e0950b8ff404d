"""CPU cost of the MoE grouped matmul: one matmul per expert against the padded bmm.

`llada_train.model.modeling.grouped_mm` runs `per_group_mm` on CPU and `padded_bmm` on GPUs
without torch._grouped_mm. The padded bmm computes every expert at the largest group's size, so
its cost grows with the router's max/mean load. Prints forward + backward milliseconds of both
at the tiny model's expert shape and a skewed load like its routers' (2-3.5).

Usage: OMP_NUM_THREADS=1 python scripts/bench_grouped_mm.py [--rows 4096] [--hot 3.0]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llada_train.model.modeling import padded_bmm, per_group_mm  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096, help="tokens x top-k")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--out", type=int, default=256, help="2 x moe_intermediate_size")
    p.add_argument("--hot", type=float, default=3.0, help="expert 0 weight, others 1")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.manual_seed(0)
    probs = torch.tensor([args.hot] + [1.0] * (args.experts - 1))
    groups = torch.multinomial(probs / probs.sum(), args.rows, replacement=True).sort().values
    counts = torch.bincount(groups, minlength=args.experts)
    offsets = counts.cumsum(0)
    x = torch.randn(args.rows, args.hidden, requires_grad=True)
    w = torch.randn(args.experts, args.hidden, args.out, requires_grad=True)
    print(f"max/mean load {counts.max().item() / counts.float().mean().item():.2f}, "
          f"{torch.get_num_threads()} thread(s)")  # fmt: skip
    for fn in (padded_bmm, per_group_mm):
        fn(x, w, offsets).sum().backward()  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn(x, w, offsets).sum().backward()
        ms = (time.perf_counter() - start) / args.repeats * 1e3
        print(f"{fn.__name__:>13}: {ms:.1f} ms forward + backward")
    same = torch.equal(padded_bmm(x, w, offsets), per_group_mm(x, w, offsets))
    print(f"outputs bit-identical: {same}")


if __name__ == "__main__":
    main()
