"""Task payloads, queue names, and the records that cross the wire.

A payload is a JSON-compatible value: ``dict`` (with ``str`` keys), ``list``, ``str``, ``int``,
``float`` (finite), ``bool`` or ``None``. It travels and is stored as its compact JSON text, which
is also what the size limit counts. Lossy conversions that ``json.dumps`` would do silently (a
tuple becoming a list, an int key becoming a string, NaN) are refused instead, so what a consumer
gets back equals what the producer put.

Validation happens twice on purpose: the client encodes and checks strictly before sending (the
error is raised where the bad value was made), and the server checks every JSON text it receives
(a client may not be ours).
"""

from __future__ import annotations

import json
import json.encoder as _json_encoder
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from .errors import InvalidRequest, PayloadError, PayloadTooLarge

_SCALARS = (str, int, float, bool, type(None))


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON-compatible")


# The C encoder json.dumps builds on every call, built once: compact, no NaN, no ASCII escaping.
# No circular-reference markers: _check_tree has already walked every container (its depth
# limit catches cycles) before anything reaches the encoder.
_c_make_encoder = getattr(_json_encoder, "c_make_encoder", None)  # private, untyped: the C accelerator
_encode: Callable[[Any], str]
if _c_make_encoder is not None:
    _encode_chunks = _c_make_encoder(
        None, _refuse, _json_encoder.encode_basestring, None, ":", ",", False, False, False
    )

    def _encode_c(value: Any) -> str:
        return "".join(_encode_chunks(value, 0))

    _encode = _encode_c
else:  # pragma: no cover - CPython always has the C accelerator
    _encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _check_tree(value: Any, depth: int = 0) -> None:
    if depth > 200:
        raise PayloadError("payload nests deeper than 200 levels")
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise PayloadError(f"payload dict keys must be str, got {type(key).__name__} key {key!r}")
            if type(item) not in _SCALARS:
                _check_tree(item, depth + 1)
    elif kind is list:
        for item in value:
            if type(item) not in _SCALARS:
                _check_tree(item, depth + 1)
    elif kind not in _SCALARS:
        raise PayloadError(
            f"payload must be JSON-compatible (dict, list, str, int, float, bool, None); got {kind.__name__}"
        )


def encode_payload(value: Any, max_bytes: int) -> str:
    """Validate ``value`` strictly and return its compact JSON text. Raises :class:`PayloadError`."""
    if type(value) not in _SCALARS:
        _check_tree(value)
    try:
        text = _encode(value)
    except (ValueError, TypeError) as e:  # NaN/Infinity
        raise PayloadError(f"payload is not JSON-compatible: {e}") from None
    check_size(text, max_bytes)
    check_unicode(text, "payload")
    return text


def check_unicode(text: str, what: str) -> None:
    """``text`` must be encodable as UTF-8: a Python str may hold lone surrogates ("\\ud800"),
    which JSON parsing accepts but no journal can store (the commit would fail for every put in
    it). ``isascii`` is O(1) in CPython, so ASCII texts cost nothing."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PayloadError(
            f"{what} is not valid Unicode text: a lone surrogate {text[e.start]!a} at character {e.start}"
        ) from None


def printable_text(text: str) -> str:
    """``text`` made storable for diagnostics (an error message, a client's name): what is not
    valid UTF-8 (lone surrogates) is written as an escape instead of being refused."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_size(
    text: str, max_bytes: int, index: int | None = None, what: str = "payload", setting: str = "QUEUEKIT_MAX_TASK_BYTES"
) -> None:
    # A UTF-8 character is at most 4 bytes, so short texts need no encoding to be measured.
    if len(text) * 4 <= max_bytes:
        return
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        where = "" if index is None else f" {index}"
        raise PayloadTooLarge(f"{what}{where} is {size} bytes encoded; the limit is {max_bytes} ({setting})")


def encode_result(value: Any, max_bytes: int) -> str:
    """A handler's return value as JSON text (the payload rules), within QUEUEKIT_MAX_RESULT_BYTES.
    Raises :class:`PayloadError` / :class:`PayloadTooLarge` naming the result."""
    try:
        text = encode_payload(value, 1 << 62)  # the size is checked below, with the result's setting
    except PayloadError as e:
        raise PayloadError(f"result: {e}") from None
    check_size(text, max_bytes, what="result", setting="QUEUEKIT_MAX_RESULT_BYTES")
    return text


