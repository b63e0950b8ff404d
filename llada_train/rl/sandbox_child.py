"""The sandbox's child program: the code that runs inside one sandbox run (see `sandbox.py`).

`sandbox.run_python` starts it as `python -I -B -S -c SOURCE CONFIG_JSON` (the text of this file,
so that the child imports nothing from the project or site-packages), with stdin = the job as
JSON: {"code": candidate source, "tests": trusted test source or null, "entry_point": name or
null, "setup": trusted source run before the tests or null}. Importing this module has no side
effect: `main()` runs only as a script, and the pure helpers (`encode`, `decode`,
`audit_rule`, `status_of_exception`, `global_reads`, `failure_reason`) are unit-tested
in-process.

Processes of one run (root caller; see `sandbox.py` for the layers):
    outer   joins the run's cgroups, unshares namespaces, forks `init`, waits, exits as it did.
    init    pid 1 of the run's pid namespace: mounts, then forks the candidate and becomes the
            harness; when it exits the kernel kills everything left in the namespace.
    harness (init, after dropping to its own unprivileged uid, non-dumpable) runs the trusted
            tests with the entry point bound to a proxy; writes the verdict to `verdict_fd`.
    candidate (its own second unprivileged uid) runs the untrusted code, then answers calls of
            the entry point over two pipes; it never holds `verdict_fd` nor anything else that
            proves success.

Call protocol (one JSON document per line, at most `max_message_bytes` per line):
    candidate -> harness  {"layers": [...]}        before any untrusted code runs
    candidate -> harness  {"ready": true, "callables": [name, ...]}   after the code ran: the
                          names of its top-level callables | {"raised": [type name, message]}
    harness -> candidate  {"name": name, "args": [...], "kwargs": [[key, value], ...]}  one call
    candidate -> harness  {"return": value} | {"raised": [type name, message]}
The harness calls `name` = the entry point, or a helper: a name the tests read as a global
(`global_reads`) that neither the trusted setup, the tests themselves nor the built-ins define,
and that the candidate lists among its callables (e.g. HumanEval/38's `encode_cyclic` when only
the candidate's code defines it). Helpers are bound only where the tests would otherwise hit a
NameError, so the candidate can never replace a trusted name (a built-in such as `sorted`, a
helper of the setup, a function of the tests); a call of a helper crosses the boundary exactly
like a call of the entry point. An entry point missing from the callables ends the run before
the tests ("error": the code does not define it). The candidate's list is hostile input: it is
only intersected with the names the harness wants, so a false list gains nothing.
Values cross the boundary in a tagged JSON form of plain built-in data only (None, bool, int,
float, complex, str, bytes, list, tuple, dict, set, frozenset; `encode` checks exact types, so an
int subclass or any object of the candidate's own class is refused), and the harness decodes
them into fresh built-in objects: whatever the candidate returns, the tests compare built-in
values with the built-in `==`, so an object that fakes equality cannot reach them.

Verdict (harness -> parent, JSON on `verdict_fd`): {"status": ..., "layers": [...], "reason":
why it is not "ok" (e.g. "tests failed: AssertionError at <tests> line 3: assert f(2) == 4"), or
null}, status one of ok | failed | error | timeout | memory | killed | sandbox_error; the harness
then exits with `STATUS_CODES[status]`, which the outer process passes on. Exit codes when no
verdict can be written: EXIT_CPU (CPU limit), EXIT_SANDBOX (the sandbox itself failed).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import traceback

EXIT_OK, EXIT_CPU, EXIT_SANDBOX = 0, 4, 70
# The harness exits with the code of its verdict: the parent requires both to agree.
STATUS_CODES = {"ok": 0, "failed": 1, "error": 2, "memory": 3, "timeout": 4, "killed": 5}
STATUS_CODES["sandbox_error"] = EXIT_SANDBOX
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 4096, 16384, 1 << 18, 1 << 21
MS_NODIRATIME, MS_STRICTATIME = 2048, 1 << 24
MOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
MAX_DEPTH = 100  # nesting of a value crossing the boundary


# ---------------------------------------------------------------------------------------------
# Values across the boundary
# ---------------------------------------------------------------------------------------------


def encode(value: object, depth: int = 0) -> object:
    """A JSON-able tagged form of plain built-in data; TypeError for anything else (exact types:
    no subclasses, no user classes). Lists are JSON arrays; other containers and non-JSON
    scalars are one-key objects: {"float": repr}, {"complex": [re, im]}, {"bytes": hex},
    {"tuple": [...]}, {"set": [...]}, {"frozenset": [...]}, {"dict": [[k, v], ...]}."""
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is str:
        return value
    if kind is float:
        return {"float": repr(value)}
    if kind is complex:
        return {"complex": [repr(value.real), repr(value.imag)]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    raise TypeError(f"a {kind.__name__} cannot cross the sandbox boundary (plain data only)")


def decode(data: object, depth: int = 0) -> object:
    """The built-in value of `encode`'s form; ValueError for anything malformed (the input may
    come from hostile code: only built-in types are ever created)."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    kind = type(data)
    if data is None or kind is bool or kind is int or kind is str:
        return data
    if kind is list:
        return [decode(v, depth + 1) for v in data]
    if kind is not dict or len(data) != 1:
        raise ValueError(f"malformed value {data!r:.80}")
    ((tag, body),) = data.items()
    if tag == "float" and type(body) is str:
        return float(body)
    if tag == "complex" and type(body) is list and len(body) == 2:
        return complex(float(body[0]), float(body[1]))
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError(f"malformed value {data!r:.80}")
    if tag == "tuple":
        return tuple(decode(v, depth + 1) for v in body)
    if tag == "set":
        return {decode(v, depth + 1) for v in body}
    if tag == "frozenset":
        return frozenset(decode(v, depth + 1) for v in body)
    if tag == "dict":
        pairs = [(decode(k, depth + 1), decode(v, depth + 1)) for k, v in map(_pair, body)]
        return dict(pairs)
    raise ValueError(f"malformed value {data!r:.80}")


