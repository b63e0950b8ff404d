"""`python -m llada_train.model.init model=NAME out=DIR`: write a freshly initialised model.

The directory is a complete HF-format checkpoint in the official layout (config.json, sharded
safetensors, index, tokenizer files), the starting point of CPT from scratch and of tests.
Special ids (mask, EOS, pad) come from the tokenizer when one is given, else from the model
config; the config's vocab_size must cover the tokenizer.
"""

from __future__ import annotations

import os

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from llada_train import CONF_DIR, DEFAULT_TOKENIZER_DIR
from llada_train.errors import user_errors
from llada_train.model.config import LLaDA2MoeConfig
from llada_train.model.io import save_pretrained
from llada_train.model.modeling import LLaDA2MoeModelLM

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def model_config_from_node(node: DictConfig, tokenizer=None) -> LLaDA2MoeConfig:
    """A Hydra `model` node (strict: unknown keys are typos) + optional tokenizer -> config."""
    d = OmegaConf.to_container(node, resolve=True)
    if tokenizer is not None:
        from llada_train.tokenizer import special_ids

        ids = special_ids(tokenizer)
        if len(tokenizer) > d["vocab_size"]:
            raise ValueError(
                f"model.vocab_size={d['vocab_size']} is smaller than the tokenizer "
                f"({len(tokenizer)} tokens); raise model.vocab_size"
            )
        d.update(eos_token_id=ids.eos_id, pad_token_id=ids.pad_id, mask_token_id=ids.mask_id)
    return LLaDA2MoeConfig.from_dict(d, strict=True)


def resolve_tokenizer(spec: str | None):
    """'default' -> the shipped tokenizer; a path -> that tokenizer; None -> no tokenizer."""
    if spec is None:
        return None
    from llada_train.tokenizer import load_tokenizer

    return load_tokenizer(DEFAULT_TOKENIZER_DIR if spec == "default" else spec)


def init_model_dir(cfg: DictConfig) -> str:
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: choose one of {sorted(_DTYPES)}")
    tokenizer = resolve_tokenizer(cfg.tokenizer)
    config = model_config_from_node(cfg.model, tokenizer)
    torch.manual_seed(cfg.seed)
    model = LLaDA2MoeModelLM(config)
    total, active = config.num_parameters()
    out = save_pretrained(
        model,
        os.path.abspath(cfg.out),
        dtype=_DTYPES[cfg.dtype],
        max_shard_bytes=int(cfg.max_shard_gb * 1024**3),
        tokenizer=tokenizer,
    )
    print(f"wrote {out}: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token)")
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="init")
@user_errors
def main(cfg: DictConfig) -> None:
    init_model_dir(cfg)


if __name__ == "__main__":
    main()
