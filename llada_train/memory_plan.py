"""A per-GPU memory plan before launch: model states, activations, the rollout extra, a verdict.

`dry_run=true` prints it (train.py for SFT/CPT, rl/loop.py for RL; see docs/memory.md). Everything
here is arithmetic on the model config and the resolved run settings; nothing is allocated. The
same arithmetic resolves `rollout.gather=auto` at launch (`decode_gather`).

Contract (all sizes in bytes unless a name ends in `_gb`; 1 GB = 1e9 bytes):
- Model states (ZeRO paper, Rajbhandari et al. 2020, arXiv 1910.02054, section 3.1; DeepSpeed
  docs "Memory Requirements"): mixed-precision Adam keeps per *trained* parameter 2 B bf16
  weights + 2 B bf16 gradients + 12 B fp32 master weights and Adam moments = 16 B. ZeRO-1
  partitions the 12 B over the data-parallel ranks, ZeRO-2 also the gradients, ZeRO-3 also the
  weights. Optimizer offload moves the 12 B to host memory, with a 4 B fp32 gradient
  partition beside them (16 B on the host); parameter offload (ZeRO-3) the
  bf16 weights too; both are reported as host memory. A frozen parameter (LoRA base) holds only
  its bf16 weights. Expert parallelism of degree E (`plan.ep_size`) divides the routed-expert
  parameters by E before ZeRO partitions them over the remaining N / E ranks. (DeepSpeed's own
  `estimate_zero3_model_states_mem_needs_*` counts 18 B/param under ZeRO-3: it adds fp32
  gradient partitions; we follow the paper's 16 B and add the ZeRO-3 gather working set below.)
- ZeRO-3 working set: the gathered bf16 weights of the current and the prefetched module (two
  of the largest decoder layer or embedding).
- Activations (`activation_bytes`): the tensors autograd saves for backward, counted per layer
  for this architecture (llada_train/model/modeling.py), for a forward of B rows of S positions
  (S = 2L with the [x_t ; x_0] layout when block_length < L, else L), plus the loss's logits.
  Checked against the bytes autograd really saves on CPU (tests/test_memory_plan.py).
  With activation checkpointing: every layer's input (B x S x hidden) plus one layer's
  recomputation during backward.
- Rollout extra (RL): under ZeRO-3 the sampler's weights: `whole` gathers every bf16 weight,
  `layerwise` (ZeRO-3's own per-module fetch, `distributed.LockstepModel`) holds two of the
  largest modules (the current and the prefetched one); either way plus the prefix KV cache of
  the sampler batch and one block's logits. `auto` (`choose_gather`) is `whole` when model
  states + that rollout with a whole gather + the runtime overhead fit the GPU, else
  `layerwise` (training activations do not count: see the peak).
- Peak = model states + max(ZeRO-3 working set + training activations, rollout) + a fixed
  runtime overhead (CUDA context, NCCL and allocator; RUNTIME_OVERHEAD_GB, a rough figure):
  training and decoding are never live together, and a layerwise rollout decodes within the
  same working set (counted once). It fits when the peak is at most the GPU's memory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

GB = 1e9
RUNTIME_OVERHEAD_GB = 3.0  # CUDA context (~0.5), NCCL buffers, allocator fragmentation: a guess
F32 = 4  # bytes
I64 = 8  # bytes (index tensors saved by gather / index_select / topk)


@dataclass(frozen=True)
class Setup:
    """The resolved run, as the plan needs it. `act_bytes`: 2 (bf16) or 4 (fp32)."""

    task: str  # sft | cpt | rl
    num_gpus: int
    gpu_gb: float
    stage: int  # ZeRO stage 0..3
    offload_optimizer: bool
    offload_param: bool
    lora_params: int  # trained adapter parameters; 0 = full fine-tuning
    ep_size: int  # expert-parallel degree (1 = none)
    micro_batch_size: int
    seq_len: int  # L: tokens per row whose logits the loss reads
    block_length: int
    activation_checkpointing: bool
    attention: str = "flex"  # flex (CUDA default) | sdpa (a dense mask is materialised)
    act_bytes: int = 2
    rollout_batch: int = 0  # RL: sequences per sampler call on one rank
    rollout_len: int = 0  # RL: prompt + generated tokens
    rollout_gather: str = "whole"  # whole | layerwise (auto resolved: `choose_gather`)
    reference_copy: bool = False  # RL kl_coef > 0: a frozen bf16 copy of the model


@dataclass
class Plan:
    parts: list[tuple[str, float]]  # (label, GB per GPU), printed in order
    states_gb: float
    activations_gb: float
    rollout_gb: float
    host_gb: float  # host memory per GPU (offload)
    peak_gb: float
    fits: bool


# ---------------------------------------------------------------------------- parameters
def parameter_groups(config) -> tuple[int, int, int]:
    """(total, routed-expert, largest module) parameter counts of an LLaDA2MoeConfig."""
    h, v = config.hidden_size, config.vocab_size
    total, _ = config.num_parameters()
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    per_expert = 3 * h * config.moe_intermediate_size
    expert = moe_layers * config.num_experts * per_expert
    attn = h * (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    attn += config.num_attention_heads * config.head_dim * h
    shared = 3 * h * config.moe_intermediate_size * (config.num_shared_experts or 0)
    moe_layer = attn + config.num_experts * (per_expert + h) + shared
    dense_layer = attn + 3 * h * config.intermediate_size
    largest = max(moe_layer if moe_layers else 0, dense_layer, v * h)
    return total, expert, largest


def model_state_bytes(config, s: Setup) -> tuple[float, float]:
    """(GPU bytes, host bytes) of weights + gradients + optimizer states per GPU.

    Per trained parameter 2 + 2 + 12 B (ZeRO paper section 3.1); frozen parameters 2 B. Dense
    parameters are partitioned over N ranks, routed experts first split E ways (EP), then
    partitioned over N / E ranks.
    """
    total, expert, _ = parameter_groups(config)
    n, e = s.num_gpus, max(1, s.ep_size)
    gpu = host = 0.0
    # (parameters held per rank before ZeRO, ZeRO partition degree, trained?)
    groups = [(total - expert, n), (expert / e, max(1, n // e))]
    for count, degree in groups:
        trained = count if not s.lora_params else 0
        w = 2 * count / (degree if s.stage >= 3 else 1)
        g = 2 * trained / (degree if s.stage >= 2 else 1)
        o = 12 * trained / (degree if s.stage >= 1 else 1)
        # optimizer offload also keeps the fp32 gradient partition in host memory (4 B;
        # deepspeed runtime/zero/stage3.py, the offload path of the fp32 partitioned grads)
        g32 = 4 * trained / (degree if s.stage >= 1 else 1)
        host += (w if s.offload_param else 0) + (o + g32 if s.offload_optimizer else 0)
        gpu += (0 if s.offload_param else w) + g + (0 if s.offload_optimizer else o)
    if s.lora_params:  # adapters: dense, small, trained with the full 16 B
        a = s.lora_params / (n if s.stage >= 3 else 1)
        gpu += (0 if s.offload_param else 2 * a) + 2 * s.lora_params / (n if s.stage >= 2 else 1)
        o = 12 * s.lora_params / (n if s.stage >= 1 else 1)
        host += 16 / 12 * o if s.offload_optimizer else 0  # + the fp32 gradients, as above
        gpu += 0 if s.offload_optimizer else o
    if s.reference_copy:
        gpu += 2 * total  # a whole frozen bf16 copy (KL reference, not partitioned)
    return gpu, host


# ---------------------------------------------------------------------------- activations
def layer_activation_bytes(
    config,
    tokens: int,
    is_moe: bool,
    act_bytes: int = 2,
    dispatch_padding: float = 0.0,
) -> float:
    """Bytes autograd saves for one decoder layer over `tokens` positions (B x S).

    a = act_bytes; every RMSNorm keeps its fp32 input (a copy when a = 2) and its normalised
    output; attention keeps the fused qkv output, the q/k norm inputs and outputs, the roped q
    and k, the attention output twice (kernel output and the `dense` input) and the fp32
    logsumexp (flash / FlexAttention style: no S x S probabilities); the MoE keeps the fp32
    router scores, the dispatched copies of the tokens (x top-k), the expert gate/up outputs,
    SiLU output and product, the expert outputs before and after the fp32 weighting and the index
    tensors; the shared expert and dense MLP keep gate, up, SiLU and product.
    `dispatch_padding`: 0 on the Hopper grouped-mm and the CPU per-expert paths; the padded bmm
    of other GPUs (`modeling.padded_bmm`) keeps (experts x largest group) / (tokens x top-k)
    extra copies of its inputs (>= 1).
    Not counted: the dense mask (`attention_mask_bytes`), tensors of size
    O(hidden) or O(experts) per layer.
    """
    a, f = act_bytes, F32
    h, d = config.hidden_size, config.head_dim
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    cast = f if a != f else 0  # .float() copies exist only when activations are not fp32
    # fp32 input (a copy in bf16, the residual stream itself in fp32), the normalised value
    # before the weight, the output (the next Linear's input), the fp32 rsqrt
    norm = (f + 2 * a) * h + f
    attn = norm
    attn += a * (nh + 2 * nkv) * d  # qkv output (v is a view of it)
    attn += (cast + a) * (nh + nkv) * d + f * (nh + nkv)  # q/k RMSNorm
    attn += a * (nh + nkv) * d  # roped q, k
    attn += 2 * a * nh * d + f * nh  # attention output, `dense` input, logsumexp
    if is_moe:
        k, e, i = config.num_experts_per_tok, config.num_experts, config.moe_intermediate_size
        mlp = norm + cast * h  # router input in fp32
        # fp32 scores, group top-2 / group / expert indices, keep mask, combine weights
        mlp += f * e + e + I64 * (2 * config.n_group + config.topk_group + k) + f * (k + 1)
        p = dispatch_padding
        # dispatched x, gate_up (2I), SiLU, product; padded (E x cap) buffers on CPU only
        mlp += a * k * ((1 + p) * h + 4 * i + p * i)
        mlp += a * k * h + f * k * h + f * k  # expert outputs, fp32 weighted outputs, weights
        mlp += I64 * k * (4 if p else 2)  # token / order (/ two dest) indices
        mlp += 4 * a * i * (config.num_shared_experts or 0)  # shared expert
    else:
        mlp = norm + 4 * a * config.intermediate_size
    return tokens * (attn + mlp)


def attention_mask_bytes(config, rows: int, positions: int) -> float:
    """SDPA only: each layer saves its own fp32 copy of the dense (rows|1, 1, S, S) mask
    (measured on CPU, torch 2.x); FlexAttention's BlockMask is negligible."""
    return config.num_hidden_layers * rows * positions * positions * F32