def _pair(item: object) -> tuple[object, object]:
    if type(item) is not list or len(item) != 2:
        raise ValueError("malformed dict item")
    return item[0], item[1]


def exception_from(raised: object) -> BaseException:
    """The exception to raise in the harness for the candidate's {"raised": [name, message]}:
    the built-in Exception subclass of that name (so tests that expect e.g. ValueError see one),
    else a plain Exception; never a BaseException outside Exception (SystemExit...)."""
    if type(raised) is not list or len(raised) != 2:
        return Exception("candidate: malformed error report")
    import builtins

    name, message = str(raised[0]), str(raised[1])[:1000]
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:  # e.g. UnicodeDecodeError takes five arguments
            pass
    return Exception(f"{name}: {message}")


def global_reads(source: str) -> set[str]:
    """Names `source` reads as globals anywhere (module level, functions, classes,
    comprehensions) and never binds at module level (assignment, def, class, import, `global`):
    those it expects from elsewhere. SyntaxError for a source that does not compile."""
    import symtable

    reads: set[str] = set()
    bound: set[str] = set()
    tables = [symtable.symtable(source, "<tests>", "exec")]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        is_module = table.get_type() == "module"
        for symbol in table.get_symbols():
            name = symbol.get_name()
            if is_module and symbol.is_local():
                bound.add(name)  # bound at module level
            elif is_module or symbol.is_global():
                if symbol.is_assigned() or symbol.is_imported():
                    bound.add(name)  # `global name` then bound in a function
                if symbol.is_referenced():
                    reads.add(name)
    return reads - bound


def failure_reason(e: BaseException, sources: dict[str, str]) -> str:
    """Why trusted code stopped with `e`: the exception, and the last line of trusted code it
    went through (`sources`: file name -> source), e.g. "tests failed: AssertionError at <tests>
    line 3: assert f(2) == 4", "tests raised NameError: name 'g' is not defined at ..."; an
    exception the candidate raised in a call says so."""
    where = ""
    tb = e.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename in sources:
            lines = sources[filename].splitlines()
            line = lines[tb.tb_lineno - 1].strip() if 0 < tb.tb_lineno <= len(lines) else ""
            where = f" at {filename} line {tb.tb_lineno}: {line[:200]}"
        tb = tb.tb_next
    try:
        message = str(e)[:500]
    except Exception:
        message = ""
    kind = type(e).__name__ + (f": {message}" if message else "")
    caller = getattr(e, "sandbox_callee", None)
    if type(caller) is str:
        kind += f" (raised by the candidate's {caller})"
    head = "tests failed:" if isinstance(e, AssertionError) else "tests raised"
    return f"{head} {kind}{where}"


