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
import threading
import time
import uuid

import pytest
from rl_reference import run_many

import llada_train
from llada_train.rl.sandbox import BOOTSTRAP_TAG, run_python

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
    orphaned sandbox processes (the bootstrap's tag in their command line, parent gone). The math
    reward's worker processes, long-lived by design (other test files start them in the same
    session), are not sandbox runs."""
    parents, tagged, math_workers = {}, set(), set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        stat = _proc_stat(pid)
        if stat is None or stat[1] in "ZX":
            continue
        parents[int(pid)] = stat[0]
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if BOOTSTRAP_TAG.encode() in cmdline:
            tagged.add(int(pid))
        elif b"_serve_math" in cmdline:
            math_workers.add(int(pid))

    def descends_from_us(pid: int) -> bool:
        if pid in math_workers:
            return False
        for _ in range(64):
            pid = parents.get(pid, 0)
            if pid in math_workers:
                return False
            if pid == os.getpid():
                return True
            if pid <= 1:
                return False
        return False

    descendants = {pid for pid in parents if descends_from_us(pid)}
    orphans = {pid for pid in tagged if parents[pid] not in parents or parents[pid] == 1}
    return sorted(descendants | orphans)


def _sandbox_processes() -> list[int]:
    """Live processes of this test process's sandbox runs: descendants running the sandbox's
    child program (its tag in the command line, which forks keep)."""
    parents, tagged = {}, []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        stat = _proc_stat(pid)
        if stat is None or stat[1] in "ZX":
            continue
        parents[int(pid)] = stat[0]
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if BOOTSTRAP_TAG.encode() in f.read():
                    tagged.append(int(pid))
        except OSError:
            pass
    mine = []
    for pid in tagged:
        cur = pid
        for _ in range(64):
            cur = parents.get(cur, 0)
            if cur == os.getpid():
                mine.append(pid)
                break
            if cur <= 1:
                break
    return mine


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


def _traversable_by_others(path: str) -> bool:
    """Whether every folder above `path` lets another uid pass (the execute bit for others)."""
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        if not os.stat(parent).st_mode & 0o001:
            return False
        if parent == os.path.dirname(parent):
            return True
        parent = os.path.dirname(parent)


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
        if layer == "mountns" and not _traversable_by_others(d):
            # the run's own uid cannot even reach the folder (e.g. a clone inside a 0700
            # `mktemp -d`): the kernel refuses the path before the read-only mount is consulted
            expected = "Permission denied"
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


# ---------------------------------------------------------------------------------------------
# Forgery: a candidate that fails the tests must not pass by attacking the proof of success
# ---------------------------------------------------------------------------------------------

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
FORGED_VERDICT = '{"status": "ok", "layers": []}'
# After the attack, the candidate's `add` is wrong: only a forged verdict could pass.
WRONG_ADD = "\ndef add(a, b):\n    return 0\n"
WRITE_EVERYWHERE = (
    "import os\n"
    "def _forge():\n"
    f"    for fd in range(3, 1024):\n"
    "        try:\n"
    f"            os.write(fd, {FORGED_VERDICT!r}.encode())\n"
    "        except OSError:\n"
    "            pass\n"
)
HOSTILE = {
    # walk the frames up from the candidate's code to whatever ran it; write to what is found
    "frames": WRITE_EVERYWHERE
    + "import sys\nf = sys._getframe()\nfound = []\nwhile f is not None:\n"
    "    found += [v for v in f.f_locals.values() if isinstance(v, (int, dict))]\n"
    "    f = f.f_back\n"
    "for v in found:\n"
    "    if isinstance(v, dict) and 'verdict_fd' in v:\n"
    "        v['verdict_fd'] and os.write(v['verdict_fd'], b'x')\n"
    "_forge()\n",
    # the same through a traceback's frames
    "traceback": WRITE_EVERYWHERE
    + "try:\n    raise ValueError\nexcept ValueError as e:\n    f = e.__traceback__.tb_frame\n"
    "while f.f_back is not None:\n    f = f.f_back\n_forge()\n",
    # inspect's view of the stack
    "inspect": WRITE_EVERYWHERE + "import inspect\nassert len(inspect.stack()) >= 1\n_forge()\n",
    # every descriptor the process holds or can name, and the pipe to the harness
    "fds": WRITE_EVERYWHERE + "_forge()\nimport os\nos.write(4, b'{\"ready\": true}\\n')\n",
    # the harness's descriptors and memory through /proc, then killing it
    "proc_of_harness": "import os, signal\nfor path in ('/proc/1/fd/3', '/proc/1/mem'):\n"
    "    try:\n        open(path, 'w').write('x')\n    except OSError:\n        pass\n"
    "try:\n    os.kill(1, signal.SIGKILL)\nexcept OSError:\n    pass\n",
    # gc: find and disarm the audit hook's rule, then write everywhere
    "gc": WRITE_EVERYWHERE
    + "import gc\ntry:\n    objs = gc.get_objects()\nexcept PermissionError:\n    objs = []\n"
    "_forge()\n",
    # the audit hook itself: rebind what it reads, replace code it runs
    "audit_hook": WRITE_EVERYWHERE + "import sys\nmain = sys.modules['__main__']\n"
    "for name in dir(main):\n    try:\n        setattr(main, name, None)\n    except Exception:\n"
    "        pass\n"
    "try:\n    (lambda: 0).__code__ = (lambda: 1).__code__\nexcept PermissionError:\n    pass\n"
    "_forge()\n",
    # skip the failing asserts with a tracer (works on tests run in the same process)
    "settrace": "import sys\n"
    "def tracer(frame, event, arg):\n"
    "    if event == 'line' and frame.f_code.co_filename == '<tests>':\n"
    "        frame.f_lineno = frame.f_lineno + 1\n"
    "    return tracer\nsys.settrace(tracer)\n",
    # patch the exception that failing asserts raise, and exit(0) at exit
    "builtins": "import builtins, atexit, os\n"
    "builtins.AssertionError = type('X', (Exception,), {})\n"
    "atexit.register(lambda: os._exit(0))\n",
    # exit with success before the tests run
    "early_exit": "import os\nos._exit(0)\n",
}


@pytest.mark.parametrize("use_audit_hook", [True, False])
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_forged_success_does_not_pass(kind, use_audit_hook):
    if not use_audit_hook and not IS_ROOT:
        pytest.skip("without root the kernel layers cannot hold alone")
    control = run_python(
        HOSTILE[kind] + "\ndef add(a, b):\n    return a + b\n",
        tests=TESTS,
        entry_point="add",
        use_audit_hook=use_audit_hook,
    )
    hostile = run_python(
        HOSTILE[kind] + WRONG_ADD, tests=TESTS, entry_point="add", use_audit_hook=use_audit_hook
    )
    assert not hostile.passed, (kind, hostile)
    assert "NameError" not in hostile.stderr and "SyntaxError" not in hostile.stderr
    if kind in ("proc_of_harness", "settrace", "builtins"):  # attacks that spare the candidate
        assert hostile.status == "failed", (kind, hostile)
        assert control.passed, (kind, control.stderr)  # a right answer still passes: the
        # wrong one failed the tests, not the attack
    _assert_clean()


@pytest.mark.parametrize(
    "code",
    [
        # an object that equals everything
        "class A:\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = object.__hash__\ndef add(a, b):\n    return A()\n",
        # an int subclass that equals everything
        "class I(int):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = int.__hash__\ndef add(a, b):\n    return I(0)\n",
        # a list subclass, a str subclass
        "class L(list):\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return L()\n",
        "class S(str):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = str.__hash__\ndef add(a, b):\n    return S('x')\n",
        # a plain container holding a fake
        "class A:\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return [A()]\n",
        # an exception carrying an object whose __str__ raises
        "class E(Exception):\n    def __str__(self):\n        raise SystemExit(0)\n"
        "def add(a, b):\n    raise E()\n",
    ],
)
def test_objects_faking_equality_do_not_pass(code):
    tests = "assert add(2, 3) == 5\nassert add(1, 1) == [0]\nassert add(0, 0) == 'x'"
    result = run_python(code, tests=tests, entry_point="add")
    assert (result.passed, result.status) == (False, "error"), result


@pytest.mark.parametrize(
    "value",
    ["5", "5.0", "True", "'5'", "(5,)", "[5, [6]]", "{'a': (1, 2.5)}", "{1, 2}", "b'x'", "1j"],
)
def test_plain_values_reach_the_tests_as_builtins(value):
    tests = f"v = add(2, 3)\nassert v == {value} and type(v) is type({value})"
    result = run_python(f"def add(a, b):\n    return {value}\n", tests=tests, entry_point="add")
    assert result.passed, result.stderr


def test_candidate_errors_reach_the_tests():
    code = "def add(a, b):\n    if a < 0:\n        raise ValueError('negative')\n    return a + b\n"
    tests = "try:\n    add(-1, 2)\nexcept ValueError as e:\n    assert str(e) == 'negative'\n"
    tests += "else:\n    raise AssertionError('no error')\nassert add(2, 3) == 5"
    assert run_python(code, tests=tests, entry_point="add").passed


@pytest.mark.parametrize(
    "reply, status",
    [
        ('{"return": {"tuple": "x"}}', "error"),  # malformed value
        ('{"return": ' + "[" * 5000 + "]" * 5000 + "}", "error"),  # nested beyond any limit
        ('{"raised": ["SystemExit", "0"]}', "error"),  # not an Exception: a plain one
        ('{"raised": ["AssertionError", "x"]}', "failed"),
        ("not json", "error"),
    ],
)
def test_forged_replies_are_rejected(reply, status):
    # the candidate answers the harness's first call itself on the reply pipe
    code = (
        "import os, sys\ndef add(a, b):\n"
        f"    os.write(sys.modules['__main__'].__dict__.get('_fd', 0) or _fd, {reply!r}.encode()"
        " + b'\\n')\n    os._exit(0)\n"
        "_fd = [fd for fd in range(3, 64) if os.path.exists(f'/proc/self/fd/{fd}') and "
        "os.readlink(f'/proc/self/fd/{fd}').startswith('pipe:')][-1]\n"
    )
    result = run_python(code, tests="assert add(2, 3) == 5", entry_point="add")
    assert (result.passed, result.status) == (False, status), result


@pytest.mark.parametrize(
    "body",
    [
        "    os._exit(0)\n",  # dies instead of raising
        "    os.write(_fd, b'not json\\n')\n    import time\n    time.sleep(5)\n",  # garbage
    ],
)
def test_tests_expecting_an_exception_cannot_be_fooled(body):
    # a test that accepts any exception for a bad input must not take the candidate's death or a
    # broken reply for one (they are not Exceptions in the harness)
    code = (
        "import os\n_fd = [fd for fd in range(3, 64) if os.path.exists(f'/proc/self/fd/{fd}') and "
        "os.readlink(f'/proc/self/fd/{fd}').startswith('pipe:')][-1]\ndef add(a, b):\n" + body
    )
    tests = "try:\n    add(-1, 1)\nexcept Exception:\n    pass\nelse:\n    raise AssertionError"
    result = run_python(code, tests=tests, entry_point="add")
    assert (result.passed, result.status) == (False, "error"), result


# ---------------------------------------------------------------------------------------------
# Helpers: other functions of the candidate that the tests call
# ---------------------------------------------------------------------------------------------

CODEC = "def encode(s):\n    return s[::-1] + '!'\n\ndef decode(s):\n    return s[:-1][::-1]\n"
CODEC_TESTS = "assert decode(encode('abc')) == 'abc'\nassert encode('ab') == 'ba!'\n"


def test_tests_call_a_helper_of_the_candidate():
    result = run_python(CODEC, tests=CODEC_TESTS, entry_point="decode", helpers=["encode"])
    assert (result.passed, result.status, result.reason) == (True, "ok", None), result.stderr
    # not declared by the record: never the candidate's, the tests meet a NameError
    result = run_python(CODEC, tests=CODEC_TESTS, entry_point="decode")
    assert not result.passed and "NameError" in result.reason, result.reason
    wrong = CODEC.replace("+ '!'", "+ '?'")
    result = run_python(wrong, tests=CODEC_TESTS, entry_point="decode", helpers=["encode"])
    assert (result.passed, result.status) == (False, "failed")
    assert (
        result.reason
        == "tests failed: AssertionError at <tests> line 2: assert encode('ab') == 'ba!'"
    )


@pytest.mark.parametrize(
    "helper",
    [
        "class A:\n    def __eq__(self, other):\n        return True\n"
        "def encode(s):\n    return A()\n",
        "class S(str):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = str.__hash__\ndef encode(s):\n    return S('x')\n",
    ],
)
def test_a_helper_crosses_the_same_boundary_as_the_entry_point(helper):
    code = "def decode(s):\n    return 'abc'\n" + helper
    tests = "assert encode('abc') == 'cba!'\nassert decode('x') == 'abc'\n"
    result = run_python(code, tests=tests, entry_point="decode", helpers=["encode"])
    assert (result.passed, result.status) == (False, "error"), result
    assert "cannot cross the sandbox boundary" in result.reason


def test_a_helper_never_replaces_a_trusted_name():
    """The candidate's functions named like a built-in, a function of the setup or of the tests
    are not what the tests call: only names the tests would otherwise not find are helpers."""
    code = (
        "def f(xs):\n    return xs\n"  # wrong: does not sort
        "def sorted(xs):\n    return xs\n"  # would make the reference agree
        "def reference(xs):\n    return xs\n"
        "def expected(xs):\n    return xs\n"
    )
    reference = "def reference(xs):\n    return list(sorted(xs))\n"
    right = code.replace("return xs\n", "return [1, 2]\n", 1)
    for setup, tests in [
        (None, "assert f([2, 1]) == sorted([2, 1])"),
        (reference, "assert f([2, 1]) == reference([2, 1])"),
        (None, "def expected(xs):\n    return [1, 2]\nassert f([2, 1]) == expected([2, 1])"),
    ]:
        declared = ["sorted", "reference", "expected"]  # even declared, never over trusted ones
        result = run_python(code, tests=tests, entry_point="f", setup=setup, helpers=declared)
        assert (result.passed, result.status) == (False, "failed"), (tests, result)
        result = run_python(right, tests=tests, entry_point="f", setup=setup, helpers=declared)
        assert result.passed, (tests, result.reason)


def test_an_entry_point_the_code_does_not_define_fails_before_the_tests():
    for code in ("def g(x):\n    return x\n", "f = 3\n", ""):
        result = run_python(code, tests="assert f(1) == 1", entry_point="f")
        assert (result.passed, result.status) == (False, "error"), code
        assert result.reason.startswith("entry point not defined"), result.reason


@pytest.mark.parametrize(
    "code, tests, reason",
    [
        ("def f(x)\n    return x", "f(1)", "the code raised SyntaxError"),
        ("import os\nos._exit(0)", "f(1)", "exited (code 0) before the tests were done"),
        ("def f(x):\n    raise ValueError('no')", "f(1)", "tests raised ValueError: no (raised "),
        ("def f(x):\n    return x", "g(1)", "tests raised NameError: name 'g' is not defined"),
        ("while True:\n    pass", "f(1)", "timeout"),
    ],
)
def test_every_failure_says_why(code, tests, reason):
    result = run_python(code, tests=tests, entry_point="f", timeout_s=2.0)
    assert not result.passed
    assert reason in result.reason, result.reason


def test_reply_over_the_message_limit_fails():
    code = "def add(a, b):\n    return 'x' * (3 << 20)\n"
    result = run_python(code, tests="add(1, 2)", entry_point="add", max_message_mb=1)
    assert (result.passed, result.status) == (False, "error")


# ---------------------------------------------------------------------------------------------
# Per-run budgets: all the run's processes together
# ---------------------------------------------------------------------------------------------

# Ten children each touch 64 MiB and then wait: 640 MiB per run if the budget were per process.
MEMORY_HOG = (
    "import os, time\nfor i in range(10):\n    if os.fork() == 0:\n"
    "        block = bytearray(64 << 20)\n"
    "        for j in range(0, len(block), 4096):\n            block[j] = 1\n"
    "        time.sleep(2)\n        os._exit(0)\n    time.sleep(0.05)\n"
    "for i in range(10):\n    os.wait()\n"
)


def _run_memory_bytes(stop: threading.Event, peak: list[int]) -> None:
    """Sample the anonymous memory of every sandbox process (the child program's tag in its
    command line, which forks keep) until `stop`: proportional set sizes, so pages forked
    processes share count once."""
    while not stop.is_set():
        total = 0
        for pid in _sandbox_processes():
            try:
                with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                    for line in f:
                        if line.startswith((b"Pss_Anon:", b"Pss_Shmem:")):
                            total += int(line.split()[1]) * 1024
            except (OSError, ValueError):
                pass
        peak[0] = max(peak[0], total)
        time.sleep(0.01)


@pytest.mark.parametrize("budget", ["cgroup", "memwatch"])
def test_memory_budget_is_a_total_over_the_run(budget):
    if budget == "cgroup" and not _has_layer("cgroup"):
        pytest.skip("no usable cgroup on this machine: the watcher is the budget")
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_run_memory_bytes, args=(stop, peak))
    sampler.start()
    try:
        result = run_python(MEMORY_HOG, timeout_s=8.0, memory_mb=256, use_cgroup=budget == "cgroup")
    finally:
        stop.set()
        sampler.join()
    assert budget in result.isolation
    assert not result.passed
    # measured from outside: never near the 640 MiB the children would hold per process
    budget_bytes = 256 << 20
    # The interpreter's start-up memory (~5 MiB, shared by its forks) is allocated before the
    # outer process joins its cgroup, so it is charged to us; the watcher acts within a period.
    # Sampled from outside, the PSS of children being killed lags the cgroup's own count: one
    # full-suite run on a loaded machine saw 277.9 MiB here (cgroup), so 32 MiB of slack; still
    # far from the 640 MiB a per-process limit would allow.
    slack = (32 << 20) if budget == "cgroup" else (64 << 20)
    assert peak[0] <= budget_bytes + slack, peak[0] / 2**20
    assert result.memory_peak_mb is not None and result.memory_peak_mb <= 256 + slack / 2**20
    if budget == "memwatch":
        assert result.status == "memory"
    _assert_clean()


def test_process_budget_counts_every_process_of_the_run():
    # grandchildren count too: each child forks again; at most max_processes at once
    code = (
        "import os, time\nalive = 0\nfor _ in range(20):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        try:\n"
        "            if os.fork() == 0:\n                time.sleep(30)\n"
        "        except OSError:\n            pass\n        time.sleep(30)\n        os._exit(0)\n"
        "    alive += 1\n    time.sleep(0.02)\n"
        "print(len([p for p in os.listdir('/proc') if p.isdigit()]))"
    )
    result = run_python(code, timeout_s=10.0, max_processes=8)
    assert result.status == "ok", result.stderr
    if _has_layer("pidns"):  # the run's own /proc: its processes, the harness included
        assert int(result.stdout) <= 8 + 1
    _assert_clean()
