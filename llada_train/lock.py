"""One writer per directory: an advisory lock held for the life of a process.

    lock = lock_dir(run_dir, RUN_LOCK, advice="wait for it to end, or choose another output_dir")
    ...                                  # the run writes into run_dir
    lock.release()                       # or just exit: the OS releases it

Contract:
- The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on `<dir>/<name>` (`run.lock` for a training
  run, `eval/watch.lock` for a checkpoint watcher). The kernel releases it when the process ends
  however it ends (exit, exception, SIGKILL, OOM kill), so a lock file left by a dead process
  never blocks: the file is a place to lock, not the lock. It is never deleted (deleting it
  would let a second process lock a fresh file while the first still holds the old one).
- The holder writes a record into the file, `{"pid", "host", "since"}`, read back only to word
  the refusal: `<dir> is in use by pid N on host H since T; <advice>`. The verdict is flock's
  alone, whatever host the record names (flock works across hosts on NFS, where the kernel
  maps it to byte-range locks).
- Re-entrant within a process: locking a directory this process already holds returns the
  same lock with one more holder, and `release` frees it after the last holder releases (an
  in-process test may run two loops one after the other on one directory).
- A file system that cannot lock at all (ENOLCK, EOPNOTSUPP) gives a warning and an unlocked
  handle: the run goes on, a second run on the same directory is then not detected.
- The descriptor is not inherited by programs the process starts (Python opens it
  non-inheritable), so a child such as the background evaluation does not keep the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass

RUN_LOCK = "run.lock"  # in the output_dir of a training run (SFT, CPT, RL)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
_held: dict[str, DirLock] = {}  # lock file (real path) -> the lock this process holds
_held_guard = threading.Lock()


@dataclass
class DirLock:
    """A held lock on `path` (fd None: the file system cannot lock; nothing is held)."""

    path: str
    fd: int | None
    holders: int = 1

    def release(self) -> None:
        """Drop one holder; the last one unlocks and closes the file."""
        with _held_guard:
            self.holders -= 1
            if self.holders > 0:
                return
            _held.pop(self.path, None)
            if self.fd is not None:
                os.close(self.fd)  # closing the only descriptor releases the flock
                self.fd = None


def lock_dir(directory: str, name: str, advice: str) -> DirLock:
    """Lock `directory/name` (the directory is created) for this process, or raise ValueError
    `<directory> is in use by pid N on host H since T; <advice>` when another process holds it."""
    lock = try_lock_dir(directory, name)
    if lock is None:
        raise ValueError(in_use_message(directory, name, advice))
    return lock


def try_lock_dir(directory: str, name: str) -> DirLock | None:
    """The lock on `directory/name`, or None when another process holds it. ValueError when the
    lock file cannot be created or opened (permissions)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.realpath(os.path.join(directory, name))
    with _held_guard:
        if path in _held:
            _held[path].holders += 1
            return _held[path]
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(
                f"cannot open the lock file {path} ({e.strerror or e}); fix its permissions or "
                "choose another directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):  # another process holds it
                os.close(fd)
                return None
            os.close(fd)
            if e.errno not in _UNSUPPORTED:
                raise
            warnings.warn(
                f"cannot lock {path} ({e.strerror}): the file system does not support locks, "
                "so a second process writing into the same directory would not be detected",
                stacklevel=2,
            )
            lock = _held[path] = DirLock(path, None)
            return lock
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        lock = _held[path] = DirLock(path, fd)
        return lock


def read_holder(path: str, timeout_s: float = 2.0) -> dict:
    """The record of the process holding the lock file `path`; its fields read "?" when it
    stays unreadable for `timeout_s` (the holder writes it right after locking)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(path) as f:
                record = json.loads(f.read())
            if isinstance(record, dict) and "pid" in record:
                return record
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.05)


def in_use_message(directory: str, name: str, advice: str) -> str:
    """`<directory> is in use by pid N on host H since T; <advice>` from the holder's record."""
    r = read_holder(os.path.join(directory, name))
    return (
        f"{os.path.abspath(directory)} is in use by pid {r.get('pid', '?')} on host "
        f"{r.get('host', '?')} since {r.get('since', '?')}; {advice}"
    )
