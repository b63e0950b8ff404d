"""The measuring half of `scripts/gpu_check.sh`: every figure of BENCHMARKS.md's GPU section.

Sections (each is timed separately and recorded even when another fails):
- attention: training attention alone, FlexAttention vs SDPA, at 2L = 1k..8k tokens
  (`bench_attention.time_attention`; goal: >= 1.3x at 4k).
- train: bf16 forward+backward of a mini-shaped model (official mini widths from
  tests/data/reference/llada2_mini_config.json, `--train-layers` layers: 1 dense + MoE),
  tokens/s with each attention backend, MFU = model FLOPs (`bench_model.training_step_flops`:
  active matmul parameters + attention on the pairs the mask allows) / time / peak
  (goal: >= 35%), peak memory.
- moe: one MoE layer at mini width, grouped dispatch vs the per-expert loop (forward+backward).
- sampler: block-forward latency (one 32-token block over a cached prefix) and `Sampler`
  tokens/s for batch 1/8/32 at mini width with a sharpened random model (TPF > 1), against the
  bytes-moved bound: (weights read, counting only the experts the block routed to, + KV cache
  read + logits written) / HBM bandwidth (goal: within 1.5x).
- memory: peak GPU memory of a 3-step SFT of a fixed 44M-parameter model at ZeRO 0/2/3 on one
  GPU (`python -m llada_train.sft`, `memory/peak_gpu_gib_rank0` of metrics.jsonl).

`--cpu-smoke`: the same code at tiny sizes on the CPU (seconds; the memory section is skipped:
it needs a GPU and the training entry point's start-up alone takes ~20 s on a CPU). Writes
OUT/gpu_check.json and OUT/gpu_check.md. Assumed peaks (dense bf16, HBM) are printed and
stored; override with --peak-tflops / --hbm-tbs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_attention  # noqa: E402
import bench_model  # noqa: E402

from llada_train import REPO_ROOT  # noqa: E402
from llada_train.model.config import LLaDA2MoeConfig  # noqa: E402
from llada_train.model.modeling import LLaDA2MoeModelLM, PrefixKVCache, SparseMoE  # noqa: E402
from llada_train.sampler import Sampler, SamplerConfig  # noqa: E402

MINI_CONFIG = os.path.join(REPO_ROOT, "tests", "data", "reference", "llada2_mini_config.json")
# (name fragment, dense bf16 TFLOP/s, HBM TB/s): vendor datasheets, dense (no sparsity)
DEVICE_PEAKS = [
    ("H200", 989.0, 4.8),
    ("H100 PCIe", 756.0, 2.0),
    ("H100", 989.0, 3.35),  # SXM
    ("A100", 312.0, 2.0),
]
GOALS = {"mfu_pct": 35.0, "sampler_bound_ratio": 1.5, "attention_speedup_4k": 1.3}
TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=32,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=16,
    num_experts_per_tok=4, n_group=4, topk_group=2,
)  # fmt: skip
# The fixed small model of BENCHMARKS.md's ZeRO table (44.2M parameters).
MEMORY_OVERRIDES = [
    "+recipe=tiny", "model.hidden_size=512", "model.intermediate_size=1024",
    "model.moe_intermediate_size=256", "model.num_hidden_layers=4",
    "model.num_attention_heads=8", "model.num_key_value_heads=2", "model.head_dim=64",
    "model.num_experts=32", "model.num_experts_per_tok=4", "model.n_group=4",
    "model.topk_group=2", "max_steps=3", "micro_batch_size=4", "global_batch_size=4",
    "checkpoint.save_every=100", "checkpoint.smoke_prompts=0", "checkpoint.export_hf=false",
    "tracking=disabled", "progress=false", "precision=bf16",
]  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_config(smoke: bool, num_layers: int) -> LLaDA2MoeConfig:
    """Mini widths (official config) with `num_layers` layers, or tiny widths for the smoke."""
    if smoke:
        return LLaDA2MoeConfig(num_hidden_layers=num_layers, **TINY)
    d = LLaDA2MoeConfig.from_json(MINI_CONFIG).to_dict()
    d["num_hidden_layers"] = num_layers
    return LLaDA2MoeConfig.from_dict(d)


def build(config: LLaDA2MoeConfig, device, dtype, train: bool) -> LLaDA2MoeModelLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = LLaDA2MoeModelLM(config)
    return model.to(dtype).train(train)


# ---------------------------------------------------------------------------- sections
def section_attention(args, device, dtype) -> list[dict]:
    lengths = [128] if args.cpu_smoke else [1024, 2048, 4096, 8192]
    heads = (4, 2, 32) if args.cpu_smoke else (16, 4, 128)  # mini: 16/4 heads x 128
    rows = []
    for n in lengths:
        r = bench_attention.time_attention(
            n, args.attention_batch, *heads, args.block_length, device, dtype,
            steps=args.steps, eager_flex=args.cpu_smoke,
        )  # fmt: skip
        print(f"  attention {n} tokens: SDPA {r['sdpa_ms']:.2f} ms, Flex {r['flex_ms']:.2f} ms, "
              f"{r['speedup']:.2f}x", flush=True)  # fmt: skip
        rows.append(r)
    return rows


def section_train(args, device, dtype, peak_tflops) -> dict:
    config = model_config(args.cpu_smoke, args.train_layers)
    model = build(config, device, dtype, train=True)
    batch, seq_len = (1, 64) if args.cpu_smoke else (args.train_batch, args.train_seq)
    total, active = config.num_parameters()
    tokens = batch * 2 * seq_len
    flops = bench_model.training_step_flops(config, batch, seq_len, args.block_length)
    out = {
        "layers": config.num_hidden_layers, "hidden": config.hidden_size,
        "experts": config.num_experts, "params_total": total, "params_active": active,
        "batch": batch, "seq_len": seq_len, "tokens_per_step": tokens,
        "block_length": args.block_length, "model_tflop_per_step": flops / 1e12,
    }  # fmt: skip
    cuda = device.type == "cuda"
    for backend in ("sdpa", "flex"):
        model.attention_backend = backend
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step = bench_model.training_step_fn(model, batch, seq_len, args.block_length)
        seconds = bench_model.median_seconds(step, args.steps, args.warmup, cuda)
        out[f"{backend}_step_ms"] = seconds * 1e3
        out[f"{backend}_tokens_per_s"] = tokens / seconds
        out[f"{backend}_mfu_pct"] = None
        if cuda:  # MFU against a GPU peak means nothing on the CPU
            out[f"{backend}_mfu_pct"] = 100 * flops / seconds / (peak_tflops * 1e12)
            out[f"{backend}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        mfu = out[f"{backend}_mfu_pct"]
        print(f"  train {backend}: {tokens / seconds:,.0f} tokens/s"
              + ("" if mfu is None else f", MFU {mfu:.1f}%"), flush=True)  # fmt: skip
    out["flex_speedup"] = out["sdpa_step_ms"] / out["flex_step_ms"]
    return out


def section_moe(args, device, dtype) -> dict:
    config = model_config(args.cpu_smoke, 2)
    moe = SparseMoE(config).to(device)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, config.initializer_range)
    moe = moe.to(dtype).train()
    tokens = 256 if args.cpu_smoke else args.train_batch * 2 * args.train_seq
    cuda = device.type == "cuda"
    step = bench_model.moe_layer_step_fn(moe, tokens)
    ours = bench_model.median_seconds(step, args.steps, args.warmup, cuda)
    moe.forward = lambda x: bench_model.naive_moe_forward(moe, x)
    loop = bench_model.median_seconds(step, max(1, args.steps // 2), min(args.warmup, 1), cuda)
    del moe.forward
    print(f"  MoE layer: grouped {ours * 1e3:.2f} ms, loop {loop * 1e3:.2f} ms", flush=True)
    return {
        "tokens": tokens, "experts": config.num_experts, "top_k": config.num_experts_per_tok,
        "grouped_ms": ours * 1e3, "loop_ms": loop * 1e3, "speedup": loop / ours,
        "grouped_tokens_per_s": tokens / ours,
    }  # fmt: skip


def block_forward_bytes(model: LLaDA2MoeModelLM, batch: int, block: int, kv_len: int) -> dict:
    """Bytes a cached block forward must move at least (after the forward: experts used).

    Weights read once (every matrix of attention, norms, dense MLP, router, shared expert, the
    routed experts with load > 0 in this forward, lm_head; the embedding rows are negligible),
    the KV cache read (2 x layers x batch x kv_len x Hkv x D), and the logits written (the
    bf16 lm_head output, read back and written as fp32: 8 bytes per logit).
    """
    config = model.config
    elem = next(model.parameters()).element_size()
    weights = 0
    for name, p in model.named_parameters():
        if "word_embeddings" in name or ".experts.gate_up_proj" in name:
            continue
        if ".experts.down_proj" in name:
            continue
        weights += p.numel()
    for moe in model.moe_layers():
        used = int((moe.last_expert_load > 0).sum())
        per_expert = moe.experts.gate_up_proj[0].numel() + moe.experts.down_proj[0].numel()
        weights += used * per_expert
    kv = 2 * config.num_hidden_layers * batch * kv_len * config.num_key_value_heads
    kv *= config.head_dim
    logits = batch * block * config.vocab_size
    return {"weights": weights * elem, "kv_cache": kv * elem, "logits": logits * 8}


def section_sampler(args, device, dtype, hbm_tbs) -> list[dict]:
    config = model_config(args.cpu_smoke, args.sampler_layers)
    model = build(config, device, dtype, train=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(args.sharpen)
    block = 8 if args.cpu_smoke else 32
    prefix = 16 if args.cpu_smoke else 512
    gen_length = 8 if args.cpu_smoke else 128
    batches = [1, 2] if args.cpu_smoke else [1, 8, 32]
    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler(
        model, mask_id=vocab - 1, eos_id=vocab - 2,
        config=SamplerConfig.from_preset(
            "quality", block_length=block, gen_length=gen_length, eos_early_stop=False
        ),
    )  # fmt: skip
    rows = []
    for b in batches:
        ids = torch.randint(0, vocab - 2, (b, prefix + block), generator=gen).to(device)
        with torch.no_grad():
            cache = PrefixKVCache.empty(config.num_hidden_layers)
            model(ids[:, :prefix], kv_cache=cache, commit_len=prefix)
            times = []
            for i in range(args.steps + args.warmup):
                sync(device)
                t0 = time.perf_counter()
                model(ids[:, prefix:], kv_cache=cache)  # block sees all: no mask, commits none
                sync(device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
        latency = sorted(times)[len(times) // 2]
        moved = block_forward_bytes(model, b, block, prefix + block)
        bound = sum(moved.values()) / (hbm_tbs * 1e12) if hbm_tbs else None
        lengths = torch.randint(prefix // 2, prefix + 1, (b,), generator=gen)
        prompts = [torch.randint(0, vocab - 2, (int(n),), generator=gen).tolist() for n in lengths]
        if not args.cpu_smoke:
            sampler.generate(prompts, use_cache=True)  # warm-up: compiles, allocator
        sync(device)
        out = sampler.generate(prompts, use_cache=True)
        row = {
            "batch": b, "block": block, "prefix": prefix,
            "block_forward_ms": latency * 1e3,
            "block_tokens_per_s": b * block / latency,
            "bytes_moved": moved, "bound_ms": None if bound is None else bound * 1e3,
            "vs_bound": None if bound is None else latency / bound,
            "generate_tokens_per_s": out.stats.tokens_per_s, "tpf": out.stats.tpf,
            "generate_forwards": out.stats.num_forwards,
        }  # fmt: skip
        print(f"  sampler batch {b}: block forward {latency * 1e3:.2f} ms"
              + (f" ({row['vs_bound']:.2f}x the HBM bound)" if bound else "")
              + f", generate {out.stats.tokens_per_s:.1f} tokens/s at TPF {out.stats.tpf:.2f}",
              flush=True)  # fmt: skip
        rows.append(row)
    return rows


def section_memory(args, device) -> list[dict]:
    if device.type != "cuda":
        return [{"skipped": "needs a GPU (CPU peak RSS per stage: BENCHMARKS.md)"}]
    rows = []
    for stage in (0, 2, 3):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "llada_train.sft", *MEMORY_OVERRIDES,
                   f"deepspeed=zero{stage}", f"output_dir={tmp}/run"]  # fmt: skip
            env = {**os.environ, "DS_ACCELERATOR": "cuda"}
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            row = {"zero_stage": stage, "seconds": time.perf_counter() - t0}
            if proc.returncode != 0:
                row["error"] = proc.stderr[-1500:]
            else:
                from llada_train.tracking import read_metrics

                metrics = read_metrics(f"{tmp}/run")
                row["peak_gpu_gib"] = max(m.get("memory/peak_gpu_gib_rank0", 0) for m in metrics)
                row["losses"] = [m["loss/total"] for m in metrics if "loss/total" in m]
        print(f"  memory ZeRO-{stage}: {row.get('peak_gpu_gib', row.get('error', '')[-200:])}",
              flush=True)  # fmt: skip
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- report
def read_junit(path: str | None) -> dict | None:
    if not path or not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = {}
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        cases[case.get("name")] = outcome
    return cases


def goals(report: dict) -> dict:
    if report["mode"] != "gpu":
        return {k: "not measurable (no GPU)" for k in GOALS}
    out = {}
    train = report.get("train") or {}
    if train.get("flex_mfu_pct") is not None:
        mfu = max(train["flex_mfu_pct"], train["sdpa_mfu_pct"])
        out["mfu_pct"] = f"{mfu:.1f}% (goal >= {GOALS['mfu_pct']}%)"
    att = {r["tokens"]: r for r in report.get("attention") or [] if "tokens" in r}
    if 4096 in att:
        out["attention_speedup_4k"] = (
            f"{att[4096]['speedup']:.2f}x (goal >= {GOALS['attention_speedup_4k']}x)"
        )
    ratios = [r["vs_bound"] for r in report.get("sampler") or [] if r.get("vs_bound")]
    if ratios:
        out["sampler_bound_ratio"] = (
            f"{min(ratios):.2f}-{max(ratios):.2f}x the bound "
            f"(goal <= {GOALS['sampler_bound_ratio']}x)"
        )
    return out


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [
        f"# gpu_check ({report['mode']}): {env['device_name']}",
        "",
        f"torch {env['torch']}, {env['dtype']}; assumed peak {env['peak_tflops']} TFLOP/s dense "
        f"bf16, HBM {env['hbm_tbs']} TB/s; {report['seconds']:.0f} s in all.",
        "",
    ]
    tests = report.get("tests")
    if tests:
        lines += ["| GPU test | outcome |", "|---|---|"]
        lines += [f"| {name} | {outcome} |" for name, outcome in tests.items()]
        lines.append("")
    if isinstance(report.get("attention"), list):
        lines += ["| attention, 2L tokens | mask kept | pass | SDPA ms | Flex ms | speed-up |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in report["attention"]:
            kind = "fwd+bwd" if r["backward"] else "fwd"
            lines.append(f"| {r['tokens']} | {r['density']:.3f} | {kind} | {r['sdpa_ms']:.2f} "
                         f"| {r['flex_ms']:.2f} | {r['speedup']:.2f}x |")  # fmt: skip
        lines.append("")
    t = report.get("train")
    if isinstance(t, dict) and "flex_step_ms" in t:
        lines += [
            f"Training step: {t['layers']} layers at hidden {t['hidden']}, {t['experts']} "
            f"experts, {t['params_total'] / 1e6:,.1f}M params ({t['params_active'] / 1e6:,.1f}M "
            f"active), batch {t['batch']} x 2x{t['seq_len']} tokens, "
            f"{t['model_tflop_per_step']:.4g} model TFLOP per step.",
            "",
            "| attention | step ms | tokens/s | MFU | peak GiB |",
            "|---|---|---|---|---|",
        ]
        for b in ("sdpa", "flex"):
            peak, mfu = t.get(f"{b}_peak_gib"), t[f"{b}_mfu_pct"]
            lines.append(
                f"| {b} | {t[f'{b}_step_ms']:.1f} | {t[f'{b}_tokens_per_s']:,.0f} | "
                f"{'-' if mfu is None else f'{mfu:.1f}%'} | "
                f"{'-' if peak is None else f'{peak:.1f}'} |"
            )
        lines.append("")
    m = report.get("moe")
    if isinstance(m, dict) and "grouped_ms" in m:
        lines += [
            f"MoE layer ({m['tokens']} tokens, {m['experts']} experts top-{m['top_k']}, "
            f"fwd+bwd): grouped {m['grouped_ms']:.2f} ms, per-expert loop {m['loop_ms']:.2f} "
            f"ms, {m['speedup']:.2f}x.",
            "",
        ]
    if isinstance(report.get("sampler"), list):
        lines += ["| sampler batch | block fwd ms | HBM bound ms | vs bound | block tokens/s "
                  "| generate tokens/s | TPF |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in report["sampler"]:
            bound = "-" if r["bound_ms"] is None else f"{r['bound_ms']:.2f}"
            ratio = "-" if r["vs_bound"] is None else f"{r['vs_bound']:.2f}x"
            lines.append(f"| {r['batch']} | {r['block_forward_ms']:.2f} | {bound} | {ratio} | "
                         f"{r['block_tokens_per_s']:,.0f} | {r['generate_tokens_per_s']:,.1f} | "
                         f"{r['tpf']:.2f} |")  # fmt: skip
        lines.append("")
    mem = report.get("memory")
    if isinstance(mem, list) and mem and "zero_stage" in mem[0]:
        lines += ["| ZeRO stage | peak GPU GiB | losses |", "|---|---|---|"]
        for r in mem:
            peak = f"{r['peak_gpu_gib']:.2f}" if "peak_gpu_gib" in r else "failed"
            lines.append(f"| {r['zero_stage']} | {peak} | {r.get('losses', '')} |")
        lines.append("")
    lines += ["Goals: " + "; ".join(f"{k}: {v}" for k, v in report["goals"].items()), ""]
    errors = report.get("errors") or {}
    lines += [f"Section {k}: {v.strip().splitlines()[-1]}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "results", "gpu_check"))
    p.add_argument("--tests-junit", default=None, help="pytest junit xml of the GPU tests")
    p.add_argument("--sections", nargs="+", default=["attention", "train", "moe", "sampler",
                                                     "memory"])  # fmt: skip
    p.add_argument("--train-layers", type=int, default=4, help="mini widths, fewer layers")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-seq", type=int, default=2048, help="clean length L (2L processed)")
    p.add_argument("--attention-batch", type=int, default=2)
    p.add_argument("--sampler-layers", type=int, default=4)
    p.add_argument("--sharpen", type=float, default=30.0, help="lm_head scale (TPF > 1)")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--budget-s", type=float, default=420.0,
        help="skip the sections that would start after this many seconds (the tests run first)",
    )  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--hbm-tbs", type=float, default=None)
    args = p.parse_args(argv)

    start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        raise SystemExit("no CUDA device: run with --cpu-smoke (tiny sizes on the CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    if args.cpu_smoke:  # one thread: a shared CPU makes multi-threaded runs spin
        args.steps, args.warmup, args.train_layers, args.sampler_layers = 1, 1, 2, 2
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU bf16 matmuls are emulated, slow
    cpu_name = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(device) if cuda else cpu_name
    peak, hbm = next(((f, b) for key, f, b in DEVICE_PEAKS if key in name), (None, None))
    peak = args.peak_tflops or peak or 989.0
    hbm = args.hbm_tbs or hbm if cuda else None
    report = {
        "mode": "gpu" if cuda else "cpu-smoke",
        "env": {
            "device_name": name, "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch."),
            "peak_tflops": peak, "hbm_tbs": hbm, "threads": torch.get_num_threads(),
        },
        "tests": read_junit(args.tests_junit),
        "errors": {},
    }  # fmt: skip
    print(f"gpu_check ({report['mode']}) on {name}: peak {peak} TFLOP/s, HBM {hbm} TB/s")
    runs = {
        "attention": lambda: section_attention(args, device, dtype),
        "train": lambda: section_train(args, device, dtype, peak),
        "moe": lambda: section_moe(args, device, dtype),
        "sampler": lambda: section_sampler(args, device, dtype, hbm),
        "memory": lambda: section_memory(args, device),
    }
    for section in args.sections:
        t0 = time.perf_counter()
        if t0 - start > args.budget_s:
            report["errors"][section] = f"skipped: past the {args.budget_s:.0f} s budget"
            continue
        print(f"[{section}]", flush=True)
        try:
            report[section] = runs[section]()
        except Exception:  # record and go on: one failure must not cost the other figures
            report["errors"][section] = traceback.format_exc()
            print(report["errors"][section], file=sys.stderr)
        if cuda:
            torch.cuda.empty_cache()
        print(f"[{section}] {time.perf_counter() - t0:.1f} s", flush=True)
    report["goals"] = goals(report)
    report["seconds"] = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text)
    failed_tests = [n for n, o in (report["tests"] or {}).items() if o in ("failed", "error")]
    return 1 if report["errors"] or failed_tests else 0


if __name__ == "__main__":
    sys.exit(main())
