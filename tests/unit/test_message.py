import json
import math

import pytest

from queuekit import message
from queuekit.errors import InvalidRequest, PayloadError, PayloadTooLarge
from queuekit.message import Task, decode_payload, encode_payload, validate_texts

LIMIT = 1024 * 1024


@pytest.mark.parametrize(
    "value", [None, True, 0, -3, 1.5, "", "ünïcode ✓", [], {}, [1, [2, [3]]], {"a": {"b": [None, False, 2.25, "x"]}}]
)
def test_round_trip_is_exact(value):
    text = encode_payload(value, LIMIT)
    assert decode_payload(text) == value
    assert type(decode_payload(text)) is type(value)


@pytest.mark.parametrize(
    "value, message",
    [
        ((1, 2), "got tuple"),
        ({1: "int key"}, "keys must be str"),
        ({"a": {2: "nested int key"}}, "keys must be str"),
        ([b"bytes"], "got bytes"),
        ({1, 2}, "got set"),
        (object(), "got object"),
        (float("nan"), "not JSON-compatible"),
        ([math.inf], "not JSON-compatible"),
    ],
)
def test_lossy_or_foreign_values_are_refused(value, message):
    with pytest.raises(PayloadError, match=message):
        encode_payload(value, LIMIT)


def test_circular_structure_is_refused_not_a_crash():
    loop = []
    loop.append(loop)
    with pytest.raises(PayloadError):
        encode_payload(loop, LIMIT)


def test_size_limit_counts_encoded_utf8_bytes():
    assert encode_payload("a" * 98, 100)  # 100 bytes with the quotes
    with pytest.raises(PayloadTooLarge, match="101 bytes"):
        encode_payload("a" * 99, 100)
    with pytest.raises(PayloadTooLarge):
        encode_payload("é" * 50, 100)  # 2 bytes each: 102 encoded


def test_server_side_validation_names_the_bad_item():
    assert validate_texts(("1", '"x"'), LIMIT) == ["1", '"x"']
    with pytest.raises(PayloadError, match="payload 2 is not valid JSON"):
        validate_texts(["1", "2", "{'single': 'quotes'}"], LIMIT)
    with pytest.raises(PayloadError, match="payload 0 must be JSON text"):
        validate_texts([{"already": "decoded"}], LIMIT)
    with pytest.raises(PayloadError):
        validate_texts(["Infinity"], LIMIT)


def test_task_from_wire():
    task = Task.from_wire("q", (7, 2, 1, json.dumps({"k": "v"}), 123.0))
    assert task.payload == {"k": "v"} and task.receipt == (7, 2) and task.attempts == 1
    with pytest.raises(AttributeError):
        task.id = 8  # immutable
    batch = Task.many_from_wire("q", [(1, 1, 0, '{"a": [1, 2]}', 0.0), (2, 1, 0, '"x,y"', 0.0), (3, 1, 0, "null", 0.0)])
    assert [t.payload for t in batch] == [{"a": [1, 2]}, "x,y", None]


@pytest.mark.parametrize("text", ["1", " 1 ", '{"a": 1}', "[1, 2]\n", '"x"', "null", "-0.5e3"])
def test_server_accepts_any_single_json_value(text):
    assert validate_texts([text], LIMIT) == [text]


@pytest.mark.parametrize("text", ["1 2", "[1", '"a"x', "NaN", "-Infinity", "", " ", "{}{}", "[1,]", "'a'"])
def test_server_refuses_anything_but_one_json_value(text):
    with pytest.raises(PayloadError, match="not valid JSON"):
        validate_texts([text], LIMIT)


def test_queue_name_check_caches_good_names_only_and_stays_bounded(monkeypatch):
    monkeypatch.setattr(message, "_VALID_NAMES", set())
    monkeypatch.setattr(message, "_VALID_NAMES_MAX", 3)
    for name in ["a", "b", "c", "d", "a"]:
        assert message.check_queue_name(name) == name
    assert message._VALID_NAMES == {"a", "b", "c"}  # bounded: "d" was checked, not remembered
    assert message.check_queue_name("d") == "d"
    for bad in ["has space", ["a"], {"a": 1}, b"a", "-a"]:  # unhashable and look-alike names too
        with pytest.raises(InvalidRequest, match="invalid queue name"):
            message.check_queue_name(bad)
    assert message._VALID_NAMES == {"a", "b", "c"}
