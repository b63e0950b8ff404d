"""The shared sampler (reverse process): joint threshold decoding, M2T + T2T (SPEC section 4).

One `Sampler` serves chat/generation, RL rollouts and evaluation, so what is measured is what is
served. Contract:

- Semantics are those of the official LLaDA2.1 `generate()`: `x` = prompt + `mask_id` up to
  ceil((P + gen_length) / block_length) * block_length tokens, blocks aligned to position 0,
  decoding from block floor(P / block_length). Per block `b` the loop counts `post` iterations
  that start with no mask and breaks when post > max_post_steps; M2T sets every masked position
  with conf > threshold (strict), or else the single most confident one (`torch.topk(k=1)` as
  the official code, which on an exact tie may pick another position than argmax); T2T sets every
  position of block `b` that was visible at the start of the iteration and is not prompt where
  cand != current and conf > editing_threshold (every iteration; None = no T2T); the block
  ends when an iteration started with no mask and made no edit. Earlier blocks are frozen and
  the prompt is never edited. After a block, `eos_early_stop` stops a row whose generated text
  holds EOS. The output is x[P : P + gen_length], cut just after the first EOS (EOS included).
- The mask id is never a candidate (its logit is -inf). Repetition penalty: lambda is
  subtracted from the logit of the token equal to the previous position's current token.
  Candidates: top-k/top-p filter the (tempered) logits, probs = softmax; cand = argmax at
  temperature 0, else a draw from a `torch.Generator` seeded with `seed`; conf = probs[cand].
- `use_cache=True`: prefix KV cache of finished blocks. The first forward of block `b` runs on
  [everything not yet cached ; block b] and commits the part before block `b` (the prompt blocks
  on the first block, block b-1 afterwards, more after a Multi-Block-Editing rewind); later
  forwards run on block `b` alone. `use_cache=False` recomputes the whole prefix every forward
  and is the reference: both take the same decisions, so tokens and forward counts agree.
- Batch > 1: row r is left-padded by (K0 - floor(P_r / block_length)) * block_length tokens so
  every row's first decode block starts at the same column K0 * block_length; position ids are
  0 at each row's first real token; padding keys are masked out (padding queries attend to
  themselves only, so no attention row is empty, which would give NaN in SDPA). All rows work
  on the same block index; inside a block a row whose block is done waits (it is left out of
  the forwards) while the others go on. Rows that are finished leave the batch and the cache.
- Multi-Block Editing (experimental, `multi_block_editing`): after block `b` is done, the last
  `mbe_window` blocks (decode blocks only) are re-run once as one bidirectional window (every
  query of the window sees the cached prefix and the whole window; a design choice: with
  block-causal attention an earlier block would see nothing it has not seen already) and the
  T2T rule is applied to the earlier blocks of the window (not the prompt, not block `b`). On an
  edit the cache is truncated to before the earliest edited block; the next block's first
  forward re-commits from there. With MBE a block is streamed once it leaves the window.
- Model protocol (`Sampler(model_fn_or_model, ...)`): a module whose forward takes
  `(input_ids, attention_mask, position_ids, kv_cache, commit_len, logits_slice)` like
  `LLaDA2MoeModelLM` (cache capable), or any callable `fn(input_ids (B, L), position_ids (B, L))
  -> logits (B, L, V)` (a `ScriptedLM`, e.g. a test's fake) that is always called on the whole
  prefix x[:, : end of block b] (the block-causal mask is implied: nothing later is given) and
  runs without cache. A module counts as cache capable when its forward takes `kv_cache` or
  **kwargs, or when it sets `supports_kv_cache`. Pass the bare model (under ZeRO-3, gather the
  parameters once around the whole `generate` call, not per forward).
- Cached and uncached logits differ only by float rounding (other shapes, other kernels), so
  decisions agree unless two candidates tie to within rounding; the tests check token and
  forward-count equality on a tiny model, `scripts/bench_sampler.py` on a larger one.
- Statistics per call (`SampleStats`): forwards per row and batched model calls, tokens, TPF =
  generated tokens / forwards (per row: the official definition; summed over rows: batch
  independent), M2T fills, T2T edits, MBE edits, wall time, tokens/s. `on_block(row,
  block_index, tokens)` streams each final block (decode block index, tokens cut after EOS).

Legend: `x` (R, T) working tokens of R rows and T columns, `P` prompt length, `b`/`k` block
index (column // block_length), `bl` block_length, `K0` first decode block (tensor columns),
`cand`/`conf` candidate token and its probability, `mask_id`/`eos_id` special ids, M2T
mask-to-token, T2T token-to-token, MBE multi-block editing.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import yaml

from llada_train import CONF_DIR
from llada_train.masks import AttentionMask, decode_mask
from llada_train.model.modeling import PrefixKVCache

PRESETS_DIR = os.path.join(CONF_DIR, "sampler")  # one YAML per preset: the only definition


def _load_presets() -> dict[str, tuple[float, float | None, int]]:
    """(threshold, editing_threshold, max_post_steps) of each preset file (the LLaDA2.1 report's
    Speed and Quality modes), read once at import; the files also restate the other knobs."""
    presets = {}
    for name in sorted(os.listdir(PRESETS_DIR)):
        if name.endswith(".yaml"):
            with open(os.path.join(PRESETS_DIR, name)) as f:
                values = yaml.safe_load(f)
            presets[name[: -len(".yaml")]] = (
                values["threshold"], values["editing_threshold"], values["max_post_steps"]
            )  # fmt: skip
    return presets


PRESETS: dict[str, tuple[float, float | None, int]] = _load_presets()


@dataclass
class SamplerConfig:
    """Knobs of joint threshold decoding; the defaults are the Speed (S) preset."""

    threshold: float = PRESETS["speed"][0]  # M2T: a masked position is set when conf > threshold
    editing_threshold: float | None = PRESETS["speed"][1]  # T2T: a visible one when conf > this
    max_post_steps: int = PRESETS["speed"][2]  # iterations allowed once a block has no mask
    block_length: int | None = 32  # null only in a config node: `sampler_config` resolves it
    gen_length: int = 256
    temperature: float = 0.0  # 0 = argmax
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 0.0  # lambda subtracted from the previous token's logit
    eos_early_stop: bool = True
    use_cache: bool = True
    seed: int | None = None  # seeds the generator of temperature > 0 draws
    multi_block_editing: bool = False  # experimental, see the module docstring
    mbe_window: int = 2  # blocks re-run by MBE, the block just finished included

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SamplerConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown sampler preset {name!r}; choose one of {sorted(PRESETS)}")
        threshold, editing_threshold, max_post_steps = PRESETS[name]
        base = dict(
            threshold=threshold, editing_threshold=editing_threshold, max_post_steps=max_post_steps
        )
        return cls(**{**base, **overrides})

    def replace(self, **overrides: Any) -> SamplerConfig:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown sampler option(s) {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"sampler option '{key}': {why}")

        if not 0.0 <= self.threshold <= 1.0:
            raise bad("threshold", f"must be in [0, 1], got {self.threshold}")
        if self.editing_threshold is not None and not 0.0 <= self.editing_threshold <= 1.0:
            raise bad("editing_threshold", "must be in [0, 1] or null (no T2T editing)")
        if self.max_post_steps < 0:
            raise bad("max_post_steps", f"must be >= 0, got {self.max_post_steps}")
        if self.block_length is None or self.block_length < 1:
            raise bad("block_length", f"must be >= 1, got {self.block_length}")
        if self.gen_length < 1:
            raise bad("gen_length", f"must be >= 1, got {self.gen_length}")
        if self.temperature < 0:
            raise bad("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise bad("top_k", "must be >= 1 or null")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1] or null")
        if self.repetition_penalty < 0:
            raise bad("repetition_penalty", "must be >= 0 (it is subtracted from a logit)")
        if self.mbe_window < 2:
            raise bad(
                "mbe_window",
                f"must be >= 2 (the window holds the new block), got {self.mbe_window}",
            )
        if self.multi_block_editing and self.editing_threshold is None:
            warnings.warn(
                "multi_block_editing has no effect with editing_threshold=None (no T2T rule)",
                stacklevel=3,
            )


def sampler_config(node: Any, model_dir: str | None = None) -> SamplerConfig:
    """A `sampler` config node (DictConfig or dict) -> a validated SamplerConfig: an unknown key
    fails with the valid ones listed, a bad value with the key named (`validate`).
    `block_length: null` takes the block length the model in `model_dir` was trained with (its
    `llada_train.json`, `model.io.training_default`), else 32; an explicit other value warns.
    T2T editing on a model whose facts say `t2t_trained: false` (a mask-only run,
    `run.t2t_trained`) warns too: its edits are arbitrary."""
    from llada_train.model.io import training_default

    if not isinstance(node, dict):
        from omegaconf import OmegaConf  # a DictConfig; the library itself needs no Hydra

        node = OmegaConf.to_container(node, resolve=True)
    knobs = dict(node)
    knobs["block_length"] = training_default(
        "block_length", knobs.get("block_length"), model_dir, SamplerConfig.block_length
    )
    cfg = SamplerConfig().replace(**knobs)
    warn_untrained_editing(model_dir, cfg.editing_threshold is not None)
    return cfg


def warn_untrained_editing(model_dir: str | None, editing: bool) -> None:
    """Warn (UserWarning) when `editing` (T2T editing on) is asked of the model in `model_dir`
    whose training facts say `t2t_trained: false` (`run.t2t_trained`: no stage supervised a
    visible token, e.g. `corruption=mask_only`): such a model's T2T proposals are arbitrary (on
    the sorting task they rewrite every correct answer, docs/learning.md). Silent for models
    without facts (not trained here). Called by `sampler_config`, lm-eval's own CLI path and
    RL (dual-mode rollouts, held-out reward)."""
    from llada_train.model.io import TRAINING_FACTS, load_training_facts

    if editing and load_training_facts(model_dir).get("t2t_trained") is False:
        warnings.warn(
            f"{model_dir} was trained without T2T supervision (mask-only corruption: "
            f"t2t_trained false in its {TRAINING_FACTS}), so its T2T edits are arbitrary; decode "
            "it with sampler.editing_threshold=null (M2T only)",
            stacklevel=3,
        )


@dataclass
class SampleStats:
    """What one `generate` call cost and produced."""

    forwards_per_row: list[int] = field(default_factory=list)  # forwards that included the row
    tokens_per_row: list[int] = field(default_factory=list)  # output length (after the EOS cut)
    num_model_calls: int = 0  # batched forwards
    num_forward_tokens: int = 0  # query tokens fed to the model, all calls
    num_m2t: int = 0  # masked positions filled
    num_t2t: int = 0  # visible tokens edited inside the current block
    num_mbe_edits: int = 0  # tokens edited by Multi-Block Editing
    wall_time_s: float = 0.0

    @property
    def num_forwards(self) -> int:
        return sum(self.forwards_per_row)

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens_per_row)

    @property
    def tpf(self) -> float:
        """Tokens per forward: generated tokens / forwards (summed over rows)."""
        return self.num_tokens / max(self.num_forwards, 1)

    @property
    def tpf_per_row(self) -> list[float]:
        return [
            t / max(f, 1) for t, f in zip(self.tokens_per_row, self.forwards_per_row, strict=True)
        ]

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0


@dataclass
class SampleOutput:
    tokens: list[list[int]]  # per row: generated tokens, cut just after the first EOS
    stats: SampleStats


class ScriptedLM(Protocol):
    """The plain-callable protocol (no cache): logits (B, L, V) for the whole prefix given."""

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor: ...


BlockCallback = Callable[[int, int, list[int]], None]


# ---------------------------------------------------------------------------- pure tensor math
def adjust_logits(
    logits: torch.Tensor,  # (N, L, V) fp32
    prev_tokens: torch.Tensor,  # (N, L) current token at the previous position
    prev_valid: torch.Tensor,  # (N, L) bool: the previous position is a real token
    mask_id: int,
    repetition_penalty: float,
) -> torch.Tensor:
    """Subtract the repetition penalty from the previous token's logit; forbid the mask id."""
    logits = logits.clone()
    if repetition_penalty:
        penalty = -repetition_penalty * prev_valid.to(logits.dtype)  # (N, L)
        logits.scatter_add_(-1, prev_tokens[..., None], penalty[..., None])
    logits[..., mask_id] = float("-inf")
    return logits