def logits_bytes(config, rows: int, seq_len: int, act_bytes: int = 2, supervised=1.0) -> float:
    """Peak bytes of the loss head over `rows` x `seq_len` positions: the fp32 logits (B, L, V),
    the fp32 log-probabilities the cross-entropy saves for the `supervised` share of positions,
    and, at the start of backward, the fp32 gradient of the logits plus the `act_bytes` gradient
    of the lm_head output."""
    n = rows * seq_len * config.vocab_size
    return n * (F32 + F32 * supervised + F32 + act_bytes)


def saved_logits_bytes(
    config, rows: int, seq_len: int, positions: int, act_bytes: int, supervised: float
) -> float:
    """The part of the loss head autograd saves: the fp32 log-probabilities of the supervised
    share and the final RMSNorm over the L read positions (in fp32 its input is a view of the
    whole S-position residual stream, so that whole storage stays alive)."""
    h, a = config.hidden_size, act_bytes
    norm_in = rows * (seq_len if a != F32 else positions) * F32 * h
    norm = norm_in + rows * seq_len * (a * h + F32)
    return rows * seq_len * config.vocab_size * F32 * supervised + norm


def activation_bytes(
    config,
    rows: int,
    seq_len: int,
    block_length: int,
    act_bytes: int = 2,
    checkpointing: bool = False,
    dispatch_padding: float = 0.0,
) -> float:
    """Saved bytes of all decoder layers for `rows` sequences of `seq_len` tokens in the
    training layout ([x_t ; x_0]: 2L positions when block_length < L). With checkpointing:
    each layer's input (a x hidden per position) plus one MoE layer recomputed in backward."""
    positions = 2 * seq_len if block_length < seq_len else seq_len
    tokens = rows * positions
    layers = [config.is_moe_layer(i) for i in range(config.num_hidden_layers)]
    if checkpointing:
        one = max(layer_activation_bytes(config, tokens, m, act_bytes, dispatch_padding)
                  for m in set(layers))  # fmt: skip
        return len(layers) * tokens * act_bytes * config.hidden_size + one
    return sum(layer_activation_bytes(config, tokens, m, act_bytes, dispatch_padding)
               for m in layers)  # fmt: skip


