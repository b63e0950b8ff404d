"""Checkpoints: DeepSpeed state for exact resume plus an HF-format export, written atomically.

Layout of `<output_dir>/checkpoints/`:
    step_00000050/            a complete checkpoint (only complete ones carry this name)
        <DeepSpeed files>     model/optimizer/scheduler states of every rank, client state
        hf/                   official-layout safetensors + config.json + tokenizer, and
                              llada_train.json (block_length and other decode facts)
        smoke_generation.json a few prompts decoded at the save (rewritten on resume if missing)
        COMPLETE.json         written last, before the rename: {"step": 50, "files": {...}}
    step_00000100.partial/    a save in progress (or killed): ignored and removed on restart
                              (never another live run's: one run per output_dir, lock.py)
    step_00000050.deleting/   a pruned checkpoint being deleted: ignored and removed on restart

Contract: a checkpoint becomes visible under its final name only by one `os.rename` after every
rank has finished writing and every file of it is fsynced (then COMPLETE.json, fsynced, then the
rename, then the parent directory fsynced), so a kill or a power loss at any moment leaves the
previous checkpoint usable. COMPLETE.json lists every file with its size; `resume=auto` picks
the highest complete step whose files are all there at their recorded size, and falls back to
the previous complete one with a warning naming both when the latest is damaged (a truncated
file). keep-last-N prunes older complete checkpoints after a new one is complete, each renamed
aside first (so no half-deleted directory ever carries a step name), then deleted.

Fault injection for tests (real SIGKILLs of rank 0, set through the environment):
LLADA_TRAIN_FAULT=kill_in_save:STEP dies in the middle of saving that step (after the DeepSpeed
files, before completion); kill_after_rename:STEP right after the checkpoint is published (before
its smoke generation); kill_after_step:STEP right after that step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
import warnings

from llada_train.distributed import barrier, layerwise_gather, weights_finite
from llada_train.errors import disk_full_message
from llada_train.lora import base_model
from llada_train.model.io import (
    official_state_dict,
    save_pretrained,
    save_training_facts,
    whole_units,
)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
PARTIAL = ".partial"
DELETING = ".deleting"
COMPLETE = "COMPLETE.json"
SMOKE_FILE = "smoke_generation.json"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    """[(step, path)] of complete checkpoints, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        m = _STEP_DIR.match(name)
        path = os.path.join(ckpt_root, name)
        if m and os.path.exists(os.path.join(path, COMPLETE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def damaged_files(path: str) -> list[str]:
    """Files of a complete checkpoint that are missing or not at the size COMPLETE.json records
    ("name (expected N bytes, found M)"); [] for an intact one or one without a file list.
    An unreadable COMPLETE.json counts as damage."""
    try:
        with open(os.path.join(path, COMPLETE)) as f:
            files = json.load(f).get("files", {})
    except (OSError, ValueError) as e:
        return [f"{COMPLETE} ({type(e).__name__}: {e})"]
    bad = []
    for rel, size in sorted(files.items()):
        full = os.path.join(path, rel)
        found = os.path.getsize(full) if os.path.isfile(full) else None
        if found != size:
            bad.append(f"{rel} (expected {size} bytes, found {'none' if found is None else found})")
    return bad


def resolve_resume(resume: str, ckpt_root: str) -> str | None:
    """resume=auto -> the latest intact complete checkpoint or None (a damaged latest one is
    skipped with a warning naming it and the one used instead); none -> None; a path -> that
    path, which must be complete and intact (else ValueError naming the damaged files)."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        skipped: list[str] = []
        reasons = ""  # what is wrong with the latest one
        for _, path in reversed(complete_checkpoints(ckpt_root)):
            bad = damaged_files(path)
            if not bad:
                if skipped:
                    warnings.warn(
                        f"resume=auto: the latest checkpoint {skipped[0]} is damaged "
                        f"({reasons}); resuming from {path}, the previous complete one",
                        stacklevel=2,
                    )
                return path
            if not skipped:
                reasons = "; ".join(bad[:3])
            skipped.append(path)
        if skipped:
            raise ValueError(
                f"every checkpoint in {ckpt_root} is damaged ({', '.join(skipped)}); "
                "pass resume=none to start over or resume=PATH of an intact checkpoint"
            )
        return None
    path = os.path.abspath(resume)
    if not os.path.exists(os.path.join(path, COMPLETE)):
        raise ValueError(f"resume={resume}: not a complete checkpoint (no {COMPLETE} inside)")
    bad = damaged_files(path)
    if bad:
        raise ValueError(
            f"resume={resume}: the checkpoint is damaged ({'; '.join(bad[:3])}); pick another "
            "checkpoint or resume=auto"
        )
    return path


def check_resume_keys(path: str, fixed: dict, allow_changes: bool) -> None:
    """Refuse to resume from checkpoint `path` when a setting it records in COMPLETE.json
    ("fixed": data, global batch, seed, model) differs from this run's `fixed`: the resumed
    run would silently continue another run. ValueError naming each key, both values and the
    way out; with `allow_changes` a warning instead. Checkpoints without the record pass."""
    with open(os.path.join(path, COMPLETE)) as f:
        recorded = json.load(f).get("fixed") or {}
    changed = []
    for key, then in recorded.items():
        now = fixed.get(key)
        if now == then:
            continue
        if isinstance(then, dict) and isinstance(now, dict):
            for sub in sorted(set(then) | set(now)):
                if then.get(sub) != now.get(sub):
                    changed.append(f"{key}.{sub}: {then.get(sub)!r} -> {now.get(sub)!r}")
        else:
            changed.append(f"{key}: {then!r} -> {now!r}")
    if not changed:
        return
    what = f"resume from {path}: changed since the checkpoint: {'; '.join(changed[:6])}"
    if allow_changes:
        warnings.warn(what + " (resume_allow_changes=true: continuing)", stacklevel=2)
        return
    raise ValueError(
        what + ". These decide the batches and the model the run continues with; restore them, "
        "start a new output_dir (or resume=none), or pass resume_allow_changes=true"
    )


def resolve_model_dir(path: str) -> str:
    """An HF-format model dir from a model dir, a checkpoint dir (its hf/) or a run dir (the hf/
    of its latest complete checkpoint)."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    if os.path.exists(os.path.join(path, "hf", "config.json")):
        return os.path.join(path, "hf")
    done = complete_checkpoints(os.path.join(path, "checkpoints"))
    if done and os.path.exists(os.path.join(done[-1][1], "hf", "config.json")):
        return os.path.join(done[-1][1], "hf")
    raise ValueError(
        f"{path}: not a model directory (config.json), a checkpoint (hf/) or a run directory "
        "with complete checkpoints; train one first or point to an HF-format LLaDA2.x directory"
    )


def remove_partials(ckpt_root: str) -> None:
    """Drop saves that never completed (a crash or kill during save) and half-pruned ones."""
    if os.path.isdir(ckpt_root):
        for name in os.listdir(ckpt_root):
            if name.endswith((PARTIAL, DELETING, ".old")):
                shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)


def prune(ckpt_root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0 = keep all): each is first
    renamed to `<name>.deleting` (atomic; the step name disappears at once), then deleted."""
    if keep_last <= 0:
        return
    for _, old in complete_checkpoints(ckpt_root)[:-keep_last]:
        aside = old + DELETING
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(old, aside)
        _fsync_dir(ckpt_root)
        shutil.rmtree(aside, ignore_errors=True)


def fsync_tree(path: str) -> dict[str, int]:
    """fsync every file and directory under `path` (files first); returns {relative path:
    size in bytes} of the files."""
    sizes = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            fd = os.open(full, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            sizes[os.path.relpath(full, path)] = os.path.getsize(full)
    for root, _, _ in os.walk(path, topdown=False):
        _fsync_dir(root)
    return sizes


def save_checkpoint(
    engine,
    ckpt_root: str,
    step: int,
    client_state: dict,
    is_main: bool,
    keep_last: int,
    export_hf: bool = True,
    export_dtype=None,
    tokenizer=None,
    facts: dict | None = None,
    fixed: dict | None = None,
    adapter_only: bool = False,
    export_state=None,
) -> str:
    """Save DeepSpeed state + HF export of `step` atomically; returns the final path.
    `facts`: the decode-relevant training facts written next to the export's config.json
    (`llada_train.json`: block_length, chat_template, ...). A full disk (or file-size limit)
    while writing raises a ValueError naming the path and the free space; the partial save is
    removed and the previous checkpoints stay intact.
    `fixed`: the settings a resumed run must share (data, global batch, seed, model), recorded in
    COMPLETE.json for `check_resume_keys`. Weights that are not finite are never saved: a
    ValueError instead (agreed over all ranks).
    `adapter_only`: the DeepSpeed state holds the trainable parameters only (LoRA: the frozen
    base comes from init_from). `export_state(model, gather)`: the (official name, tensor)
    pairs of the HF export, default `official_state_dict` (LoRA: `lora.merged_official_state`)."""
    if not weights_finite(engine.module, engine.device):
        raise ValueError(
            f"step {step}: the weights hold non-finite values; no checkpoint is written (the "
            f"last good one is in {ckpt_root})"
        )
    tag = step_tag(step)
    partial = os.path.join(ckpt_root, tag + PARTIAL)
    final = os.path.join(ckpt_root, tag)
    try:
        _write_partial(engine, ckpt_root, partial, client_state, is_main, export_hf,
                       export_dtype, tokenizer, facts, step, adapter_only,
                       export_state)  # fmt: skip
    except (OSError, RuntimeError) as e:
        message = disk_full_message(e, partial)
        if message is None:
            raise
        shutil.rmtree(partial, ignore_errors=True)  # give the space back
        raise ValueError(
            f"step {step}: saving the checkpoint failed: {message}; the previous checkpoints in "
            f"{ckpt_root} are intact"
        ) from e
    if is_main:
        fault_point("kill_in_save", step)
    barrier()
    if is_main:
        files = fsync_tree(partial)  # every rank's files are on disk before the marker
        with open(os.path.join(partial, COMPLETE), "w") as f:
            json.dump({"step": step, "time": time.time(), "files": files, "fixed": fixed}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(partial)
        if os.path.exists(final):  # re-saving a step (e.g. after a resume) replaces it whole;
            aside = final + ".old"  # renamed aside first: a watcher may be writing inside it
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(partial, final)
        _fsync_dir(ckpt_root)
        fault_point("kill_after_rename", step)
        prune(ckpt_root, keep_last)
    barrier()
    return final


def _write_partial(engine, ckpt_root, partial, client_state, is_main, export_hf, export_dtype,
                   tokenizer, facts, step, adapter_only=False,
                   export_state=None) -> None:  # fmt: skip
    """The DeepSpeed files (every rank) and the HF export (rank 0) of one save, into `partial`."""
    engine.save_checkpoint(
        ckpt_root, tag=os.path.basename(partial), client_state=client_state, save_latest=False,
        exclude_frozen_parameters=adapter_only,
    )  # fmt: skip
    if export_hf:  # under ZeRO-3 one decoder layer at a time is gathered, on every rank
        model = engine.module
        gather = layerwise_gather(model)
        if is_main:
            state = (export_state or official_state_dict)(model, gather=gather)
            hf_dir = os.path.join(partial, "hf")
            from llada_train.model.card import describe_run, generation_fields, write_model_card

            # what the export is (model card) and what it carries from init_from (remote code,
            # generation config, tokenizer): it loads where the model it was tuned from loads
            info = describe_run(os.path.dirname(os.path.abspath(ckpt_root)), facts, step)
            save_pretrained(
                base_model(model), hf_dir, dtype=export_dtype, tokenizer=tokenizer, state=state,
                source_dir=info.source_dir, generation=generation_fields(info),
            )  # fmt: skip
            if facts is not None:
                save_training_facts(hf_dir, {**facts, "step": step})
            write_model_card(hf_dir, info)
        else:
            for _ in whole_units(model, gather):  # take part in the gathers, copy nothing
                pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fault_point(name: str, step: int) -> None:
    """SIGKILL this process if LLADA_TRAIN_FAULT names this point and step (tests only)."""
    if os.environ.get("LLADA_TRAIN_FAULT", "") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def load_checkpoint(engine, path: str, adapter_only: bool = False) -> dict:
    """Restore engine (model, optimizer, scheduler) from a complete checkpoint; client state.
    `adapter_only`: the checkpoint holds the trainable parameters only (see save_checkpoint)."""
    root, tag = os.path.split(os.path.abspath(path))
    load_path, client_state = engine.load_checkpoint(
        root, tag=tag, load_module_strict=not adapter_only
    )
    if load_path is None:
        raise ValueError(f"{path}: DeepSpeed could not load this checkpoint")
    return client_state or {}