def sample_candidates(
    logits: torch.Tensor,  # (N, L, V)
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cand, conf), both (N, L): conf = softmax probability of cand after the filters."""
    if temperature > 0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    probs = logits.softmax(-1)
    if temperature > 0:
        flat = probs.reshape(-1, probs.shape[-1])
        cand = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    else:
        cand = probs.argmax(-1)
    conf = probs.gather(-1, cand[..., None]).squeeze(-1)
    return cand, conf


def joint_threshold_step(
    block: torch.Tensor,  # (N, bl) tokens of the current block at the start of the iteration
    cand: torch.Tensor,  # (N, bl)
    conf: torch.Tensor,  # (N, bl)
    editable: torch.Tensor,  # (N, bl) bool: not prompt
    mask_id: int,
    threshold: float,
    editing_threshold: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One M2T + T2T update: (new block, M2T fills, T2T edits), the last two bool (N, bl)."""
    masked = block == mask_id
    fill = masked & (conf > threshold)  # strict, as the official code
    stuck = masked.any(1) & ~fill.any(1)  # no mask passed: set the single most confident one
    # topk(k=1), as the official code: on an exact tie it may pick another index than argmax
    best = conf.masked_fill(~masked, float("-inf")).topk(1, dim=1).indices[:, 0]  # (N,)
    fill |= stuck[:, None] & (torch.arange(block.shape[1], device=block.device) == best[:, None])
    if editing_threshold is None:
        edit = torch.zeros_like(masked)
    else:
        edit = ~masked & editable & (cand != block) & (conf > editing_threshold)
    return torch.where(fill | edit, cand, block), fill, edit


