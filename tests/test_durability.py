"""Durable checkpoint files, with a real DeepSpeed engine in this process (one rank, CPU):
every file fsynced before the completion marker, the marker before the rename; pruning renames
aside before deleting; a damaged latest checkpoint falls back to the previous complete one; a
missing smoke generation is rewritten on resume; every step-keyed jsonl is truncated on resume.

The engine's process group is set up under environment that is restored right after, so
subprocesses of other tests never inherit this process's rendezvous port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import warnings

import pytest
import torch

from llada_train.checkpoint import (
    COMPLETE,
    SMOKE_FILE,
    complete_checkpoints,
    damaged_files,
    load_checkpoint,
    remove_partials,
    resolve_resume,
    save_checkpoint,
)
from llada_train.config import DeepSpeedConfig, OptimConfig, TrackingConfig
from llada_train.distributed import create_engine, deepspeed_config, init_distributed
from llada_train.model.modeling import LLaDA2MoeModelLM
from llada_train.tracking import Tracker
from tests.conftest import tiny_config
from tests.test_train import run_entry


@pytest.fixture(scope="module")
def engine():
    with pytest.MonkeyPatch.context() as mp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():  # fmt: skip
            mp.setenv(key, value)
        mp.setenv("DS_ACCELERATOR", "cpu")
        init_distributed()
        torch.manual_seed(0)
        model = LLaDA2MoeModelLM(tiny_config())
        ds = deepspeed_config(DeepSpeedConfig(), OptimConfig(), 1, 1, 1, "fp32")
        engine = create_engine(model, ds, OptimConfig(), 10)
    return engine  # the environment is restored: subprocesses of later tests rendezvous alone


def save(engine, root, step, keep_last=0):
    return save_checkpoint(engine, str(root), step, {"step": step}, True, keep_last, True)


def test_every_file_is_fsynced_before_the_marker_and_the_rename(engine, tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):  # the real call, recorded by path
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    final = save(engine, tmp_path, 3)
    partial = final + ".partial"
    with open(os.path.join(final, COMPLETE)) as f:
        files = json.load(f)["files"]
    assert any(name.startswith("hf/") for name in files) and len(files) >= 3
    for rel, size in files.items():  # recorded sizes are the real ones
        assert os.path.getsize(os.path.join(final, rel)) == size
    synced = [path for kind, path in events if kind == "fsync"]
    marker = synced.index(os.path.join(partial, COMPLETE))
    publish = events.index(("rename", partial))
    for rel in files:  # every file fsynced before the marker, the marker before the rename
        assert synced.index(os.path.join(partial, rel)) < marker, rel
    assert events.index(("fsync", os.path.join(partial, COMPLETE))) < publish
    assert ("fsync", str(tmp_path)) in events[publish:]  # the rename itself made durable


def test_pruning_renames_aside_then_deletes(engine, tmp_path, monkeypatch):
    save(engine, tmp_path, 1, keep_last=1)
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((a, b)), real_rename(a, b)))
    save(engine, tmp_path, 2, keep_last=1)
    old = os.path.join(tmp_path, "step_00000001")
    assert (old, old + ".deleting") in renames
    assert sorted(os.listdir(tmp_path)) == ["step_00000002"]
    os.makedirs(old + ".deleting")  # a kill in the middle of a delete: removed on restart
    remove_partials(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["step_00000002"]


def test_damaged_latest_checkpoint_falls_back_to_the_previous(engine, tmp_path):
    first = save(engine, tmp_path, 1)
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    latest = save(engine, tmp_path, 2)
    states = [n for n in os.listdir(latest) if n.endswith("model_states.pt")]
    target = os.path.join(latest, states[0])
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
        f.truncate(size // 2)
    assert damaged_files(latest) == [f"{states[0]} (expected {size} bytes, found {size // 2})"]
    with pytest.warns(UserWarning) as record:
        path = resolve_resume("auto", str(tmp_path))
    assert path == first
    text = " ".join(str(w.message) for w in record)
    assert latest in text and first in text  # the warning names both
    assert load_checkpoint(engine, path)["step"] == 1
    for k, v in engine.module.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="damaged"):
        resolve_resume(latest, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_resume("auto", str(tmp_path / "none")) is None  # nothing, no warning


def test_every_step_keyed_jsonl_is_truncated_on_resume(tmp_path):
    tracking = TrackingConfig(mode="disabled")
    tracker = Tracker(tracking, str(tmp_path), {}, True)
    for step in (1, 2, 3, 4):
        tracker.log({"loss": float(step)}, step=step)
        tracker.log_table("rollouts", ["prompt", "completion"], [["p", "c"]], step)
    Tracker(tracking, str(tmp_path), {}, True, resume_step=2)
    for name in ("metrics.jsonl", "rollouts.jsonl"):
        with open(tmp_path / name) as f:
            assert [json.loads(line)["step"] for line in f] == [1, 2], name


def test_missing_smoke_generation_is_rewritten_on_resume(tmp_path):
    """A kill right after a checkpoint's rename (before its smoke generation): the resumed run
    writes it, at that step, before training on."""
    out = tmp_path / "run"
    proc = run_entry("sft", out, "max_steps=2", env={"LLADA_TRAIN_FAULT": "kill_after_rename:2"},
                     check=False)  # fmt: skip
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), proc.stderr[-2000:]
    ckpt = os.path.join(out, "checkpoints", "step_00000002")
    assert [s for s, _ in complete_checkpoints(os.path.join(out, "checkpoints"))] == [2]
    assert not os.path.exists(os.path.join(ckpt, SMOKE_FILE))
    run_entry("sft", out, "max_steps=2")
    with open(os.path.join(ckpt, SMOKE_FILE)) as f:
        smoke = json.load(f)
    assert smoke["step"] == 2 and len(smoke["samples"]) == 1
