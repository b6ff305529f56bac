"""``queuekit consume --pool process``: each handler seat runs its tasks in a child process.

Why children: a thread cannot be killed in Python, so a handler that overruns its timeout in the
thread pool can only be abandoned; a child can be terminated (SIGTERM, then SIGKILL after a
grace) and replaced, which also frees the seat for real and gives CPU-bound handlers their own
interpreter (true parallelism).

Children are started with the ``spawn`` method: forking a process that already runs threads (the
fetcher, the heartbeat, other seats) can copy a lock held by another thread and deadlock the
child. A child imports the handler spec itself, tells its parent it is ready, then serves one task
at a time over a pipe:

    parent -> child   TaskMessage  (or None: exit)
    child -> parent   ("ok", value) | ("error", message, traceback) | ("extend", seconds)

A child whose parent dies exits too (it watches the parent's sentinel), so a SIGKILLed consumer
leaves no orphan running handlers.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import NamedTuple

from .context import Seat, TaskHost, bind_seat, takes_context
from .errors import ConfigError, QueuekitError
from .message import Task

START_TIMEOUT = 60.0  # seconds a child may take to import the handler and say it is ready
_mp = multiprocessing.get_context("spawn")


class TaskMessage(NamedTuple):
    """One task as sent to a child (the Task itself, plus what the child cannot know)."""

    task: Task
    timeout: float | None  # the effective timeout: the child computes the context's deadline from it


class ChildDied(QueuekitError):
    """The child process running a task exited (killed, crashed, or called os._exit)."""

    def __init__(self, message: str, exitcode: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class Child:
    """The parent's handle on one child process. Used by one handler thread, except
    :meth:`terminate`/:meth:`kill`, which the monitor may call at any time."""

    def __init__(self, spec: str, max_result_bytes: int):
        self.spec = spec
        parent_end, child_end = _mp.Pipe()
        self.process = _mp.Process(
            target=child_main, args=(spec, child_end, max_result_bytes), name="queuekit-handler", daemon=True
        )
        self.process.start()
        child_end.close()
        self.conn = parent_end
        if not parent_end.poll(START_TIMEOUT):
            self.kill()
            raise ConfigError(f"handler child for {spec!r} did not start within {START_TIMEOUT:g} s")
        try:
            hello = parent_end.recv()
        except (EOFError, OSError):
            self.process.join(5)
            raise ConfigError(
                f"handler child for {spec!r} exited while starting ({describe_exit(self.process.exitcode)})"
            ) from None
        if hello[0] != "ready":
            self.process.join(5)
            raise ConfigError(f"handler child cannot load {spec!r}: {hello[1]}")

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def run(self, message: TaskMessage, on_extend: Callable[[float | None], None]) -> tuple:
        """Send one task, wait for its outcome. Raises :class:`ChildDied` if the child exits first."""
        try:
            self.conn.send(message)
            while True:
                reply = self.conn.recv()
                if reply[0] != "extend":
                    return reply
                on_extend(reply[1])
        except (EOFError, OSError):
            self.process.join(5)
            code = self.process.exitcode
            raise ChildDied(f"handler child pid {self.pid} died ({describe_exit(code)})", code) from None

    def terminate(self) -> None:
        if self.process.is_alive():
            self.process.terminate()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the child to exit between tasks; kill it if it does not within ``timeout``."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.kill()
            self.process.join(5)
        self.conn.close()


# -- the child's side ----------------------------------------------------------------------------


class _ChildHost(TaskHost):
    """A child asks its parent to renew the lease (fire and forget: the parent holds the lease)."""

    def __init__(self, conn: multiprocessing.connection.Connection):
        self.conn = conn

    def extend(self, task: Task, seconds: float | None) -> bool:
        self.conn.send(("extend", seconds))
        return True


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)


def child_main(spec: str, conn: multiprocessing.connection.Connection, max_result_bytes: int) -> None:
    from .worker import check_result, load_handler  # the worker's own rules, in the child

    # SIGINT (Ctrl-C reaches the whole process group) is the parent's to handle: it drains.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    try:
        handler = load_handler(spec)
        with_ctx = takes_context(handler)
    except Exception as e:
        conn.send(("init_error", str(e)))
        return
    timeouts: dict[int, float | None] = {}
    seat = Seat(_ChildHost(conn), lambda task: timeouts.get(task.id))
    bind_seat(seat)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task, timeout = message
        timeouts.clear()
        timeouts[task.id] = timeout
        seat.current = (task, time.monotonic())
        try:
            value = handler(task.payload, seat.context()) if with_ctx else handler(task.payload)
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        else:
            problem = check_result(value, max_result_bytes)
            if problem is not None:
                conn.send(("error", problem, ""))
            else:
                try:
                    conn.send(("ok", value))
                except Exception as e:  # the value passed the JSON check, so this is unexpected
                    conn.send(("error", f"result cannot be sent to the worker: {type(e).__name__}: {e}", ""))
        finally:
            seat.current = None