def status_of_exception(e: BaseException) -> str:
    """Status of a run whose tests stopped with `e` (AssertionError: the tests failed)."""
    if isinstance(e, AssertionError):
        return "failed"
    if isinstance(e, MemoryError):
        return "memory"
    return "error"


class CandidateGone(BaseException):
    """The candidate process closed its end (it exited or was killed). Not an Exception, like
    ProtocolError, so that a test's `except Exception` cannot take it for an answer."""


class ProtocolError(BaseException):
    """A message or value from the candidate that breaks the protocol."""


class Channel:
    """Line-delimited JSON over a pair of pipe fds, at most `limit` bytes a line."""

    def __init__(self, read_fd: int, write_fd: int, limit: int) -> None:
        self.read_fd, self.write_fd, self.limit = read_fd, write_fd, limit
        self.buffer = b""

    def send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self.write_fd, data) :]

    def receive(self) -> dict:
        while b"\n" not in self.buffer:
            if len(self.buffer) > self.limit:
                raise ProtocolError(f"message over {self.limit} bytes")
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                raise CandidateGone("the candidate process ended")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        if len(line) > self.limit:
            raise ProtocolError(f"message over {self.limit} bytes")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"malformed message: {e}") from None
        if type(message) is not dict:
            raise ProtocolError("malformed message")
        return message


class Candidate:
    """The harness's stand-in for a function of the candidate (its entry point or a helper the
    tests name): each call crosses to the candidate process and returns a freshly decoded
    built-in value (or raises)."""

    def __init__(self, channel: Channel, name: str) -> None:
        self._channel, self._name, self.__name__ = channel, name, name

    def __call__(self, *args: object, **kwargs: object) -> object:
        request = {
            "name": self._name,
            "args": encode(list(args)),
            "kwargs": [[k, encode(v)] for k, v in kwargs.items()],
        }
        self._channel.send(request)
        reply = self._channel.receive()
        if set(reply) == {"return"}:
            try:
                return decode(reply["return"])
            except (ValueError, TypeError, RecursionError) as e:  # TypeError: unhashable
                raise ProtocolError(f"malformed value: {e}") from None
        if set(reply) == {"raised"}:
            error = exception_from(reply["raised"])
            error.sandbox_callee = self._name  # for `failure_reason`
            raise error
        raise ProtocolError("malformed reply from the candidate")


# ---------------------------------------------------------------------------------------------
# Kernel layers (root)
# ---------------------------------------------------------------------------------------------


def _libc():
    import ctypes  # imported by main() early, while every path is readable

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    return libc, ctypes


def _check(rc: int, what: str, ctypes) -> None:
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _prctl(option: int, value: int) -> None:
    libc, ctypes = _libc()
    _check(libc.prctl(option, value, 0, 0, 0), f"prctl({option})", ctypes)


def _unescape(path: str) -> str:
    """/proc/self/mountinfo writes space, tab, newline and backslash as \\ooo."""
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _mounts():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            yield _unescape(fields[4]), fields[5].split(",")


def _expose(paths: list[str], libc, ctypes) -> None:
    """Mask every directory on the way to `paths` that others cannot traverse (e.g. /root, 0700)
    with an empty tmpfs, and bind only the next path component back into it."""
    for _ in range(32):
        blocked: dict[str, set[str]] = {}
        for path in paths:
            cur = "/"
            for name in [p for p in path.split("/") if p]:
                if not os.stat(cur).st_mode & 0o001:
                    blocked.setdefault(cur, set()).add(name)
                    break
                cur = os.path.join(cur, name)
        if not blocked:
            return
        top = min(blocked, key=lambda p: p.count("/"))
        fds = {n: os.open(os.path.join(top, n), os.O_PATH) for n in blocked[top]}
        flags = MS_NOSUID | MS_NODEV
        _check(libc.mount(b"tmpfs", top.encode(), b"tmpfs", flags, b"mode=0711,size=64k"),
               "mask " + top, ctypes)  # fmt: skip
        for name, fd in fds.items():
            dst = os.path.join(top, name)
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.mkdir(dst)
            else:
                open(dst, "w").close()
            source = f"/proc/self/fd/{fd}".encode()
            _check(libc.mount(source, dst.encode(), None, MS_BIND | MS_REC, None),
                   "bind " + dst, ctypes)  # fmt: skip
            os.close(fd)
    raise OSError("too many directories to expose")


