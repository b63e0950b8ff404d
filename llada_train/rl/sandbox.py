"""Run untrusted Python (model output) in a sandboxed subprocess.

Contract: `run_python(code)` executes `code` as a script in a fresh interpreter (standard library
only) and returns a `SandboxResult`; `passed` is True only when the whole program ran to its end:
the child writes a per-run secret token after the last statement, so `sys.exit(0)`, `os._exit(0)`
or an atexit trick before the tests does not pass. The calling process never crashes or hangs,
whatever the code does: every failure, a failure to set the sandbox up included, comes back as a
result with `passed=False` and a `status`. Nothing is kept: the scratch directory is removed and
every process the code started is dead before `run_python` returns. `run_many` runs a batch on a
thread pool (the launch is thread-safe: no `preexec_fn`; the child sets itself up).

Process layout: `python -I -B -S -c BOOTSTRAP` (isolated mode, no site-packages, empty
environment) starts as the *outer* process in its own session; it unshares namespaces and forks
the *inner* process, which sets up the remaining layers on itself, then compiles and runs the
code. The outer one (trusted, root) only waits and exits the way the inner one did. The layers
actually set up are reported in `SandboxResult.isolation`.

Kernel layers, when the caller is root (all verified on the development machine: Linux, root
with CAP_SYS_ADMIN, Python 3.11, by tests/test_sandbox.py with the audit hook off):
- "netns": a new, empty network namespace: not even loopback is up, so connecting to a server on
  the host's 127.0.0.1 fails with ENETUNREACH.
- "mountns": a new mount namespace in which every mount is remounted read-only, the scratch
  directory is a fresh size-limited tmpfs (the only writable place; it vanishes with the
  namespace), and a directory the sandbox user could not traverse on the way to the interpreter
  (e.g. /root, 0700, holding a pyenv Python) is masked by an empty tmpfs with only the needed
  entries bound back in, which also hides the rest of it.
- "pidns": the inner process is pid 1 of a new pid namespace, with its own /proc: the code sees
  no other process, and when the inner process dies the kernel kills and reaps everything it
  started, wherever it went (setsid, double fork).
- "uid": the code runs as a fresh unprivileged uid (random, >= 1e6, one per run, not in
  /etc/passwd) with no groups and PR_SET_NO_NEW_PRIVS. RLIMIT_NPROC is not enforced for uid 0,
  so the uid switch is what makes the process limit bind; a per-run uid makes the limit per run
  and lets the parent kill every process of the run by uid.
Always:
- "rlimits": RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE (which also caps the captured stdout/stderr
  files, so a flood can neither fill the disk nor the parent's memory), RLIMIT_NOFILE,
  RLIMIT_NPROC, RLIMIT_CORE = 0.
- "audit" (unless switched off for tests): a `sys.addaudithook` hook, which Python offers no way
  to remove, refusing sockets, ctypes, starting programs, writes outside the scratch directory
  (open for writing, mkdir, remove, rename, ...), reading /proc/*/mem, and the gc and
  other-thread-frame introspection that could reach the hook.
- The wall clock: on timeout the inner process is killed first (so the outer one reaps it and no
  zombie is left where the host's init does not reap), then, as root, every process of the run's
  uid, then the whole process group.

Without root the kernel layers degrade: the child tries an unprivileged user namespace for
"netns" and "pidns" (RLIMIT_NPROC then counts the processes of that namespace on recent kernels,
of the whole user on older ones); writes outside the scratch directory are stopped only by the
audit hook; without "pidns", processes that left the process group may survive. In a root
container without CAP_SYS_ADMIN the namespaces are skipped and the uid switch still happens, but
an interpreter under a 0700 directory then cannot import modules not imported at startup.
The audit hook is a second line of defence: code written against this sandbox's internals (e.g.
walking frames up to the bootstrap to read the token, or `_posixsubprocess`) can get around it;
containment rests on the kernel layers.

Statuses: "ok" (ran to the end), "failed" (AssertionError), "error" (any other exception,
SystemExit included, or an exit before the end), "timeout" (wall clock or CPU limit), "memory"
(MemoryError), "killed" (another signal, e.g. a crash), "sandbox_error" (the sandbox itself
failed; the message is in `stderr`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Exit codes of the bootstrap below, mapped to statuses by `_status`.
_EXIT_FAILED, _EXIT_ERROR, _EXIT_MEMORY, _EXIT_CPU, _EXIT_SANDBOX = 1, 2, 3, 4, 70
_TAIL_BYTES = 4096  # how much of stdout / stderr is kept in the result
_UID_BASE, _UID_SPAN = 1_000_000, 1 << 24  # per-run uids are drawn from this range
BOOTSTRAP_TAG = "# llada_train sandbox bootstrap"  # first line of the child's `-c` program

# The child's program. It runs as `python -I -B -S -c BOOTSTRAP CONFIG_JSON` with stdin =
# token line + untrusted source. Setup order matters: namespaces and mounts need root, so they
# come before the uid switch; the audit hook comes last so that it does not see the setup.
BOOTSTRAP = (
    BOOTSTRAP_TAG
    + r'''
import json, os, resource, signal, sys, traceback

def _libc():
    import ctypes  # imported early by _main, while every path is readable
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    return libc, ctypes

def _check(rc, what, ctypes):
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 4096, 16384, 1 << 18, 1 << 21
MS_NODIRATIME, MS_STRICTATIME = 2048, 1 << 24
MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
               "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
               "strictatime": MS_STRICTATIME}

def _unescape(path):  # /proc/self/mountinfo writes space, tab, newline, backslash as \ooo
    import re
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)

def _mounts():
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        yield _unescape(fields[4]), fields[5].split(",")

def _expose(paths, libc, ctypes):
    """Mask every directory on the way to `paths` that others cannot traverse (e.g. /root, 0700)
    with an empty tmpfs, and bind only the next path component back into it."""
    for _ in range(32):
        blocked = {}
        for path in paths:
            parts = [p for p in path.split("/") if p]
            cur = "/"
            for name in parts:
                if not os.stat(cur).st_mode & 0o001:
                    blocked.setdefault(cur, set()).add(name)
                    break
                cur = os.path.join(cur, name)
        if not blocked:
            return
        top = min(blocked, key=lambda p: p.count("/"))
        fds = {n: os.open(os.path.join(top, n), os.O_PATH) for n in blocked[top]}
        _check(libc.mount(b"tmpfs", top.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                          b"mode=0711,size=64k"), "mask " + top, ctypes)
        for name, fd in fds.items():
            dst = os.path.join(top, name)
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.mkdir(dst)
            else:
                open(dst, "w").close()
            _check(libc.mount(f"/proc/self/fd/{fd}".encode(), dst.encode(), None,
                              MS_BIND | MS_REC, None), "bind " + dst, ctypes)
            os.close(fd)
    raise OSError("too many directories to expose")

def _unshare(is_root):
    """New namespaces for this process (network, mounts) and its next child (pids)."""
    libc, ctypes = _libc()
    CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
    CLONE_NEWNET = 0x40000000
    if is_root:
        if libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID) == 0:
            return ["netns", "mountns", "pidns"]
    elif libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) == 0:  # unprivileged userns
        return ["netns", "pidns"]
    return []  # e.g. a container without CAP_SYS_ADMIN: the other layers still apply

def _mount_fs(cfg):
    """Everything read-only, the scratch dir a fresh tmpfs, /proc showing only this pid ns."""
    libc, ctypes = _libc()
    scratch = cfg["scratch"]
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private", ctypes)
    needed = {os.path.realpath(p) for p in sys.path + [sys.prefix, sys.base_prefix]
              if p and os.path.exists(p)}
    _expose(sorted(needed | {scratch}), libc, ctypes)
    for target, opts in list(_mounts()):
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for opt in opts:
            flags |= MOUNT_FLAGS.get(opt, 0)
        libc.mount(None, target.encode(), None, flags, None)  # some (e.g. /proc) may refuse
    uid = cfg["uid"]
    options = f"mode=0700,uid={uid},gid={uid},size={cfg['scratch_bytes']}"
    _check(libc.mount(b"tmpfs", scratch.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                      options.encode()), "scratch tmpfs", ctypes)
    _check(libc.mount(b"proc", b"/proc", b"proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      None), "mount /proc", ctypes)

def _limits(cfg):
    cpu = cfg["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # soft: SIGXCPU, hard: SIGKILL
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["max_files"], cfg["max_files"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_processes"], cfg["max_processes"]))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))

def _drop_privileges(cfg, layers):
    uid = cfg["uid"]
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    layers.append("uid")

# Defaults bind what the hook calls, so that monkeypatching os or builtins does not change it.
def _install_hook(scratch, allow_kill, realpath=os.path.realpath, fspath=os.fspath,
                  getpid=os.getpid, isinstance=isinstance, bytes=bytes, int=int,
                  PermissionError=PermissionError):
    prefix = scratch.rstrip("/") + "/"
    writable = frozenset(("/dev/null", "/dev/stdout", "/dev/stderr"))
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    path_events = {  # event -> positions of the paths it modifies
        "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
        "os.link": (1,), "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,),
        "os.chown": (0,), "os.utime": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
        "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,),
        "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.move": (1,),
    }
    blocked = ("socket.", "ctypes.", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
               "os.forkpty", "pty.", "subprocess.", "gc.get_objects", "gc.get_referrers",
               "gc.get_referents", "sys._current_frames", "sys._current_exceptions",
               "sys.remote_exec", "cpython.remove_audit_hook")

    def resolve(path):
        if isinstance(path, int):
            return None  # an open file descriptor: no new path
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        return realpath(path)

    def inside(path):
        path = resolve(path)
        return path is None or path == scratch or path.startswith(prefix)

    def hook(event, args):
        if event == "open":
            path, flags = args[0], args[2]
            if flags & write_flags and path not in writable and not inside(path):
                raise PermissionError(f"sandbox: no writes outside the scratch dir: {path!r}")
            resolved = resolve(path)
            if resolved and resolved.startswith("/proc/") and resolved.endswith("/mem"):
                raise PermissionError("sandbox: process memory is off limits")
        elif event in path_events:
            for i in path_events[event]:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} outside the scratch dir")
        elif event.startswith(blocked):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event == "object.__setattr__" and args[1] == "__code__":
            raise PermissionError("sandbox: replacing __code__ is not allowed")
        elif event in ("os.kill", "os.killpg") and not allow_kill and args[0] != getpid():
            raise PermissionError("sandbox: signalling other processes is not allowed")

    sys.addaudithook(hook)

def _forward(pid):
    """The outer process: wait for the inner one and exit the same way."""
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 70)

def _run(cfg, token, source, is_root, layers):
    """The inner process (pid 1 of the new pid namespace as root): set up, then run the code."""
    write, exit_now, marker_fd = os.write, os._exit, cfg["marker_fd"]  # kept from user code
    try:
        if "mountns" in layers:
            _mount_fs(cfg)
        os.chdir(cfg["scratch"])  # again: a tmpfs may now be mounted over it
        _limits(cfg)
        # As pid 1 of a pid namespace the process ignores signals it has no handler for,
        # SIGXCPU included: without this the CPU limit would only act at the hard limit.
        signal.signal(signal.SIGXCPU, lambda *_: exit_now(4))
        layers.append("rlimits")
        if is_root:
            _drop_privileges(cfg, layers)
        libc, ctypes = _libc()
        # after the uid switch, which clears it: die with the outer process
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            raise OSError("prctl(PR_SET_PDEATHSIG) failed")
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: no setuid binaries
            raise OSError("prctl(PR_SET_NO_NEW_PRIVS) failed")
        if cfg["use_audit_hook"]:
            _install_hook(os.path.realpath(cfg["scratch"]), allow_kill=is_root)
            layers.append("audit")
        write(marker_fd, (json.dumps(layers) + "\n").encode())
    except BaseException:
        traceback.print_exc()
        exit_now(70)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    del cfg
    try:
        code, source = compile(source, "<sandbox>", "exec"), None  # compiled under the limits
        exec(code, namespace)
        write(marker_fd, token)
        exit_code = 0
    except BaseException as e:
        try:
            traceback.print_exc()
        except BaseException:
            pass
        exit_code = 1 if isinstance(e, AssertionError) else 3 if isinstance(e, MemoryError) else 2
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    exit_now(exit_code)  # skips atexit handlers the code may have registered

def _main():
    cfg = json.loads(sys.argv[1])
    token, _, source = sys.stdin.buffer.read().partition(b"\n")  # token: ran to the end
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    is_root = os.geteuid() == 0
    try:
        _libc()
        layers = _unshare(is_root) if cfg["use_namespaces"] else []
        pid = os.fork()  # as root: the child is pid 1 of the new pid namespace
    except BaseException:
        traceback.print_exc()
        os._exit(70)
    if pid:
        del token, source
        _forward(pid)
    _run(cfg, token, source, is_root, layers)

_main()
'''
)


@dataclass(frozen=True)
class SandboxResult:
    passed: bool  # the program ran to its end without an exception
    status: str  # ok | failed | error | timeout | memory | killed | sandbox_error
    returncode: int | None  # of the child; negative: killed by that signal
    stdout: str  # tail
    stderr: str  # tail
    wall_s: float
    isolation: tuple[str, ...]  # layers set up in the child, see the module docstring


_uids_in_use: set[int] = set()
_uids_lock = threading.Lock()


def _claim_uid() -> int:
    """A uid no process uses now and no concurrent run of this process has claimed."""
    with _uids_lock:
        while True:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN)  # not `random`: leave its seed alone
            if uid not in _uids_in_use and not _pids_of_uid(uid):
                _uids_in_use.add(uid)
                return uid


def _pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes of `uid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid != uid:
                    continue
                with open(f"/proc/{entry}/stat", "rb") as f:
                    state = f.read().rpartition(b")")[2].split()[0]
            except (OSError, IndexError):
                continue  # the process ended meanwhile
            if state not in (b"Z", b"X"):  # a zombie is dead already; its parent reaps it
                pids.append(int(entry))
    return pids


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` until none is left (a fork bomb races the first rounds)."""
    for _ in range(100):
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _TAIL_BYTES))
    return f.read().decode("utf-8", "replace")


