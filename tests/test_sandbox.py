"""The sandbox stops hostile code and leaves nothing behind (llada_train/rl/sandbox.py).

Every hostile program below must score 0 (`passed` False), return within its time limit, leave no
process running and no file written, while this test process carries on. Where the machine gives
the kernel layers (root: namespaces and a per-run uid), the write and network attacks are also run
with the audit hook switched off, so each kernel layer is shown to hold on its own. Small limits
keep the file under ~15 s on 2 CPU cores.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid

import pytest

import llada_train
from llada_train.rl.sandbox import BOOTSTRAP_TAG, run_many, run_python

IS_ROOT = os.geteuid() == 0
FAST = dict(timeout_s=2.0, memory_mb=256, max_processes=16)


def _proc_stat(pid: str) -> tuple[int, str] | None:
    """(parent pid, state letter) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return int(fields[1]), fields[0].decode()
    except (OSError, IndexError, ValueError):
        return None


def _leftover_processes() -> list[int]:
    """Live (non-zombie) processes left by sandbox runs: descendants of this test process, and
    orphaned sandbox processes (the bootstrap's tag in their command line, parent gone)."""
    parents, tagged = {}, set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        stat = _proc_stat(pid)
        if stat is None or stat[1] in "ZX":
            continue
        parents[int(pid)] = stat[0]
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if BOOTSTRAP_TAG.encode() in f.read():
                    tagged.add(int(pid))
        except OSError:
            pass

    def descends_from_us(pid: int) -> bool:
        for _ in range(64):
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
            if pid <= 1:
                return False
        return False

    descendants = {pid for pid in parents if descends_from_us(pid)}
    orphans = {pid for pid in tagged if parents[pid] not in parents or parents[pid] == 1}
    return sorted(descendants | orphans)


def _assert_clean() -> None:
    for _ in range(50):  # the kernel may take a moment to tear a namespace down
        if not _leftover_processes():
            return
        time.sleep(0.02)
    assert _leftover_processes() == []


def _has_layer(layer: str) -> bool:
    return layer in run_python("pass").isolation


# ---------------------------------------------------------------------------------------------
# Ordinary code
# ---------------------------------------------------------------------------------------------


def test_correct_code_passes():
    result = run_python("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('hi')")
    assert (result.passed, result.status, result.returncode) == (True, "ok", 0)
    assert result.stdout == "hi\n"
    assert {"rlimits", "audit"} <= set(result.isolation)
    if IS_ROOT:  # RLIMIT_NPROC only binds a non-root uid
        assert "uid" in result.isolation


def test_stdlib_is_importable():
    code = "import collections, fractions, functools, heapq, itertools, json, math, re, typing"
    assert run_python(code + "\nassert math.gcd(12, 18) == 6").passed


@pytest.mark.parametrize(
    "code, status",
    [
        ("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5", "failed"),
        ("def add(a, b)\n    return a + b", "error"),  # SyntaxError
        ("raise ValueError('no')", "error"),
    ],
)
def test_wrong_code_fails(code, status):
    result = run_python(code)
    assert (result.passed, result.status) == (False, status)
    assert result.returncode != 0


@pytest.mark.parametrize(
    "code",
    [
        "import sys\nsys.exit(0)\nassert False",
        "import os\nos._exit(0)\nassert False",
        "import atexit, os\natexit.register(lambda: os._exit(0))\nassert False",
    ],
)
def test_early_exit_does_not_pass(code):
    # a policy that learns to exit(0) before the tests must not collect the reward
    result = run_python(code)
    assert not result.passed
    assert result.status in ("error", "failed")


# ---------------------------------------------------------------------------------------------
# Hostile code: stopped, scores 0, nothing left behind
# ---------------------------------------------------------------------------------------------


def test_infinite_loop_is_stopped_by_the_wall_clock():
    result = run_python("while True:\n    pass", timeout_s=1.0)
    assert (result.passed, result.status) == (False, "timeout")
    assert result.wall_s < 1.0 + 2.0
    _assert_clean()


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock():
    start = time.perf_counter()
    result = run_python("while True:\n    pass", timeout_s=30.0, cpu_s=1)
    assert (result.passed, result.status) == (False, "timeout")
    assert time.perf_counter() - start < 15.0  # 1 s of CPU, even on a busy machine
    _assert_clean()