def rollout_bytes(config, s: Setup) -> float:
    """RL sampler bytes per GPU beside the model states: gathered weights (ZeRO-3 only; below
    it they are resident): the whole bf16 model (`whole`) or the working set of two of the
    largest modules (`layerwise`); the prefix KV cache (batch x len x layers x 2 x kv_heads x
    head_dim x act_bytes) and one block's fp32 logits (batch x block_length x vocab x 4 B,
    twice for the sampling math)."""
    if not s.rollout_batch:
        return 0.0
    total, _, largest = parameter_groups(config)
    if s.stage >= 3 or s.offload_param:
        gather = 2 * total if s.rollout_gather == "whole" else 2 * 2 * largest
    else:
        gather = 0.0
    kv = s.rollout_batch * s.rollout_len * config.num_hidden_layers * 2
    kv *= config.num_key_value_heads * config.head_dim * s.act_bytes
    logits = 2 * s.rollout_batch * s.block_length * config.vocab_size * F32
    return gather + kv + logits


# ---------------------------------------------------------------------------- the plan
def estimate(config, s: Setup) -> Plan:
    """The per-GPU plan of `s` for a model of `config` (an LLaDA2MoeConfig)."""
    states, host = model_state_bytes(config, s)
    _, _, largest = parameter_groups(config)
    working = 2 * 2 * largest if s.stage >= 3 else 0.0
    rows, positions = (
        s.micro_batch_size,
        (2 * s.seq_len if s.block_length < s.seq_len else s.seq_len),
    )
    layers = activation_bytes(
        config, rows, s.seq_len, s.block_length, s.act_bytes, s.activation_checkpointing
    )
    mask = attention_mask_bytes(config, 1, positions) if s.attention == "sdpa" else 0.0
    head = logits_bytes(config, rows, s.seq_len, s.act_bytes)
    acts = layers + mask + head
    roll = rollout_bytes(config, s)
    peak = states + max(working + acts, roll) + RUNTIME_OVERHEAD_GB * GB
    ckpt = "with" if s.activation_checkpointing else "without"
    parts = [
        ("model states (weights + grads + optimizer)", states / GB),
        ("ZeRO-3 gathered working set (2 largest modules)", working / GB),
        (f"activations {ckpt} checkpointing ({rows} x {positions} positions)", layers / GB),
    ]
    if mask:
        parts.append(("dense attention masks (sdpa, fp32 per layer)", mask / GB))
    parts.append((f"logits + loss ({rows} x {s.seq_len} x {config.vocab_size}, fp32)", head / GB))
    if s.rollout_batch:
        weights = "whole model" if s.rollout_gather == "whole" else "2 largest modules"
        if s.stage < 3 and not s.offload_param:
            weights = "resident weights"
        label = f"rollout ({s.rollout_gather}: {weights} + KV cache + logits)"
        parts.append((label, roll / GB))
    parts.append(("runtime overhead (CUDA context, NCCL, allocator)", RUNTIME_OVERHEAD_GB))
    return Plan(
        parts, states / GB, acts / GB, roll / GB, host / GB, peak / GB, peak / GB <= s.gpu_gb
    )


