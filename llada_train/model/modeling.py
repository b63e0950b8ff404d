"""LLaDA2-MoE: the block-diffusion transformer of the LLaDA2.x family, written for one device.

Contract (facts of the official model code, SPEC section 1):
- Logits at position i predict the token at position i (no shift); attention is controlled
  only by the explicit boolean `attention_mask` (True = may attend), never by a causal flag.
- Pre-norm RMSNorm in fp32; fused QKV rows [q heads | k heads | v heads]; GQA; per-head
  RMSNorm on q and k before a partial rotary embedding (rotate_half on the first rope_dim dims).
- Layers < first_k_dense_replace use a dense SiLU-gated MLP; the others a sigmoid-routed MoE with
  a selection-only expert bias, group-limited top-k, normalised and scaled combine weights and a
  shared expert.
- Experts are stored stacked: `experts.gate_up_proj` (E, H, 2I) and `experts.down_proj`
  (E, I, H), and run as grouped matmuls over expert-sorted tokens: one launch per projection per
  layer whatever the routing, and every rank touches every expert weight in the same order
  (what ZeRO-3 needs). `llada_train.model.io` maps to and from the official per-expert names.
- Expert parallelism is DeepSpeed AutoEP's (`distributed.create_engine`): it swaps each
  SparseMoE for its `AutoEPMoELayer` (the same router and expert math, tests/test_autoep.py);
  `moe_layers()` lists either kind. This file stays written for one device.
- Attention runs SDPA with a dense boolean mask or block-sparse FlexAttention
  (`llada_train.model.attention`); `model.attention_backend` ('auto' = flex on CUDA, sdpa
  elsewhere | 'sdpa' | 'flex') picks the form of an `AttentionMask`; both agree to float
  rounding (tests/test_attention.py).
- Precision, as the official model whatever the parameter dtype (bf16 on GPU): router
  logits, scores and combine weights (`router_dtype: fp32`), the weighted sum of the routed
  experts' outputs and the returned logits are fp32; RMSNorm and the rotary tables are
  computed in fp32 and cast back; matmuls run in the parameter dtype.
- `PrefixKVCache` holds keys/values of a committed prefix (finished blocks); a forward with
  `commit_len = n` appends the keys/values of its first n positions to the cache.

Legend: B batch, L query length, Lc cached length, H hidden, E experts, K experts per token,
I expert width, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llada_train.masks import AttentionMask
from llada_train.model.attention import attend, resolve_mask
from llada_train.model.config import LLaDA2MoeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)  # weight applied after the cast, as the official code


# ---------------------------------------------------------------------------- rotary embedding
def rope_cos_sin(
    position_ids: torch.Tensor, rope_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, L, rope_dim) for integer positions (B, L); computed in fp32."""
    inv_freq = 1.0 / (
        theta
        ** (
            torch.arange(0, rope_dim, 2, device=position_ids.device, dtype=torch.float32) / rope_dim
        )
    )
    freqs = position_ids.float()[..., None] * inv_freq  # (B, L, rope_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head of x (B, nH, L, D); pass the rest."""
    r = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, L, r)
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# ---------------------------------------------------------------------------- KV cache
@dataclass
class PrefixKVCache:
    """Keys/values (B, Hkv, Lc, D) per layer of a prefix that will not change any more."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    @classmethod
    def empty(cls, num_layers: int) -> PrefixKVCache:
        return cls([None] * num_layers, [None] * num_layers)

    @property
    def length(self) -> int:
        k = self.keys[0] if self.keys else None
        return 0 if k is None else k.shape[2]

    def get(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[layer], self.values[layer]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat((self.keys[layer], k), dim=2)
            self.values[layer] = torch.cat((self.values[layer], v), dim=2)

    def select(self, batch_index: torch.Tensor) -> PrefixKVCache:
        """Keep only the given rows of the batch (sequences that are still decoding)."""
        pick = lambda t: None if t is None else t.index_select(0, batch_index)  # noqa: E731
        return PrefixKVCache([pick(k) for k in self.keys], [pick(v) for v in self.values])

    def truncate(self, length: int) -> None:
        """Drop cached positions >= length (used when an earlier block is edited again)."""
        self.keys = [None if k is None or length == 0 else k[:, :, :length] for k in self.keys]
        self.values = [None if v is None or length == 0 else v[:, :, :length] for v in self.values]


# ---------------------------------------------------------------------------- attention
class Attention(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False
        )
        self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, L, H)
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask,  # BlockMask | bool broadcastable to (B, 1, L, Lc + L) | None
        kv_cache: PrefixKVCache | None,
        layer_idx: int,
        commit_len: int,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.query_key_value(x).view(
            b, n, self.num_heads + 2 * self.num_kv_heads, self.head_dim
        )
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q = apply_partial_rope(self.query_layernorm(q.transpose(1, 2)), cos, sin)  # (B, nH, L, D)
        k = apply_partial_rope(self.key_layernorm(k.transpose(1, 2)), cos, sin)  # (B, Hkv, L, D)
        v = v.transpose(1, 2)
        if kv_cache is not None:
            ck, cv = kv_cache.get(layer_idx)
            if commit_len:
                kv_cache.append(layer_idx, k[:, :, :commit_len], v[:, :, :commit_len])
            if ck is not None:
                k, v = torch.cat((ck, k), dim=2), torch.cat((cv, v), dim=2)
        out = attend(q, k, v, attention_mask)  # (B, nH, L, D)
        return self.dense(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


# ---------------------------------------------------------------------------- MLPs and MoE
class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid router with selection-only expert bias and group-limited top-k (fp32)."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        # Not trained by the optimiser: moved by the aux-loss-free balancing rule (see losses).
        # A buffer, except under DeepSpeed AutoEP (`carry_bias_as_parameter`).
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def carry_bias_as_parameter(self) -> None:
        """Hold the selection-only bias (E,) as a frozen parameter `e_score_correction_bias`
        (requires_grad=False) instead of the `expert_bias` buffer, with `expert_bias` left as an
        alias of the same tensor, so the balancing rule (`train.update_expert_bias`, in place)
        and this forward read and write one tensor.

        Why: DeepSpeed AutoEP (0.19.8, `auto_ep_layer._copy_e_score_correction_bias`) carries a
        fixed bias into its router only under that name; a buffer named `expert_bias` would be
        dropped without a word. Called by `distributed.create_engine` before AutoEP replaces
        this layer; the official checkpoint name stays `mlp.gate.expert_bias` (model/io.py).
        Idempotent."""
        if "e_score_correction_bias" in self._parameters:
            return
        bias = self._buffers.pop("expert_bias")
        self.e_score_correction_bias = nn.Parameter(bias, requires_grad=False)
        object.__setattr__(self, "expert_bias", self.e_score_correction_bias)  # unregistered alias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, H) -> expert ids (T, K), combine weights (T, K) fp32, scores (T, E) fp32."""
        logits = F.linear(x.float(), self.weight.float())  # (T, E)
        scores = torch.sigmoid(logits)
        biased = scores + self.expert_bias.float()  # selection only
        t = biased.shape[0]
        group_scores = biased.view(t, self.n_group, -1).topk(2, dim=-1).values.sum(-1)  # (T, G)
        group_idx = group_scores.topk(self.topk_group, dim=-1).indices
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_keep = group_keep.repeat_interleave(self.num_experts // self.n_group, dim=1)
        topk_idx = biased.masked_fill(~expert_keep, float("-inf")).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, topk_idx)  # unbiased scores of the chosen experts
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return topk_idx, weights * self.routed_scaling_factor, scores


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (N, in) with rows sorted by group; rows offsets[e-1]:offsets[e] are multiplied by w[e].

    One fused kernel (torch._grouped_mm) on Hopper GPUs; on other GPUs one padded bmm (groups
    padded to the largest group: a constant number of launches, whatever the number of experts);
    on CPU one matmul per group over exactly its rows, since there the padded bmm computes every
    expert at the largest group's size (measured 69 ms against 42 ms forward + backward for
    4096 rows x 16 experts of 256 x 256 at a max/mean load of 2.6, torch 2.13, one thread; the
    tiny model's routers run at 2-3.5). The results are the same to the bit on that case.
    """
    if _use_torch_grouped_mm(x, w):
        return torch._grouped_mm(x, w, offs=offsets.to(torch.int32))
    if x.device.type == "cpu":
        return per_group_mm(x, w, offsets)
    return padded_bmm(x, w, offsets)


def per_group_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`grouped_mm` as one matmul per group: x (N, in), w (G, in, out), offsets (G,) -> (N, out)."""
    rows, start = [], 0
    for group, end in enumerate(offsets.tolist()):
        rows.append(x[start:end] @ w[group])  # (count, out)
        start = end
    return torch.cat(rows) if rows else x.new_zeros(0, w.shape[2])


