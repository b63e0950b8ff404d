"""`python -m llada_train.eval`: evaluate a model or watch a training run (Hydra, conf/eval.yaml).

    python -m llada_train.eval model_dir=runs/sft/checkpoints/step_00000150/hf \
        tasks=[llada_arith_gen,llada_arith_mc,llada_code] limit=100 sampler=quality mc_samples=64
    python -m llada_train.eval model_dir=DIR tasks=[gsm8k] chat_template=false   # hub task
    python -m llada_train.eval watch=runs/sft poll_s=120          # every new checkpoint
    python -m llada_train.eval watch=runs/sft once=true           # what is there, then exit

Contract:
- `model_dir=DIR`: one evaluation through `lm_eval.simple_evaluate(model=<LLaDALM>, ...,
  task_manager=TaskManager(include_path=eval/tasks))`. The results JSON (scores, sampler preset
  and knobs, TPF, tokens/s, ELBO standard error, wall time) goes to `out=`, else next to the
  checkpoint (`<checkpoint>/eval_results.json`) when DIR is a checkpoint or its `hf/` dir, else
  into DIR. The flat metrics go to W&B (`tracking=offline` by default, `online`, `disabled`) and
  to `metrics.jsonl` of the tracking folder, at the checkpoint's step (0 for a plain model):
  `RUN_DIR/eval/` for a checkpoint, `eval/` beside the results file otherwise (`tracking_dir=`).
- `watch=RUN_DIR`: `watch.watch` (see there); W&B run `<run name>-eval` in `RUN_DIR/eval/`.
  While another watcher of RUN_DIR lives, one `error:` line naming it and exit status 2.
- SIGTERM ends the process cleanly (the W&B run is finished); nothing else is touched.

The same evaluation through lm-eval's own command line (our model registered, our tasks
included): `python -m llada_train.eval.cli --model llada --model_args pretrained=DIR,
sampler=speed,mc_samples=32,chat_template=True --tasks llada_arith_gen --limit 20
--batch_size 16` (see `llada_train/eval/cli.py`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from typing import Any

import hydra
from omegaconf import DictConfig

from llada_train import CONF_DIR
from llada_train.errors import check_known_keys, user_errors
from llada_train.eval.config import register_eval_schema
from llada_train.eval.evaluate import (
    check_tasks,
    evaluate_checkpoint,
    make_tracker,
    resolve_target,
    results_path,
)

logger = logging.getLogger("llada_train.eval")

register_eval_schema()


def run(cfg: DictConfig) -> dict[str, Any] | list[dict[str, Any]]:
    check_known_keys(cfg)
    if (cfg.model_dir is None) == (cfg.watch is None):
        raise ValueError("set exactly one of model_dir=DIR (evaluate once) or watch=RUN_DIR")
    check_tasks(list(cfg.tasks), cfg.include_path, cfg.include_defaults)  # before any model
    # SIGTERM -> SystemExit, so `finally` closes the W&B run; a plain kill would skip that. A
    # SystemExit raised while a finalizer runs (e.g. datasets' Dataset.__del__ during a gc pass)
    # is swallowed ("Exception ignored in ..."): `stopped` then ends the watch loop anyway.
    stopped = threading.Event()

    def on_sigterm(signum: int, frame: object) -> None:
        stopped.set()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    if cfg.watch is not None:
        from llada_train.eval.watch import lock_watcher, watch

        if cfg.out is not None:
            raise ValueError("out= is for model_dir= runs; watch= writes next to each checkpoint")

        run_dir = os.path.abspath(cfg.watch)
        held = lock_watcher(run_dir)  # before the tracker writes: one watcher per run (watch.py)
        tracker = make_tracker(
            cfg,
            cfg.tracking_dir or os.path.join(run_dir, "eval"),
            f"{os.path.basename(run_dir)}-eval",
        )
        try:
            records = watch(
                run_dir,
                cfg,
                poll_s=cfg.poll_s,
                once=cfg.once,
                overwrite=cfg.overwrite,
                tracker=tracker,
                stop=stopped,
            )
        finally:
            if tracker is not None:
                tracker.finish()
            held.release()  # `watch` took and released its own hold of the same lock
        if stopped.is_set():
            sys.exit(128 + signal.SIGTERM)
        failed = [r for r in records if r["status"] == "failed"]
        logger.info("watch: %d evaluated, %d failed", len(records) - len(failed), len(failed))
        return records
    target = resolve_target(cfg.model_dir)
    out = results_path(target, cfg.out)
    if target.checkpoint_dir is not None:
        run_dir = os.path.dirname(os.path.dirname(target.checkpoint_dir))  # RUN/checkpoints/step
        default_dir, name = os.path.join(run_dir, "eval"), f"{os.path.basename(run_dir)}-eval"
    else:
        default_dir = os.path.join(os.path.dirname(out), "eval")  # W&B files beside the results
        name = f"{os.path.basename(target.model_dir)}-eval"
    tracker = make_tracker(cfg, cfg.tracking_dir or default_dir, name)
    try:
        summary = evaluate_checkpoint(cfg.model_dir, cfg, tracker=tracker, out=out)
    finally:
        if tracker is not None:
            tracker.finish()
    print(json.dumps({k: summary[k] for k in ("scores", "tpf", "tokens_per_s")}, indent=2))
    print(f"results: {out}")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
