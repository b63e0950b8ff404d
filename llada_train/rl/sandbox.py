"""Run untrusted Python (model output) in a sandbox, and judge it with tests it cannot reach.

Contract: `run_python(code, tests=..., entry_point=...)` runs `code` (standard library only) in a
fresh interpreter, then runs the trusted `tests` in a *separate* process, the harness, in which
the name `entry_point` is a proxy: each call crosses to the candidate's process as plain data and
its return value comes back as plain data (see `sandbox_child.py`). `passed` is True only when
the tests ran to their end without an exception. Without `tests`, `passed` means `code` itself
ran to its end (its own asserts are then the test: a program is its own judge there). The
calling process never crashes or hangs, whatever the code does: every failure, a failure to set
the sandbox up included, comes back as a result with `passed=False` and a `status`. Nothing is
kept: the scratch directory is removed and every process of the run is dead before `run_python`
returns. `run_many` runs a batch on a thread pool (the launch is thread-safe: no `preexec_fn`;
the child sets itself up). The child program is `llada_train/rl/sandbox_child.py`, passed as
`python -I -B -S -c SOURCE` (isolated mode, no site-packages, empty environment).

Threat model. The candidate is an adversary that knows this code and wants `passed=True` without
passing the tests (an RL policy finds every hole). What proves success is the harness's verdict,
written to a file descriptor that only the harness holds, and the exit status of the run's outer
process; the parent requires both. Neither is reachable from the candidate's process:
- nothing in its memory proves anything (there is no token: frames via `sys._getframe`,
  tracebacks, gc, inspect, reading its own memory find only the candidate's own state);
- it holds no descriptor of the verdict (closed before the fork's child runs any code);
- the harness runs under another unprivileged uid, non-dumpable, with no_new_privs: the
  candidate can neither signal, ptrace, nor open /proc/PID/{mem,fd} of it; the outer process is
  root (and in the parent pid namespace, so not even visible);
- the tests never touch an object of the candidate: returns are encoded by exact built-in type
  (an int subclass, or a class whose `__eq__` is always true, is refused) and decoded in the
  harness into fresh built-ins, so `assert f(x) == y` compares built-in values with the built-in
  `==` (the benchmark's own semantics: 1 == 1.0 == True as in HumanEval's official checker; what
  cannot happen is a candidate object in the comparison);
- the tests cannot be skipped or patched (settrace, builtins, monkeypatching the asserts): they
  run in the harness, where no candidate code runs.
What the candidate can do is answer calls, crash, hang or exhaust its budgets: each ends in
`passed=False`. Tests may reach the candidate only through calls with plain-data arguments (an
in-place mutation of an argument is not seen by the tests) of `entry_point` and of helpers: the
candidate's other top-level functions that the tests call and no trusted code defines (e.g.
HumanEval/38's `encode_cyclic` where the candidate's code is the only one to define it; see
`sandbox_child.py`). A helper is bound only where the record declares it (a stub of its prompt
or its "helpers" list) and the tests would otherwise meet a NameError, so it never replaces a
built-in, a name of `setup` or one the tests define; what a helper answers
is trusted as far as the tests trust it, like the entry point's answers (put a helper the tests
use as a reference, such as HumanEval/32's `poly`, in `setup` instead). `setup` is trusted code
run in the harness before the tests (e.g. a HumanEval prompt's helper functions).

Process layout: the outer process (root) joins the run's cgroups, unshares namespaces and forks
init, pid 1 of a new pid namespace; init mounts, forks the candidate process (uid A), then drops
to uid B and becomes the harness. Layers actually set up are reported in
`SandboxResult.isolation`.

Kernel layers, when the caller is root (all verified on the development machine: Linux 6.18,
root with CAP_SYS_ADMIN, Python 3.11, cgroup v1 memory and pids controllers, by
tests/test_sandbox.py with the audit hook off):
- "cgroup": one memory + pids cgroup per run (v2 where the caller's cgroup delegates the memory
  and pids controllers, else v1), created under the caller's own cgroup: `memory_mb` caps the
  memory of all the run's processes together (anonymous, page cache and its tmpfs scratch; no
  swap; what the outer interpreter allocated while starting, ~5 MiB, before it joined, stays
  charged to the caller), `max_processes` + 2 (the outer process and the harness) caps their
  number. The kernel enforces both: a run cannot exceed them even for an instant; an OOM kill
  inside the run gives status "memory".
- "netns": a new, empty network namespace: not even loopback is up.
- "mountns": every mount remounted read-only, the scratch directory a fresh size-limited tmpfs
  (the only writable place), a directory the sandbox uid could not traverse on the way to the
  interpreter (e.g. /root, 0700, holding a pyenv Python) masked by an empty tmpfs with only the
  needed entries bound back in.
- "pidns": the run's own pid namespace and /proc: the code sees no process outside the run, and
  when init exits the kernel kills everything the run started, wherever it went.
- "uid": the candidate runs as a fresh unprivileged uid (random, >= 1e6, one per run, not in
  /etc/passwd) with no groups and PR_SET_NO_NEW_PRIVS; the harness as a second one.
  RLIMIT_NPROC counts all the processes of a uid, so with a per-run uid it is a total per run.
Always:
- "rlimits": RLIMIT_CPU, RLIMIT_AS (per process: a single huge allocation fails fast with
  MemoryError), RLIMIT_FSIZE (also caps the captured stdout/stderr files), RLIMIT_NOFILE,
  RLIMIT_NPROC, RLIMIT_CORE = 0.
- "audit" (unless switched off for tests): a `sys.addaudithook` hook in the candidate process
  refusing sockets, ctypes, starting programs and writes outside the scratch directory: the
  guard of writes and sockets where the namespaces are missing, a second line elsewhere.
- The wall clock: on timeout every process of the run is killed (cgroup, uids, process group).

Fallback budget without a usable cgroup ("memwatch"): still a total, never per process. The
process count is RLIMIT_NPROC of the run's own uid (root) or of the user namespace (recent
kernels, without root). Memory: one watcher thread of this process sums the resident anonymous
and shmem memory (RssAnon + RssShmem) of every process of the run (descendants of the outer
process, and the run's uids) every 20 ms, and kills the whole run (status "memory") when the sum
passes `memory_mb`. Unlike the cgroup it acts after the fact: a run can overshoot by what it
allocates within one period, and memory no process maps (an unmapped memfd) is not seen.

Without root the kernel layers degrade: the child tries an unprivileged user namespace for
"netns" and "pidns"; writes outside the scratch directory are stopped only by the audit hook;
candidate and harness share the caller's uid, so the verdict is only as safe as the caller's own
process is from code of its uid (ptrace, /proc/PID/fd): run the trainer as root for rewards that
matter. In a root container without CAP_SYS_ADMIN the namespaces are skipped and the uid switch
still happens.

Statuses: "ok" (the tests, or the code, ran to the end), "failed" (AssertionError), "error" (any
other exception, SystemExit included, an exit before the end, or an entry point the code does
not define), "timeout" (wall clock or CPU limit), "memory" (MemoryError, or the run's memory
budget), "killed" (another signal, e.g. a crash), "sandbox_error" (the sandbox itself failed;
the message is in `stderr`). `reason` says why in one line whenever `passed` is False, e.g.
"tests failed: AssertionError at <tests> line 3: assert f(2) == 4", "entry point not defined:
...", "timeout: past the wall clock of 5.0 s".
"""

