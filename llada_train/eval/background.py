"""Evaluation of every checkpoint of a training run, beside the run, without blocking it.

    (started by the training loop)  python -m llada_train.eval.background RUN_DIR/eval/watcher.yaml

Contract:
- `watch.start_background(run_dir, eval_node, tracking_node, every_steps)` (called on rank 0 of
  a CPT/SFT run when `checkpoint.eval_mode` is `background`) writes the resolved eval config to
  `RUN_DIR/eval/watcher.yaml` and starts this module as a child process that runs
  `watch.watch(RUN_DIR, exit_with_pid=<the training process>)`: every complete checkpoint is
  evaluated as it appears (results in `<checkpoint>/eval_results.json`, metrics in the W&B run
  `<run>-eval` under `RUN_DIR/eval/`), and once training has exited, the last checkpoints are
  evaluated and the watcher ends by itself. Its output goes to `RUN_DIR/eval/watcher.log`.
- The child runs in a session of its own, so a Ctrl-C of the training job does not kill it
  midway through a result (it then finishes the last checkpoint and exits); kill it with
  `kill PID` (the PID is printed at launch and written to `RUN_DIR/eval/watcher.pid`).
- Whatever the watcher does, the training job never waits for it or depends on it: the
  watcher only reads checkpoints and writes its two result files inside them (see `watch`).
"""

from __future__ import annotations

import logging
import os
import sys

from omegaconf import OmegaConf


def main(config_path: str) -> None:
    from llada_train.eval.config import as_eval_config
    from llada_train.eval.evaluate import make_tracker
    from llada_train.eval.watch import watch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    job = OmegaConf.load(config_path)
    cfg = as_eval_config(job.eval)
    run_dir = cfg.watch
    tracker = make_tracker(
        cfg, cfg.tracking_dir or os.path.join(run_dir, "eval"), f"{os.path.basename(run_dir)}-eval"
    )
    try:
        records = watch(
            run_dir,
            cfg,
            poll_s=cfg.poll_s,
            tracker=tracker,
            exit_with_pid=int(job.pid),
            every_steps=job.every_steps,
        )
    finally:
        if tracker is not None:
            tracker.finish()
    failed = sum(r["status"] == "failed" for r in records)
    logging.info("background eval: %d evaluated, %d failed", len(records) - failed, failed)


if __name__ == "__main__":
    main(sys.argv[1])