def _join_cgroups(paths: list[str]) -> list[str]:
    """Move this process (and so every process it starts) into the run's cgroups."""
    for path in paths:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    return []  # the parent reports the layer: a failure to join ends the run here


def _unshare(is_root: bool) -> list[str]:
    """New namespaces for this process (network, mounts) and its next child (pids)."""
    libc, _ = _libc()
    clone_newns, clone_newuser, clone_newpid = 0x00020000, 0x10000000, 0x20000000
    clone_newnet = 0x40000000
    if is_root:
        if libc.unshare(clone_newns | clone_newnet | clone_newpid) == 0:
            return ["netns", "mountns", "pidns"]
    elif libc.unshare(clone_newuser | clone_newnet | clone_newpid) == 0:  # unprivileged userns
        return ["netns", "pidns"]
    return []  # e.g. a container without CAP_SYS_ADMIN: the other layers still apply


def _mount_fs(cfg: dict) -> None:
    """Everything read-only, the scratch dir a fresh tmpfs, /proc showing only this pid ns."""
    libc, ctypes = _libc()
    scratch = cfg["scratch"]
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private", ctypes)
    needed = {
        os.path.realpath(p)
        for p in sys.path + [sys.prefix, sys.base_prefix]
        if p and os.path.exists(p)
    }
    _expose(sorted(needed | {scratch}), libc, ctypes)
    for target, opts in list(_mounts()):
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for opt in opts:
            flags |= MOUNT_FLAGS.get(opt, 0)
        libc.mount(None, target.encode(), None, flags, None)  # some (e.g. /proc) may refuse
    uid = cfg["uid"]
    options = f"mode=0700,uid={uid},gid={uid},size={cfg['scratch_bytes']}"
    _check(libc.mount(b"tmpfs", scratch.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                      options.encode()), "scratch tmpfs", ctypes)  # fmt: skip
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    _check(libc.mount(b"proc", b"/proc", b"proc", flags, None), "mount /proc", ctypes)


def _limits(cfg: dict, max_processes: int) -> None:
    cpu = cfg["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # soft: SIGXCPU, hard: SIGKILL
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["max_files"], cfg["max_files"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))