def suggestions(config, s: Setup, total_lora_params: int) -> list[str]:
    """Changes that lower the peak, each with the peak it would give (GB per GPU); when none
    fits alone, all of them together as a last line.

    Under expert parallelism (`s.ep_size` > 1) LoRA is never suggested (launch refuses LoRA
    with AutoEP: `distributed.check_expert_parallel`), and an RL plan whose rollout decodes on
    a whole copy (AutoEP refuses layerwise decoding) also gets "no expert parallelism" (alone,
    and with `deepspeed=zero3_offload` when that is suggested) where `rollout.gather=auto`
    would then decode layerwise (`choose_gather`)."""
    out, together = [], {}
    base = estimate(config, s).peak_gb

    def tried(label: str, **change) -> None:
        p = estimate(config, dataclasses.replace(s, **change))
        if p.peak_gb < 0.99 * base:
            verdict = "fits" if p.fits else "does not fit"
            host = f"; host {p.host_gb:.0f} GB per GPU" if p.host_gb else ""
            out.append(f"  {label}: peak {p.peak_gb:.1f} GB ({verdict}{host})")
            if "num_gpus" not in change and "lora_params" not in change:
                together.update(change)

    offload = dict(stage=3, offload_optimizer=True, offload_param=True)
    # under EP the rollout decodes on a whole copy (AutoEP refuses layerwise decoding); without
    # EP, `rollout.gather=auto` decodes layerwise where the whole model does not fit
    whole_under_ep = s.ep_size > 1 and s.rollout_batch and s.rollout_gather == "whole"
    no_ep = "no expert parallelism (deepspeed.expert_parallel.autoep_size=0; rollout.gather=auto"
    no_ep += " then decodes layerwise)"

    def tried_without_ep(label: str, **change) -> None:
        if choose_gather(config, dataclasses.replace(s, ep_size=1, **change)) == "layerwise":
            tried(label, ep_size=1, rollout_gather="layerwise", **change)

    if s.stage < 3 or not (s.offload_optimizer and s.offload_param):
        keeps = (f" deepspeed.expert_parallel.autoep_size={s.ep_size} (rollouts still decode "
                 "on a whole copy)")  # fmt: skip
        tried(f"deepspeed=zero3_offload{keeps if whole_under_ep else ''}", **offload)
        if whole_under_ep:
            tried_without_ep(f"deepspeed=zero3_offload, {no_ep}", **offload)
    if whole_under_ep:
        tried_without_ep(no_ep)
    for n in (2 * s.num_gpus, 4 * s.num_gpus):
        tried(f"{n} GPUs (plan.num_gpus={n})", num_gpus=n)
    # LoRA is refused with AutoEP (distributed.check_expert_parallel): not under EP
    if not s.lora_params and total_lora_params and s.ep_size == 1:
        # LoRA is refused under ZeRO-3 (lora.check_lora): the frozen base is then replicated
        tried(
            "lora.enabled=true deepspeed=zero2",
            lora_params=total_lora_params, stage=min(s.stage, 2), offload_param=False,
        )  # fmt: skip
    if s.micro_batch_size > 1:
        tried("micro_batch_size=1", micro_batch_size=1)
    if not s.activation_checkpointing:
        tried("activation_checkpointing=true", activation_checkpointing=True)
    if s.rollout_batch and s.rollout_gather == "whole" and s.stage >= 3 and s.ep_size == 1:
        # (under AutoEP decoding needs a whole copy: `distributed.inference_model`)
        tried("layerwise rollout gather (rollout.gather=layerwise)", rollout_gather="layerwise")
    if len(together) > 1 and not any("(fits" in line for line in out):
        p = estimate(config, dataclasses.replace(s, **together))
        host = f"; host {p.host_gb:.0f} GB per GPU" if p.host_gb else ""
        out.append(f"  all of the above but LoRA and more GPUs: peak {p.peak_gb:.1f} GB "
                   f"({'fits' if p.fits else 'does not fit'}{host})")  # fmt: skip
    return out