from __future__ import annotations

import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from llada_train.rl import sandbox_child

_TAIL_BYTES = 4096  # how much of stdout / stderr is kept in the result
_UID_BASE, _UID_SPAN = 1_000_000, 1 << 24  # per-run uids are drawn from this range
_SANDBOX_PROCESSES = 2  # the outer process and the harness, on top of the candidate's own
_WATCH_INTERVAL_S = 0.02  # the memory watcher's period (fallback without cgroups)
_CHILD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
with open(_CHILD_PATH, encoding="utf-8") as _f:
    CHILD_SOURCE = _f.read()  # run as `python -I -B -S -c CHILD_SOURCE CONFIG_JSON`
BOOTSTRAP_TAG = CHILD_SOURCE.split("\n", 1)[0]  # first line: how tests find orphaned children


@dataclass(frozen=True)
class SandboxResult:
    passed: bool  # the tests (or, without tests, the code) ran to their end
    status: str  # ok | failed | error | timeout | memory | killed | sandbox_error
    returncode: int | None  # of the outer process; negative: killed by that signal
    stdout: str  # tail
    stderr: str  # tail
    wall_s: float
    isolation: tuple[str, ...]  # layers set up for the run, see the module docstring
    memory_peak_mb: float | None = None  # all the run's processes together, where measured
    reason: str | None = None  # why it did not pass, one line; None when it passed