def _status(returncode: int | None, is_timeout: bool, is_complete: bool) -> str:
    if is_timeout or returncode in (_EXIT_CPU, -signal.SIGXCPU):  # wall clock or CPU limit
        return "timeout"
    if returncode == 0:
        return "ok" if is_complete else "error"  # exit(0) before the end
    if returncode == _EXIT_FAILED:
        return "failed"
    if returncode == _EXIT_MEMORY:
        return "memory"
    if returncode == _EXIT_SANDBOX:
        return "sandbox_error"
    return "killed" if returncode is not None and returncode < 0 else "error"


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    cpu_s: float | None = None,
    memory_mb: int = 512,
    max_processes: int = 32,
    max_file_mb: int = 8,
    scratch_mb: int = 64,
    max_files: int = 64,
    use_namespaces: bool = True,
    use_audit_hook: bool = True,
) -> SandboxResult:
    """Run `code` as a script in a sandbox (see the module docstring); never raises.

    timeout_s: wall clock; cpu_s: CPU seconds (default: timeout_s, rounded up); memory_mb: address
    space; max_processes: processes and threads of the run; max_file_mb: largest file, stdout and
    stderr included; scratch_mb: size of the scratch tmpfs; max_files: open file descriptors.
    use_namespaces / use_audit_hook: switch a layer off, only to test the others alone.
    """
    start = time.perf_counter()
    is_root = os.geteuid() == 0
    uid = None
    scratch = None
    proc = None
    try:
        uid = _claim_uid() if is_root else None
        scratch = tempfile.mkdtemp(prefix="llada_sandbox_")
        if uid is not None:
            os.chown(scratch, uid, uid)  # the host dir is the scratch dir without a mount ns
        os.chmod(scratch, 0o700)
        token = secrets.token_hex(16)
        with (
            tempfile.TemporaryFile() as stdin,
            tempfile.TemporaryFile() as stdout,
            tempfile.TemporaryFile() as stderr,
            tempfile.TemporaryFile() as marker,
        ):
            if uid is not None:  # lets the code reopen them, e.g. as /dev/stdout
                os.fchown(stdout.fileno(), uid, uid)
                os.fchown(stderr.fileno(), uid, uid)
            stdin.write(token.encode() + b"\n" + code.encode("utf-8", "surrogatepass"))
            stdin.seek(0)
            config = {
                "scratch": os.path.realpath(scratch),
                "uid": uid,
                "cpu_s": max(1, math.ceil(cpu_s if cpu_s is not None else timeout_s)),
                "memory_bytes": memory_mb << 20,
                "max_processes": max_processes,
                "file_bytes": max_file_mb << 20,
                "scratch_bytes": scratch_mb << 20,
                "max_files": max_files,
                "marker_fd": marker.fileno(),
                "use_namespaces": use_namespaces,
                "use_audit_hook": use_audit_hook,
            }
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch}
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-S", "-c", BOOTSTRAP, json.dumps(config)],
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cwd=scratch,
                env=env,
                pass_fds=(marker.fileno(),),
                start_new_session=True,  # its own process group, killed as a whole below
            )
            is_timeout = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                is_timeout = True
            _cleanup(proc, uid)
            marker.seek(0)
            marker_text = marker.read().decode("utf-8", "replace")
            is_complete = proc.returncode == 0 and token in marker_text
            try:
                isolation = tuple(json.loads(marker_text.split("\n", 1)[0]))
            except ValueError:
                isolation = ()
            return SandboxResult(
                passed=is_complete and not is_timeout,
                status=_status(proc.returncode, is_timeout, is_complete),
                returncode=proc.returncode,
                stdout=_tail(stdout),
                stderr=_tail(stderr),
                wall_s=time.perf_counter() - start,
                isolation=isolation,
            )
    except BaseException as e:  # the sandbox itself failed: report it, never raise
        if proc is not None:
            _cleanup(proc, uid)
        if isinstance(e, KeyboardInterrupt):
            raise
        return SandboxResult(
            passed=False,
            status="sandbox_error",
            returncode=None,
            stdout="",
            stderr=f"{type(e).__name__}: {e}",
            wall_s=time.perf_counter() - start,
            isolation=(),
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if uid is not None:
            with _uids_lock:
                _uids_in_use.discard(uid)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the outer process has one: the inner one)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rpartition(b")")[2].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return children


def _cleanup(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill whatever is left of the run and reap the child; bounded in time.

    The inner process dies first: it is pid 1 of the run's pid namespace, so the kernel then
    kills the rest of the namespace, and the (trusted) outer process reaps it and exits; killing
    both at once would leave the inner one a zombie wherever the host's init does not reap. As
    root, every process of the run's uid is killed too, and the process group covers runs
    without namespaces.
    """
    if proc.poll() is None:
        for pid in _children(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    if uid is not None:
        _kill_uid(uid)
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group lives on while any member does
    except OSError:
        pass
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        pass  # stuck in the kernel: give up rather than hang the caller


def run_many(
    codes: Sequence[str], *, max_workers: int = 8, **kwargs: object
) -> list[SandboxResult]:
    """`run_python` on each of `codes` with the same keyword arguments, in a thread pool (the
    threads only wait on subprocesses); results in the order of `codes`."""
    if not codes:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(codes)))) as pool:
        return list(pool.map(lambda code: run_python(code, **kwargs), codes))