def format_plan(config, s: Setup, total_lora_params: int = 0) -> list[str]:
    """The printed lines; the last one is the verdict."""
    p = estimate(config, s)
    off = "+".join(
        k for k, on in (("optimizer", s.offload_optimizer), ("params", s.offload_param)) if on
    )
    lines = [
        f"memory plan ({s.task}): {s.num_gpus} GPUs x {s.gpu_gb:g} GB, ZeRO-{s.stage}"
        f"{' offload ' + off if off else ''}, {'LoRA' if s.lora_params else 'full fine-tuning'}"
        f"{f', EP {s.ep_size}' if s.ep_size > 1 else ''}, {'bf16' if s.act_bytes == 2 else 'fp32'}"
    ]
    lines += [f"  {label:<62} {gb:8.1f} GB" for label, gb in p.parts]
    other = dataclasses.replace(s, activation_checkpointing=not s.activation_checkpointing)
    o = estimate(config, other)
    lines.append(
        f"  (activations {'without' if s.activation_checkpointing else 'with'} checkpointing "
        f"would be {o.activations_gb:.1f} GB)"
    )
    if s.rollout_batch:
        lines.append("  (training and rollout are never live together: the peak takes the larger)")
    if p.host_gb:
        lines.append(f"  host memory (offload): {p.host_gb:.1f} GB per GPU")
    if not p.fits:
        lines.append("what to change:")
        lines += suggestions(config, s, total_lora_params)
    verdict = "fits" if p.fits else "does not fit"
    lines.append(
        f"memory plan: peak {p.peak_gb:.1f} GB per GPU on {s.num_gpus} x {s.gpu_gb:g} GB: {verdict}"
    )
    return lines