# ---------------------------------------------------------------------------------------------
# Per-run budgets: a cgroup where the machine allows it, else a watcher
# ---------------------------------------------------------------------------------------------


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _cgroup_mounts() -> dict[str, tuple[str, str]]:
    """{"v2" or a v1 controller: (mount point, root of the mount)} from /proc/self/mountinfo."""
    mounts = {}
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup2":
            mounts.setdefault("v2", (fields[4], fields[3]))
        elif tail[0] == "cgroup":
            for option in tail[2].split(","):
                if option in ("memory", "pids"):
                    mounts.setdefault(option, (fields[4], fields[3]))
    return mounts


def _own_cgroup_dir(mount: tuple[str, str], path: str) -> str:
    point, root = mount
    relative = path[len(root) :] if root != "/" and path.startswith(root) else path
    return os.path.join(point, relative.lstrip("/"))


_cgroup_bases_cache: list[tuple[int, dict[str, str]]] = []


def _cgroup_bases() -> tuple[int, dict[str, str]]:
    """(version, {"memory": dir, "pids": dir}) under which per-run cgroups can be made, (0, {})
    when none can (not root, no such controllers, or not delegated); computed once."""
    if _cgroup_bases_cache:
        return _cgroup_bases_cache[0]
    found: tuple[int, dict[str, str]] = (0, {})
    try:
        if os.geteuid() == 0:
            mounts = _cgroup_mounts()
            paths = {}
            for line in _read("/proc/self/cgroup").splitlines():
                _, controllers, path = line.split(":", 2)
                for name in controllers.split(",") if controllers else ["v2"]:
                    paths[name] = path
            if "v2" in mounts and "v2" in paths:
                base = _own_cgroup_dir(mounts["v2"], paths["v2"])
                if {"memory", "pids"} <= set(_read(f"{base}/cgroup.subtree_control").split()):
                    found = (2, {"memory": base, "pids": base})
            if not found[0] and {"memory", "pids"} <= set(mounts) & set(paths):
                dirs = {c: _own_cgroup_dir(mounts[c], paths[c]) for c in ("memory", "pids")}
                if all(os.access(d, os.W_OK) for d in dirs.values()):
                    found = (1, dirs)
    except (OSError, ValueError):
        found = (0, {})
    _cgroup_bases_cache.append(found)
    return found


class _RunCgroup:
    """The cgroup(s) of one run: created with the limits, joined by the child, removed after."""

    def __init__(self, memory_bytes: int, max_pids: int) -> None:
        self.version, bases = _cgroup_bases()
        if not self.version:
            raise OSError("no cgroup available")
        name = f"llada_sandbox_{os.getpid()}_{secrets.token_hex(6)}"
        self.dirs: list[str] = []
        try:
            if self.version == 2:
                self.memory = self.pids = self._make(bases["memory"], name)
                _write(f"{self.memory}/memory.max", str(memory_bytes))
                _write(f"{self.memory}/memory.swap.max", "0")
            else:
                self.memory = self._make(bases["memory"], name)
                self.pids = self._make(bases["pids"], name)
                _write(f"{self.memory}/memory.limit_in_bytes", str(memory_bytes))
                try:  # exists only with swap accounting; without it there is no swap to use
                    _write(f"{self.memory}/memory.memsw.limit_in_bytes", str(memory_bytes))
                except OSError:
                    pass
            _write(f"{self.pids}/pids.max", str(max_pids))
        except BaseException:
            self.remove()
            raise

    def _make(self, base: str, name: str) -> str:
        path = os.path.join(base, name)
        os.mkdir(path)
        self.dirs.append(path)
        return path

    @property
    def procs_files(self) -> list[str]:
        return [f"{d}/cgroup.procs" for d in self.dirs]

    def peak_bytes(self) -> int | None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int(_read(f"{self.memory}/{name}"))
        except (OSError, ValueError):
            return None  # memory.peak needs Linux >= 5.19

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in _read(f"{self.memory}/{name}").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def kill_all(self) -> None:
        """SIGKILL every process of the run until none is left (a fork bomb races the first
        rounds)."""
        for _ in range(200):
            pids = set()
            for path in self.procs_files:
                try:
                    pids.update(int(p) for p in _read(path).split())
                except (OSError, ValueError):
                    pass
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.005)

    def remove(self) -> None:
        for path in reversed(self.dirs):
            for _ in range(200):  # a killed process leaves its cgroup a moment later
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)
        self.dirs = []