def validate_results(results: Any, max_bytes: int) -> dict[int, str] | None:
    """Server side: ``results`` of an ack, task id -> JSON text within the result limit."""
    if results is None:
        return None
    if type(results) is not dict:
        raise InvalidRequest(f"results must map task ids to JSON texts, got {type(results).__name__}")
    for task_id, text in results.items():
        if type(task_id) is not int:
            raise InvalidRequest(f"results must be keyed by task id (int), got {task_id!r}")
        if type(text) is not str:
            raise PayloadError(f"result of task {task_id} must be JSON text (str), got {type(text).__name__}")
        check_size(text, max_bytes, task_id, "result of task", "QUEUEKIT_MAX_RESULT_BYTES")
        check_unicode(text, f"result of task {task_id}")
        _check_json(text, f"result of task {task_id}")
    return results


# Task headers: small string metadata carried to the handler untouched (trace context,
# idempotency keys). Capped so they stay cheap to store with every task and send with every get.
MAX_HEADERS = 64
MAX_HEADER_NAME_CHARS = 128
MAX_HEADERS_BYTES = 8192
MAX_TASK_TIMEOUT = 7 * 86400.0  # a per-task timeout at put, seconds


def check_headers(headers: Any) -> dict[str, str] | None:
    """``headers`` as given to put (client and server): None, or a dict of str to str with at most
    MAX_HEADERS entries, names of 1..MAX_HEADER_NAME_CHARS characters and at most
    MAX_HEADERS_BYTES of names and values in UTF-8. Raises :class:`InvalidRequest`."""
    if headers is None:
        return None
    if type(headers) is not dict:
        raise InvalidRequest(f"headers must be a dict of str to str, got {type(headers).__name__}")
    if len(headers) > MAX_HEADERS:
        raise InvalidRequest(f"at most {MAX_HEADERS} headers per task, got {len(headers)}")
    size = 0
    for name, value in headers.items():
        if type(name) is not str or not 1 <= len(name) <= MAX_HEADER_NAME_CHARS:
            raise InvalidRequest(f"header names must be str of 1..{MAX_HEADER_NAME_CHARS} characters, got {name!r:.60}")
        if type(value) is not str:
            raise InvalidRequest(f"header {name!r} must have a str value, got {type(value).__name__}")
        check_unicode(name, "a header name")
        check_unicode(value, f"header {name!r}")
        size += len(name.encode("utf-8", "surrogatepass")) + len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_HEADERS_BYTES:
        raise InvalidRequest(f"headers are {size} bytes (names and values, UTF-8); the limit is {MAX_HEADERS_BYTES}")
    return headers or None


def check_task_timeout(timeout: Any) -> float | None:
    """A per-task timeout given at put: None (the consumer's default) or seconds in 0.001..7 days."""
    if timeout is None:
        return None
    if type(timeout) not in (int, float) or not 0.001 <= timeout <= MAX_TASK_TIMEOUT:
        raise InvalidRequest(
            f"timeout must be None or a number of seconds in 0.001..{MAX_TASK_TIMEOUT:g}, got {timeout!r}"
        )
    return float(timeout)


def validate_texts(texts: Any, max_bytes: int) -> list[str]:
    """Server side: every item must be a JSON text within the size limit. Returns them as a list."""
    if type(texts) not in (list, tuple):
        raise InvalidRequest(f"payloads must be a list of JSON texts, got {type(texts).__name__}")
    scan = _DECODER.scan_once  # type: ignore[attr-defined]  # the C scanner, untyped in typeshed
    for index, text in enumerate(texts):
        if type(text) is not str:
            raise PayloadError(f"payload {index} must be JSON text (str), got {type(text).__name__}")
        check_size(text, max_bytes, index)
        if not text.isascii():  # inlined: the ASCII case (most tasks) skips a call per task
            check_unicode(text, f"payload {index}")
        # Fast path: the C scanner on compact JSON (what queuekit clients send) must consume the
        # whole text. Anything else (surrounding whitespace, errors) takes the full decoder, which
        # accepts what JSON allows and words the error.
        try:
            if scan(text, 0)[1] == len(text):
                continue
        except (StopIteration, ValueError):
            pass
        _check_json(text, f"payload {index}")
    return list(texts)


def _check_json(text: str, what: str) -> None:
    try:
        _DECODER.decode(text)
    except ValueError as e:
        raise PayloadError(f"{what} is not valid JSON: {e}") from None


def decode_payload(text: str) -> Any:
    return _DECODER.decode(text)


# Names that passed the check: every call names a queue, and a set lookup is cheaper than the
# regular expression. Bounded, so a client inventing names cannot grow it without limit.
_VALID_NAMES: set[str] = set()
_VALID_NAMES_MAX = 4096


def check_queue_name(name: Any) -> str:
    if type(name) is str and name in _VALID_NAMES:
        return name
    if type(name) is not str or not QUEUE_NAME.fullmatch(name):
        raise InvalidRequest(
            f"invalid queue name {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ : - (starting alphanumeric)"
        )
    if len(_VALID_NAMES) < _VALID_NAMES_MAX:
        _VALID_NAMES.add(name)
    return name


