"""`python -m llada_train.generate`: chat with a checkpoint through the shared sampler.

    python -m llada_train.generate model_dir=runs/sft/checkpoints/step_00000150/hf \
        prompt="What is 123 + 456?" sampler=speed

Loads an HF-format directory (ours or an official LLaDA2.x one) and its tokenizer, applies the
chat template, decodes with the configured preset (conf/sampler/*), streams finished blocks
and reports the sampler statistics (forwards, TPF, M2T/T2T edits, tokens/s). `block_length`
and `chat_template` default to what the model was trained with (its `llada_train.json`).
"""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from llada_train import CONF_DIR
from llada_train.config import register_schemas
from llada_train.errors import user_errors
from llada_train.model.config import LLaDA2MoeConfig
from llada_train.model.io import check_checkpoint, from_pretrained, resolve_dtype, training_default
from llada_train.sampler import Sampler, sampler_config
from llada_train.tokenizer import encode_prompt, resolve_tokenizer, special_ids


def generate(cfg: DictConfig) -> list[str]:
    """Decode `prompt` (or `prompts`) with the model of `model_dir`; returns the answers.
    Bad input (an empty prompt, one longer than the model's positions, broken weight or
    tokenizer files) fails with a ValueError before the weights are loaded."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else str(cfg.device))
    texts = list(cfg.prompts) or [cfg.prompt]
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            where = f"prompts[{i}]" if cfg.prompts else "prompt"
            raise ValueError(
                f'{where} is empty: pass the text to answer, e.g. prompt="What is 2+3?"'
            )
    config = LLaDA2MoeConfig.from_json(cfg.model_dir)
    check_checkpoint(cfg.model_dir, config)
    tokenizer = resolve_tokenizer(cfg.tokenizer, cfg.model_dir)
    ids = special_ids(tokenizer)
    chat = training_default("chat_template", cfg.chat_template, cfg.model_dir, True)
    prompts = [encode_prompt(tokenizer, t, cfg.system, chat) for t in texts]
    s_cfg = sampler_config(cfg.sampler, cfg.model_dir)
    for text, prompt in zip(texts, prompts, strict=True):
        if len(prompt) + s_cfg.gen_length > config.max_position_embeddings:
            raise ValueError(
                f"prompt {text[:40]!r}... is {len(prompt)} tokens; with sampler.gen_length="
                f"{s_cfg.gen_length} that exceeds the model's max_position_embeddings="
                f"{config.max_position_embeddings}: shorten the prompt or lower sampler.gen_length"
            )
    model = from_pretrained(cfg.model_dir, device=device, dtype=resolve_dtype(cfg.dtype, device))
    sampler = Sampler(model, ids.mask_id, ids.eos_id, s_cfg, device=device)
    streaming = cfg.stream and len(prompts) == 1

    def on_block(row: int, block: int, tokens: list[int]) -> None:
        sys.stdout.write(tokenizer.decode(tokens, skip_special_tokens=True))
        sys.stdout.flush()

    out = sampler.generate(prompts, on_block=on_block if streaming else None)
    answers = [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
    if streaming:
        print()
    else:
        for q, a in zip(texts, answers, strict=True):
            print(f">>> {q}\n{a}\n")
    s = out.stats
    print(
        f"[{s.num_tokens} tokens, {s.num_forwards} forwards, TPF {s.tpf:.2f}, "
        f"M2T {s.num_m2t}, T2T {s.num_t2t}, {s.tokens_per_s:.1f} tokens/s, {s.wall_time_s:.2f}s]",
        file=sys.stderr,
    )
    return answers


register_schemas()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
@user_errors
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