@dataclass
class _WatchedRun:
    root_pid: int
    uids: tuple[int, ...]
    budget_bytes: int
    peak_bytes: int = 0
    is_over: bool = False


class _MemoryWatcher:
    """One thread summing the memory of each watched run every `_WATCH_INTERVAL_S` and killing a
    run over its budget (the fallback without cgroups, see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[int, _WatchedRun] = {}
        self.thread: threading.Thread | None = None

    def add(self, run: _WatchedRun) -> None:
        with self.lock:
            self.runs[id(run)] = run
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="sandbox-memwatch")
                self.thread.daemon = True
                self.thread.start()

    def remove(self, run: _WatchedRun) -> None:
        with self.lock:
            self.runs.pop(id(run), None)

    def _loop(self) -> None:
        while True:
            with self.lock:
                runs = list(self.runs.values())
                if not runs:
                    self.thread = None
                    return
            self.check(runs)
            time.sleep(_WATCH_INTERVAL_S)

    @staticmethod
    def check(runs: list[_WatchedRun]) -> None:
        """One pass: the memory of every process, summed per run; runs over budget are killed."""
        table = _process_table()
        for run in runs:
            members = _run_members(table, run.root_pid, run.uids)
            total = sum(_resident_private_bytes(pid) for pid in members)
            run.peak_bytes = max(run.peak_bytes, total)
            if total > run.budget_bytes:
                run.is_over = True
                for pid in members:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass


_watcher = _MemoryWatcher()


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, uid) of every live (non-zombie) process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
            except OSError:
                continue  # the process ended meanwhile
            if len(fields) > 1 and fields[0] not in (b"Z", b"X"):
                table[int(entry)] = (int(fields[1]), uid)
    return table


def _run_members(table: dict[int, tuple[int, int]], root_pid: int, uids: tuple[int, ...]) -> list:
    """Processes of a run: `root_pid`, its descendants, and every process of the run's uids."""
    members = []
    for pid, (_, uid) in table.items():
        if uid in uids:
            members.append(pid)
            continue
        cur = pid
        for _ in range(64):
            if cur == root_pid:
                members.append(pid)
                break
            cur = table.get(cur, (0, 0))[0]
            if cur <= 1:
                break
    return members


def _resident_private_bytes(pid: int) -> int:
    """RssAnon + RssShmem of a process (0 if it is gone)."""
    total = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"RssAnon:", b"RssShmem:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------

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
                    continue  # the cheap test first: most processes are not the run's
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


def _status(verdict: dict, returncode: int | None, is_timeout: bool, is_over_memory: bool) -> str:
    """The run's status: the harness's verdict unless the run was stopped from outside."""
    if is_over_memory:
        return "memory"
    if is_timeout:
        return "timeout"
    status = verdict.get("status")
    if status in sandbox_child.STATUS_CODES and returncode == sandbox_child.STATUS_CODES[status]:
        return status
    if returncode == 4 or returncode == -signal.SIGXCPU:  # the harness's CPU limit
        return "timeout"
    if returncode == 70:
        return "sandbox_error"
    return "killed" if returncode is not None and returncode < 0 else "error"


