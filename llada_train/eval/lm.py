"""The lm-evaluation-harness model `llada`: a LLaDA2.x checkpoint behind the shared sampler.

    lm = LLaDALM(pretrained="runs/sft/checkpoints/step_00000150/hf", sampler="quality")
    lm = LLaDALM(model=model, tokenizer=tokenizer)        # in memory, e.g. inside training
    lm_eval.simple_evaluate(model=lm, tasks=[...])

Contract:
- Registered as `llada` (`@register_model`), so `model_args` strings work: `pretrained=DIR,
  device=cuda,dtype=bfloat16,sampler=quality,threshold=0.6,mc_samples=64,chat_template=True`.
  Every field of `SamplerConfig` except `gen_length` is a knob (`max_gen_toks` sets the default
  generation length); an unknown key fails with the valid ones listed. Nothing here knows our
  own tasks: any lm-eval task (gsm8k, humaneval, hellaswag, wikitext) goes through the three
  request types below.
- `generate_until`: requests with equal `gen_kwargs` are decoded in batches of `batch_size` by
  the shared `Sampler` with the configured preset; `max_gen_toks` of the request (else of the
  model) is the sampler's `gen_length`; the text is decoded without special tokens and cut at
  the first `until` stop string. `do_sample=True` or `temperature > 0` switches to sampling
  (temperature, top_p, top_k, seeded by `seed`); other generation keys are ignored (warned
  once). TPF, tokens/s, forwards, M2T/T2T counts accumulate over the run: `speed_stats()`.
- `loglikelihood` returns, per (context c, continuation y), `(ELBO estimate, is_greedy)`; the
  standard error of each estimate is kept in `last_standard_errors` (same order), and their
  mean over the run is in `speed_stats()["ll_standard_error_mean"]` and logged.
- `loglikelihood_rolling` (perplexity) returns the ELBO of the whole text: one request with an
  empty context when the text fits in `max_length` tokens, else windows of `max_length` tokens
  whose first `max_length // 2` are the previous tokens (context) and the rest are scored, so
  every token is scored exactly once; window estimates add up, their variances too.
- Reproducible: the mask draws of a request are seeded by (seed, context tokens), so a request
  gets the same estimate in any batch, order or run, and the choices of one multiple-choice
  question share their draws (common random numbers: k and the positions coincide for
  continuations of equal length, which lowers the variance of the comparison).
- Text is text: contexts and continuations are encoded with `tokenizer.encode_text`, so a
  `<|mask|>` or `<|endoftext|>` inside a request is ordinary tokens; control ids come only from
  the chat template (ours with `chat_template=True`, or lm-eval's `--apply_chat_template`,
  whose rendered strings are recognised and encoded with `encode_chat`).
- Single process (rank 0 of 1): lm-eval's data-parallel sharding is not implemented.

The estimator (Monte Carlo ELBO under the block layout of training, SPEC sections 2 and 6):
x0 = [c ; y] (P + n tokens), only y maskable. Per sample s, draw a mask count k_s, mask a
uniform k_s-subset M_s of y to get x_t, run the training layout `training_inputs(x_t, x0,
block_length)` (noisy block b sees noisy block b and clean blocks < b), and score

    e_s = (n / k_s) * sum_{i in M_s} log p(y_i | noisy block of i, clean earlier blocks)

with log p renormalised without the mask token (the sampler never proposes it either). The
estimate is the mean of e_s over `mc_samples` samples; k_s is stratified: k_s = ceil(u_s n),
u_s uniform on [s/N, (s+1)/N), so k is marginally uniform on {1..n} and the mean is unbiased.

Why E[e] is an ELBO of log p(y | c) for a block-diffusion model:
1. The model is block-autoregressive: log p(y | c) = sum_b log p(y^b | c, y^{<b}), each block a
   masked diffusion model conditioned on the clean earlier blocks (and on the context tokens
   that share the first block: they are never masked).
2. For one block, the masked-diffusion bound is log p(y^b | .) >= E_{t ~ U(0,1)} E_{M ~ Bern(t)}
   [(1/t) sum_{i in M} log p(y_i | z_M)]. Summing it over blocks with one shared t is the same
   bound on the whole y, because with the layout above the prediction at a position of block b
   depends only on which positions of block b are masked, never on the masks of other blocks.
3. The count form used here (k uniform on 1..n, M a uniform k-subset, weight n/k; LLaDA's
   estimator) has the same expectation as the t form: both put total weight
   (|M| - 1)! (n - |M|)! / n! on every non-empty subset M (t form: integral of
   t^{|M|-1} (1-t)^{n-|M|} dt = B(|M|, n-|M|+1); count form: (1/n) (1/C(n,|M|)) (n/|M|)).
So E[e] = sum_b ELBO_b <= log p(y | c), and `tests/test_eval.py` checks the Monte Carlo mean
against this expectation enumerated over every subset, with per-block forwards under the
inference (block-causal) mask: an independent path to the same numbers.

Standard error: the sample standard deviation of the e_s over sqrt(N), the i.i.d. formula;
stratification only lowers the true variance, so it is conservative (an over-estimate).
is_greedy: one extra forward per request with all of y masked (still under the layout, so block
b sees the clean earlier blocks): True iff every y_i is the argmax (mask excluded) there, i.e.
y is what one-shot decoding of each block given the true earlier blocks would write. It is a
teacher-forced notion of greedy, not the output of the threshold sampler.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llada_train.elbo import masked_log_probs
from llada_train.masks import training_inputs
from llada_train.sampler import (
    PRESETS,
    Sampler,
    SamplerConfig,
    SampleStats,
    warn_untrained_editing,
)
from llada_train.tokenizer import (
    encode_chat,
    encode_prompt,
    encode_text,
    load_tokenizer,
    special_ids,
)

logger = logging.getLogger(__name__)

# Sampler knobs accepted as model_args (gen_length is the request's max_gen_toks instead).
SAMPLER_KNOBS = tuple(f.name for f in dataclasses.fields(SamplerConfig) if f.name != "gen_length")
DEFAULT_MAX_LENGTH = 4096  # context cap when the config allows more: the 2L layout is quadratic
LOGITS_BUDGET = 1 << 27  # fp32 logit entries per ELBO forward (512 MiB)
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}


@dataclasses.dataclass(frozen=True)
class ElboResult:
    """Monte Carlo ELBO of one continuation (nats), see the module docstring."""

    estimate: float  # mean of the per-sample estimates e_s
    standard_error: float  # std(e_s) / sqrt(N); nan for N = 1; 0 for an empty continuation
    is_greedy: bool
    num_tokens: int  # n = |y|


def preset_name(config: SamplerConfig) -> str:
    """The preset whose (threshold, editing_threshold, max_post_steps) `config` has, or custom."""
    key = (config.threshold, config.editing_threshold, config.max_post_steps)
    return next((name for name, value in PRESETS.items() if value == key), "custom")


def draw_masks(
    num_tokens: int, num_samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified mask counts k (N,) in 1..n and masks (N, n) bool with exactly k_s per row.

    u_s = (s + U_s) / N covers stratum s of [0, 1); k_s = ceil(u_s n) is uniform on 1..n for a
    uniform u; the masked positions are the k_s smallest ranks of a random permutation.
    """
    jitter = torch.rand(num_samples, generator=generator, dtype=torch.float64)
    u = (torch.arange(num_samples, dtype=torch.float64) + jitter) / num_samples  # (N,)
    k = torch.ceil(u * num_tokens).long().clamp_(1, num_tokens)  # (N,)
    ranks = torch.rand(num_samples, num_tokens, generator=generator).argsort(1).argsort(1)
    return k, ranks < k[:, None]  # (N,), (N, n)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any non-empty stop string."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """auto -> cuda if present else cpu. lm-eval's CLI passes cuda:0 unless told otherwise, so a
    CUDA device on a machine without one falls back to the CPU with a warning."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("llada: device=%s but CUDA is not available; using the CPU", device)
        return torch.device("cpu")
    return device


