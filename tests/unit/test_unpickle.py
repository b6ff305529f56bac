"""Restricted unpickling (transport.decode_message for servers, decode_reply for clients): nothing
from the wire runs code, plain data still decodes, the reply types a client needs still decode,
and a request cannot expand far beyond its frame."""

import pickle
import pickletools
import queue
import time
from multiprocessing import managers
from multiprocessing.reduction import ForkingPickler

import pytest
from hypothesis import HealthCheck, given, settings

from queuekit import errors, journal, transport
from queuekit.message import validate_texts
from queuekit.transport import RequestTooExpanded, UnpicklingRefused, decode_message, decode_reply
from support.wire_attacks import amplification_request, corpus, fuzz_bodies, gadgets

DECODERS = [decode_message, decode_reply]
MARKER = "/nonexistent-dir/queuekit-pwned"  # created by `touch` only if a gadget ran
CORPUS = corpus(MARKER)
# What a refused or undecodable message may raise; anything else (or a return) is a bug.
DECODE_ERRORS = (UnpicklingRefused, pickle.UnpicklingError)  # UnpicklingRefused is one too


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a pickle from the wire ran code"


@pytest.mark.parametrize("decode", DECODERS, ids=["request", "reply"])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_pickle_is_refused(decode, name):
    with pytest.raises(UnpicklingRefused):
        decode(CORPUS[name])


@pytest.mark.parametrize("decode", DECODERS, ids=["request", "reply"])
def test_gadgets_run_nothing(decode, marker):
    for body in corpus(str(marker)).values():
        with pytest.raises(UnpicklingRefused):
            decode(body)
    # Sanity: the same bytes do create the marker under a stock unpickler (so the test can fail).
    pickle.loads(pickle.dumps(gadgets(str(marker))["os.system"]))
    assert marker.exists()
    marker.unlink()


def test_refusal_names_the_global_but_carries_no_payload():
    with pytest.raises(UnpicklingRefused, match=r"global posix\.system refused") as info:
        decode_message(CORPUS["os.system protocol 4"])
    assert "touch" not in str(info.value)
    assert info.value.reason == "unpickling"
    assert isinstance(info.value, errors.QueuekitError)


REQUESTS = [
    (transport.API_IDENT, "put_many", ("q", ['{"a":1}', "[1,2]", '"x"'], 0.0), {}),
    (transport.API_IDENT, "get_many", ("q", 100, 0.5, None, [1, 2, 3]), {}),
    (transport.API_IDENT, "ack_many", ("q", {1, 2}), {}),
    (transport.API_IDENT, "nack_many", ("q", [(1, 1, None, "boom"), (2, 3, 1.5, None)]), {}),
    (None, "accept_connection", ("worker",), {}),
    (None, "create", ("get_task_queue",), {}),
    (None, "incref", ("7f0-1",), {}),
    ("7f0-1", "put", ({"nested": [1, 2.5, None, True, {"k": "v"}], "b": b"\x00"},), {"block": False}),
    ("7f0-1", "put", ("x" * 5_000_000,), {}),  # one big string: in its frame once
    ("7f0-1", "put", ([str(i) * 10 for i in range(50_000)],), {}),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=range(len(REQUESTS)))
@pytest.mark.parametrize("protocol", [4, 5])  # pickle.DEFAULT_PROTOCOL on 3.11-3.13 and 3.14+
def test_plain_requests_decode_unchanged(request_, protocol):
    assert decode_message(pickle.dumps(request_, protocol)) == request_


def test_old_protocols_decode_when_they_need_no_global():
    """Protocols 0-3 spell a set (and 0-2 bytes) as a call of a global: refused like any global.
    Every client on Python 3 sends protocol 4 or 5, where these are opcodes."""
    plain = (transport.API_IDENT, "nack_many", ("q", [(1, 1, None, "boom"), (2, 3, 1.5, None)]), {"k": [True]})
    for protocol in range(4):
        assert decode_message(pickle.dumps(plain, protocol)) == plain
        with pytest.raises(UnpicklingRefused, match=r"builtin(s|__)\.set"):
            decode_message(pickle.dumps({1}, protocol))


def test_stock_manager_requests_name_no_global():
    """What a stock BaseManager client sends (create, accept_connection, incref/decref, a proxy's
    method call putting a dict/list/str) pickles without a single global."""
    token = managers.Token("get_task_queue", ("127.0.0.1", 1), "7f0-1")
    sent = [
        (None, "create", ("get_task_queue",), {}),
        (None, "accept_connection", ("Thread-1",), {}),
        (None, "incref", (token.id,), {}),
        (None, "decref", (token.id,), {}),
        (token.id, "put", ({"to": "a@example.org", "n": [1, 2]},), {}),
        (token.id, "put", (["a", 1],), {}),
        (token.id, "put", ("text",), {}),
        (token.id, "get", (), {}),
        (token.id, "qsize", (), {}),
    ]
    for request_ in sent:
        body = ForkingPickler.dumps(request_).tobytes()  # the stock serializer
        ops = {op.name for op, _, _ in pickletools.genops(body)}
        assert not ops & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "NEWOBJ", "INST", "OBJ"}, request_
        assert decode_message(body) == request_


