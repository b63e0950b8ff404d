"""The only module that touches torch.distributed and DeepSpeed.

Contract:
- `init_distributed()` works the same under `python -m` (a world of one: it fills in the
  rendezvous variables torchrun would set) and under `torchrun`/`deepspeed`; NCCL on CUDA, gloo
  on CPU (`DS_ACCELERATOR=cpu`).
- `deepspeed_config(...)` is the one place the DeepSpeed json is produced from our typed config.
- `create_engine(...)`: a real DeepSpeed engine (ZeRO 0-3, optional CPU offload) over the model,
  AdamW with decoupled weight decay on matrices only, and a step-indexed LR schedule.
- Expert parallelism is DeepSpeed AutoEP (`deepspeed.expert_parallel.autoep_size=N`):
  `deepspeed_config` opens the `expert_parallel` block, `create_engine` fills in the routing
  map from the model config (`autoep_block`), carries each router's bias as the frozen
  parameter AutoEP copies (`Router.carry_bias_as_parameter`) and, after AutoEP has swapped the
  MoE blocks, checks the bias came through and gives the new blocks our interface
  (`adapt_autoep_layers`). `gather_experts` reassembles the routed experts of an EP group for
  the HF export (model/io.py), which stays in the official per-expert layout.
- `inference_model(model, gather, engine)`: the model for a block of decoding. Below ZeRO-3 the
  model itself. Under ZeRO-3, `gather="whole"`: whole weights on every rank (a hook-free twin
  over the gathered tensors), so ranks may take different numbers of sampler forwards;
  `gather="layerwise"`: the partitioned model behind `LockstepModel`, decoding through ZeRO-3's
  own per-module fetch with every rank of the ZeRO group making the same sequence of forwards
  (a rank that is done runs one-token dummy forwards until an all-reduced "anyone still
  decoding" flag is 0), on a rollout copy of the engine's parameter coordinator so the
  training trace is untouched (docs/scale.md). Loads and exports gather one decoder layer at a
  time (`layerwise_gather`), so no rank holds the whole model for them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialise the process group once (idempotent) and return this process's place in it."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # plain `python -m`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a world of one); returns t."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_sums(
    sums: dict[str, float | torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Sum named values over ranks in one collective; returns float64 tensors by name, each of
    its value's shape. Every rank passes the same names (laid out in sorted order, so the
    insertion order of the dict does not matter); a value is a number or a tensor of any shape.
    A float32 value comes back exactly as a float32 all-reduce over two ranks would give it."""
    names = sorted(sums)
    values = [torch.as_tensor(sums[k], device=device).detach() for k in names]
    flat = torch.cat([v.to(torch.float64).reshape(-1) for v in values])  # (sum of sizes,)
    all_reduce_sum(flat)
    out, start = {}, 0
    for name, v in zip(names, values, strict=True):
        out[name] = flat[start : start + v.numel()].view(v.shape)
        start += v.numel()
    return out


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer of rank `src` to the other ranks (ZeRO-3 gathers parameters only, so
    buffers such as the router's expert bias, loaded on one rank, travel this way)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b.data, src=src)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_min(value: float, device: torch.device) -> float:
    """The smallest `value` over ranks (`value` itself in a world of one); a collective, so
    every rank calls it with its own value."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return float(t.item())
    return value


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA, fp32 elsewhere."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision={precision!r}: choose auto, bf16 or fp32")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def check_deepspeed(ds_cfg) -> None:
    """ValueError naming the `deepspeed.*` key to change (called at launch and here)."""
    if ds_cfg.stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.stage={ds_cfg.stage}: ZeRO stages are 0, 1, 2, 3")
    if ds_cfg.offload_param and ds_cfg.stage != 3:
        raise ValueError("deepspeed.offload_param needs deepspeed.stage=3")
    if ds_cfg.offload_optimizer and ds_cfg.stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs deepspeed.stage >= 1")
    check_autoep_settings(ds_cfg)


# ---------------------------------------------------------------------------- expert parallelism
# Keys of DeepSpeed's `expert_parallel` block that define the routing math: `autoep_block` sets
# them from the model config, so an override could only make AutoEP compute another function.
AUTOEP_MAPPED_KEYS = (
    "enabled", "autoep_size", "preset_model", "num_experts_attr", "top_k_attr", "top_k",
    "score_func", "score_apply", "route_norm", "route_scale", "routed_scaling_factor",
    "num_expert_groups", "num_limited_groups", "expert_activation", "has_shared_experts",
    "moe_layer_pattern", "router_pattern", "expert_pattern", "expert_w1", "expert_w2",
    "expert_w3", "shared_experts_pattern",
)  # fmt: skip


def autoep_size(ds_cfg) -> int:
    """The AutoEP degree of a `deepspeed` node: 0 when expert parallelism is off."""
    ep = getattr(ds_cfg, "expert_parallel", None)  # a dataclass or a DictConfig node
    return int(getattr(ep, "autoep_size", 0)) if ep is not None else 0


def _ep_overrides(ds_cfg) -> dict:
    overrides = getattr(ds_cfg, "overrides", None) or {}
    block = overrides.get("expert_parallel") or {}
    if not isinstance(block, dict):
        from omegaconf import OmegaConf

        block = OmegaConf.to_container(block, resolve=True)
    return dict(block)


def check_autoep_settings(ds_cfg) -> None:
    """ValueError naming the `deepspeed.*` key for an AutoEP setting we cannot honour.

    - `deepspeed.expert_parallel.autoep_size` must be >= 0 (0 = off).
    - `deepspeed.overrides.expert_parallel.load_balance_coeff`: AutoEP 0.19.8 rejects any
      non-null value (`auto_ep_presets/base.py: _raise_unsupported_load_balance_coeff`); its job
      (a dynamic selection bias) is done by our own aux-loss-free rule, `moe.bias_update_rate`.
    - a routing key of `AUTOEP_MAPPED_KEYS` under `deepspeed.overrides.expert_parallel`: they
      are set from the model config (`autoep_block`).
    - any `deepspeed.overrides.expert_parallel` block while autoep_size is 0.
    """
    size = autoep_size(ds_cfg)
    if size < 0:
        raise ValueError(
            f"deepspeed.expert_parallel.autoep_size={size}: use 0 (off) or the number of ranks "
            "that split the routed experts"
        )
    block = _ep_overrides(ds_cfg)
    if block.get("load_balance_coeff") is not None:
        raise ValueError(
            f"deepspeed.overrides.expert_parallel.load_balance_coeff="
            f"{block['load_balance_coeff']}: DeepSpeed AutoEP rejects a dynamic load-balance "
            "coefficient; remove the key (expert load is balanced by llada_train's own "
            "aux-loss-free bias rule, moe.bias_update_rate)"
        )
    mapped = sorted(k for k in block if k in AUTOEP_MAPPED_KEYS)
    if mapped:
        raise ValueError(
            f"deepspeed.overrides.expert_parallel.{mapped[0]}: the routing keys "
            f"({', '.join(mapped)}) are set from the model config; use "
            "deepspeed.expert_parallel.autoep_size to enable AutoEP"
        )
    if block and size == 0:
        raise ValueError(
            "deepspeed.overrides.expert_parallel is set but AutoEP is off: set "
            "deepspeed.expert_parallel.autoep_size=N"
        )


def check_expert_parallel(cfg) -> None:
    """The launch checks of a run with AutoEP that span config groups (ValueError naming the
    key): no `moe.aux_loss_coef` (the AutoEP block returns no router scores for the auxiliary
    loss, `train.moe_aux_loss`), no LoRA (PEFT renames the modules AutoEP looks for: it would
    find no MoE layer), no `rollout.gather=layerwise` (RL: AutoEP decodes on a whole local copy,
    `autoep_twin`; `inference_model` would refuse it at the first decode), WORLD_SIZE a
    multiple of the AutoEP degree. A no-op when it is off."""
    size = autoep_size(cfg.deepspeed)
    if size == 0:
        return
    moe = cfg.get("moe")
    if moe is not None and moe.aux_loss_coef > 0:
        raise ValueError(
            f"moe.aux_loss_coef={moe.aux_loss_coef} with deepspeed.expert_parallel.autoep_size="
            f"{size}: the AutoEP MoE block does not expose router scores for the auxiliary loss; "
            "set moe.aux_loss_coef=0 (moe.bias_update_rate balances the load) or autoep_size=0"
        )
    lora = cfg.get("lora")
    if lora is not None and lora.enabled:
        raise ValueError(
            f"lora.enabled=true with deepspeed.expert_parallel.autoep_size={size}: LoRA wraps "
            "the model in PEFT, whose module names AutoEP does not match; turn one of them off"
        )
    rollout = cfg.get("rollout")  # RL only
    if rollout is not None and rollout.get("gather") == "layerwise":
        raise ValueError(
            f"rollout.gather=layerwise with deepspeed.expert_parallel.autoep_size={size}: under "
            "AutoEP rollouts, the held-out reward and smoke samples decode on a whole local copy "
            "of the model (distributed.autoep_twin), never layerwise; set rollout.gather=auto or "
            "whole, or deepspeed.expert_parallel.autoep_size=0"
        )
    world = world_size_from_env()
    if world % size and not cfg.get("dry_run"):  # a dry run plans for plan.num_gpus instead
        raise ValueError(
            f"deepspeed.expert_parallel.autoep_size={size} must divide the {world} ranks"
        )


def autoep_block(model_config, device_type: str) -> dict[str, Any]:
    """The routing keys of DeepSpeed's `expert_parallel` block for an LLaDA2MoeConfig.

    LLaDA2's router (modeling.Router; the official `LLaDA2MoeGate`) maps onto AutoEP's
    TokenChoiceTopKRouter (deepspeed/moe/ep_router.py, ported from TorchTitan) as:
    sigmoid scores (score_func); group-limited top-k with the group scored by the sum of its
    top-2 biased scores (num_expert_groups = n_group, num_limited_groups = topk_group, AutoEP's
    group_score_func "top2_sum", the DeepSeek-V3 rule both follow); the bias in selection only
    (our `expert_bias`, carried as `e_score_correction_bias`); combine weights the unbiased
    scores of the chosen experts, normalised when norm_topk_prob and top-k > 1 (route_norm:
    ours skips the division for top-1, AutoEP's would not), times routed_scaling_factor, applied
    after the experts (score_apply post); experts SwiGLU with our stacked `gate_up_proj`
    (E, H, 2I) / `down_proj` (E, I, H), which AutoEP reads as its "hidden_first" fused layout;
    the shared expert `shared_experts`, added unweighted. The DeepSeek-V3 preset supplies the
    module names (`model.layers.N.mlp` with `gate`, `experts`, `shared_experts`).
    `use_grouped_mm` is on for CUDA (torch._grouped_mm / Triton) and off on CPU (AutoEP's
    per-expert loop; its CPU grouped_mm path is untested here).
    """
    top_k = model_config.num_experts_per_tok
    return {
        "enabled": True,
        "preset_model": "deepseek_v3",
        "num_experts_attr": "num_experts",
        "top_k_attr": "num_experts_per_tok",
        "top_k": top_k,
        "score_func": "sigmoid",
        "score_apply": "post",
        "route_norm": bool(model_config.norm_topk_prob and top_k > 1),
        "routed_scaling_factor": float(model_config.routed_scaling_factor),
        "num_expert_groups": model_config.n_group,
        "num_limited_groups": model_config.topk_group,
        "expert_activation": "swiglu",
        "load_balance_coeff": None,
        "use_grouped_mm": device_type == "cuda",
    }


def prepare_for_autoep(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Before `deepspeed.initialize` with AutoEP: every router's bias becomes the frozen
    parameter AutoEP copies (`Router.carry_bias_as_parameter`). Returns a copy of each bias
    (E,) by the name of its MoE block, for `adapt_autoep_layers` to check. Raises ValueError
    when the model has no MoE layer (nothing to split)."""
    biases = {}
    for name, module in model.named_modules():
        gate = getattr(module, "gate", None)
        if hasattr(gate, "carry_bias_as_parameter"):
            gate.carry_bias_as_parameter()
            biases[name] = gate.e_score_correction_bias.detach().clone()
    if not biases:
        raise ValueError("deepspeed.expert_parallel.autoep_size: the model has no MoE layer")
    return biases


class _Fp32RouterLinear(torch.nn.Linear):
    """The router projection in fp32 whatever the parameter dtype (`router_dtype: fp32` of the
    official model, as modeling.Router); AutoEP's router runs it in the parameter dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see the class
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(x.float(), self.weight.float(), bias)


def adapt_autoep_layers(model: torch.nn.Module, biases: dict[str, torch.Tensor]) -> int:
    """After `deepspeed.initialize` has swapped the MoE blocks for AutoEP's `AutoEPMoELayer`:
    check every one carries its router bias, and give it our SparseMoE interface, so the
    training loop (`train.py`: loads, the bias rule, checkpoints' client state) runs unchanged:
    `gate` (its router, unregistered) with `gate.expert_bias` (an alias of the router's
    `e_score_correction_bias` parameter, updated in place), `last_expert_load` (E,) tokens
    routed by this rank in the last forward (a forward hook on the router), `last_routing`
    None. The router projection runs in fp32 (`_Fp32RouterLinear`). Under ZeRO-3 the bias is
    gathered once and kept whole (persistent), so in-place updates are what every forward
    reads; it is frozen, so no optimizer partition goes stale.

    Returns the number of AutoEP layers. Raises RuntimeError when a layer lacks the bias
    parameter or its value differs from the source's (AutoEP dropped or changed it), or when
    AutoEP replaced a different number of layers than the model had.
    """
    from llada_train.model.modeling import is_autoep_layer

    layers = [(n, m) for n, m in model.named_modules() if is_autoep_layer(m)]
    if len(layers) != len(biases):
        raise RuntimeError(f"AutoEP replaced {len(layers)} MoE layers, the model has {len(biases)}")
    for name, layer in layers:
        router = layer.router
        bias = router._parameters.get("e_score_correction_bias")
        if not isinstance(bias, torch.nn.Parameter):
            raise RuntimeError(
                f"AutoEP dropped the expert bias of {name}: its router has no "
                "e_score_correction_bias parameter"
            )
        expected = biases.get(name)
        with gathered_parameters([bias]):
            copied = bias.data.float().cpu()
        if expected is None or not torch.equal(copied, expected.float().cpu()):
            raise RuntimeError(f"AutoEP changed the expert bias of {name} while copying it")
        if type(router.gate) is torch.nn.Linear:
            router.gate.__class__ = _Fp32RouterLinear
        canonical = bias
        if hasattr(bias, "ds_id"):
            # ZeRO-3 re-gathers a parameter from its partitions (after every optimizer step for
            # persistent ones), so an in-place write to it would not last: the rule updates a
            # whole fp32 copy, pushed into the parameter before each router forward
            canonical = copied.to(bias.ds_tensor.device)
            router.register_forward_pre_hook(_push_bias(canonical))
        object.__setattr__(router, "expert_bias", canonical)
        object.__setattr__(layer, "gate", router)
        layer.last_expert_load = None
        layer.last_routing = None  # no scores for the auxiliary loss (check_expert_parallel)

        def record_load(_module, _inputs, outputs, layer=layer):
            layer.last_expert_load = outputs[2].detach()  # (E,) tokens of this rank

        router.register_forward_hook(record_load)
    return len(layers)


def _push_bias(canonical: torch.Tensor):
    """A forward pre-hook for an AutoEP router under ZeRO-3 (it runs after ZeRO-3's own fetch,
    registered later): copy the whole bias `canonical` (E,) into the gathered
    `e_score_correction_bias` and into this rank's partition of it, so what is routed by,
    saved and re-gathered is the value the balancing rule wrote."""

    def push(router: torch.nn.Module, _inputs) -> None:
        p = router.e_score_correction_bias
        with torch.no_grad():
            p.data.copy_(canonical)
            part = p.ds_tensor.numel()
            start = dist.get_rank(p.ds_process_group) * part
            piece = canonical.reshape(-1)[start : start + part]
            p.ds_tensor.data.reshape(-1)[: piece.numel()].copy_(piece)

    return push


def gather_experts(layer: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    """All routed experts (E, ...) of an AutoEP layer from this rank's local ones
    `t` (E / ep, ...), concatenated in expert order over the layer's EP group (a collective
    over that group; `t` itself when the degree is 1). AutoEP places experts contiguously:
    rank r of the group owns experts r * E/ep .. (r + 1) * E/ep - 1
    (`ep_repack._local_expert_range`)."""
    if layer.ep_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(layer.ep_size)]
    dist.all_gather(parts, t.contiguous(), group=layer.ep_group)
    return torch.cat(parts)


def has_expert_parallel(model: torch.nn.Module) -> bool:
    """Whether `model` has an AutoEP layer whose experts are split over several ranks."""
    from llada_train.model.modeling import is_autoep_layer

    return any(is_autoep_layer(m) and m.ep_size > 1 for m in model.modules())


def deepspeed_config(
    ds_cfg,  # config.DeepSpeedConfig
    optim_cfg,  # config.OptimConfig
    micro_batch_size: int,
    accumulation_steps: int,
    world_size: int,
    precision: str,
) -> dict[str, Any]:
    """The DeepSpeed json for our run; `ds_cfg.overrides` is merged last (nested dicts merged)."""
    check_deepspeed(ds_cfg)
    zero: dict[str, Any] = {"stage": ds_cfg.stage}
    if ds_cfg.stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if ds_cfg.stage == 3:
        # gather every parameter the same way on every rank; MoE experts are stacked weights
        # used whole, so the trace is identical across ranks (SPEC section 1)
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    if ds_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds_cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": micro_batch_size * accumulation_steps * world_size,
        "gradient_clipping": optim_cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds_cfg.offload_optimizer:  # ZeRO-Offload needs DeepSpeed's CPU Adam, built from config
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": optim_cfg.lr,
                "betas": list(optim_cfg.betas),
                "eps": optim_cfg.eps,
                "weight_decay": optim_cfg.weight_decay,
            },
        }
    size = autoep_size(ds_cfg)
    if size:
        if world_size % size:
            raise ValueError(
                f"deepspeed.expert_parallel.autoep_size={size} must divide the {world_size} ranks"
            )
        # routing keys: create_engine adds them from the model config (autoep_block)
        config["expert_parallel"] = {"enabled": True, "autoep_size": size}
    overrides = ds_cfg.overrides
    if not isinstance(overrides, dict):  # a DictConfig: plain dicts, so nested blocks merge
        from omegaconf import OmegaConf

        overrides = OmegaConf.to_container(overrides, resolve=True)
    return _merge(config, dict(overrides))


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = (
            _merge(dict(base[k]), dict(v))
            if isinstance(v, dict) and isinstance(base.get(k), dict)
            else v
        )
    return base


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (ndim >= 2); none on norms (vectors). A parameter created
    partitioned by ZeRO-3 (`zero.Init`) is judged by its full shape (`ds_shape`), not by its
    empty local placeholder."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
            (decay if ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]  # LoRA trains matrices only: no empty group


def lr_lambda(
    step: int,
    max_steps: int,
    warmup_ratio: float,
    min_lr_ratio: float,
    decay_ratio: float = 1.0,
    decay_end_ratio: float = 1.0,
) -> float:
    """LR multiplier of optimizer step `step` (0-based): linear warmup over
    ceil(warmup_ratio * max_steps) steps, constant at 1, then a cosine to min_lr_ratio over
    ceil(decay_ratio * max_steps) steps (at most every step after the warmup) that ends at step
    round(decay_end_ratio * max_steps), then min_lr_ratio to the end.

    decay_ratio = 1: warmup + cosine over the whole run (the usual LLM schedule).
    decay_ratio < 1: warmup-stable-decay (WSD; Hu et al. 2024, MiniCPM section 4): the rate
    stays at its peak until the final decay. Issue 17 found the tiny recipe's addition task
    learnt only late, after a whole-run cosine has already lowered the rate (docs/learning.md).
    decay_end_ratio < 1: the decay ends before the run does and the rate holds at its floor
    after it (Megatron-LM's `--lr-decay-iters` below `--train-iters`). Issue 26 found that the
    tiny addition task completes its rise while the rate decays; the held tail is the margin
    for a run whose rise comes late.
    """
    warmup = math.ceil(warmup_ratio * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    decay_end = max(warmup, min(max_steps, round(decay_end_ratio * max_steps)))
    decay = min(decay_end - warmup, math.ceil(decay_ratio * max_steps))
    decay_start = decay_end - decay
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, decay))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def create_engine(model: torch.nn.Module, ds_config: dict[str, Any], optim_cfg, max_steps: int):
    """A DeepSpeed engine with AdamW and the `lr_lambda` schedule (stepped by DeepSpeed).

    With an enabled `expert_parallel` block (AutoEP), the routing keys are filled in from
    `model.config` (`autoep_block`), the router biases become parameters first
    (`prepare_for_autoep`) and the AutoEP layers are checked and adapted after
    (`adapt_autoep_layers`; RuntimeError if AutoEP dropped a bias)."""
    import deepspeed

    biases = None
    if ds_config.get("expert_parallel", {}).get("enabled"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        block = {**autoep_block(model.config, device), **ds_config["expert_parallel"]}
        ds_config = {**ds_config, "expert_parallel": block}
        biases = prepare_for_autoep(model)

    schedule = lambda s: lr_lambda(  # noqa: E731
        s, max_steps, optim_cfg.warmup_ratio, optim_cfg.min_lr_ratio, optim_cfg.decay_ratio,
        getattr(optim_cfg, "decay_end_ratio", 1.0),
    )
    optimizer = None
    if "optimizer" not in ds_config:
        # ZeRO-0 steps this optimizer bare: the guarded one skips non-finite steps (see there)
        adamw = GuardedAdamW if ds_config["zero_optimization"]["stage"] == 0 else torch.optim.AdamW
        optimizer = adamw(
            param_groups(model, optim_cfg.weight_decay),
            lr=optim_cfg.lr,
            betas=tuple(optim_cfg.betas),
            eps=optim_cfg.eps,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    else:
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=None
        if optimizer is not None
        else param_groups(model, optim_cfg.weight_decay),
        lr_scheduler=scheduler,
        config=ds_config,
    )
    if biases is not None:
        adapt_autoep_layers(engine.module, biases)
    return engine


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite, agreed over all ranks.

    ZeRO-1/2/3 already skip such a step (their optimizer sets `overflow` when the global
    gradient norm is inf/NaN; the engine then counts a skipped step, steps no LR schedule and
    `was_step_applied()` is False). ZeRO-0 steps the bare optimizer, which has no such check:
    this one computes the local squared gradient norm (fp32, as DeepSpeed's clipping), agrees
    on its finiteness over ranks and, when it is not finite, leaves parameters and optimizer
    state untouched and sets `overflow`, which the engine reads the same way."""

    overflow = False

    def step(self, closure=None):  # noqa: D102 - see the class docstring
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        local = torch.zeros(1, dtype=torch.float32, device=device)
        for grad in grads:
            local += grad.detach().float().pow(2).sum()
        bad = torch.tensor([0.0 if torch.isfinite(local).all() else 1.0], device=device)
        self.overflow = bool(all_reduce_sum(bad) > 0)
        return None if self.overflow else super().step(closure)


def reset_schedule(engine, lr: float) -> None:
    """After a resume: the LR of the next update recomputed under the current config (base lr
    `lr` and the schedule the engine was built with, at the restored schedule position), not
    the value the old schedule left in the restored optimizer state."""
    scheduler = engine.lr_scheduler
    position = scheduler.last_epoch  # scheduler steps taken (skipped optimizer steps excluded)
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, fn in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(position)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def weights_finite(model: torch.nn.Module, device) -> bool:
    """Whether every parameter and buffer of `model` is finite, agreed over all ranks (under
    ZeRO-3 each rank checks its own partitions)."""
    bad = torch.zeros(1, device=device)
    for t in [*model.parameters(), *model.buffers()]:
        local = getattr(t, "ds_tensor", t)  # the ZeRO-3 partition, else the tensor
        if local.is_floating_point() and local.numel() and not torch.isfinite(local).all():
            bad += 1
            break
    return float(all_reduce_sum(bad)) == 0


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitions the parameters of `model`."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def layerwise_gather(model: torch.nn.Module, modifier_rank: int | None = None):
    """The `gather` argument of `model.io`'s load/export: None when `model` is not partitioned
    (below ZeRO-3), else a function making a list of its parameters whole for a block. With
    AutoEP experts split over ranks but no ZeRO-3, a gather that does nothing: its presence
    makes every rank drain the export, whose expert reassembly is collective
    (`gather_experts`)."""
    if not is_partitioned(model):
        return (lambda params: contextlib.nullcontext()) if has_expert_parallel(model) else None
    return lambda params: gathered_parameters(params, modifier_rank=modifier_rank)


@contextlib.contextmanager
def inference_model(model: torch.nn.Module, gather: str = "whole", engine: Any = None):
    """The model to decode with for a block of sampler calls (a collective: every rank enters
    and leaves).

    Below ZeRO-3 (`is_partitioned` is False) `model` itself, whatever `gather` says: its weights
    are resident. Under ZeRO-3:
    - `gather="whole"`: a twin without DeepSpeed's hooks that shares the gathered tensors (the
      whole bf16 model on every rank, 2 B x parameters). What happens inside is not collective:
      ranks may take different numbers of forwards.
    - `gather="layerwise"`: `LockstepModel` over the partitioned `model`; ZeRO-3's per-module
      hooks fetch and release each submodule's weights, so a rank holds one decoder layer plus
      what the prefetch bucket brings (docs/scale.md). Every model call inside is collective;
      on leaving, a rank that is done runs dummy forwards until every rank of the ZeRO group is
      (`LockstepModel.drain`). So no collective of another kind may run inside the block (do
      all-reduces after it). `engine` (the DeepSpeed engine of `model`, required here) lends
      its parameter coordinator: the block decodes on a copy whose trace is recorded from the
      decoding forwards alone, and the engine gets its own back, trace untouched, on leaving.

    Raises ValueError for a `gather` other than whole or layerwise (`auto` is resolved by the
    caller: `memory_plan.decode_gather`); for layerwise under ZeRO-3, before any decoding,
    ValueError when ZeRO-3 does not partition over every rank (`zero_group`) and RuntimeError
    without `engine` or with a DeepSpeed lacking the coordinator API (`_offload_of`). A
    forward that fails inside a layerwise block leaves the ranks' collectives out of step: it
    surfaces as `DecodeDesync`, which callers must not swallow.
    """
    if gather not in ("whole", "layerwise"):
        raise ValueError(f"gather={gather!r}: inference_model takes whole or layerwise")
    if has_expert_parallel(model) or (is_partitioned(model) and _has_autoep_layers(model)):
        if gather == "layerwise":  # an expert all-to-all in every forward; see autoep_twin
            raise ValueError(
                "layerwise decoding with AutoEP expert parallelism is not supported; decode "
                "with the whole gather (RL: rollout.gather=whole)"
            )
        yield autoep_twin(model)
        return
    if not is_partitioned(model):
        yield model
        return
    if gather == "layerwise":
        with layerwise_model(model, engine) as stepped:
            yield stepped
        return
    with gathered_parameters(model):
        with torch.device("meta"):
            twin = type(model)(model.config)
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                owner_name, _, leaf = name.rpartition(".")
                owner = twin.get_submodule(owner_name)
                if leaf in owner._parameters:
                    owner._parameters[leaf] = torch.nn.Parameter(t.data, requires_grad=False)
                else:
                    owner._buffers[leaf] = t.data
        twin.attention_backend = getattr(model, "attention_backend", "auto")
        twin.train(model.training)
        yield twin


def _has_autoep_layers(model: torch.nn.Module) -> bool:
    from llada_train.model.modeling import is_autoep_layer

    return any(is_autoep_layer(m) for m in model.modules())


def autoep_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A whole, hook-free LLaDA2MoeModelLM (our SparseMoE blocks) with the weights of a model
    whose MoE blocks AutoEP replaced, for decoding (a collective: every rank calls it).

    Why: an AutoEP block all-to-alls tokens over its EP group in every forward, so ranks
    decoding different prompts for different numbers of forwards would not pair their
    collectives; the twin decodes locally (each rank holds the whole model, as the ZeRO-3
    whole gather does). Weights come from `model.io.whole_units` (AutoEP names mapped back,
    experts reassembled over the EP group, one decoder layer whole at a time under ZeRO-3)
    and are copied, frozen."""
    from llada_train.model.io import whole_units

    with torch.device("meta"):
        twin = type(model)(model.config)
    gather = layerwise_gather(model)
    with torch.no_grad():
        for unit in whole_units(model, gather):
            for name, t in unit.items():
                owner_name, _, leaf = name.rpartition(".")
                owner = twin.get_submodule(owner_name)
                data = t.data.clone()  # a gathered tensor is released when its unit ends
                if leaf in owner._parameters:
                    owner._parameters[leaf] = torch.nn.Parameter(data, requires_grad=False)
                else:
                    owner._buffers[leaf] = data
    twin.attention_backend = getattr(model, "attention_backend", "auto")
    twin.train(model.training)
    return twin


class DecodeDesync(RuntimeError):
    """A forward failed on this rank inside a layerwise decoding block: the other ranks are
    inside a ZeRO-3 all-gather this rank will never join, so the job cannot go on (callers
    that keep training after a failed evaluation must re-raise this one)."""


def zero_group(model: torch.nn.Module):
    """The process group ZeRO-3 partitions `model` over (every parameter's `ds_process_group`;
    the data-parallel group). Raises ValueError when the parameters are spread over different
    groups (e.g. expert parallelism: lock-step decoding would need one flag per group) or when
    the group is not every rank of WORLD. The "still decoding" flag is reduced over this group,
    but DeepSpeed 0.19.8's `reset_step` checks the recorded trace with broadcasts over WORLD
    (`assert_ints_same_as_other_ranks`, runtime/zero/utils.py) on the first forwards of a block
    and after a trace invalidation: two ZeRO groups that make different numbers of forwards
    would pair those broadcasts wrongly and hang. Pure data parallelism (this project today)
    partitions over WORLD."""
    groups = {id(p.ds_process_group): p.ds_process_group for p in model.parameters()
              if hasattr(p, "ds_id")}  # fmt: skip
    if len(groups) != 1:
        raise ValueError(
            f"layerwise decoding needs every ZeRO-3 parameter in one process group, found "
            f"{len(groups)}; decode with the whole gather (RL: rollout.gather=whole)"
        )
    group = next(iter(groups.values()))
    size, world = dist.get_world_size(group), dist.get_world_size()
    if size != world:
        raise ValueError(
            f"layerwise decoding needs ZeRO-3 to partition over all {world} ranks (pure data "
            f"parallelism), but its data-parallel group has {size}: DeepSpeed's trace checks "
            "broadcast over all ranks and would not pair across groups that decode different "
            "numbers of forwards (docs/scale.md, 'Decoding under ZeRO-3'); decode with the "
            "whole gather (RL: rollout.gather=whole)"
        )
    return group


class LockstepModel(torch.nn.Module):
    """A partitioned ZeRO-3 model whose every call is matched by one forward on every rank of
    its ZeRO group (`group`), so ZeRO-3's per-module all-gathers pair up across ranks.

    Each call first all-reduces (sum, over `group`) a flag of 1 ("this rank is decoding"; the
    sum is not read, so no device sync), then runs `module` under `torch.no_grad()` (inference
    mode off, so the weights ZeRO-3 gathers, and keeps when persistent, are ordinary tensors
    that training can use later). `drain()` is the other side: it all-reduces 0 and, while the
    sum is not 0, runs one dummy forward (one token, no cache, no mask) that walks the same
    module sequence as a real call; the weights gathered do not depend on the input's shape,
    only on the modules called, and every forward of LLaDA2MoeModelLM calls every module (the
    MoE experts are two stacked weights used whole). So ranks may decode different prompts,
    different numbers of blocks and sampler calls: after `drain()` they have made the same
    number of forwards. The sampler protocol (`sampler.Sampler`): cache capable, `config` of
    the module, `.parameters()` for a device. Its train/eval mode starts as the module's.
    """

    supports_kv_cache = True  # forward passes every keyword on to LLaDA2MoeModelLM

    def __init__(self, module: torch.nn.Module, group: Any, flag_device: torch.device) -> None:
        super().__init__()
        self.module = module
        self.training = module.training  # lm-eval restores the mode it reads here
        self.group = group
        self.flag_device = flag_device
        self.num_forwards = 0  # this rank's own model calls
        self.num_dummy_forwards = 0  # forwards run for the other ranks
        self.in_forward = False  # a failure with this set leaves the collectives out of step

    @property
    def config(self):
        """The wrapped model's config (the sampler reads num_hidden_layers, lm-eval vocab_size)."""
        return self.module.config

    def reduce_flag(self, decoding: bool) -> torch.Tensor:
        """All-reduce (sum) this rank's flag, a (1,) float tensor of 1 or 0, over the ZeRO
        group; returns the sum, unread. Raises what the collective raises (a dead peer: gloo's
        connection error)."""
        flag = torch.tensor([1.0 if decoding else 0.0], device=self.flag_device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=self.group)
        return flag

    def anyone_decoding(self, decoding: bool) -> bool:
        """`reduce_flag(decoding)`, read: whether any rank of the group sent 1."""
        return bool(self.reduce_flag(decoding).item() > 0)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`module(*args, **kwargs)` (LLaDA2MoeModelLM: fp32 logits (B, L', V)) after the flag
        all-reduce, under no_grad with inference mode off; every rank of the group runs a
        forward with it (its own or a dummy)."""
        self.in_forward = True
        self.reduce_flag(True)  # the others only need the 1 in the sum: nothing to read here
        with torch.inference_mode(False), torch.no_grad():
            out = self.module(*args, **kwargs)
        self.num_forwards += 1
        self.in_forward = False
        return out

    def drain(self) -> int:
        """Run dummy forwards until no rank of the group decodes; returns how many ran here."""
        ran = 0
        dummy = torch.zeros((1, 1), dtype=torch.long, device=self.flag_device)  # (B, L) = (1, 1)
        while self.anyone_decoding(False):
            self.in_forward = True
            with torch.inference_mode(False), torch.no_grad():
                self.module(dummy)
            self.in_forward = False
            ran += 1
        self.num_dummy_forwards += ran
        return ran


TESTED_DEEPSPEED = "0.19.8"  # the release whose private ZeRO-3 coordinator API is used below
# What layerwise decoding calls on DeepSpeed's PartitionedParameterCoordinator (private API)
COORDINATOR_METHODS = (
    "is_invalid_trace",
    "_clear_trace_structures",
    "_invalidate_trace",
    "_clean_inflight_param_registry",
)


def _offload_of(engine: Any):
    """The ZeRO-3 parameter offload of a DeepSpeed engine (its hooks and its
    `param_coordinator`), checked for the private API layerwise decoding swaps and calls.
    Raises RuntimeError, naming the DeepSpeed release this was tested with, when `engine` is
    None or has no such offload, coordinator or coordinator methods (older or newer DeepSpeed):
    decoding on the training coordinator instead would prefetch and release by the training
    step's trace, so it is refused rather than run silently."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    coordinator = getattr(offload, "param_coordinator", None)
    if coordinator is None:
        missing = ["optimizer.parameter_offload.param_coordinator"]
    else:
        missing = [name for name in COORDINATOR_METHODS if not hasattr(coordinator, name)]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"layerwise decoding under ZeRO-3 needs the DeepSpeed engine's ZeRO-3 parameter "
            f"coordinator (private API, tested with deepspeed {TESTED_DEEPSPEED}); "
            f"{'no engine was given' if engine is None else 'missing: ' + ', '.join(missing)} "
            f"(deepspeed {deepspeed.__version__}). Install deepspeed=={TESTED_DEEPSPEED} or "
            "decode with the whole gather (RL: rollout.gather=whole)"
        )
    return offload


def _rollout_coordinator(coordinator: Any) -> Any:
    """A copy of DeepSpeed's PartitionedParameterCoordinator (deepspeed 0.19.8,
    runtime/zero/partitioned_param_coordinator.py) with an empty trace of its own: it records
    the module order of the decoding forwards and prefetches by it, while the original keeps
    the training step's forward + backward trace. The copy shares the in-flight registry and
    the settings (prefetch bucket, live-parameter cap); `_clear_trace_structures` /
    `_invalidate_trace` give it fresh trace lists instead of the original's."""
    rollout = copy.copy(coordinator)
    if rollout.is_invalid_trace():
        rollout._clear_trace_structures()
    else:  # a RECORD or COMPLETE training trace (the latter from the 3rd training step on)
        rollout._invalidate_trace()  # sets the copy's mode only; waits for in-flight gathers
    return rollout


@contextlib.contextmanager
def layerwise_model(model: torch.nn.Module, engine: Any):
    """`LockstepModel` over the partitioned `model` for a block of decoding (see
    `inference_model`, gather="layerwise"); on leaving, drains (every rank has made the same
    forwards), releases every non-persistent weight left whole and gives `engine` its parameter
    coordinator back, whether the block ended normally or by an exception outside a forward
    (which is raised after that). Before any decoding: ValueError from `zero_group` (not pure
    data parallelism), RuntimeError from `_offload_of` (no engine, or a DeepSpeed without the
    coordinator API). A failure inside a forward or the drain raises `DecodeDesync`."""
    from deepspeed.accelerator import get_accelerator

    group = zero_group(model)
    offload = _offload_of(engine)
    training = offload.param_coordinator
    offload.param_coordinator = _rollout_coordinator(training)
    stepped = LockstepModel(model, group, torch.device(get_accelerator().current_device_name()))

    def desync(e: Exception) -> DecodeDesync:
        return DecodeDesync(
            f"a forward failed inside layerwise decoding ({type(e).__name__}: {e}); the ranks "
            "can no longer gather weights together"
        )

    def drain_and_release() -> None:
        try:
            stepped.drain()
        except Exception as e:
            raise desync(e) from e
        # every rank is out of its forwards: no prefetched layer stays whole for training
        offload.param_coordinator._clean_inflight_param_registry()
        release_gathered(model)

    try:
        try:
            yield stepped
        except Exception as e:
            if stepped.in_forward:
                raise desync(e) from e
            drain_and_release()  # the others are waiting for this rank's flag
            raise
        drain_and_release()
    finally:
        offload.param_coordinator = training


def release_gathered(model: torch.nn.Module) -> int:
    """Partition again every ZeRO-3 parameter of `model` left whole (AVAILABLE, not persistent,
    in no module's forward); returns how many. Persistent parameters (numel at most
    `stage3_param_persistence_threshold`) stay whole by design."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    released = 0
    for p in model.parameters():
        if (
            hasattr(p, "ds_id")
            and p.ds_status == ZeroParamStatus.AVAILABLE
            and not p.ds_persist
            and not p.ds_active_sub_modules
        ):
            p.partition()
            released += 1
    return released


@contextlib.contextmanager
def gathered_parameters(
    model: torch.nn.Module | list[torch.nn.Parameter], modifier_rank: int | None = None
):
    """Full parameters inside the block under ZeRO-3 (once, around a whole sampler call), of a
    module or of a list of parameters; with `modifier_rank`, that rank's in-place changes are
    scattered back on exit."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield
