"""`python -m llada_train.model.init model=NAME out=DIR`: write a freshly initialised model.

The directory is a complete HF-format checkpoint in the official layout (config.json, sharded
safetensors, index, tokenizer files, generation_config.json, llada_train's remote code under the
official auto_map names, a model card), the starting point of CPT from scratch and of tests.
Special ids (mask, EOS, pad) come from the tokenizer when one is given, else from the model
config; the config's vocab_size must cover the tokenizer (`llada_train.model.build`).
"""

from __future__ import annotations

import os

import hydra
import torch
from omegaconf import DictConfig

from llada_train import CONF_DIR
from llada_train.config import register_schemas
from llada_train.errors import user_errors
from llada_train.model.build import model_config_from_node
from llada_train.model.card import generation_fields, init_info, write_model_card
from llada_train.model.io import save_pretrained
from llada_train.model.modeling import LLaDA2MoeModelLM
from llada_train.tokenizer import resolve_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
register_schemas()


def init_model_dir(cfg: DictConfig) -> str:
    tokenizer = resolve_tokenizer(cfg.tokenizer)
    config = model_config_from_node(cfg.model, tokenizer)
    torch.manual_seed(cfg.seed)
    model = LLaDA2MoeModelLM(config)
    total, active = config.num_parameters()
    info = init_info(cfg.seed)
    out = save_pretrained(
        model,
        os.path.abspath(cfg.out),
        dtype=_DTYPES[cfg.dtype],
        max_shard_bytes=int(cfg.max_shard_gb * 1024**3),
        tokenizer=tokenizer,
        generation=generation_fields(info),
    )
    write_model_card(out, info)  # a README.md that says what this is and what loads it
    print(f"wrote {out}: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token)")
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="init")
@user_errors
def main(cfg: DictConfig) -> None:
    init_model_dir(cfg)


if __name__ == "__main__":
    main()