def _raised(exc):
    return decode_reply(pickle.dumps(("#ERROR", exc)))[1]


@pytest.mark.parametrize("key", sorted(transport.REPLY_TYPES), ids=lambda k: ".".join(k))
def test_every_reply_type_decodes(key):
    cls = transport.REPLY_TYPES[key]
    if cls is managers.Token:
        token = managers.Token("get_task_queue", ("127.0.0.1", 5), "7f0-1")
        got = decode_reply(pickle.dumps(("#RETURN", (token, ["put", "get"]))))[1][0]
        assert (got.typeid, got.address, got.id) == (token.typeid, token.address, token.id)
        return
    exc = cls("utf-8", b"\xff", 0, 1, "bad") if cls is UnicodeDecodeError else None
    exc = cls("ascii", "\xff", 0, 1, "bad") if cls is UnicodeEncodeError else exc
    exc = exc if exc is not None else cls("boom")
    got = _raised(exc)
    assert type(got) is cls and got.args == exc.args


def test_reply_types_are_only_the_protocols():
    modules = {module for module, _ in transport.REPLY_TYPES}
    assert modules == {"builtins", "multiprocessing.managers", "_queue", "queue", "queuekit.errors", "queuekit.journal"}
    assert queue.Empty in transport.REPLY_TYPES.values() and journal.JournalError in transport.REPLY_TYPES.values()
    for (module, name), cls in transport.REPLY_TYPES.items():
        if module == "builtins":
            assert issubclass(cls, Exception), name  # no builtin function, no BaseException-only class


@pytest.mark.parametrize(
    "obj",
    [
        SystemExit(3),
        KeyboardInterrupt(),
        getattr,
        managers.RemoteError("x"),
        managers.Server,
        transport.Connection,
        queue.Queue,
    ],
    ids=repr,
)
def test_other_types_in_replies_are_refused(obj):
    with pytest.raises(UnpicklingRefused):
        decode_reply(pickle.dumps(("#RETURN", obj), 5))


def test_amplification_is_refused_in_milliseconds():
    body = amplification_request()
    assert len(body) < 100_000
    started = time.perf_counter()
    with pytest.raises(RequestTooExpanded) as info:
        decode_message(body)
    elapsed = time.perf_counter() - started
    assert info.value.reason == "amplification"
    assert elapsed < 0.05, f"refusal took {elapsed * 1000:.1f} ms"
    # What it would have cost: validating the expanded texts (the loop thread's time, per request).
    texts = pickle.loads(body)[2][1]
    started = time.perf_counter()
    validate_texts(texts, 1 << 20)
    assert time.perf_counter() - started > 10 * elapsed
    assert sum(map(len, texts)) > 200_000_000


def test_exponential_nesting_is_refused():
    inner = ["x" * 100]
    for _ in range(40):  # 2**40 references from a few hundred bytes
        inner = [inner, inner]
    body = pickle.dumps(("7f0-1", "put", (inner,), {}))
    assert len(body) < 1000
    with pytest.raises(RequestTooExpanded):
        decode_message(body)


def test_a_request_referencing_a_small_object_twice_is_fine():
    shared = {"k": "v" * 1000}
    request_ = ("7f0-1", "put", ([shared, shared, shared],), {})
    assert decode_message(pickle.dumps(request_)) == request_


def test_a_cycle_is_refused_not_walked_forever():
    loop = []
    loop.append(loop)
    with pytest.raises(RequestTooExpanded):
        decode_message(pickle.dumps(("7f0-1", "put", (loop,), {})))


# -- fuzz: random frames and random pickles against both decoders ---------------------------

_NEVER_DECODED = {
    "GLOBAL",
    "STACK_GLOBAL",
    "INST",
    "OBJ",
    "REDUCE",
    "BUILD",
    "NEWOBJ",
    "NEWOBJ_EX",
    "PERSID",
    "BINPERSID",
}


# No per-example deadline: a wall-clock limit on bodies of a few bytes measures how busy the
# machine is (a starved CI container took 47 s on one); what decoding costs is checked against
# the stock unpickler in the same run by the test below.
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_bodies())
def test_fuzz_decoders_refuse_or_fail_cleanly(body):
    for decode in DECODERS:
        try:
            decode(body)
        except DECODE_ERRORS:
            continue
        # It decoded: then it built nothing (the atoms' globals are in no allowlist).
        ops = {op.name for op, _, _ in pickletools.genops(body)}
        assert not ops & _NEVER_DECODED, f"{decode.__name__} decoded {body!r}"


def test_a_large_unframed_pickle_costs_about_what_the_stock_unpickler_costs():
    """Without FRAME opcodes a file-reading unpickler would make one Python call per opcode, and
    the refusal's opcode scan must not walk millions of opcodes: both stay near pickle.loads."""
    body = b"\x80\x04(" + b"K\x01" * 2_000_000 + b"N)R."  # fails at its very end
    timings = {}
    for name, decode in (("stock", pickle.loads), ("restricted", decode_message)):
        started = time.perf_counter()
        with pytest.raises((TypeError, pickle.UnpicklingError)):
            decode(body)
        timings[name] = time.perf_counter() - started
    assert timings["restricted"] < 3 * timings["stock"] + 0.05, timings