# ---------------------------------------------------------------------------- from a config
def device_gb(plan_cfg) -> tuple[float, str]:
    """(GPU memory in GB, where it came from): plan.gpu_gb, else the CUDA device, else 80."""
    if plan_cfg.gpu_gb:
        return float(plan_cfg.gpu_gb), "plan.gpu_gb"
    import torch

    if torch.cuda.is_available():  # this rank's device (init_distributed sets it)
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory / GB, "the CUDA device"
    return 80.0, "assumed (no GPU here; set plan.gpu_gb)"


def whole_gather_peak_gb(config, s: Setup) -> float:
    """GB per GPU while decoding with a whole-model gather under the plan `s` (its rollout
    batch, at least one sequence of one block): model states + the rollout bytes with `whole`
    (the bf16 model, KV cache, logits) + the runtime overhead: the rollout term of `estimate`'s
    peak. Training activations and the ZeRO-3 working set do not count: training and decoding
    are never live together."""
    whole = dataclasses.replace(
        s, rollout_gather="whole", rollout_batch=max(1, s.rollout_batch),
        rollout_len=max(s.rollout_len, s.block_length),
    )  # fmt: skip
    states, _ = model_state_bytes(config, whole)
    return (states + rollout_bytes(config, whole)) / GB + RUNTIME_OVERHEAD_GB


def choose_gather(config, s: Setup) -> str:
    """What `rollout.gather=auto` decodes with under the plan `s`: `whole` when the decoding
    with a whole gather fits the GPU (`whole_gather_peak_gb` <= gpu_gb), else `layerwise`;
    `whole` below ZeRO-3, where nothing is gathered (the weights are resident). The rule of
    issue 28: gather the whole model only where it fits. Whether training fits is the plan's
    verdict, not this one's."""
    if s.stage < 3 and not s.offload_param:
        return "whole"
    return "whole" if whole_gather_peak_gb(config, s) <= s.gpu_gb else "layerwise"


def requested_gather(cfg, task: str) -> str:
    """The gather a run asks for: `rollout.gather` for RL (rollouts, held-out reward, smoke
    generations, in-process lm-eval); SFT/CPT have no key and decode with `auto`. Raises
    ValueError for a value outside auto | whole | layerwise."""
    gather = str(cfg.rollout.gather) if task == "rl" else "auto"
    if gather not in ("auto", "whole", "layerwise"):
        raise ValueError(f"rollout.gather={gather}: choose auto, whole or layerwise")
    return gather


def plan_ep_size(cfg) -> int:
    """The expert-parallel degree the plan divides routed-expert states by: `plan.ep_size`
    when set, else the run's own AutoEP degree (`deepspeed.expert_parallel.autoep_size`,
    0 = off -> 1)."""
    from llada_train.distributed import autoep_size

    if cfg.plan.get("ep_size") is not None:
        return int(cfg.plan.ep_size)
    return max(1, autoep_size(cfg.deepspeed))