def padded_bmm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`grouped_mm` as one bmm over groups padded to the largest: shapes as `per_group_mm`."""
    num_groups = w.shape[0]
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    starts = offsets - counts
    group_of_row = torch.repeat_interleave(
        torch.arange(num_groups, device=x.device), counts, output_size=x.shape[0]
    )
    slot = torch.arange(x.shape[0], device=x.device) - starts[group_of_row]
    cap = int(counts.max()) if x.shape[0] else 0
    dest = group_of_row * cap + slot  # row of x -> its slot in the flattened (E * cap) buffer
    # index_copy / index_select: their backward passes are index_select / index_add, much
    # cheaper on CPU than the accumulating index_put of advanced-index assignment
    buf = x.new_zeros(num_groups * cap, x.shape[1]).index_copy(0, dest, x)
    out = torch.bmm(buf.view(num_groups, cap, x.shape[1]), w)
    return out.view(num_groups * cap, w.shape[2]).index_select(0, dest)


def _use_torch_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    # CPU: torch._grouped_mm exists but measured 6x slower than the padded bmm (torch 2.13, 2
    # cores, 4096 rows x 16 experts), so the padded path serves CPU.
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.device.type == "cuda":  # Hopper+ kernels: bf16 with 16-byte aligned strides
        major, _ = torch.cuda.get_device_capability(x.device)
        return major >= 9 and x.dtype == torch.bfloat16 and all(s % 8 == 0 for s in w.shape[1:])
    return False


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g.contiguous()


class StackedExperts(nn.Module):
    """All routed experts of a layer as two stacked weights, applied with grouped matmuls."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, 2 * intermediate_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        gate_up = grouped_mm(x_sorted, self.gate_up_proj, offsets)  # (N, 2I)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        out = grouped_mm((F.silu(gate) * up).contiguous(), self.down_proj, offsets)  # (N, H)
        return _ContiguousGrad.apply(out)


