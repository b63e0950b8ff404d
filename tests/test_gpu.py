"""GPU checks (marked `gpu`): what only a CUDA device runs, in bf16 where training runs in bf16.

Run by `scripts/gpu_check.sh` (or `pytest -m gpu tests/test_gpu.py` on a GPU machine). Skipped
where no CUDA device is present, except with LLADA_GPU_TESTS_ON_CPU=1 (what
`scripts/gpu_check.sh --cpu-smoke` sets): then the same tests run on the CPU at the same small
sizes, so the code cannot rot while no GPU is around (the CPU takes the padded-bmm and eager
FlexAttention paths instead of `torch._grouped_mm` and the fused kernels).

- grouped MoE dispatch: `torch._grouped_mm` (Hopper) = padded bmm = the official per-expert
  loop in bf16, outputs and gradients (max |diff| <= 2% of the largest |reference| entry).
- FlexAttention (compiled on CUDA) vs SDPA on the training mask with and without documents:
  fp32 logits and gradients; bf16 logits at most twice as far from fp32 as SDPA's (mean).
- Sampler: cached vs uncached, and FlexAttention vs SDPA, give the same tokens.
- A 2-step bf16 SFT of the tiny recipe on the device: two finite losses (and GPU memory logged).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from llada_train.masks import training_inputs
from llada_train.model import modeling
from llada_train.model.modeling import LLaDA2MoeModelLM, SparseMoE
from llada_train.model.reference import naive_moe_forward
from llada_train.sampler import Sampler, SamplerConfig
from llada_train.tracking import read_metrics
from tests.conftest import tiny_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("LLADA_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (LLADA_GPU_TESTS_ON_CPU=1 runs it on the CPU)")


def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _close(a: torch.Tensor, ref: torch.Tensor, share: float, what: str) -> None:
    err = float((a.float() - ref.float()).abs().max())
    scale = float(ref.float().abs().max())
    assert err <= share * scale + 1e-6, f"{what}: max |diff| {err:.3g} vs max |ref| {scale:.3g}"


# ---------------------------------------------------------------------------- MoE dispatch
def test_grouped_mm_equals_padded_bmm_and_per_expert_loop_bf16(device, monkeypatch):
    config = tiny_config(
        hidden_size=256,
        moe_intermediate_size=128,
        num_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        head_dim=64,
    )  # fmt: skip  (8-aligned widths: what torch._grouped_mm needs)
    torch.manual_seed(0)
    moe = SparseMoE(config).to(device)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
    moe = moe.to(torch.bfloat16).train()
    x0 = torch.randn(512, config.hidden_size, device=device, dtype=torch.bfloat16)
    if _is_hopper(device):  # the path under test really is the fused kernel
        assert modeling._use_torch_grouped_mm(x0, moe.experts.gate_up_proj)

    def run(forward):
        moe.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        y = forward(x)
        y.float().pow(2).sum().backward()
        return y.detach(), x.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad

    ours = run(moe)
    loop = run(lambda x: naive_moe_forward(moe, x))
    monkeypatch.setattr(modeling, "_use_torch_grouped_mm", lambda x, w: False)
    padded = run(moe)
    names = ("output", "grad x", "grad gate_up_proj", "grad down_proj")
    for name, a, b, c in zip(names, ours, padded, loop, strict=True):
        _close(a, c, 0.02, f"grouped vs loop, {name}")
        _close(b, c, 0.02, f"padded bmm vs loop, {name}")


# ---------------------------------------------------------------------------- attention
def _attention_model(device, dtype) -> LLaDA2MoeModelLM:
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8,
    )  # fmt: skip
    return LLaDA2MoeModelLM(config).to(device=device, dtype=dtype).train()


def _logits_grads(model, backend, ids, mask, pos, sl):
    model.attention_backend = backend
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask, position_ids=pos, logits_slice=sl)
    logits.logsumexp(-1).mean().backward()
    grads = [p.grad.detach().float().clone() for p in model.parameters() if p.grad is not None]
    return logits.detach(), grads


def test_flex_attention_matches_sdpa_on_the_training_mask(device):
    """fp32: FlexAttention = SDPA to 1e-3 of the largest |entry| (logits), 5e-3 (gradients).

    bf16 (the training dtype): both are compared with the fp32 result of the same weights, and
    FlexAttention's mean |error| must be at most twice SDPA's (plus 1e-4 of the scale): bf16
    rounding through a few layers (and the routing flips it causes, which dominate a max) is
    larger than any kernel difference, so a fixed bf16-vs-bf16 tolerance would be either loose
    or flaky. (CPU, eager math FlexAttention: flex/SDPA error ratio 1.0 and 1.7 observed.)
    """
    model = _attention_model(device, torch.float32)
    seq_len, bl = (256, 32) if device.type == "cuda" else (32, 8)  # CPU: eager math, smaller
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 255, (2, seq_len), generator=gen).to(device)
    xt = x0.masked_fill(torch.rand(2, seq_len, generator=gen).to(device) < 0.5, 255)
    doc = torch.zeros(2, seq_len, dtype=torch.long)
    doc[0, seq_len // 3 :] += 1
    doc[1, seq_len // 7 :] += 1
    doc[1, 2 * seq_len // 3 :] += 1
    for docs in (None, doc.to(device)):
        what = f"docs={docs is not None}"
        ids, mask, pos, sl = training_inputs(xt, x0, bl, docs)
        model.float()
        ref = {b: _logits_grads(model, b, ids, mask, pos, sl) for b in ("sdpa", "flex")}
        _close(ref["flex"][0], ref["sdpa"][0], 1e-3, f"fp32 logits, {what}")
        for i, (g, r) in enumerate(zip(ref["flex"][1], ref["sdpa"][1], strict=True)):
            _close(g, r, 5e-3, f"fp32 grad {i}, {what}")
        model.to(torch.bfloat16)
        low = {b: _logits_grads(model, b, ids, mask, pos, sl) for b in ("sdpa", "flex")}
        truth = ref["sdpa"][0]
        err = {b: float((low[b][0] - truth).abs().mean()) for b in low}
        print(what, "bf16 mean |logit - fp32|:", err)
        assert err["flex"] <= 2 * err["sdpa"] + 1e-4 * float(truth.abs().max()), (what, err)


def test_sampler_cached_uncached_flex_sdpa_agree(device):
    torch.manual_seed(2)
    model = LLaDA2MoeModelLM(tiny_config(vocab_size=64, head_dim=16)).to(device).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    prompts = [[5, 6, 7], list(range(10, 21)), [3]]  # left padding
    block, gen = (8, 24) if device.type == "cuda" else (4, 8)  # CPU: eager FlexAttention, smaller
    config = SamplerConfig.from_preset("quality", block_length=block, gen_length=gen)
    results = {}
    for backend in ("sdpa", "flex"):
        model.attention_backend = backend
        sampler = Sampler(model, mask_id=63, eos_id=62, config=config)
        for use_cache in (True, False):
            out = sampler.generate(prompts, use_cache=use_cache)
            results[backend, use_cache] = (out.tokens, out.stats.forwards_per_row)
    reference = results["sdpa", False]
    for key, value in results.items():
        assert value == reference, key


# ---------------------------------------------------------------------------- training
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("deepspeed", "hydra", "datasets")),
    reason="the training entry point needs the project's dependencies (pip install -e .)",
)
def test_two_step_bf16_sft(device, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "llada_train.sft", "+recipe=tiny", "precision=bf16",
        "max_steps=2", "micro_batch_size=4", "global_batch_size=4", "checkpoint.save_every=100",
        "checkpoint.smoke_prompts=1",
        "checkpoint.smoke_gen_length=8", "checkpoint.export_hf=false", "tracking=disabled",
        "progress=false", f"output_dir={out}",
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": device.type, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = read_metrics(out)
    losses = [m["loss/total"] for m in metrics if "loss/total" in m]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    if device.type == "cuda":
        assert any(m.get("memory/peak_gpu_gib_rank0", 0) > 0 for m in metrics)