def setup_from_config(
    cfg, config, task: str, world: int, num_gpus: int | None = None, gpu_gb: float | None = None
) -> Setup:
    """A Setup from a resolved TrainConfig / RLConfig node and the model config, for
    `num_gpus` GPUs (default `plan.num_gpus`, else `world`) of `gpu_gb` GB (default
    `device_gb`); its `rollout_gather` is the run's (`requested_gather`), `auto` resolved by
    `choose_gather`. Raises ValueError for a bad `plan.ep_size` or `rollout.gather`."""
    from llada_train.distributed import autoep_size
    from llada_train.lora import lora_parameter_count

    gpu_gb = gpu_gb or device_gb(cfg.plan)[0]
    num_gpus = num_gpus or cfg.plan.num_gpus or world
    ep_size = plan_ep_size(cfg)
    if ep_size < 1 or num_gpus % ep_size:
        raise ValueError(f"plan.ep_size={ep_size} must be >= 1 and divide the {num_gpus} GPUs")
    gather = requested_gather(cfg, task)
    if task != "rl" and cfg.plan.get("model"):
        import warnings

        warnings.warn(f"plan.model has no effect for {task}: the plan sizes the model node",
                      stacklevel=2)  # fmt: skip
    lora = lora_parameter_count(config, cfg.lora) if cfg.lora.enabled else 0
    common = dict(
        task=task, num_gpus=num_gpus, gpu_gb=gpu_gb,
        stage=cfg.deepspeed.stage, offload_optimizer=cfg.deepspeed.offload_optimizer,
        offload_param=cfg.deepspeed.offload_param, lora_params=lora, ep_size=ep_size,
        micro_batch_size=cfg.micro_batch_size,
        activation_checkpointing=cfg.activation_checkpointing,
        attention="sdpa" if cfg.attention_backend == "sdpa" else "flex",
        act_bytes=4 if cfg.precision == "fp32" else 2,
    )  # fmt: skip
    if task != "rl":
        s = Setup(seq_len=cfg.data.max_length, block_length=cfg.block_length, **common)
    else:
        per_rank = max(1, cfg.rollout.prompts_per_step // num_gpus)
        length = cfg.plan.prompt_length + cfg.rollout.gen_length
        s = Setup(
            seq_len=length, block_length=cfg.block_length or 32,
            rollout_batch=per_rank * cfg.rollout.group_size, rollout_len=length,
            reference_copy=cfg.conf.kl_coef > 0, **common,
        )  # fmt: skip
    if autoep_size(cfg.deepspeed) > 1:  # AutoEP decodes with a whole local copy
        if gather == "layerwise":
            raise ValueError(
                "rollout.gather=layerwise with deepspeed.expert_parallel.autoep_size="
                f"{autoep_size(cfg.deepspeed)}: decoding under AutoEP uses a whole copy of the "
                "model (distributed.inference_model); use rollout.gather=whole or auto, or "
                "turn AutoEP off"
            )
        gather = "whole"
    if gather == "auto":
        gather = choose_gather(config, s)
    return dataclasses.replace(s, rollout_gather=gather)


def decode_gather(
    cfg, config, task: str, world: int, device_type: str, gpu_gb: float | None = None
) -> tuple[str, str]:
    """(gather, why): how a launched run decodes under ZeRO-3 (`distributed.inference_model`),
    for `world` processes on a `device_type` ("cuda" | "cpu") device of `gpu_gb` GB (default
    `device_gb`; a launched run passes the smallest over its ranks, so that every rank makes
    the same choice). RL's `rollout.gather` whole | layerwise is taken as given; `auto` (RL's
    default; SFT and CPT, which have no key, always) is `whole` below ZeRO-3 (weights resident)
    and on the CPU (no GPU memory to plan for), else `choose_gather` on the plan of this world
    (`plan.num_gpus` ignored: the run is what it is). `why` names `rollout.gather` for RL and no
    key for SFT/CPT."""
    gather = requested_gather(cfg, task)
    key = "rollout.gather=" if task == "rl" else ""  # SFT/CPT: no key to name
    if gather != "auto":
        return gather, f"{key}{gather}"
    if cfg.deepspeed.stage < 3:
        return "whole", f"{key}auto, below ZeRO-3 the weights are resident"
    if device_type != "cuda":
        return "whole", f"{key}auto on the {device_type}"
    s = setup_from_config(cfg, config, task, world, num_gpus=world, gpu_gb=gpu_gb)
    gather = s.rollout_gather  # choose_gather's verdict on this run's plan
    whole_gb = 2 * parameter_groups(config)[0] / GB
    verdict = "fits" if gather == "whole" else "does not fit"
    return gather, (
        f"{key}auto: model states + the whole model ({whole_gb:.1f} GB in bf16) + KV cache "
        f"= {whole_gather_peak_gb(config, s):.1f} GB {verdict} in {s.gpu_gb:g} GB"
    )


def print_plan(cfg, config, task: str, world: int) -> bool:
    """Print the plan of a resolved run; returns whether it fits."""
    from llada_train.lora import lora_parameter_count

    s = setup_from_config(cfg, config, task, world)
    _, source = device_gb(cfg.plan)
    print(f"GPU memory {s.gpu_gb:g} GB ({source}); GPUs {s.num_gpus} "
          f"({'plan.num_gpus' if cfg.plan.num_gpus else 'WORLD_SIZE'})")  # fmt: skip
    if s.stage >= 3 or s.offload_param:
        asked = requested_gather(cfg, task)
        how = f"auto -> {s.rollout_gather}" if asked == "auto" else asked
        if task == "rl":
            print(f"rollout.gather={how} (under ZeRO-3: rollouts, held-out reward, smoke samples)")
        else:  # no key: SFT/CPT always decode with auto
            print(f"decoding under ZeRO-3 (smoke samples, held-out check, in-process lm-eval): "
                  f"{how} gather")  # fmt: skip
    for line in format_plan(config, s, lora_parameter_count(config, cfg.lora)):
        print(line)
    return math.isfinite(s.gpu_gb) and estimate(config, s).fits


def rl_model_config(cfg):
    """The LLaDA2MoeConfig an RL plan sizes: `plan.model` (conf/model/NAME.yaml, e.g. `flash`:
    a dry run before the weights are on disk) when set, else `init_from`'s config.json (a
    model dir, checkpoint or run dir). Raises ValueError when neither names one, or when
    plan.model names no file of conf/model."""
    import os

    from omegaconf import OmegaConf

    from llada_train import CONF_DIR
    from llada_train.model.build import model_config_from_node

    if cfg.plan.model:
        path = os.path.join(CONF_DIR, "model", f"{cfg.plan.model}.yaml")
        if not os.path.isfile(path):
            names = sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "model")))
            raise ValueError(f"plan.model={cfg.plan.model}: no conf/model file; choose {names}")
        return model_config_from_node(OmegaConf.load(path))
    init_from = OmegaConf.select(cfg, "init_from", throw_on_missing=False)
    if not init_from:
        raise ValueError(
            "name the model with plan.model=NAME (conf/model/NAME.yaml) or init_from=DIR"
        )
    from llada_train.checkpoint import resolve_model_dir
    from llada_train.model.config import LLaDA2MoeConfig

    return LLaDA2MoeConfig.from_json(resolve_model_dir(init_from))


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    """`python -m llada_train.memory_plan ENTRY [overrides ...]`: the plan alone, for
    ENTRY = sft | cpt | rl composed as the entry point composes it (same overrides). The RL
    schema has no model node: name the model with `model=NAME` (= `plan.model=NAME`,
    conf/model/NAME.yaml) or `init_from=DIR` (its config.json)."""
    import sys

    from hydra import compose, initialize_config_dir

    from llada_train import CONF_DIR
    from llada_train.config import register_configs
    from llada_train.distributed import world_size_from_env
    from llada_train.model.build import resolve_model_config

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("sft", "cpt", "rl"):
        raise SystemExit("usage: python -m llada_train.memory_plan sft|cpt|rl [key=value ...]")
    entry, overrides = args[0], args[1:]
    if entry == "rl":  # model=NAME is the plan's model (plan.model): the RL schema has no node
        overrides = [f"plan.{o}" if o.startswith("model=") else o for o in overrides]
    register_configs("rl" if entry == "rl" else "train")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=entry, overrides=overrides)
    if entry != "rl":
        config = resolve_model_config(cfg.init_from, cfg.model)
    else:
        try:
            config = rl_model_config(cfg)
        except ValueError as e:
            raise SystemExit(f"rl: {e}") from None
    print_plan(cfg, config, entry, cfg.plan.num_gpus or world_size_from_env())


if __name__ == "__main__":
    main()
