"""The sandbox child program's pure parts, in-process (llada_train/rl/sandbox_child.py): the
value encoding that crosses from the candidate to the harness, the error mapping, the audit
rule. The processes themselves are exercised by tests/test_sandbox.py."""

from __future__ import annotations

import json
import math
import os

import pytest

from llada_train.rl import sandbox, sandbox_child
from llada_train.rl.sandbox_child import (
    Candidate,
    Channel,
    ProtocolError,
    audit_rule,
    decode,
    encode,
    exception_from,
    failure_reason,
    global_reads,
    status_of_exception,
)


def test_the_child_source_is_this_module():
    with open(sandbox_child.__file__, encoding="utf-8") as f:
        assert sandbox.CHILD_SOURCE == f.read()
    assert sandbox.BOOTSTRAP_TAG == sandbox.CHILD_SOURCE.splitlines()[0]


@pytest.mark.parametrize(
    "value",
    [
        None, True, False, 0, -5, 10**40, "", "héllo\n", 1.5, -0.0, math.inf, 1e-300, 2 + 3j,
        b"\x00\xff", [], [1, [2, [3]]], (), (1, "a", (2.5,)), {1, 2}, frozenset({"x"}),
        {"a": 1, 2: [3], (1, 2): {"b": None}},
    ],
)  # fmt: skip
def test_round_trip_keeps_value_and_exact_type(value):
    wire = json.loads(json.dumps(encode(value)))  # what crosses the pipe
    back = decode(wire)
    assert back == value and type(back) is type(value)
    if isinstance(value, dict):
        assert [type(k) for k in back] == [type(k) for k in value]


def test_nan_round_trips():
    assert math.isnan(decode(json.loads(json.dumps(encode(math.nan)))))


class AlwaysEqual:
    def __eq__(self, other):
        return True


class FakeInt(int):
    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


@pytest.mark.parametrize(
    "value",
    [AlwaysEqual(), FakeInt(3), [FakeInt(3)], {"a": AlwaysEqual()}, (1, object()), len, iter([])],
)  # fmt: skip
def test_encode_refuses_anything_but_plain_builtins(value):
    with pytest.raises(TypeError):
        encode(value)


