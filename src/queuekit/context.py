"""What a handler knows about the task it runs: :class:`TaskContext` and :func:`current_task`.

A handler that takes two positional parameters gets the context as its second argument; any
handler (or code it calls, in the same thread) can call ``queuekit.current_task()`` instead.

The context is built lazily: the worker's handler thread only records which task it runs (one
attribute store per task, see :class:`Seat`), and the :class:`TaskContext` is made the first
time someone asks for it. A handler that never asks costs nothing more than before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from .errors import QueuekitError
from .message import Task

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class NoTaskContext(QueuekitError, RuntimeError):
    """``current_task()`` was called outside a queuekit handler (or in a thread the handler started)."""


class TaskHost:
    """What a context asks of whoever runs the task: the worker in its own process, or the
    parent of a process-pool child. The default (for tests and for children) cannot extend and
    sees no cancellation."""

    def extend(self, task: Task, seconds: float | None) -> bool:
        return False

    def is_cancelled(self, task_id: int) -> bool:
        return False


class TaskContext:
    """The task a handler runs. Read-only, except :meth:`extend`.

    ``attempt`` is 1 for the first delivery, 2 for the first retry, ...; ``delivery`` numbers the
    lease (it also grows on redeliveries after an expired lease, which charge no attempt).
    ``deadline`` is the wall-clock time (``time.time()`` scale) at which the worker gives up on
    this run (the task's timeout, else the consumer's ``--task-timeout``), None without one.
    """

    __slots__ = ("_task", "_host", "_deadline", "_headers")

    def __init__(self, task: Task, host: TaskHost, deadline: float | None):
        self._task = task
        self._host = host
        self._deadline = deadline
        headers = getattr(task, "headers", None)  # Task gains headers with the lifecycle wire
        self._headers = MappingProxyType(dict(headers)) if headers else _NO_HEADERS

    def __repr__(self) -> str:
        return f"TaskContext(queue={self.queue!r}, id={self.id}, attempt={self.attempt})"

    @property
    def task(self) -> Task:
        return self._task

    @property
    def id(self) -> int:
        return self._task.id

    @property
    def queue(self) -> str:
        return self._task.queue

    @property
    def attempt(self) -> int:
        return self._task.attempts + 1

    @property
    def delivery(self) -> int:
        return self._task.delivery

    @property
    def enqueued_at(self) -> float:
        return self._task.enqueued_at

    @property
    def deadline(self) -> float | None:
        return self._deadline

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def cancelled(self) -> bool:
        """True once ``cancel(id)`` reached this worker (on its next heartbeat). The handler may
        stop early; whatever it then returns or raises, the server records the task cancelled."""
        return self._host.is_cancelled(self._task.id)

    def extend(self, seconds: float | None = None) -> bool:
        """Renew this task's lease now (for ``seconds``, default the consumer's lease). The worker
        already renews the leases of running tasks on every heartbeat; this is for a handler that
        wants to be sure before a long step. It does NOT move the deadline: the timeout is a hard
        budget. Returns False if the lease was already lost (the task went to someone else)."""
        return self._host.extend(self._task, seconds)


class Seat:
    """One handler seat: what its thread runs now (``current`` is ``(task, monotonic start)`` or
    None, replaced in one store so that readers in other threads never see a torn pair) and the
    context made for that task, if anyone asked."""

    __slots__ = ("current", "_ctx", "_host", "_timeout_of")

    def __init__(self, host: TaskHost, timeout_of: Callable[[Task], float | None]):
        self.current: tuple[Task, float] | None = None
        self._ctx: TaskContext | None = None
        self._host = host
        self._timeout_of = timeout_of

    def context(self) -> TaskContext:
        current = self.current
        if current is None:
            raise NoTaskContext("queuekit.current_task() called outside a running handler")
        task, started = current
        ctx = self._ctx
        if ctx is None or ctx._task is not task:
            limit = self._timeout_of(task)
            # The deadline on the wall clock: the start measured on the monotonic clock, moved over.
            deadline = time.time() - (time.monotonic() - started) + limit if limit else None
            ctx = self._ctx = TaskContext(task, self._host, deadline)
        return ctx


_local = threading.local()


def bind_seat(seat: Seat | None) -> None:
    """Make ``seat`` the one :func:`current_task` reads in this thread (once per handler thread)."""
    _local.seat = seat


def current_task() -> TaskContext:
    """The context of the task the calling handler runs. Raises :class:`NoTaskContext` when
    called outside a handler, or from a thread other than the one queuekit called it in."""
    seat: Seat | None = getattr(_local, "seat", None)
    if seat is None:
        raise NoTaskContext(
            "queuekit.current_task() called outside a queuekit handler (it works in the thread the "
            "worker called the handler in; pass the context on to threads you start)"
        )
    return seat.context()


def takes_context(handler: Callable[..., Any]) -> bool:
    """True if ``handler`` takes the context as a second positional argument (decided once, at load)."""
    import inspect

    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: payload only
        return False
    # Two required positional parameters: (payload, ctx). One (or optional extras): payload only,
    # so that a handler with a defaulted second parameter keeps getting what it always got.
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2