class SparseMoE(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = Router(config)
        self.experts = StackedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts
            else None
        )
        # Tokens routed to each expert in the last forward (detached); read by load balancing
        # and logging. Not a parameter, not saved.
        self.last_expert_load: torch.Tensor | None = None
        # (router scores (T, E), chosen experts (T, K)) of the last training forward, for the
        # optional load-balance auxiliary loss; None in eval mode.
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, H)
        topk_idx, topk_w, scores = self.gate(flat)
        expert_of = topk_idx.reshape(-1)  # (T*K,)
        order = torch.argsort(expert_of, stable=True)
        load = torch.bincount(expert_of, minlength=self.num_experts)  # (E,)
        offsets = torch.cumsum(load, 0)
        token_of = order // self.top_k
        # index_select rather than advanced indexing: its backward is an index_add, not the
        # much slower accumulating index_put
        y_sorted = self.experts(flat.index_select(0, token_of), offsets)  # (T*K, H)
        w_sorted = topk_w.reshape(-1).index_select(0, order)  # (T*K,) fp32
        # weighted sum in fp32, then the model dtype, as the official code
        # (`(y * topk_weight).sum(1).to(hidden_states.dtype)`, topk_weight fp32); the product
        # promotes to fp32 while autograd keeps the bf16 y_sorted, not an fp32 copy
        y = flat.new_zeros(flat.shape, dtype=torch.float32).index_add_(
            0, token_of, y_sorted * w_sorted[:, None]
        )
        y = y.to(flat.dtype)
        self.last_expert_load = load.detach()
        self.last_routing = (scores, topk_idx) if self.training else None
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape)


