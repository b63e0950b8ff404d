"""Experiment tracking: Weights & Biases (online / offline / disabled) plus a local metrics file.

Contract: only rank 0 logs. Every logged dict also goes, one JSON line per step, to
`<run_dir>/metrics.jsonl`, the record tests and scripts read back (W&B offline files are not
meant to be parsed); tables (`log_table`) go to `<run_dir>/<key>.jsonl` (`samples.jsonl`,
`rollouts.jsonl`). On resume, lines of steps after the resumed step are dropped from every
`*.jsonl` of the run dir first, so each file always describes one uninterrupted history.
"""

from __future__ import annotations

import json
import os
from typing import Any

METRICS_FILE = "metrics.jsonl"


class Tracker:
    def __init__(
        self,
        cfg,  # config.TrackingConfig
        run_dir: str,
        config_dict: dict[str, Any],
        is_main: bool,
        resume_step: int | None = None,
        job_type: str = "train",
    ):
        if cfg.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"tracking.mode={cfg.mode!r}: choose online, offline or disabled")
        self.is_main = is_main
        self.metrics_path = os.path.join(run_dir, METRICS_FILE)
        self.run = None
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        for name in sorted(os.listdir(run_dir)):  # metrics.jsonl and the table files
            if name.endswith(".jsonl"):
                _truncate_after(
                    os.path.join(run_dir, name), resume_step if resume_step is not None else -1
                )
        if cfg.mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.run_name or os.path.basename(os.path.abspath(run_dir)),
                dir=run_dir,
                mode=str(cfg.mode),
                config=config_dict,
                job_type=job_type,
                resume="allow",
                id=_run_id(run_dir),
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table of samples (W&B Table) and a copy in `<run_dir>/<key>.jsonl`."""
        if not self.is_main:
            return
        path = os.path.join(os.path.dirname(self.metrics_path), f"{key.replace('/', '_')}.jsonl")
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **dict(zip(columns, row, strict=True))}) + "\n")
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _run_id(run_dir: str) -> str:
    """A stable W&B id per run directory, so a resumed run continues the same W&B run."""
    path = os.path.join(run_dir, ".wandb_id")
    if os.path.exists(path):
        return open(path).read().strip()
    import uuid

    run_id = uuid.uuid4().hex[:8]
    with open(path, "w") as f:
        f.write(run_id)
    return run_id


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", step) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def optional_pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend, for the study scripts' figures
    (scripts/frontier.py, scripts/rl_compare.py); None, with a printed note, when matplotlib is
    not installed (it is optional: the scripts still write their tables)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: table written, plot skipped (pip install matplotlib)")
        return None
    return plt
