"""The LLaDA2-MoE model: config, architecture and HF-format I/O."""

from llada_train.model.config import LLaDA2MoeConfig
from llada_train.model.io import (
    from_pretrained,
    official_shapes,
    official_state_dict,
    save_pretrained,
)
from llada_train.model.modeling import LLaDA2MoeModelLM, PrefixKVCache

__all__ = [
    "LLaDA2MoeConfig",
    "LLaDA2MoeModelLM",
    "PrefixKVCache",
    "from_pretrained",
    "official_shapes",
    "official_state_dict",
    "save_pretrained",
]