def is_autoep_layer(module: nn.Module) -> bool:
    """Whether `module` is a DeepSpeed AutoEP MoE block (its class marks itself so)."""
    return bool(getattr(type(module), "_is_autoep_layer", False))


class DecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (
            SparseMoE(config)
            if config.is_moe_layer(layer_idx)
            else MLP(config.hidden_size, config.intermediate_size)
        )

    def forward(self, x, cos, sin, attention_mask, kv_cache, commit_len):
        x = x + self.attention(
            self.input_layernorm(x), cos, sin, attention_mask, kv_cache, self.layer_idx, commit_len
        )
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA2MoeModel(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaDA2MoeModelLM(nn.Module):
    """The LM: `model.*` backbone and an untied `lm_head`; forward returns logits (B, L, V)."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.config = config
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # 'auto' (flex on CUDA, sdpa elsewhere) | 'sdpa' | 'flex'; see model/attention.py
        self.attention_backend = "auto"
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, ones for norms, zero bias."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        for m in self.modules():
            if isinstance(m, Router):
                m.expert_bias.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def moe_layers(self) -> list[nn.Module]:
        """The routed MoE blocks in layer order: `SparseMoE`, or DeepSpeed's `AutoEPMoELayer`
        where AutoEP replaced them (`distributed.adapt_autoep_layers` gives those the same
        `gate.expert_bias`, `last_expert_load`, `last_routing` and `num_experts`)."""
        return [m for m in self.modules() if isinstance(m, SparseMoE) or is_autoep_layer(m)]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: AttentionMask | torch.Tensor | None = None,  # (B|1, 1, L, Lc + L)
        position_ids: torch.Tensor | None = None,  # (B|1, L); default Lc .. Lc + L - 1
        kv_cache: PrefixKVCache | None = None,
        commit_len: int = 0,
        logits_slice: slice | None = None,
    ) -> torch.Tensor:
        """Logits (B, L', V) in fp32 for the positions in `logits_slice` (all by default).

        attention_mask: an `AttentionMask` (drawn as a BlockMask or a dense tensor according to
        `attention_backend`), a bool tensor (True = may attend; always SDPA) or None (full).
        Raises ValueError for a non-boolean mask tensor or commit_len without a cache.
        """
        b, n = input_ids.shape
        attention_mask = resolve_mask(attention_mask, self.attention_backend, input_ids.device)
        if commit_len and kv_cache is None:
            raise ValueError("commit_len > 0 needs a kv_cache to commit into")
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=input_ids.device)[None]
        x = self.model.word_embeddings(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.rope_dim, self.config.rope_theta, x.dtype)
        if cos.shape[0] != b:
            cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if use_ckpt:
                x = checkpoint(
                    layer, x, cos, sin, attention_mask, kv_cache, commit_len, use_reentrant=False
                )
            else:
                x = layer(x, cos, sin, attention_mask, kv_cache, commit_len)
        if logits_slice is not None:
            x = x[:, logits_slice]
        return self.lm_head(self.model.norm(x)).float()