class Delivery(NamedTuple):
    """One task in a ``get_many`` reply, as the broker leased it: ``payload`` is the JSON text.

    The broker builds it as a plain tuple in this field order (:data:`WireDelivery`), because
    that is what goes on the wire: a named tuple would pickle as a reference to this class, and
    building one costs about 0.6 µs more per task (a batched get spends about 3 µs per task on the
    server in all). Readers rebuild the record (``Delivery._make``) or unpack it in this order.
    """

    id: int
    delivery: int
    attempts: int
    payload: str
    enqueued_at: float


WireDelivery = tuple[int, int, int, str, float]  # a Delivery as a plain tuple


class NackItem(NamedTuple):
    """One item of a ``nack_many`` call. ``delay`` None: the server's backoff. Plain tuple on the wire."""

    id: int
    delivery: int
    delay: float | None
    error: str | None


# One task of a ``take`` reply (the get of clients that know headers, timeouts and several
# queues), a plain tuple: (queue, id, delivery, attempts, payload text, enqueued_at, headers, timeout).
TakeItem = tuple[str, int, int, int, str, float, Any, Any]


class Task(NamedTuple):
    """A task as a consumer holds it: leased until acked, nacked, released or the lease expires.

    Immutable (a named tuple: a consumer creates one per task, so creation cost matters).
    ``delivery`` numbers the lease this copy was handed out under; nack/extend/release quote it so
    that a stale copy (whose lease expired and which was redelivered elsewhere) cannot disturb the
    current holder. ``ack`` does not need it: finished work is finished, whoever reports it.
    ``headers`` and ``timeout`` are what the producer gave at put (None when it gave none).
    """

    queue: str
    id: int
    delivery: int
    attempts: int
    payload: Any
    enqueued_at: float
    headers: dict[str, str] | None = None
    timeout: float | None = None

    @classmethod
    def from_wire(cls, queue: str, item: tuple) -> Task:
        return cls.many_from_wire(queue, [item])[0]

    @staticmethod
    def many_from_wire(queue: str, items: list[tuple]) -> list[Task]:
        """Decode a ``get_many`` reply: :class:`Delivery` items (plain tuples on the wire).

        The server validated every text as one JSON value, so the batch decodes as one JSON array
        in a single call, much cheaper than a call per task.
        """
        if not items:
            return []
        payloads = _DECODER.decode("[" + ",".join(text for _, _, _, text, _ in items) + "]")
        if len(payloads) != len(items):  # only a server that skipped validation could cause this
            raise PayloadError("server sent a malformed batch of payloads")
        # Unpacked in Delivery's field order (cheaper than building a Delivery per task).
        return [
            Task(queue, task_id, delivery, attempts, payload, enqueued_at)
            for (task_id, delivery, attempts, _, enqueued_at), payload in zip(items, payloads, strict=True)
        ]

    @staticmethod
    def many_from_take(items: list[tuple]) -> list[Task]:
        """Decode a ``take`` reply (:data:`TakeItem` tuples), one JSON decode for the batch."""
        if not items:
            return []
        payloads = _DECODER.decode("[" + ",".join(item[4] for item in items) + "]")
        if len(payloads) != len(items):
            raise PayloadError("server sent a malformed batch of payloads")
        return [
            Task(queue, task_id, delivery, attempts, payload, enqueued_at, headers, timeout)
            for (queue, task_id, delivery, attempts, _, enqueued_at, headers, timeout), payload in zip(
                items, payloads, strict=True
            )
        ]

    @property
    def receipt(self) -> tuple[int, int]:
        return (self.id, self.delivery)


class Heartbeat(NamedTuple):
    """What ``heartbeat`` says about the tasks it renewed: ``lost`` (no longer ours: lease expired,
    redelivered, finished) and ``cancelled`` (still ours, but ``cancel(id)`` was called: stop the
    work and ack or nack it; either is recorded as cancelled)."""

    lost: list[int]
    cancelled: list[int]


# Task states as status() reports them.
TASK_STATES = ("ready", "delayed", "inflight", "succeeded", "failed", "dead", "cancelled", "unknown")


class TaskStatus(NamedTuple):
    """Where a task is in its life (``Queue.status``, ``queuekit status``, ``GET /tasks/<id>``).

    ``state``: ready, delayed, inflight, succeeded, failed (its last attempt failed and it will be
    retried), dead, cancelled, or unknown (never existed, or finished so long ago that the result
    store evicted it). Times are Unix seconds (None: not yet / not known). ``consumer``: the client
    name of the connection that holds or held it. Sent as a plain tuple in this field order.
    """

    id: int
    queue: str | None
    state: str
    attempts: int = 0
    last_error: str | None = None
    enqueued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    consumer: str | None = None
    has_result: bool = False
