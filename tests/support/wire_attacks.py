"""Hostile pickles for the wire-safety tests: each would create a marker file (or build an object
by a call) if the process that unpickles it resolved globals. Shared by tests/unit/test_unpickle.py
and tests/process/test_wire_safety.py."""

from __future__ import annotations

import builtins
import os
import pickle
import pickletools
import struct
import subprocess

from hypothesis import strategies as st


class Gadget:
    """Pickles as ``func(*args)``: what an attacker's ``__reduce__`` makes the unpickler call."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def gadgets(marker: str) -> dict[str, Gadget]:
    """Objects that create ``marker`` when unpickled by a stock unpickler."""
    touch = f"touch {marker}"
    code = f"__import__('os').system({touch!r})"
    return {
        "os.system": Gadget(os.system, touch),
        "subprocess.Popen": Gadget(subprocess.Popen, ["touch", marker]),
        "builtins.eval": Gadget(builtins.eval, code),
        "builtins.exec": Gadget(builtins.exec, code),
    }


def _str0(text: str) -> bytes:
    return text.encode() + b"\n"


def raw_pickles(marker: str) -> dict[str, bytes]:
    """Hand-written pickles, one per object-building opcode (protocol 0 to 5)."""
    touch = f"touch {marker}".encode()
    su = b"\x8c" + bytes([len(touch)]) + touch  # SHORT_BINUNICODE
    return {
        "GLOBAL+REDUCE (protocol 0)": b"cos\nsystem\n(S'" + touch + b"'\ntR.",
        "STACK_GLOBAL+REDUCE": b"\x80\x04\x8c\x02os\x8c\x06system\x93" + su + b"\x85R.",
        "INST": b"(S'" + touch + b"'\nios\nsystem\n.",
        "OBJ": b"(cos\nsystem\nS'" + touch + b"'\no.",
        "NEWOBJ": b"\x80\x02cbuiltins\nobject\n)\x81.",
        "NEWOBJ_EX": b"\x80\x04\x8c\x08builtins\x8c\x06object\x93)}\x92.",
        "REDUCE without a global": b"\x80\x02N)R.",
        "BUILD on plain data": b"\x80\x02}}\x8c\x01a\x8c\x01bsb.",
        "PERSID": b"P" + touch + b"\n.",
        "BINPERSID": b"\x80\x02" + su + b"Q.",
        "EXT1": b"\x80\x02\x82\x01.",
        "EXT2": b"\x80\x02\x83\x01\x00.",
        "EXT4": b"\x80\x02\x84\x01\x00\x00\x00.",
        "NEXT_BUFFER": b"\x80\x05\x97.",
        "READONLY_BUFFER": b"\x80\x05\x97\x98.",
    }


def corpus(marker: str) -> dict[str, bytes]:
    """Every hostile message body: gadgets alone (every protocol), inside a request, and raw."""
    out = {}
    for name, gadget in gadgets(marker).items():
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            out[f"{name} protocol {protocol}"] = pickle.dumps(gadget, protocol)
        out[f"{name} in a request"] = pickle.dumps(("queuekit.v1", "put_many", ("q", [gadget], 0.0), {}))
    out.update(raw_pickles(marker))
    return out


def frame(body: bytes) -> bytes:
    return struct.pack("!i", len(body)) + body


def amplification_request(ident: str = "queuekit.v1", refs: int = 10_000, size: int = 23_000) -> bytes:
    """The issue's example: a put_many of one ``size``-char JSON text referenced ``refs`` times
    (pickle memo references): ~45 KB on the wire, ~230 MB of JSON text once expanded."""
    text = '"' + "x" * (size - 2) + '"'
    return pickle.dumps((ident, "put_many", ("amplified", [text] * refs, 0.0), {}), pickle.DEFAULT_PROTOCOL)


# -- fuzz: message bodies built from pickle opcodes (plain and dangerous), and random bytes --

_ATOMS = [
    b"N",
    b"\x88",
    b"\x89",
    b"K\x07",
    b"J\xff\xff\xff\x7f",
    b"\x8c\x03abc",
    b"C\x02hi",
    b"G@\t!\xfbTD-\x18",
    b"(",
    b"t",
    b")",
    b"]",
    b"}",
    b"e",
    b"u",
    b"\x85",
    b"\x86",
    b"\x87",
    b"l",
    b"a",
    b"s",
    b"\x94",
    b"h\x00",
    b"j\x00\x00\x00\x00",
    b"0",
    b"2",
    b"1",
    b"\x8f",
    b"\x90",
    b"\x91",
    b"\x95\x05\x00\x00\x00\x00\x00\x00\x00",
    # the dangerous ones
    b"cos\nsystem\n",
    b"\x8c\x02os\x8c\x06system\x93",
    b"cbuiltins\neval\n",
    b"R",
    b"b",
    b"\x81",
    b"\x92",
    b"o",
    b"ios\nsystem\n",
    b"Pid\n",
    b"Q",
    b"\x82\x01",
    b"\x97",
    b"\x98",
]
_random_pickles = st.builds(
    lambda proto, atoms: b"\x80" + bytes([proto]) + b"".join(atoms) + b".",
    st.integers(0, 5),
    st.lists(st.sampled_from(_ATOMS), max_size=40),
)
_opcode_soup = st.lists(
    st.one_of(st.sampled_from([op.code.encode("latin-1") for op in pickletools.opcodes]), st.binary(max_size=6)),
    max_size=30,
).map(b"".join)


def fuzz_bodies():
    """A hypothesis strategy of message bodies: opcode sequences, opcode soup, random bytes."""
    return st.one_of(_random_pickles, _opcode_soup, st.binary(max_size=300))