def test_encode_refuses_deep_nesting():
    deep: list = []
    for _ in range(sandbox_child.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(TypeError, match="deeply"):
        encode(deep)


@pytest.mark.parametrize(
    "wire",
    [
        {"tuple": "x"}, {"float": 1}, {"bytes": "zz"}, {"dict": [[1]]}, {"a": 1, "b": 2},
        {"object": []}, {"complex": ["1"]}, 1.5,
    ],
)  # fmt: skip
def test_decode_rejects_malformed_values(wire):
    with pytest.raises(ValueError):
        decode(wire)


@pytest.mark.parametrize(
    "raised, kind, message",
    [
        (["ValueError", "bad"], ValueError, "bad"),
        (["AssertionError", "x"], AssertionError, "x"),
        (["SystemExit", "0"], Exception, "SystemExit: 0"),  # never a BaseException
        (["KeyboardInterrupt", ""], Exception, "KeyboardInterrupt: "),
        (["MyError", "m"], Exception, "MyError: m"),
        (["UnicodeDecodeError", "u"], Exception, "UnicodeDecodeError: u"),  # 5-argument type
        ("junk", Exception, "candidate: malformed error report"),
    ],
)
def test_exception_from(raised, kind, message):
    e = exception_from(raised)
    assert type(e) is kind and str(e) == message


def test_status_of_exception():
    assert status_of_exception(AssertionError()) == "failed"
    assert status_of_exception(MemoryError()) == "memory"
    assert status_of_exception(ProtocolError()) == "error"
    assert status_of_exception(ValueError()) == "error"


def test_candidate_proxy_over_a_pipe():
    """The harness's proxy against a scripted candidate: calls go out encoded, replies come back
    as built-ins; a broken reply is a ProtocolError (not an Exception a test could catch)."""
    requests_read, requests_write = os.pipe()
    replies_read, replies_write = os.pipe()
    harness = Channel(replies_read, requests_write, limit=1 << 16)
    candidate = Channel(requests_read, replies_write, limit=1 << 16)
    proxy = Candidate(harness, "f")
    os.write(replies_write, b'{"return": {"tuple": [1, {"float": "2.5"}]}}\n')
    assert proxy([1], k=(2,)) == (1, 2.5)
    request = candidate.receive()
    assert decode(request["args"]) == [[1]] and request["kwargs"] == [["k", {"tuple": [2]}]]
    assert request["name"] == "f"  # the function to call: the entry point or a helper
    os.write(replies_write, b'{"raised": ["KeyError", "k"]}\n')
    with pytest.raises(KeyError) as raised:
        proxy()
    assert raised.value.sandbox_callee == "f"  # for the reason: raised by the candidate's f
    for reply in (b'{"return": {"set": [[1]]}}\n', b"[1]\n", b'{"x": 1}\n', b"{\n"):
        os.write(replies_write, reply)
        with pytest.raises(ProtocolError):
            proxy()
    for fd in (requests_read, requests_write, replies_read, replies_write):
        os.close(fd)


@pytest.mark.parametrize(
    "event, args, refused",
    [
        ("open", ("/tmp/x", "w", os.O_WRONLY | os.O_CREAT), True),
        ("open", ("/scratch/x", "w", os.O_WRONLY | os.O_CREAT), False),
        ("open", ("/scratch/../etc/x", "w", os.O_WRONLY), True),
        ("open", ("/etc/passwd", "r", os.O_RDONLY), False),
        ("open", ("/dev/null", "w", os.O_WRONLY), False),
        ("os.remove", ("/tmp/x", -1), True),
        ("os.rename", ("/scratch/a", "/tmp/b", -1, -1), True),
        ("os.mkdir", ("/scratch/d", 0o777, -1), False),
        ("socket.connect", (None, ("127.0.0.1", 80)), True),
        ("ctypes.dlopen", ("libc.so.6",), True),
        ("subprocess.Popen", ("ls", ["ls"], None, None), True),
        ("gc.get_objects", (None,), True),
        ("object.__setattr__", (len, "__code__", None), True),
        ("object.__setattr__", (object(), "x", 1), False),
        ("os.listdir", ("/",), False),
    ],
)
def test_audit_rule(event, args, refused):
    rule = audit_rule("/scratch")
    assert bool(rule(event, args)) == refused


def test_audit_rule_ignores_rebound_module_globals(monkeypatch):
    rule = audit_rule("/scratch")
    monkeypatch.setattr(sandbox_child, "os", None)
    assert rule("socket.connect", (None, None))
    assert rule("open", ("/tmp/x", "w", 1))


def test_global_reads():
    """The names the tests expect from elsewhere: read as globals somewhere, bound nowhere at
    module level; these (less the built-ins and the setup's names) may be the candidate's
    helpers."""
    tests = (
        "import math\nMETADATA = {}\n\n"
        "def check(candidate):\n"
        "    import random\n"
        "    global counter\n"
        "    counter = 1\n"
        "    assert math.fabs(poly(coeffs, candidate(1))) < 1e-4\n"
        "    assert [helper(i) for i in range(3)]\n"
        "    def inner():\n        return other + candidate\n"
        "    class K:\n        a = in_class\n"
        "late(1)\n"
        "def late(x):\n    return x\n"
        "check(find_zero)\n"
    )
    assert global_reads(tests) == {
        "poly", "coeffs", "helper", "other", "in_class", "find_zero", "range",
    }  # fmt: skip
    with pytest.raises(SyntaxError):
        global_reads("assert f(1) ==")


def _raise_in(source: str, filename: str, namespace: dict | None = None) -> BaseException:
    try:
        exec(compile(source, filename, "exec"), {} if namespace is None else namespace)
    except BaseException as e:
        return e
    raise AssertionError("no exception")


def test_failure_reason_names_the_line_of_the_tests():
    tests = "x = 1\nassert x == 1\nassert x == 2, 'two'\n"
    e = _raise_in(tests, "<tests>")
    assert failure_reason(e, {"<tests>": tests}) == (
        "tests failed: AssertionError: two at <tests> line 3: assert x == 2, 'two'"
    )
    setup = "def helper(x):\n    return 1 / x\n"
    namespace: dict = {}
    exec(compile(setup, "<setup>", "exec"), namespace)
    tests = "assert helper(1) == 1\nhelper(0)\n"
    e = _raise_in(tests, "<tests>", namespace)
    reason = failure_reason(e, {"<setup>": setup, "<tests>": tests})
    assert reason == (
        "tests raised ZeroDivisionError: division by zero at <setup> line 2: return 1 / x"
    )  # the deepest line of trusted code
    assert failure_reason(AssertionError(), {}) == "tests failed: AssertionError"