def cut_after_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def _speaks_cache_protocol(model: Any) -> bool:
    """True for a module whose forward takes `kv_cache` (or **kwargs, e.g. a timing wrapper)."""
    explicit = getattr(model, "supports_kv_cache", None)
    if explicit is not None:
        return bool(explicit)
    if not isinstance(model, torch.nn.Module):
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "kv_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


# ---------------------------------------------------------------------------- the sampler
@dataclass
class _Batch:
    """Working state of one call: R rows laid out on T columns (see the module docstring)."""

    x: torch.Tensor  # (R, T) tokens
    is_prompt: torch.Tensor  # (R, T) bool
    valid: torch.Tensor  # (R, T) bool: not left padding
    pos: torch.Tensor  # (R, T) position ids (0 at the first real token)
    pad: list[int]  # left padding of each row (a multiple of bl)
    prompt_len: list[int]
    num_decode_blocks: list[int]
    first_block: int  # K0: tensor block index of every row's first decode block
    block_length: int
    fwd_count: torch.Tensor  # (R,) forwards per row
    m2t: torch.Tensor  # () counters kept on the device (no sync per iteration)
    t2t: torch.Tensor
    mbe: torch.Tensor


class Sampler:
    """Joint threshold decoding over a cached or a scripted model; see the module docstring."""

    def __init__(
        self,
        model_fn_or_model: torch.nn.Module | ScriptedLM,
        mask_id: int,
        eos_id: int,
        config: SamplerConfig | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if mask_id == eos_id:
            raise ValueError("mask_id and eos_id must differ")
        self.model = model_fn_or_model
        self.mask_id = int(mask_id)
        self.eos_id = int(eos_id)
        self.config = config if config is not None else SamplerConfig()
        self.supports_cache = _speaks_cache_protocol(model_fn_or_model)
        if device is None and isinstance(model_fn_or_model, torch.nn.Module):
            first = next(model_fn_or_model.parameters(), None)
            device = first.device if first is not None else None
        self.device = torch.device(device if device is not None else "cpu")

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[torch.Tensor],
        gen_length: int | None = None,
        on_block: BlockCallback | None = None,
        **overrides: Any,
    ) -> SampleOutput:
        """Decode a batch of prompts; `overrides` replace fields of the sampler's config."""
        if gen_length is not None:
            overrides["gen_length"] = gen_length
        cfg = self.config.replace(**overrides) if overrides else self.config
        rows = [self._as_list(p) for p in prompts]
        if not rows:
            raise ValueError("generate() needs at least one prompt")
        for i, p in enumerate(rows):
            if self.mask_id in p:
                raise ValueError(f"prompt {i} contains the mask id {self.mask_id}; remove it")
        use_cache = cfg.use_cache and self.supports_cache
        if cfg.use_cache and not self.supports_cache:
            warnings.warn(
                "use_cache=True has no effect: the model is a plain callable (no kv_cache)",
                stacklevel=2,
            )
        generator = None
        if cfg.temperature > 0 and cfg.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        stats = SampleStats()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            batch = self._layout(rows, cfg)
            self._decode(batch, cfg, use_cache, generator, stats, on_block)
            tokens = [
                cut_after_eos(
                    batch.x[r, batch.pad[r] + p : batch.pad[r] + p + cfg.gen_length].tolist(),
                    self.eos_id,
                )
                for r, p in enumerate(batch.prompt_len)
            ]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats.wall_time_s = time.perf_counter() - start
        stats.forwards_per_row = batch.fwd_count.tolist()
        stats.tokens_per_row = [len(t) for t in tokens]
        stats.num_m2t, stats.num_t2t = int(batch.m2t), int(batch.t2t)
        stats.num_mbe_edits = int(batch.mbe)
        return SampleOutput(tokens=tokens, stats=stats)

    # ------------------------------------------------------------------ layout
    @staticmethod
    def _as_list(prompt: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise ValueError(f"a prompt tensor must be 1-D, got shape {tuple(prompt.shape)}")
            return [int(t) for t in prompt.tolist()]
        return [int(t) for t in prompt]

    def _layout(self, prompts: list[list[int]], cfg: SamplerConfig) -> _Batch:
        bl, dev = cfg.block_length, self.device
        prompt_len = [len(p) for p in prompts]
        first_blocks = [p // bl for p in prompt_len]
        num_decode_blocks = [-(-(p + cfg.gen_length) // bl) - p // bl for p in prompt_len]
        k0 = max(first_blocks)
        pad = [(k0 - k) * bl for k in first_blocks]
        num_cols = (k0 + max(num_decode_blocks)) * bl
        num_rows = len(prompts)
        x = torch.full((num_rows, num_cols), self.eos_id, dtype=torch.long)  # (R, T)
        is_prompt = torch.zeros(num_rows, num_cols, dtype=torch.bool)
        for r, p in enumerate(prompts):
            end = (k0 + num_decode_blocks[r]) * bl
            x[r, pad[r] : pad[r] + len(p)] = torch.tensor(p, dtype=torch.long)
            x[r, pad[r] + len(p) : end] = self.mask_id
            is_prompt[r, pad[r] : pad[r] + len(p)] = True
        cols = torch.arange(num_cols)[None]  # (1, T)
        pad_t = torch.tensor(pad)[:, None]  # (R, 1)
        zero = torch.zeros((), dtype=torch.long, device=dev)
        return _Batch(
            x=x.to(dev),
            is_prompt=is_prompt.to(dev),
            valid=(cols >= pad_t).to(dev),
            pos=(cols - pad_t).clamp(min=0).to(dev),
            pad=pad,
            prompt_len=prompt_len,
            num_decode_blocks=num_decode_blocks,
            first_block=k0,
            block_length=bl,
            fwd_count=torch.zeros(num_rows, dtype=torch.long, device=dev),
            m2t=zero.clone(),
            t2t=zero.clone(),
            mbe=zero.clone(),
        )

    # ------------------------------------------------------------------ decoding loop
    def _decode(
        self,
        batch: _Batch,
        cfg: SamplerConfig,
        use_cache: bool,
        generator: torch.Generator | None,
        stats: SampleStats,
        on_block: BlockCallback | None,
    ) -> None:
        bl, k0 = cfg.block_length, batch.first_block
        cache = PrefixKVCache.empty(self._num_layers()) if use_cache else None
        alive = list(range(len(batch.prompt_len)))  # rows still decoding, in cache row order
        stopped = [False] * len(alive)
        streamer = _Streamer(batch, bl, cfg.gen_length, self.eos_id, on_block)
        window = cfg.mbe_window if cfg.multi_block_editing else 1
        for j in range(max(batch.num_decode_blocks)):
            keep = [
                i for i, r in enumerate(alive) if j < batch.num_decode_blocks[r] and not stopped[r]
            ]
            if len(keep) < len(alive):
                if cache is not None and keep:
                    cache = cache.select(torch.tensor(keep, device=self.device))
                alive = [alive[i] for i in keep]
            if not alive:
                break
            k = k0 + j
            self._decode_block(batch, cfg, alive, k, cache, generator, stats)
            if window > 1 and j >= 1:
                self._multi_block_edit(batch, cfg, alive, k, cache, generator, stats)
            block_end = (k + 1) * bl
            for r in alive:
                streamer.flush(r, upto_block=j - window + 1)
                done = j == batch.num_decode_blocks[r] - 1
                if cfg.eos_early_stop and not done:
                    gen = batch.x[r, batch.pad[r] + batch.prompt_len[r] : block_end]
                    done = stopped[r] = bool((gen == self.eos_id).any())
                if done:
                    streamer.flush(r, upto_block=j)

    def _decode_block(
        self,
        batch: _Batch,
        cfg: SamplerConfig,
        alive: list[int],
        k: int,
        cache: PrefixKVCache | None,
        generator: torch.Generator | None,
        stats: SampleStats,
    ) -> None:
        """The per-block loop of SPEC section 4 for every alive row (block index k)."""
        bl = cfg.block_length
        start, end = k * bl, (k + 1) * bl
        n = len(alive)
        post = [0] * n
        has_mask = [True] * n  # every decode block starts with masks
        active = list(range(n))  # positions in `alive` whose block is still running
        first = True
        while True:
            nxt = []
            for i in active:
                if not has_mask[i]:
                    post[i] += 1
                if post[i] <= cfg.max_post_steps:
                    nxt.append(i)
            active = nxt
            if not active:
                return
            assert not first or len(active) == n, "the first forward of a block commits all rows"
            row_list = [alive[i] for i in active]
            rows = torch.tensor(row_list, device=self.device)
            logits = self._forward_block(batch, row_list, active, n, k, cache, first, stats)
            first = False
            block = batch.x[rows, start:end]  # (N, bl)
            cand, conf = self._candidates(batch, cfg, rows, start, end, logits, generator)
            new, fill, edit = joint_threshold_step(
                block,
                cand,
                conf,
                ~batch.is_prompt[rows, start:end],
                self.mask_id,
                cfg.threshold,
                cfg.editing_threshold,
            )
            batch.x[rows, start:end] = new
            batch.fwd_count[rows] += 1
            batch.m2t += fill.sum()
            batch.t2t += edit.sum()
            # One host sync per iteration: (had a mask, edited, still has a mask) per row.
            flags = torch.stack(
                ((block == self.mask_id).any(1), edit.any(1), (new == self.mask_id).any(1))
            ).tolist()
            nxt = []
            for col, i in enumerate(active):
                had_mask, edited, still_masked = flags[0][col], flags[1][col], flags[2][col]
                if had_mask or edited:  # else: converged (no mask and no edit)
                    nxt.append(i)
                has_mask[i] = still_masked
            active = nxt

    def _candidates(
        self,
        batch: _Batch,
        cfg: SamplerConfig,
        rows: torch.Tensor,
        start: int,
        end: int,
        logits: torch.Tensor,  # (N, end - start, V)
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cand/conf for columns [start, end) of `rows` from the current state of x."""
        if cfg.repetition_penalty:
            lo = max(start - 1, 0)
            prev = batch.x[rows, lo : end - 1]  # (N, end - 1 - lo)
            if start == 0:  # column 0 has no previous position
                prev = torch.cat((torch.full_like(prev[:, :1], self.mask_id), prev), dim=1)
            prev_valid = batch.pos[rows, start:end] >= 1  # previous column is a real token
        else:
            prev = prev_valid = torch.zeros(0, dtype=torch.long)  # unused
        logits = adjust_logits(logits, prev, prev_valid, self.mask_id, cfg.repetition_penalty)
        return sample_candidates(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)

    # ------------------------------------------------------------------ Multi-Block Editing
    def _multi_block_edit(
        self,
        batch: _Batch,
        cfg: SamplerConfig,
        alive: list[int],
        k: int,
        cache: PrefixKVCache | None,
        generator: torch.Generator | None,
        stats: SampleStats,
    ) -> None:
        """Re-run the window [w0, k] bidirectionally once; T2T on blocks w0..k-1."""
        if cfg.editing_threshold is None:
            return
        bl = cfg.block_length
        w0 = max(batch.first_block, k - cfg.mbe_window + 1)
        start, edit_end, end = w0 * bl, k * bl, (k + 1) * bl
        row_list = alive
        rows = torch.tensor(row_list, device=self.device)
        mask_cols = torch.arange(end)
        mask_cols[start:] = end - 1  # window queries see every key up to `end`
        if cache is not None:  # cache holds blocks < k: use a view of the part before w0
            view = PrefixKVCache(
                [None if t is None or start == 0 else t[:, :, :start] for t in cache.keys],
                [None if t is None or start == 0 else t[:, :, :start] for t in cache.values],
            )
            mask = self._mask(batch, row_list, mask_cols[start:], torch.arange(start, end), end)
            logits = self._call_model(
                batch.x[rows, start:end],
                mask,
                batch.pos[rows, start:end],
                view,
                0,
                slice(0, edit_end - start),
                stats,
            )
        else:
            mask = self._mask(batch, row_list, mask_cols, torch.arange(end), end)
            logits = self._call_model(
                batch.x[rows, :end],
                mask,
                batch.pos[rows, :end],
                None,
                0,
                slice(start, edit_end),
                stats,
            )
        cand, conf = self._candidates(batch, cfg, rows, start, edit_end, logits, generator)
        current = batch.x[rows, start:edit_end]
        edit = ~batch.is_prompt[rows, start:edit_end] & (cand != current)
        edit &= conf > cfg.editing_threshold
        batch.x[rows, start:edit_end] = torch.where(edit, cand, current)
        batch.fwd_count[rows] += 1
        batch.mbe += edit.sum()
        edited_cols = edit.any(0).nonzero()
        if cache is not None and edited_cols.numel():
            first_edited_block = w0 + int(edited_cols[0]) // bl
            cache.truncate(first_edited_block * bl)  # the next block re-commits from here

    # ------------------------------------------------------------------ model calls
    def _num_layers(self) -> int:
        for owner in (self.model, getattr(self.model, "module", None)):  # bare or wrapped
            num_layers = getattr(getattr(owner, "config", None), "num_hidden_layers", None)
            if num_layers is not None:
                return int(num_layers)
        raise ValueError(
            "the KV cache needs model.config.num_hidden_layers; pass the bare model "
            "(e.g. engine.module) or set use_cache=False"
        )

    def _forward_block(
        self,
        batch: _Batch,
        row_list: list[int],  # rows of x
        active: list[int],  # their positions among the alive rows (= cache rows)
        num_alive: int,
        k: int,
        cache: PrefixKVCache | None,
        first: bool,
        stats: SampleStats,
    ) -> torch.Tensor:
        """Logits (N, bl, V) of block k for `row_list`."""
        bl = batch.block_length
        rows = torch.tensor(row_list, device=self.device)
        start, end = k * bl, (k + 1) * bl
        if cache is None:  # reference path: recompute the whole prefix
            q_cols = torch.arange(end)
            mask = self._mask(batch, row_list, q_cols, q_cols, end)
            return self._call_model(
                batch.x[rows, :end], mask, batch.pos[rows, :end], None, 0, slice(start, end), stats
            )
        if first:  # commit every column before block k that the cache does not hold yet
            lo = cache.length
            q_cols = torch.arange(lo, end)
            mask = self._mask(batch, row_list, q_cols, q_cols, end)
            return self._call_model(
                batch.x[rows, lo:end],
                mask,
                batch.pos[rows, lo:end],
                cache,
                start - lo,
                slice(start - lo, None),
                stats,
            )
        assert cache.length == start, (cache.length, start)
        sub = (
            cache
            if len(active) == num_alive
            else cache.select(torch.tensor(active, device=self.device))
        )
        q_cols = torch.arange(start, end)
        mask = self._mask(batch, row_list, q_cols, q_cols, end)
        return self._call_model(
            batch.x[rows, start:end], mask, batch.pos[rows, start:end], sub, 0, None, stats
        )

    def _mask(
        self,
        batch: _Batch,
        row_list: list[int],  # rows of x (host copy of `rows`)
        mask_cols: torch.Tensor,  # (Lq,) column used for the block rule of each query
        q_cols: torch.Tensor,  # (Lq,) true column of each query
        end: int,  # keys are columns [0, end)
    ) -> AttentionMask | None:
        """(N|1, 1, Lq, end) block-causal mask over valid keys (`masks.decode_mask`: dense for
        SDPA, a cached BlockMask for FlexAttention); None if nothing is hidden."""
        bl = batch.block_length
        pad = [batch.pad[r] for r in row_list]
        if max(pad) == 0 and int(mask_cols.min()) // bl == (end - 1) // bl:
            return None  # every query sees every key: let SDPA run without a mask
        return decode_mask(mask_cols, q_cols, end, bl, pad, self.device)

    def _call_model(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        kv_cache: PrefixKVCache | None,
        commit_len: int,
        logits_slice: slice | None,
        stats: SampleStats,
    ) -> torch.Tensor:
        stats.num_model_calls += 1
        stats.num_forward_tokens += input_ids.numel()
        if self.supports_cache:
            return self.model(
                input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                kv_cache=kv_cache,
                commit_len=commit_len,
                logits_slice=logits_slice,
            )
        assert kv_cache is None
        logits = self.model(input_ids, position_ids)
        return logits if logits_slice is None else logits[:, logits_slice]


class _Streamer:
    """Calls on_block(row, decode block index, tokens) once per final block, cut after EOS."""

    def __init__(
        self, batch: _Batch, bl: int, gen_length: int, eos_id: int, on_block: BlockCallback | None
    ) -> None:
        self.batch, self.bl, self.gen_length, self.eos_id = batch, bl, gen_length, eos_id
        self.on_block = on_block
        n = len(batch.prompt_len)
        self.next_block = [0] * n
        self.saw_eos = [False] * n

    def flush(self, r: int, upto_block: int) -> None:
        """Stream decode blocks next_block[r] .. upto_block of row r."""
        if self.on_block is None:
            return
        b = self.batch
        gen_start = b.pad[r] + b.prompt_len[r]
        gen_end = gen_start + self.gen_length
        while self.next_block[r] <= upto_block and not self.saw_eos[r]:
            j = self.next_block[r]
            lo = max((b.first_block + j) * self.bl, gen_start)
            hi = min((b.first_block + j + 1) * self.bl, gen_end)
            tokens = b.x[r, lo:hi].tolist()
            if self.eos_id in tokens:
                tokens, self.saw_eos[r] = cut_after_eos(tokens, self.eos_id), True
            self.next_block[r] += 1
            if tokens:
                self.on_block(r, j, tokens)