def test_fork_bomb_is_contained():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_python(code, **FAST)
    assert (result.passed, result.status) == (False, "timeout")
    _assert_clean()
    assert os.getpid() > 0 and run_python("pass").passed  # we still fork and run fine


def test_process_limit_caps_forks():
    # children that stay alive: only max_processes of them may exist, the child itself included
    code = (
        "import os, time\nnum_forked = 0\nfor _ in range(100):\n    try:\n"
        "        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n"
        "        num_forked += 1\n    except OSError:\n        break\nprint(num_forked)"
    )
    result = run_python(code, timeout_s=5.0, max_processes=8)
    assert result.status == "ok", result.stderr
    assert 1 <= int(result.stdout) <= 7
    _assert_clean()  # the sleeping children are killed


def test_escaped_session_is_killed():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
    assert run_python(code).passed
    _assert_clean()


def test_huge_allocation_fails_with_memory_status():
    result = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')", **FAST)
    assert (result.passed, result.status) == (False, "memory")
    assert "allocated" not in result.stdout
    _assert_clean()


def test_stdout_flood_does_not_hang():
    result = run_python("while True:\n    print('x' * 10000)", timeout_s=3.0, max_file_mb=1)
    assert not result.passed
    assert result.wall_s < 3.0 + 2.0
    assert 0 < len(result.stdout) <= 4096  # a tail, not the flood
    _assert_clean()


@pytest.fixture
def outside_dirs():
    """Directories anyone may write to, so that only the sandbox can stop the writes: one under
    the system temp dir and one in the repository."""
    dirs = [
        tempfile.mkdtemp(prefix="sandbox_target_"),
        os.path.join(llada_train.REPO_ROOT, f".sandbox_target_{uuid.uuid4().hex}"),
    ]
    os.makedirs(dirs[1])
    for d in dirs:
        os.chmod(d, 0o777)
    yield dirs
    for d in dirs:
        for name in os.listdir(d):
            os.remove(os.path.join(d, name))
        os.rmdir(d)


@pytest.mark.parametrize("layer", ["audit", "mountns"])
def test_writes_outside_the_scratch_dir_fail(outside_dirs, layer):
    if layer == "mountns" and not _has_layer("mountns"):
        pytest.skip("no mount namespace on this machine: only the audit hook guards writes")
    for d in outside_dirs:
        target = os.path.join(d, "x")
        code = f"open({target!r}, 'w').write('pwned')"
        result = run_python(code, use_audit_hook=layer == "audit")
        assert (result.passed, result.status) == (False, "error")
        expected = "sandbox: no writes" if layer == "audit" else "Read-only file system"
        assert expected in result.stderr
        assert not os.path.exists(target)


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    yield server
    server.close()


@pytest.mark.parametrize("layer", ["audit", "netns"])
def test_network_connection_fails(listener, layer):
    if layer == "netns" and not _has_layer("netns"):
        pytest.skip("no network namespace on this machine: only the audit hook guards sockets")
    port = listener.getsockname()[1]
    code = (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "s.sendall(b'pwned')\nprint('connected')"
    )
    result = run_python(code, use_audit_hook=layer == "audit")
    assert (result.passed, result.status) == (False, "error")
    assert "connected" not in result.stdout
    expected = "sandbox: socket" if layer == "audit" else "Network is unreachable"
    assert expected in result.stderr
    with pytest.raises(socket.timeout):  # a connection would be queued here, even unaccepted
        listener.accept()


# ---------------------------------------------------------------------------------------------
# Nothing kept; batches
# ---------------------------------------------------------------------------------------------


def test_scratch_dir_is_the_cwd_and_is_removed():
    before = {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("llada_sandbox_")}
    code = "import os\nopen('notes.txt', 'w').write('x' * 100)\nprint(os.getcwd())"
    result = run_python(code)
    assert result.passed, result.stderr
    scratch = result.stdout.strip()
    assert os.path.basename(scratch).startswith("llada_sandbox_")
    assert not os.path.exists(scratch)
    after = {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("llada_sandbox_")}
    assert after <= before


def test_run_many_keeps_the_order():
    codes = ["assert True", "assert False", "print(6 * 7)", "while True:\n    pass"]
    results = run_many(codes, max_workers=4, timeout_s=1.0)
    assert [r.status for r in results] == ["ok", "failed", "ok", "timeout"]
    assert results[2].stdout == "42\n"
    _assert_clean()
