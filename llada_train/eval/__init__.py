"""Evaluation through lm-evaluation-harness (SPEC section 6).

- `lm.LLaDALM`: the lm-eval model `llada` (shared sampler for generation, Monte Carlo
  block-diffusion ELBO for log-likelihood and perplexity).
- `evaluate.evaluate_checkpoint(ckpt_dir, eval_cfg, *, model=None, tokenizer=None, step=None,
  tracker=None, out=None) -> dict`: one checkpoint, results written next to it.
- `watch.watch(run_dir, eval_cfg, ...)`: evaluate new checkpoints of a run as they appear
  (import it from `llada_train.eval.watch`: the submodule shadows a package attribute).
- `python -m llada_train.eval` (Hydra, conf/eval.yaml) and `python -m llada_train.eval.cli`
  (lm-eval's CLI with `--model llada`).

Names are imported lazily: importing this package does not import lm_eval (slow).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "LLaDALM": "llada_train.eval.lm",
    "evaluate_checkpoint": "llada_train.eval.evaluate",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llada_train.eval' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
