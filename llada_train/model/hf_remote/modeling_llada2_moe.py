"""LLaDA2-MoE for `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

Shipped by llada_train (`llada_train/model/hf_remote/`) in exports whose source had no remote
code of its own, e.g. a model trained from scratch. It wraps llada_train's implementation, so
`pip install llada_train` is needed where it loads (transformers says so when it is missing).
The weights are in the official layout: the official modeling_llada2_moe.py of
inclusionAI/LLaDA2.1-mini (copied over this file and configuration_llada2_moe.py) and SGLang's
LLaDA2 model (architectures: LLaDA2MoeModelLM) load the same directory.

Contract:
- `from_pretrained(dir, dtype=..., device_map=...)`: `llada_train.model.io.from_pretrained`
  (names and shapes checked); dtype None/"auto" = config.json's torch_dtype; device_map a
  single device ("cpu", "cuda", "cuda:1", an index) or "auto" (the first GPU, else the CPU).
- `forward(input_ids, attention_mask=None, position_ids=None)` -> `.logits` (B, L, V), fp32;
  the logits at position i predict the token at position i (no shift). attention_mask: None
  (every position sees every other), (B, L) of 1 = real token / 0 = padding, or a 4-D
  (B|1, 1, L, L) mask: bool or integer (True/1 = may attend) or floating additive (0 = may
  attend, negative = may not).
- `generate(inputs, ...)`: llada_train's joint threshold sampler (M2T + T2T editing, block KV
  cache); the defaults come from generation_config.json (block_length, threshold,
  editing_threshold, max_post_steps, gen_length, eos/mask ids). Returns the generated tokens
  only, (B, T) right-padded with the EOS id. `steps` is accepted and ignored (threshold
  decoding decides how many tokens each forward sets).
- `save_pretrained(dir)` writes the official layout again (`llada_train.model.io`).
"""

import dataclasses
import os

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from llada_train.model import io as llada_io
from llada_train.model.config import LLaDA2MoeConfig as TrainConfig
from llada_train.model.modeling import LLaDA2MoeModelLM as TrainLM

from .configuration_llada2_moe import LLaDA2MoeConfig

_UNSET = object()


def _train_config(config) -> TrainConfig:
    """llada_train's config of an HF config object (the architecture keys only)."""
    skip = {"extra", "torch_dtype", "model_type", "architectures", "rope_scaling"}
    names = {f.name for f in dataclasses.fields(TrainConfig)} - skip
    return TrainConfig.from_dict({k: getattr(config, k) for k in names if hasattr(config, k)})


def _device(device_map) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError("device_map: this model loads onto one device; pass one device")
        device_map = devices.pop()
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def _dtype(dtype, config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "torch_dtype", None) or "float32"
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _bool_mask(attention_mask, input_ids):
    """attention_mask (module docstring) -> bool (B|1, 1, L, L), True = may attend; or None."""
    if attention_mask is None:
        return None
    m = attention_mask.to(input_ids.device)
    if m.dim() == 2:  # (B, L) padding mask: every query sees the real tokens of its row
        n = input_ids.shape[1]
        return m.bool()[:, None, None, :].expand(-1, 1, n, -1)
    if m.dim() != 4:
        raise ValueError(f"attention_mask: expected 2 or 4 dims, got shape {list(m.shape)}")
    if m.dtype == torch.bool:
        return m
    if m.is_floating_point():
        return m == 0  # additive: 0 = may attend
    return m != 0


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):  # llada_train initialises (or loads) every weight itself
        pass


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    """The LM: `model.*` backbone and `lm_head`, llada_train's modules under the official
    names (the routed experts are stored stacked; `save_pretrained` splits them again)."""

    def __init__(self, config, impl=None):
        super().__init__(config)
        impl = impl if impl is not None else TrainLM(_train_config(config))
        self.model = impl.model
        self.lm_head = impl.lm_head
        self.__dict__["impl"] = impl  # not a submodule: it owns self.model and self.lm_head
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, revision=kwargs.get("revision"))
        if config is None:
            config = LLaDA2MoeConfig.from_pretrained(path)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        impl = llada_io.from_pretrained(
            path, device=_device(kwargs.get("device_map")), dtype=_dtype(dtype, config)
        )
        model = cls(config, impl=impl)
        if os.path.exists(os.path.join(path, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model.eval()

    def save_pretrained(self, save_directory, **kwargs):
        llada_io.save_pretrained(self.impl, save_directory, dtype=self.dtype)

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        logits = self.impl(
            input_ids,
            attention_mask=_bool_mask(attention_mask, input_ids),
            position_ids=position_ids,
        )
        return CausalLMOutput(logits=logits)

    @torch.no_grad()
    def generate(
        self,
        inputs=None,
        attention_mask=None,
        gen_length=None,
        block_length=None,
        threshold=None,
        editing_threshold=_UNSET,
        max_post_steps=None,
        temperature=None,
        top_k=None,
        top_p=None,
        eos_early_stop=None,
        eos_id=None,
        mask_id=None,
        steps=None,
        input_ids=None,
        max_new_tokens=None,
        **kwargs,
    ):
        from llada_train.sampler import Sampler, SamplerConfig

        ids = inputs if inputs is not None else input_ids
        if ids is None:
            raise ValueError("generate() needs the prompt ids (inputs=...)")
        if ids.dim() == 1:
            ids = ids[None]
        g = self.generation_config

        def pick(value, name, default):
            if value is not None and value is not _UNSET:
                return value
            found = getattr(g, name, None) if g is not None else None
            return default if found is None else found

        if editing_threshold is _UNSET:  # None = no T2T editing, so "unset" needs its own mark
            editing_threshold = getattr(g, "editing_threshold", None) if g is not None else None
        cfg = SamplerConfig(
            threshold=pick(threshold, "threshold", 0.7),
            editing_threshold=editing_threshold,
            max_post_steps=pick(max_post_steps, "max_post_steps", 16),
            block_length=pick(block_length, "block_length", 32),
            gen_length=max_new_tokens or pick(gen_length, "gen_length", 256),
            temperature=pick(temperature, "temperature", 0.0),
            top_k=top_k,
            top_p=top_p,
            eos_early_stop=pick(eos_early_stop, "eos_early_stop", True),
        )
        eos = pick(eos_id, "eos_token_id", self.config.eos_token_id)
        eos = eos[0] if isinstance(eos, list) else eos
        mask = pick(mask_id, "mask_token_id", getattr(self.config, "mask_token_id", None))
        if eos is None or mask is None:
            raise ValueError(
                "generate() needs eos_id and mask_id (generation_config.json has none)"
            )
        if attention_mask is not None:  # padding (either side) is not part of the prompt
            rows = [row[m.bool()].tolist() for row, m in zip(ids, attention_mask, strict=True)]
        else:
            rows = ids.tolist()
        sampler = Sampler(self.impl, mask, eos, cfg, ids.device)
        out = sampler.generate(rows)
        width = max((len(t) for t in out.tokens), default=0)
        result = torch.full((len(rows), width), eos, dtype=torch.long, device=ids.device)
        for i, tokens in enumerate(out.tokens):
            result[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return result


LLaDA2MoeModel = LLaDA2MoeModelLM  # AutoModel: the same model (logits, not hidden states)
