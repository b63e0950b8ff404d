"""One run per output dir (llada_train/lock.py): a second run on a live run's dir stops at launch
with one `error:` line and exit status 2 while the first finishes untouched; a lock left by a
killed process blocks nothing; a finished run's dir can be resumed; one checkpoint watcher per
run."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from llada_train.eval.watch import WATCH_LOCK, watch, watcher_lock_dir
from llada_train.lock import RUN_LOCK, lock_dir, try_lock_dir
from llada_train.tracking import read_metrics

TINY = [
    "+recipe=tiny",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.moe_intermediate_size=32",
    "micro_batch_size=2",
    "global_batch_size=4",
    "checkpoint.save_every=3",
    "checkpoint.eval_every_saves=0",
    "checkpoint.smoke_prompts=0",
    "heldout.every=0",
    "tracking=disabled",
    "progress=false",
]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
# Holds a lock in a child process until killed: `python -c HOLD DIR NAME`.
HOLD = (
    "import sys, time; from llada_train.lock import lock_dir; "
    "lock_dir(sys.argv[1], sys.argv[2], 'x'); print('locked', flush=True); time.sleep(600)"
)


def sft(out, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "llada_train.sft", *TINY, f"output_dir={out}", *overrides]


def holder_pid(path) -> int | None:
    try:
        with open(path) as f:
            return json.load(f).get("pid")
    except (OSError, ValueError):
        return None


def steps(run_dir) -> list[int]:
    return [m["step"] for m in read_metrics(str(run_dir))]


def is_locked(path) -> bool:
    """Whether some process holds the flock on `path` (probed through a new open file)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.fixture
def holder(tmp_path):
    """A child process holding the lock DIR/NAME (started by the returned function)."""
    procs = []

    def start(directory, name):
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(directory), name], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_second_run_on_a_live_dir_fails_at_launch_and_a_finished_one_resumes(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(sft(out, "max_steps=6"), env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while holder_pid(out / RUN_LOCK) != first.pid:  # the record is written once locked
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline, "the first run never took its lock"
            time.sleep(0.2)
        # Stopped, the first run still holds its lock, however long the second takes to launch.
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run(sft(out, "max_steps=6"), env=ENV, capture_output=True,
                                    text=True, timeout=300)  # fmt: skip
        finally:
            os.kill(first.pid, signal.SIGCONT)
        expected = (
            rf"error: {re.escape(str(out))} is in use by pid {first.pid} on host "
            rf"{re.escape(socket.gethostname())} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d.*; wait "
            r"for it to end, or choose another output_dir"
        )
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.splitlines()
        assert len(lines) == 1 and re.fullmatch(expected, lines[0]), second.stderr[-3000:]
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        first.kill()
        first.wait()
    assert steps(out) == [1, 2, 3, 4, 5, 6]  # one row per step: the second run wrote nothing
    assert not is_locked(out / RUN_LOCK)  # released at exit
    resumed = subprocess.run(sft(out, "max_steps=8"), env=ENV, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000006" in resumed.stdout
    assert steps(out) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_lock_of_a_killed_process_does_not_block(tmp_path, holder):
    run_dir = tmp_path / "run"
    child = holder(run_dir, RUN_LOCK)
    assert try_lock_dir(str(run_dir), RUN_LOCK) is None  # held by a live process
    with pytest.raises(ValueError) as e:
        lock_dir(str(run_dir), RUN_LOCK, "wait for it to end, or choose another output_dir")
    assert f"{run_dir} is in use by pid {child.pid} on host {socket.gethostname()} since " in str(
        e.value
    )
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert holder_pid(run_dir / RUN_LOCK) == child.pid  # its record stays, and blocks nothing
    lock = lock_dir(str(run_dir), RUN_LOCK, "")
    assert holder_pid(run_dir / RUN_LOCK) == os.getpid()
    again = lock_dir(str(run_dir), RUN_LOCK, "")  # re-entrant within a process
    assert again is lock
    again.release()
    assert is_locked(run_dir / RUN_LOCK)  # one holder left
    lock.release()
    assert not is_locked(run_dir / RUN_LOCK)


def test_a_record_naming_another_host_does_not_block_when_unlocked(tmp_path):
    (tmp_path / RUN_LOCK).write_text('{"pid": 1, "host": "elsewhere", "since": "then"}\n')
    lock = lock_dir(str(tmp_path), RUN_LOCK, "")  # flock decides, not the record
    assert json.loads((tmp_path / RUN_LOCK).read_text())["host"] == socket.gethostname()
    lock.release()


def test_one_watcher_per_run(tmp_path, holder):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    assert watcher_lock_dir(str(run_dir)) == watcher_lock_dir(str(run_dir / "checkpoints"))
    child = holder(watcher_lock_dir(str(run_dir)), WATCH_LOCK)
    with pytest.raises(ValueError, match=rf"{run_dir / 'eval'} is in use by pid {child.pid} "):
        watch(str(run_dir), once=True)
    # A background watcher waits for the other one instead; here it is stopped while waiting.
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert watch(str(run_dir), poll_s=0.1, stop=stop, exit_with_pid=os.getpid()) == []
    child.kill()
    child.wait()
    assert watch(str(run_dir), once=True) == []  # nothing to evaluate, but it ran
    assert not is_locked(os.path.join(watcher_lock_dir(str(run_dir)), WATCH_LOCK))
