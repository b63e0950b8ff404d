"""Checkpoint watcher: evaluate each new complete checkpoint of a training run as it appears.

    python -m llada_train.eval watch=runs/sft poll_s=120 tasks=[llada_arith_gen] limit=100
    python -m llada_train.eval watch=runs/sft once=true      # what is there now, then exit

Contract:
- Scans `RUN_DIR/checkpoints` (or RUN_DIR itself when it holds the step_N folders) every
  `poll_s` seconds with `checkpoint.complete_checkpoints`, so only checkpoints that carry
  COMPLETE.json (published by one atomic rename) are read; `.partial` saves are never touched.
  Checkpoints are evaluated oldest first; one that already has `eval_results.json` is skipped
  unless `overwrite`.
- Each evaluation is `evaluate.evaluate_checkpoint`: results land in
  `<checkpoint>/eval_results.json` and the flat metrics go to the tracker at the checkpoint's
  step. A broken checkpoint or a failing evaluation (any Exception) is logged, recorded in
  `<checkpoint>/eval_error.json` (best effort) and skipped for the life of this watcher; it is
  retried by the next watcher. KeyboardInterrupt / SystemExit (SIGTERM) stop the loop.
- The watcher only reads the run, writes its two result files inside checkpoint folders, and
  its tracker files and lock under its own folder: killing it (SIGTERM or SIGKILL) at any
  moment leaves the training job and its checkpoints untouched. A result file is written by
  atomic rename, so a kill never leaves half a JSON. If training prunes a checkpoint while it
  is being evaluated, that evaluation fails and is skipped like any other.
- `once=True` (or `stop` set) ends the loop after the current scan; `watch` returns one record
  per checkpoint handled: {"step", "path", "status": "ok" | "failed", "error"?, "summary"?}.
- `exit_with_pid=PID` (the training job that started the watcher, `eval.background`): once that
  process is gone, one last scan picks up the checkpoints saved since the previous one, then the
  loop ends. `every_steps=N` evaluates only steps that are multiples of N, plus the newest
  checkpoint of that last scan (the run's final save).
- One watcher per run: `watch` holds `RUN_DIR/eval/watch.lock` (lock.py; the same file whether
  it was pointed at RUN_DIR or RUN_DIR/checkpoints) while it runs, so no checkpoint is evaluated
  twice at once and no result is logged twice. A watcher started while another lives fails at
  once with `<RUN_DIR>/eval is in use by pid N on host H since T; ...` (ValueError); a
  background one (`exit_with_pid`) waits for the other to end instead (e.g. a resumed run's
  watcher while the finished run's evaluates its last checkpoints), then scans as usual.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llada_train.checkpoint import complete_checkpoints
from llada_train.config import checkpoint_eval_node
from llada_train.eval.config import as_eval_config
from llada_train.eval.evaluate import ERROR_FILE, RESULTS_FILE, evaluate_checkpoint, write_json
from llada_train.lock import DirLock, in_use_message, lock_dir, try_lock_dir

logger = logging.getLogger(__name__)

WATCH_LOCK = "watch.lock"
WATCH_ADVICE = "another watcher evaluates this run's checkpoints; wait for it to end, or stop it"


def checkpoints_root(run_dir: str) -> str:
    """RUN_DIR/checkpoints, or RUN_DIR itself when it already is a checkpoints folder."""
    nested = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(nested) or not complete_checkpoints(run_dir):
        return nested
    return run_dir


def watcher_lock_dir(run_dir: str) -> str:
    """RUN_DIR/eval, the folder of the watcher lock, for `run_dir` = RUN_DIR or its checkpoints
    folder alike."""
    run = os.path.abspath(run_dir)
    if os.path.basename(run) == "checkpoints":
        run = os.path.dirname(run)
    return os.path.join(run, "eval")


def lock_watcher(run_dir: str) -> DirLock:
    """The watcher lock of `run_dir` (module doc), or ValueError naming the watcher holding it."""
    return lock_dir(watcher_lock_dir(run_dir), WATCH_LOCK, WATCH_ADVICE)


def _wait_for_watcher_lock(
    run_dir: str, stop: threading.Event, poll_s: float, exit_with_pid: int | None = None
) -> DirLock | None:
    """The watcher lock of `run_dir` once its holder has ended; None if `stop` is set first or
    the training process `exit_with_pid` has ended meanwhile (the holder evaluates what that
    run left; a background watcher must not outlive its run waiting for a manual one)."""
    folder = watcher_lock_dir(run_dir)
    lock = try_lock_dir(folder, WATCH_LOCK)
    if lock is None:
        logger.info(
            "waiting: %s", in_use_message(folder, WATCH_LOCK, "this watcher starts when it ends")
        )
    while lock is None and not stop.wait(min(poll_s, 5.0)):
        if exit_with_pid is not None and not _is_alive(exit_with_pid):
            return None
        lock = try_lock_dir(folder, WATCH_LOCK)
    return lock


def pending_checkpoints(
    run_dir: str, overwrite: bool = False, skip: set[str] | None = None
) -> list[tuple[int, str]]:
    """[(step, path)] of complete checkpoints still to evaluate, oldest first."""
    skip = skip or set()
    return [
        (step, path)
        for step, path in complete_checkpoints(checkpoints_root(run_dir))
        if path not in skip and (overwrite or not os.path.exists(os.path.join(path, RESULTS_FILE)))
    ]


def watch(
    run_dir: str,
    eval_cfg: DictConfig | dict | None = None,
    *,
    poll_s: float = 60.0,
    once: bool = False,
    overwrite: bool = False,
    tracker: Any = None,
    stop: threading.Event | None = None,
    exit_with_pid: int | None = None,
    every_steps: int | None = None,
) -> list[dict[str, Any]]:
    """Evaluate new complete checkpoints of `run_dir` until `once`, `stop` or the end of
    process `exit_with_pid` (module doc)."""
    stop = stop or threading.Event()
    handled: set[str] = set()
    records: list[dict[str, Any]] = []
    if exit_with_pid is None:
        lock = lock_watcher(run_dir)
    else:  # a background watcher: after the one before it
        lock = _wait_for_watcher_lock(run_dir, stop, poll_s, exit_with_pid)
        if lock is None:
            return records
    logger.info("watching %s (every %.0f s)", checkpoints_root(run_dir), poll_s)
    try:
        while True:
            last_scan = exit_with_pid is not None and not _is_alive(exit_with_pid)
            pending = pending_checkpoints(run_dir, overwrite, handled)
            for k, (step, path) in enumerate(pending):
                if stop.is_set():
                    break
                handled.add(path)
                is_final = last_scan and k == len(pending) - 1
                if every_steps and step % every_steps and not is_final:
                    continue
                records.append(_evaluate_one(step, path, eval_cfg, tracker))
            if once or stop.is_set() or last_scan:
                return records
            stop.wait(poll_s)
            if stop.is_set():
                return records
    finally:
        lock.release()


def _is_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie child counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (not Linux): fall back to a signal-0 probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _evaluate_one(step: int, path: str, eval_cfg, tracker) -> dict[str, Any]:
    """One checkpoint; every Exception becomes a "failed" record (the loop goes on)."""
    start = time.perf_counter()
    try:
        summary = evaluate_checkpoint(path, eval_cfg, step=step, tracker=tracker)
        return {"step": step, "path": path, "status": "ok", "summary": summary}
    except Exception as e:  # a broken checkpoint, a pruned one, an OOM, a task error, ...
        error = f"{type(e).__name__}: {e}"
        logger.error("eval of %s (step %d) failed, skipped: %s", path, step, error)
        try:
            write_json(
                {
                    "step": step,
                    "error": error,
                    "traceback": traceback.format_exc(),
                    "wall_time_s": time.perf_counter() - start,
                    "time": time.time(),
                },
                os.path.join(path, ERROR_FILE),
            )
        except OSError:  # e.g. the checkpoint was pruned meanwhile
            pass
        if tracker is not None:
            try:
                tracker.log({"eval/failed": 1.0}, step=step)
            except Exception:  # tracking must not stop the watcher either
                logger.exception("logging the failure of step %d failed", step)
        return {"step": step, "path": path, "status": "failed", "error": error}


def start_background(
    run_dir: str, eval_node, tracking_node, every_steps: int | None
) -> subprocess.Popen:
    """Start `python -m llada_train.eval.background` on `run_dir` (see that module): a watcher
    that evaluates every checkpoint as it appears and exits after the calling process."""

    eval_dir = os.path.join(run_dir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    cfg = as_eval_config({"poll_s": 10.0, **checkpoint_eval_node(eval_node)})
    cfg.watch = run_dir
    if tracking_node is not None:
        cfg.tracking = OmegaConf.merge(cfg.tracking, tracking_node)
    OmegaConf.update(cfg, "device", "cpu" if cfg.device == "auto" else cfg.device)
    path = os.path.join(eval_dir, "watcher.yaml")
    job = {"pid": os.getpid(), "every_steps": every_steps, "eval": OmegaConf.to_container(cfg)}
    OmegaConf.save(OmegaConf.create(job), path)
    log = open(os.path.join(eval_dir, "watcher.log"), "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llada_train.eval.background", path],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    with open(os.path.join(eval_dir, "watcher.pid"), "w") as f:
        f.write(f"{proc.pid}\n")
    return proc