@register_model("llada")
class LLaDALM(LM):
    """lm-eval adapter; see the module docstring. Build from `pretrained=DIR` or `model=`."""

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,  # a tokenizer object, or a path (default: the model directory)
        device: str | None = "auto",
        dtype: str = "auto",  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
        sampler: str = "speed",  # preset name; knobs below override its fields
        sampler_config: SamplerConfig | None = None,  # in memory: replaces `sampler`
        batch_size: int | str = 16,  # prompts per sampler call
        max_batch_size: int | None = None,  # lm-eval passes it; unused (no auto batch size)
        mc_samples: int = 32,  # Monte Carlo samples per log-likelihood request
        mc_batch_size: int = 64,  # rows (samples) per ELBO forward
        chat_template: bool = False,  # wrap each context as one user turn of the chat template
        system: str | None = None,  # system message when chat_template is on
        max_gen_toks: int | None = None,  # default generation length (None: sampler gen_length)
        max_length: int | None = None,  # token budget of context + continuation
        seed: int = 1234,
        **sampler_knobs: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(sampler_knobs) - set(SAMPLER_KNOBS))
        if unknown:
            raise ValueError(
                f"llada model_args: unknown option(s) {unknown}; sampler knobs are "
                f"{list(SAMPLER_KNOBS)}, the rest: pretrained, device, dtype, sampler, batch_size, "
                "mc_samples, mc_batch_size, chat_template, system, max_gen_toks, max_length, seed"
            )
        if (pretrained is None) == (model is None):
            raise ValueError("give exactly one of pretrained=DIR (a model directory) or model=")
        if model is None:
            from llada_train.model.io import from_pretrained, resolve_dtype  # heavy: on load

            if isinstance(tokenizer or pretrained, str):  # tokenizer files checked first
                tokenizer = load_tokenizer(tokenizer or pretrained)
            dev = _resolve_device(device)
            model = from_pretrained(pretrained, device=dev, dtype=resolve_dtype(dtype, dev))
        elif tokenizer is None:
            raise ValueError("an in-memory model needs its tokenizer (tokenizer=...)")
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        first = next(model.parameters())
        self._device = first.device
        self.model = model
        self.tokenizer = tokenizer
        self.pretrained = pretrained
        ids = special_ids(tokenizer)
        self.mask_id, self.eos_id = ids.mask_id, ids.eos_id
        if sampler_config is None:  # lm-eval's CLI: the trained block length by default
            from llada_train.model.io import training_default

            block_length = training_default(
                "block_length", sampler_knobs.pop("block_length", None), pretrained, 32
            )
            base = SamplerConfig.from_preset(sampler, block_length=int(block_length))
        else:
            base = sampler_config
        self.sampler_config = base.replace(**sampler_knobs) if sampler_knobs else base
        if sampler_config is None:  # sampler_config() has warned on the other path
            warn_untrained_editing(pretrained, self.sampler_config.editing_threshold is not None)
        self.sampler = Sampler(model, self.mask_id, self.eos_id, self.sampler_config, self._device)
        self.block_length = self.sampler_config.block_length
        self.batch_size = self._parse_batch_size(batch_size)
        self.mc_samples = int(mc_samples)
        self.mc_batch_size = int(mc_batch_size)
        if self.mc_samples < 1 or self.mc_batch_size < 1:
            raise ValueError("mc_samples and mc_batch_size must be >= 1")
        self.use_chat_template = bool(chat_template)
        self.system = system
        self.max_gen_toks = int(max_gen_toks or self.sampler_config.gen_length)
        config_max = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_length = int(
            max_length or min(config_max or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
        )
        self.seed = int(seed)
        self.last_standard_errors: list[float] = []
        self._warned: set[str] = set()
        self._chat_ids: dict[str, list[int]] = {}  # apply_chat_template's strings -> their ids
        self.reset_stats()

    @staticmethod
    def _parse_batch_size(batch_size: int | str) -> int:
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            logger.warning("batch_size=%s: no automatic batch size; using 16", batch_size)
            return 16
        value = int(batch_size)
        if value < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return value

    # ------------------------------------------------------------------ bookkeeping
    def reset_stats(self) -> None:
        self._gen = SampleStats()
        self._num_generate_calls = 0
        self._ll_forwards = 0
        self._ll_rows = 0
        self._ll_wall_s = 0.0
        self._ll_standard_errors: list[float] = []

    def speed_stats(self) -> dict[str, float]:
        """Totals since construction (or `reset_stats`): generation TPF and tokens/s, the
        ELBO forwards, and the mean standard error of the log-likelihood estimates."""
        g = self._gen
        finite = [se for se in self._ll_standard_errors if math.isfinite(se)]
        return {
            "tpf": g.num_tokens / g.num_forwards if g.num_forwards else 0.0,
            "tokens_per_s": g.num_tokens / g.wall_time_s if g.wall_time_s > 0 else 0.0,
            "num_tokens": g.num_tokens,
            "num_forwards": g.num_forwards,
            "num_generate_calls": self._num_generate_calls,
            "generate_wall_s": g.wall_time_s,
            "num_m2t": g.num_m2t,
            "num_t2t": g.num_t2t,
            "ll_forwards": self._ll_forwards,
            "ll_rows": self._ll_rows,
            "ll_wall_s": self._ll_wall_s,
            "ll_requests": len(self._ll_standard_errors),
            "ll_standard_error_mean": sum(finite) / len(finite) if finite else float("nan"),
        }

    def get_model_info(self) -> dict[str, Any]:
        """Merged into lm-eval's results["config"]."""
        return {
            "llada_pretrained": self.pretrained,
            "llada_sampler": {
                "preset": preset_name(self.sampler_config),
                **dataclasses.asdict(self.sampler_config),
            },
            "llada_mc_samples": self.mc_samples,
        }

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # ------------------------------------------------------------------ chat template
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "llada")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """lm-eval's `--apply_chat_template` path (then leave chat_template=False). The ids of
        the rendered string are remembered, so that special-token strings inside the messages
        stay text when lm-eval hands the string back as a context."""
        rendered = self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        self._chat_ids[rendered] = encode_chat(self.tokenizer, chat_history, add_generation_prompt)
        return rendered

    def _encode_context(self, context: str) -> tuple[list[int], bool]:
        """(ids, ends in a chat template) of a context, as the model sees it. Text is text:
        special-token strings in a context are ordinary tokens; control ids come only from the
        chat template, ours (one user turn when chat_template is on) or lm-eval's rendering of
        `apply_chat_template` (recognised by its string, text appended after it stays text)."""
        if context in self._chat_ids:
            return self._chat_ids[context], True
        for rendered, ids in self._chat_ids.items():  # e.g. lm-eval appended a gen_prefix
            if context.startswith(rendered):
                return ids + self._encode(context[len(rendered) :]), True
        if not self.use_chat_template:
            return self._encode(context), False
        return encode_prompt(self.tokenizer, context, self.system, chat_template=True), True

    def _encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text) if text else []

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        for indices in groups.values():
            until, gen_length, overrides = self._generation_settings(requests[indices[0]].args[1])
            prompts = [self._prompt_tokens(requests[i].args[0], gen_length) for i in indices]
            order = sorted(range(len(indices)), key=lambda j: -len(prompts[j]))  # less padding
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                tokens = self._sample([prompts[j] for j in chunk], gen_length, overrides)
                for j, out in zip(chunk, tokens, strict=True):
                    text = cut_at_stop(self.tokenizer.decode(out, skip_special_tokens=True), until)
                    results[indices[j]] = text
                    self.cache_hook.add_partial("generate_until", requests[indices[j]].args, text)
        return results  # type: ignore[return-value]

    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int, dict[str, Any]]:
        """(stop strings, gen_length, sampler overrides) of one request's gen_kwargs."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        gen_length = int(gen_kwargs.get("max_gen_toks") or self.max_gen_toks)
        overrides: dict[str, Any] = {}
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if gen_kwargs.get("do_sample") or temperature > 0:
            overrides["temperature"] = temperature if temperature > 0 else 1.0
            if gen_kwargs.get("top_p") is not None:
                overrides["top_p"] = float(gen_kwargs["top_p"])
            if gen_kwargs.get("top_k") is not None:
                overrides["top_k"] = int(gen_kwargs["top_k"])
            if self.sampler_config.seed is None:
                overrides["seed"] = self.seed
        ignored = sorted(set(gen_kwargs) - _GEN_KEYS)
        if ignored:
            self._warn_once(
                f"gen:{ignored}", f"llada: generation options {ignored} are ignored (no effect)"
            )
        return until, gen_length, overrides

    def _prompt_tokens(self, context: str, gen_length: int) -> list[int]:
        tokens = self._encode_context(context)[0]
        budget = max(self.max_length - gen_length, 1)
        if len(tokens) > budget:  # keep the end: the question sits there
            self._warn_once("trunc", f"llada: prompts cut to their last {budget} tokens")
            tokens = tokens[-budget:]
        return tokens

    def _sample(
        self, prompts: list[list[int]], gen_length: int, overrides: dict[str, Any]
    ) -> list[list[int]]:
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.sampler.generate(prompts, gen_length=gen_length, **overrides)
        finally:
            self.model.train(was_training)
        s, g = out.stats, self._gen
        g.forwards_per_row += s.forwards_per_row
        g.tokens_per_row += s.tokens_per_row
        g.num_model_calls += s.num_model_calls
        g.num_forward_tokens += s.num_forward_tokens
        g.num_m2t += s.num_m2t
        g.num_t2t += s.num_t2t
        g.num_mbe_edits += s.num_mbe_edits
        g.wall_time_s += s.wall_time_s
        self._num_generate_calls += 1
        return out.tokens

    # ------------------------------------------------------------------ log-likelihood
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        results = self.loglikelihood_tokens(pairs)
        self.last_standard_errors = [r.standard_error for r in results]
        out = [(r.estimate, r.is_greedy) for r in results]
        for request, answer in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, answer)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, request in enumerate(requests):
            for pair in self.rolling_windows(self._encode(request.args[0])):
                windows.append(pair)
                owner.append(i)
        results = self.loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        variances = [0.0] * len(requests)
        for i, r in zip(owner, results, strict=True):
            totals[i] += r.estimate
            variances[i] += r.standard_error**2
        self.last_standard_errors = [math.sqrt(v) for v in variances]
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        """(context, scored) windows covering `tokens`, each token scored once (module doc)."""
        if len(tokens) <= self.max_length:
            return [([], tokens)] if tokens else []
        context_len = self.max_length // 2
        step = self.max_length - context_len
        windows = [([], tokens[: self.max_length])]
        for start in range(self.max_length, len(tokens), step):
            windows.append((tokens[start - context_len : start], tokens[start : start + step]))
        return windows

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids (c, y): the whole text is encoded once and split after the context's
        tokens (trailing spaces of the context belong to the continuation, as in lm-eval)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids, is_chat = self._encode_context(context) if context else ([], False)
        if is_chat:  # the template ends in a control token: nothing merges across it
            c, y = context_ids, self._encode(continuation)
        else:
            whole = self._encode(context + continuation)
            c, y = whole[: len(context_ids)], whole[len(context_ids) :]
        if len(c) + len(y) > self.max_length:
            self._warn_once("ll_trunc", f"llada: contexts cut to fit {self.max_length} tokens")
            c = c[max(len(c) + len(y) - self.max_length, 0) :]
            y = y[-self.max_length :]
        return c, y

    def _request_seed(self, context: list[int]) -> int:
        digest = hashlib.sha256(json.dumps([self.seed, context]).encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    @torch.inference_mode()
    def loglikelihood_tokens(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        num_samples: int | None = None,
    ) -> list[ElboResult]:
        """Monte Carlo ELBO of each continuation y given its context c (token ids).

        Rows (N samples + 1 all-masked row per request) of requests of equal total length share
        forwards, up to `mc_batch_size` rows and `LOGITS_BUDGET` logit entries; rows of
        different lengths never share one, so no padding can leak into attention.
        """
        num_samples = int(num_samples or self.mc_samples)
        start_time = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        samples: list[list[float]] = [[] for _ in pairs]
        greedy = [True] * len(pairs)
        by_length: dict[int, list[int]] = {}
        for i, (c, y) in enumerate(pairs):
            if len(y):
                by_length.setdefault(len(c) + len(y), []).append(i)
        try:
            for length in sorted(by_length):
                self._score_group(pairs, by_length[length], length, num_samples, samples, greedy)
        finally:
            self.model.train(was_training)
        results = []
        for i, (_, y) in enumerate(pairs):
            values = torch.tensor(samples[i], dtype=torch.float64)
            if not len(y):
                results.append(ElboResult(0.0, 0.0, True, 0))
                continue
            se = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan
            results.append(ElboResult(float(values.mean()), se, greedy[i], len(y)))
        self._ll_wall_s += time.perf_counter() - start_time
        ses = [r.standard_error for r in results if r.num_tokens]
        self._ll_standard_errors += ses
        finite = [se for se in ses if math.isfinite(se)]
        if finite:
            logger.info(
                "llada loglikelihood: %d requests, %d samples each, mean standard error %.4f",
                len(pairs),
                num_samples,
                sum(finite) / len(finite),
            )
        return results

    def _score_group(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        indices: list[int],
        length: int,  # P + n, equal for every request of the group
        num_samples: int,
        samples: list[list[float]],
        greedy: list[bool],
    ) -> None:
        """Append the e_s of requests `indices` to `samples`; set their is_greedy flags."""
        x0_rows, masked_rows, weights, owners, is_greedy_row = [], [], [], [], []
        lo = length
        for i in indices:
            c, y = pairs[i]
            n, prompt_len = len(y), len(c)
            lo = min(lo, prompt_len)
            gen = torch.Generator().manual_seed(self._request_seed(list(c)))
            k, masked_y = draw_masks(n, num_samples, gen)  # (N,), (N, n)
            masked_y = torch.cat((masked_y, torch.ones(1, n, dtype=torch.bool)))  # + greedy row
            masked = torch.zeros(num_samples + 1, length, dtype=torch.bool)  # (N + 1, L)
            masked[:, prompt_len:] = masked_y
            x0_rows.append(torch.tensor([*c, *y], dtype=torch.long).expand(num_samples + 1, -1))
            masked_rows.append(masked)
            weights.append(torch.cat((n / k.double(), torch.zeros(1, dtype=torch.float64))))
            owners += [i] * (num_samples + 1)
            is_greedy_row += [False] * num_samples + [True]
        x0_all = torch.cat(x0_rows)  # (R, L)
        masked_all = torch.cat(masked_rows)  # (R, L)
        weight_all = torch.cat(weights)  # (R,)
        vocab = int(self.model.config.vocab_size)
        span = length - lo  # logits are read for positions lo..L-1 only
        rows_per_forward = max(1, min(self.mc_batch_size, LOGITS_BUDGET // (span * vocab)))
        for start in range(0, len(owners), rows_per_forward):
            rows = slice(start, start + rows_per_forward)
            x0 = x0_all[rows].to(self._device)
            masked = masked_all[rows].to(self._device)
            xt = x0.masked_fill(masked, self.mask_id)
            input_ids, mask, position_ids, _ = training_inputs(xt, x0, self.block_length)
            logits = self.model(
                input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                logits_slice=slice(lo, length),
            )  # (B, span, V) of the noisy copy
            self._ll_forwards += 1
            self._ll_rows += x0.shape[0]
            # log p of the masked rows only, renormalised without the mask token (as the sampler)
            (row, _), logp, is_argmax = masked_log_probs(
                logits, x0[:, lo:], masked[:, lo:], exclude_id=self.mask_id
            )  # (M,) each
            sums = torch.zeros(x0.shape[0], dtype=torch.float64, device=logp.device)  # (B,)
            sums = sums.index_add(0, row, logp.double()).cpu()
            hits = torch.ones(x0.shape[0], dtype=torch.bool, device=logp.device)  # (B,)
            hits = hits.index_put((row[~is_argmax],), torch.tensor(False, device=hits.device)).cpu()
            for j, row in enumerate(range(start, start + x0.shape[0])):
                owner = owners[row]
                if is_greedy_row[row]:
                    greedy[owner] = bool(hits[j])
                else:
                    samples[owner].append(float(weight_all[row] * sums[j]))