def _reason(
    status: str, verdict: dict, returncode: int | None, timeout_s: float, memory_mb: int
) -> str | None:
    """One line on why a run with this status did not pass: the harness's own account where the
    status is its verdict, else what stopped the run from outside."""
    if status == "ok" and returncode == 0:
        return None
    told = verdict.get("reason")
    if status == verdict.get("status") and isinstance(told, str) and told:
        return told[:2000]
    if status == "timeout":
        return f"timeout: past the wall clock of {timeout_s} s or the CPU time limit"
    if status == "memory":
        return f"memory: over the run's budget of {memory_mb} MiB"
    if status == "killed":
        return f"killed by signal {-returncode}" if returncode and returncode < 0 else "killed"
    if status == "sandbox_error":
        return "sandbox error: the sandbox could not be set up (see stderr)"
    return f"{status}: the run ended before the tests were done (exit code {returncode})"


def run_python(
    code: str,
    *,
    tests: str | None = None,
    entry_point: str | None = None,
    setup: str | None = None,
    helpers: list[str] | tuple[str, ...] = (),
    timeout_s: float = 5.0,
    cpu_s: float | None = None,
    memory_mb: int = 512,
    max_processes: int = 32,
    max_file_mb: int = 8,
    scratch_mb: int = 64,
    max_files: int = 64,
    max_message_mb: int = 16,
    use_namespaces: bool = True,
    use_audit_hook: bool = True,
    use_cgroup: bool = True,
) -> SandboxResult:
    """Run `code`, then the trusted `tests` against its `entry_point` (see the module docstring);
    never raises.

    tests: trusted source run in the harness, `entry_point` bound to the candidate's function
    (and each name of `helpers` that the tests call, no trusted code defines and the candidate
    defines, see the module docstring); None: `passed` means `code` ran to its end. setup:
    trusted source run in the harness first. helpers: the names the record lets the candidate
    supply besides the entry point (the stubs of its prompt, its "helpers" list); any other
    name the tests read stays a NameError, so a candidate can never stand in for a reference
    function the tests rely on.
    timeout_s: wall clock; cpu_s: CPU seconds per process (default: timeout_s, rounded up);
    memory_mb: all the run's processes together (the cgroup or the watcher), and the address
    space of each; max_processes: processes and threads of the candidate, all together;
    max_file_mb: largest file, stdout and stderr included; scratch_mb: size of the scratch tmpfs;
    max_files: open file descriptors; max_message_mb: largest value crossing to the harness.
    use_namespaces / use_audit_hook / use_cgroup: switch a layer off, only to test the others.
    """
    start = time.perf_counter()
    is_root = os.geteuid() == 0
    uids: list[int] = []
    scratch = None
    proc = None
    cgroup = None
    watched = None
    try:
        if is_root:
            uids = [_claim_uid(), _claim_uid()]  # the candidate's, the harness's
        scratch = tempfile.mkdtemp(prefix="llada_sandbox_")
        if uids:
            os.chown(
                scratch, uids[0], uids[0]
            )  # the host dir is the scratch dir without a mount ns
        os.chmod(scratch, 0o700)
        isolation = []
        if use_cgroup and _cgroup_bases()[0]:
            cgroup = _RunCgroup(memory_mb << 20, max_processes + _SANDBOX_PROCESSES)
            isolation.append("cgroup")
        with (
            tempfile.TemporaryFile() as stdin,
            tempfile.TemporaryFile() as stdout,
            tempfile.TemporaryFile() as stderr,
            tempfile.TemporaryFile() as verdict_file,
        ):
            if uids:  # lets the code reopen them, e.g. as /dev/stdout
                for f in (stdout, stderr):
                    os.fchown(f.fileno(), uids[0], uids[0])
            job = {
                "code": code, "tests": tests, "entry_point": entry_point, "setup": setup,
                "helpers": sorted(helpers),
            }  # fmt: skip
            stdin.write(json.dumps(job).encode("utf-8", "surrogatepass"))
            stdin.seek(0)
            config = {
                "scratch": os.path.realpath(scratch),
                "uid": uids[0] if uids else None,
                "harness_uid": uids[1] if uids else None,
                "cpu_s": max(1, math.ceil(cpu_s if cpu_s is not None else timeout_s)),
                "memory_bytes": memory_mb << 20,
                "max_processes": max_processes,
                "file_bytes": max_file_mb << 20,
                "scratch_bytes": scratch_mb << 20,
                "max_files": max_files,
                "max_message_bytes": max_message_mb << 20,
                "verdict_fd": verdict_file.fileno(),
                "cgroup_procs": cgroup.procs_files if cgroup else [],
                "use_namespaces": use_namespaces,
                "use_audit_hook": use_audit_hook,
            }
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch}
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-S", "-c", CHILD_SOURCE, json.dumps(config)],
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cwd=scratch,
                env=env,
                pass_fds=(verdict_file.fileno(),),
                start_new_session=True,  # its own process group, killed as a whole below
            )
            if cgroup is None:
                watched = _WatchedRun(proc.pid, tuple(uids), memory_mb << 20)
                _watcher.add(watched)
                isolation.append("memwatch")
            is_timeout = not _wait(proc, timeout_s)
            if watched is not None:
                _watcher.remove(watched)
            _cleanup(proc, uids, cgroup)
            verdict_file.seek(0)
            try:
                verdict = json.loads(verdict_file.read(1 << 16))
                assert isinstance(verdict, dict)
            except (ValueError, AssertionError):
                verdict = {}
            is_over = bool(watched and watched.is_over) or bool(cgroup and cgroup.oom_kills())
            status = _status(verdict, proc.returncode, is_timeout, is_over)
            if cgroup is not None:
                peak = cgroup.peak_bytes()
            else:
                peak = watched.peak_bytes if watched else None
            return SandboxResult(
                passed=status == "ok" and proc.returncode == 0,
                status=status,
                returncode=proc.returncode,
                stdout=_tail(stdout),
                stderr=_tail(stderr),
                wall_s=time.perf_counter() - start,
                isolation=tuple(isolation) + tuple(verdict.get("layers", [])),
                memory_peak_mb=None if peak is None else peak / 2**20,
                reason=_reason(status, verdict, proc.returncode, timeout_s, memory_mb),
            )
    except BaseException as e:  # the sandbox itself failed: report it, never raise
        if watched is not None:
            _watcher.remove(watched)
        if proc is not None:
            _cleanup(proc, uids, cgroup)
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
            reason=f"sandbox error: {type(e).__name__}: {e}",
        )
    finally:
        if cgroup is not None:
            cgroup.remove()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if uids:
            with _uids_lock:
                _uids_in_use.difference_update(uids)


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for the child to exit, at most `timeout_s`; whether it exited. A pidfd wakes us the
    moment it does (Popen.wait(timeout) polls with sleeps of up to 50 ms)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Linux < 5.3, or the child is gone already
        pidfd = None
    if pidfd is not None:
        try:
            select.select([pidfd], [], [], timeout_s)
        finally:
            os.close(pidfd)
        timeout_s = 0.0
    try:
        proc.wait(timeout=timeout_s if timeout_s > 0 else 0.001)
        return True
    except subprocess.TimeoutExpired:
        return False


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the outer process has one: init)."""
    return [child for child, (parent, _) in _process_table().items() if parent == pid]


def _cleanup(proc: subprocess.Popen, uids: list[int], cgroup: _RunCgroup | None) -> None:
    """Kill whatever is left of the run and reap the child; bounded in time.

    Init dies first: it is pid 1 of the run's pid namespace, so the kernel then kills the rest
    of the namespace, and the (trusted) outer process reaps it and exits; killing both at once
    would leave init a zombie wherever the host's init does not reap. Then every process of the
    cgroup (else of the run's uids), and the process group for runs without namespaces.
    """
    if proc.poll() is None:
        for pid in _children(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    if cgroup is not None:
        cgroup.kill_all()  # every process of the run: none can leave the cgroup
    else:
        for uid in uids:
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
    if cgroup is not None:
        cgroup.kill_all()  # the outer process itself is a member until it is reaped