def _become(uid: int) -> None:
    """Drop root for good: a fresh uid and gid, no groups (clears every capability)."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


# ---------------------------------------------------------------------------------------------
# The audit hook of the candidate process
# ---------------------------------------------------------------------------------------------


def audit_rule(scratch: str):
    """`rule(event, args) -> str`: why an audit event is refused in the candidate process, ""
    if it is allowed. Writes are allowed only inside `scratch` (a realpath); sockets, ctypes,
    starting programs, gc traversal, other threads' frames and replacing a function's code or
    defaults never. Everything the rule reads is bound here, in its closure and defaults, not in
    module globals that the candidate could rebind (the rule is reachable only through gc, which
    it refuses)."""
    prefix = scratch.rstrip("/") + "/"
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    writable = frozenset(("/dev/null", "/dev/stdout", "/dev/stderr"))
    path_events = tuple(  # (event, positions of the paths it modifies)
        {
            "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
            "os.link": (1,), "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,),
            "os.chown": (0,), "os.utime": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
            "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,),
            "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.move": (1,),
        }.items()
    )  # fmt: skip
    blocked = (
        "socket.", "ctypes.", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
        "os.forkpty", "pty.", "subprocess.", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "sys._current_frames", "sys._current_exceptions",
        "sys.remote_exec", "cpython.remove_audit_hook",
    )  # fmt: skip
    guarded_attributes = frozenset(("__code__", "__defaults__", "__kwdefaults__"))

    def outside(path, realpath=os.path.realpath, fspath=os.fspath, isinstance=isinstance):
        if isinstance(path, int):
            return False  # an open file descriptor: no new path
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        path = realpath(path)
        return not (path == scratch or path.startswith(prefix))

    def rule(event, args, outside=outside, len=len, dict=dict):
        if event == "open":
            path, flags = args[0], args[2]
            if flags & write_flags and path not in writable and outside(path):
                return f"no writes outside the scratch dir: {path!r}"
        elif event.startswith(blocked):
            return f"{event} is not allowed"
        elif event == "object.__setattr__" and args[1] in guarded_attributes:
            return f"replacing {args[1]} is not allowed"
        else:
            for name, positions in path_events:
                if event == name:
                    for i in positions:
                        if i < len(args) and outside(args[i]):
                            return f"{event} outside the scratch dir"
        return ""

    return rule


def _install_hook(scratch: str) -> None:
    """A hook Python offers no way to remove: a second line behind the kernel layers (and the
    only guard of writes and sockets where those are missing)."""

    rule = audit_rule(scratch)

    def hook(event, args, error=PermissionError):
        reason = rule(event, args)
        if reason:
            raise error("sandbox: " + reason)

    sys.addaudithook(hook)


# ---------------------------------------------------------------------------------------------
# The three processes
# ---------------------------------------------------------------------------------------------


def _forward(pid: int) -> None:
    """The outer process: wait for init and exit the same way."""
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else EXIT_SANDBOX)


def _run_candidate(cfg: dict, job: dict, layers: list[str], channel: Channel) -> None:
    """The candidate process: set up, report the layers, run the code, serve calls; never
    returns. Nothing that proves success is reachable from here."""
    exit_now = os._exit
    try:
        _limits(cfg, cfg["max_processes"])
        layers.append("rlimits")
        if cfg["uid"] is not None:
            _become(cfg["uid"])
            layers.append("uid")
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))  # after the uid switch, which clears it
        _prctl(PR_SET_NO_NEW_PRIVS, 1)  # no setuid binaries
        if cfg["use_audit_hook"]:
            _install_hook(os.path.realpath(cfg["scratch"]))
            layers.append("audit")
        channel.send({"layers": layers})
    except BaseException:
        traceback.print_exc()
        exit_now(EXIT_SANDBOX)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    source, entry_point = job["code"], job["entry_point"]
    del cfg, job
    try:
        exec(compile(source, "<sandbox>", "exec"), namespace)  # compiled under the limits
        names = [k for k, v in namespace.items() if type(k) is str and callable(v)]
        _flush()  # the run may end as soon as the harness has its answer
        channel.send({"ready": True, "callables": names})
        while True:
            try:
                request = channel.receive()
            except CandidateGone:
                break  # the harness is done
            try:
                function = namespace[request.get("name", entry_point)]
                args = decode(request["args"])
                kwargs = {k: decode(v) for k, v in request["kwargs"]}
                reply = {"return": encode(function(*args, **kwargs))}
            except Exception as e:
                traceback.print_exc()
                reply = {"raised": [type(e).__name__, str(e)[:1000]]}
            _flush()
            channel.send(reply)
        exit_code = EXIT_OK
    except BaseException as e:
        try:
            traceback.print_exc()
            _flush()
            channel.send({"raised": [type(e).__name__, str(e)[:1000]]})
        except BaseException:
            pass
        exit_code = 1
    _flush()
    exit_now(exit_code)  # skips atexit handlers the code may have registered


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _candidate_status(pid: int) -> tuple[str, str]:
    """Status of a run whose candidate process ended early, from its wait status, and why."""
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return "timeout", "the candidate process ran out of CPU time"
        return "killed", f"the candidate process was killed by signal {sig}"
    code = os.waitstatus_to_exitcode(status)
    if code == EXIT_CPU:
        return "timeout", "the candidate process ran out of CPU time"
    if code == EXIT_SANDBOX:
        return "sandbox_error", "the candidate process could not be set up"
    return "error", f"the candidate process exited (code {code}) before the tests were done"


def _callables(message: dict) -> set[str]:
    """The candidate's callables from its "ready" message (hostile input: checked)."""
    names = message.get("callables", [])
    if type(names) is not list or any(type(name) is not str for name in names):
        raise ProtocolError("malformed list of callables")
    return set(names)


def _harness(cfg: dict, job: dict, channel: Channel, candidate_pid: int) -> dict:
    """Run the trusted tests against the candidate; the verdict."""
    layers: list = []
    try:
        message = channel.receive()
        layers = message["layers"]  # written before any untrusted code ran
        message = channel.receive()
        callables = _callables(message) if set(message) <= {"ready", "callables"} else set()
    except CandidateGone:
        status, reason = _candidate_status(candidate_pid)
        return {"status": status, "layers": [], "reason": reason}
    except ProtocolError as e:
        return {"status": "error", "layers": layers, "reason": f"protocol error: {e}"}
    if not message.get("ready"):  # the code raised while loading
        raised = message.get("raised")
        e = exception_from(raised)
        is_named = type(raised) is list and len(raised) == 2 and type(raised[0]) is str
        name = raised[0][:100] if is_named else "?"
        reason = f"the code raised {name}: {str(e)[:500]}"  # SyntaxError: with its line
        return {"status": status_of_exception(e), "layers": layers, "reason": reason}
    entry_point = job["entry_point"]
    if entry_point and entry_point not in callables:
        reason = f"entry point not defined: the code defines no function {entry_point!r}"
        return {"status": "error", "layers": layers, "reason": reason}
    sources = {"<setup>": job["setup"] or "", "<tests>": job["tests"] or ""}
    namespace: dict = {"__name__": "__main__"}
    try:
        if job["setup"]:
            exec(compile(job["setup"], "<setup>", "exec"), namespace)
        if entry_point:
            namespace[entry_point] = Candidate(channel, entry_point)
        if job["tests"]:
            import builtins

            wanted = global_reads(job["tests"]) - set(namespace) - set(dir(builtins))
            declared = set(job.get("helpers") or ())  # the record's, never the candidate's
            for name in sorted(wanted & callables & declared):
                if not name.startswith("__"):
                    namespace[name] = Candidate(channel, name)  # a helper the tests name
            exec(compile(job["tests"], "<tests>", "exec"), namespace)
    except CandidateGone:
        status, reason = _candidate_status(candidate_pid)
        return {"status": status, "layers": layers, "reason": reason}
    except BaseException as e:
        try:
            traceback.print_exc()
        except BaseException:
            pass
        status, reason = status_of_exception(e), ""
        try:
            reason = failure_reason(e, sources)
        except BaseException:
            reason = f"tests stopped with {type(e).__name__}"
        return {"status": status, "layers": layers, "reason": reason}
    return {"status": "ok", "layers": layers, "reason": None}


def _init(cfg: dict, job: dict, layers: list[str]) -> None:
    """pid 1 of the run: mounts, the candidate process, then the harness; never returns."""
    exit_now, write, verdict_fd = os._exit, os.write, cfg["verdict_fd"]
    try:
        if "mountns" in layers:
            _mount_fs(cfg)
        os.chdir(cfg["scratch"])  # again: a tmpfs may now be mounted over it
        requests_read, requests_write = os.pipe()  # harness -> candidate
        replies_read, replies_write = os.pipe()  # candidate -> harness
        pid = os.fork()
        if pid == 0:
            os.close(verdict_fd)  # the candidate never holds the verdict
            os.close(requests_write)
            os.close(replies_read)
            limit = cfg["max_message_bytes"]
            _run_candidate(cfg, job, layers, Channel(requests_read, replies_write, limit))
        os.close(requests_read)
        os.close(replies_write)
        os.chdir("/")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full stderr must not kill the harness
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        # As pid 1 of a pid namespace this process ignores signals it has no handler for,
        # SIGXCPU included: without a handler the CPU limit would only act at the hard limit.
        signal.signal(signal.SIGXCPU, lambda *_: exit_now(EXIT_CPU))
        _limits(cfg, 4)
        if cfg["harness_uid"] is not None:
            _become(cfg["harness_uid"])
        _prctl(PR_SET_DUMPABLE, 0)  # no ptrace, no /proc/1/mem or /proc/1/fd from the candidate
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        channel = Channel(replies_read, requests_write, cfg["max_message_bytes"])
    except BaseException:
        traceback.print_exc()
        exit_now(EXIT_SANDBOX)
    verdict = _harness(cfg, job, channel, pid)
    _flush()
    write(verdict_fd, json.dumps(verdict).encode())
    exit_now(STATUS_CODES[verdict["status"]])


def main() -> None:
    cfg = json.loads(sys.argv[1])
    job = json.loads(sys.stdin.buffer.read())
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    is_root = os.geteuid() == 0
    try:
        _libc()
        layers = _join_cgroups(cfg["cgroup_procs"])
        layers += _unshare(is_root) if cfg["use_namespaces"] else []
        pid = os.fork()  # as root: the child is pid 1 of the new pid namespace
    except BaseException:
        traceback.print_exc()
        os._exit(EXIT_SANDBOX)
    if pid:
        del job
        os.close(cfg["verdict_fd"])  # only the harness holds it
        _prctl(PR_SET_DUMPABLE, 0)  # no ptrace from the run, whatever its uid
        _forward(pid)
    _init(cfg, job, layers)


if __name__ == "__main__":
    main()
