"""The worker runtime behind ``queuekit consume``.

One process consumes one queue with these threads:

- *fetcher*: leases tasks in batches (up to ``concurrency + prefetch`` held at once) and carries the
  acks of finished tasks on its next ``get_many``, so an ack costs no round trip of its own;
- *handlers* (``concurrency`` of them): call ``handler(payload)``; returning acks the task, raising
  nacks it (the server retries it with backoff, then dead-letters it);
- *heartbeat*: renews the leases of every task held (running or buffered) every ``lease/3`` s;
- *main*: waits for SIGTERM/SIGINT. Signal handlers only set flags.

Shutdown is two-phase: stop fetching, release the tasks not started (no attempt charged), let
running handlers finish within ``drain_timeout``, report their outcomes, exit 0. Handlers still
running at the deadline are nacked (they may have done part of their work). A second signal exits
at once; the server then redelivers whatever this process held when its leases expire.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from . import logs
from .client import Client, Queue
from .errors import AuthenticationFailed, ConfigError, ExitCode, QueuekitError, ServerUnavailable
from .message import Task

MAX_SLICE = 64  # most tasks a handler thread takes from the buffer at once
SLICE_BELOW_SECONDS = 0.001  # ...when tasks take less than this on average
FETCH_WAIT = 1.0  # server-side wait per get when this worker is idle: bounds the start of a drain
BUSY_FETCH_WAIT = 0.05  # ...while handlers run: their acks ride on the next get, so keep it short
_log = logs.get("consumer")


def load_handler(spec: str) -> Callable[[Any], Any]:
    """Import ``pkg.module:function`` (attribute paths like ``mod:Class.method`` work too)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"handler must look like pkg.module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # so a handler module next to you works without PYTHONPATH
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(f"cannot import handler module {module_name!r}: {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"handler {spec!r}: {module_name} has no attribute {attr!r}") from None
    if not callable(target):
        raise ConfigError(f"handler {spec!r} is not callable")
    return target


class Worker:
    def __init__(
        self,
        client: Client,
        queue: str,
        handler: Callable[[Any], Any],
        *,
        concurrency: int = 1,
        prefetch: int = 2,
        lease: float = 30.0,
        drain_timeout: float = 25.0,
    ):
        self.client = client
        self.queue: Queue = client.queue(queue)
        self.handler = handler
        self.concurrency = concurrency
        self.capacity = concurrency + prefetch
        self.lease = lease
        self.drain_timeout = drain_timeout
        self._cond = threading.Condition()
        self._buffer: deque[Task] = deque()
        self._running: dict[tuple[int, int], Task] = {}
        self._acks: list[Task] = []
        self._nacks: list[tuple[Task, float | None, str]] = []
        self._task_seconds = 1.0  # assume slow until measured
        self._unstarted: list[Task] = []  # taken by a handler thread when the drain began
        self._stop = threading.Event()  # set by signals: stop fetching and drain
        self._draining = False  # handlers stop taking buffered tasks
        self._done = threading.Event()  # heartbeat stops
        self._fatal: BaseException | None = None
        self._signals = 0
        self.processed = 0
        self.failed = 0

    # -- life cycle -------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: object) -> None:
            self._signals += 1
            if self._signals > 1:
                os._exit(ExitCode.ERROR)  # second signal: no drain
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Consume until stopped; returns the exit code."""
        if not self._wait_for_server():
            return self._exit_code()
        _log.info(
            "consumer_started",
            queue=self.queue.name,
            server=self.client.address,
            pid=os.getpid(),
            concurrency=self.concurrency,
            capacity=self.capacity,
            lease=self.lease,
            drain_timeout=self.drain_timeout,
            handler=getattr(self.handler, "__qualname__", "?"),
        )
        handlers = [
            threading.Thread(target=self._handle_loop, name=f"handler-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        fetcher = threading.Thread(target=self._fetch_loop, name="fetcher", daemon=True)
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        for t in (*handlers, fetcher, heartbeat):
            t.start()
        while not self._stop.wait(0.5):
            pass
        return self._drain(fetcher, handlers)

    def _wait_for_server(self) -> bool:
        """Connect before anything else; a consumer may well start before its server."""
        while not self._stop.is_set():
            try:
                self.client.ping()
                return True
            except AuthenticationFailed as e:
                self._fatal = e
                _log.error("fatal", reason="authentication", error=str(e))
                return False
            except ServerUnavailable as e:
                _log.warning("server_unreachable", error=str(e))
        return False

    def _drain(self, fetcher: threading.Thread, handlers: list[threading.Thread]) -> int:
        started = time.monotonic()
        deadline = started + self.drain_timeout
        _log.info(
            "consumer_draining",
            running=len(self._running),
            buffered=len(self._buffer),
            drain_timeout=self.drain_timeout,
        )
        fetcher.join(timeout=FETCH_WAIT + self.client.call_timeout)
        with self._cond:
            self._draining = True
            unstarted = list(self._buffer)
            self._buffer.clear()
            self._cond.notify_all()
        released = self._report(lambda: self.queue.release(unstarted), "release") if unstarted else 0
        for t in handlers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._cond:
            late, self._unstarted = self._unstarted, []
        if late:
            released = (released or 0) + (self._report(lambda: self.queue.release(late), "release") or 0)
        with self._cond:
            overdue = list(self._running.values())
            self._nacks.extend((task, 0.0, "worker stopped: drain timeout exceeded") for task in overdue)
        self._flush_outcomes()
        self._done.set()
        code = self._exit_code()
        _log.info(
            "consumer_stopped",
            processed=self.processed,
            failed=self.failed,
            released=released or 0,
            abandoned=len(overdue),
            seconds=round(time.monotonic() - started, 3),
            exit_code=int(code),
        )
        return code

    def _exit_code(self) -> int:
        if self._fatal is None:
            return ExitCode.OK
        return getattr(self._fatal, "exit_code", ExitCode.ERROR)

    def _fail_fatally(self, e: BaseException) -> None:
        self._fatal = e
        _log.error("fatal", reason=type(e).__name__, error=str(e))
        self._stop.set()

    # -- threads ----------------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        refill_at = max(1, self.capacity // 2)
        backoff = 0.1
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set():
                    room = self.capacity - len(self._buffer) - len(self._running)
                    if room >= refill_at or (room > 0 and not self._buffer):
                        break
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                acks, self._acks = self._acks, []
                nacks, self._nacks = self._nacks, []
                # Outcomes of tasks still running will wait for the next get: do not park it long.
                wait = BUSY_FETCH_WAIT if self._running or self._buffer else FETCH_WAIT
            try:
                if nacks:
                    self.queue.nack_many(nacks)
                    nacks = []
                tasks = self.queue.get_many(room, wait, lease=self.lease, ack=acks)
                backoff = 0.1
            except AuthenticationFailed as e:
                self._fail_fatally(e)
                return
            except ServerUnavailable as e:
                _log.warning("server_unreachable", error=str(e))
                with self._cond:  # report them next time
                    self._acks[:0] = acks
                    self._nacks[:0] = nacks
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except QueuekitError as e:
                self._fail_fatally(e)
                return
            if tasks:
                with self._cond:
                    self._buffer.extend(tasks)
                    self._cond.notify_all()

    def _handle_loop(self) -> None:
        """Take a slice of the buffer per lock round (not one task: a lock round and a wake-up per
        task would cost more than a no-op handler), run it, report the outcomes in one round."""
        handler = self.handler
        cond = self._cond
        while True:
            with cond:
                while not self._buffer and not self._draining:
                    cond.wait()
                if self._draining:
                    return
                # Slow tasks are taken one by one so that no task waits behind another's slow work
                # while a handler thread is idle; fast ones in slices.
                share = (
                    1
                    if self._task_seconds > SLICE_BELOW_SECONDS
                    else max(1, min(MAX_SLICE, len(self._buffer) // self.concurrency))
                )
                tasks = [self._buffer.popleft() for _ in range(share)]
                for task in tasks:
                    self._running[task.receipt] = task
            done: list[Task] = []
            failed: list[tuple[Task, float | None, str]] = []
            unstarted: list[Task] = []
            started = time.monotonic()
            for i, task in enumerate(tasks):
                if self._draining:  # drain began: what this thread has not started goes back
                    unstarted = tasks[i:]
                    break
                try:
                    handler(task.payload)
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"
                    _log.error(
                        "task_failed",
                        queue=task.queue,
                        task=task.id,
                        attempts=task.attempts + 1,
                        error=error[:500],
                        traceback=traceback.format_exc(),
                    )
                    failed.append((task, None, error))
                else:
                    done.append(task)
            ran = len(done) + len(failed)
            if ran:  # moving average of one task's duration
                self._task_seconds += ((time.monotonic() - started) / ran - self._task_seconds) * 0.2
            with cond:
                for task in tasks:
                    del self._running[task.receipt]
                self._acks.extend(done)
                self._nacks.extend(failed)
                self._unstarted.extend(unstarted)
                self.processed += len(done)
                self.failed += len(failed)
                cond.notify_all()

    def _heartbeat_loop(self) -> None:
        interval = max(0.2, self.lease / 3)
        while not self._done.wait(interval):
            with self._cond:
                held = list(self._running.values()) + list(self._buffer)
            if not held:
                continue
            try:
                lost = set(self.queue.extend(held, self.lease))
            except ServerUnavailable as e:
                _log.warning("lease_renewal_failed", tasks=len(held), error=str(e))
                continue
            except QueuekitError as e:
                _log.error("lease_renewal_failed", tasks=len(held), error=str(e))
                continue
            if lost:
                with self._cond:
                    # A buffered task whose lease was lost belongs to someone else now: skip it.
                    self._buffer = deque(t for t in self._buffer if t.id not in lost)
                _log.warning("lease_lost", queue=self.queue.name, tasks=len(lost))

    # -- reporting --------------------------------------------------------------------------

    def _flush_outcomes(self) -> None:
        with self._cond:
            acks, self._acks = self._acks, []
            nacks, self._nacks = self._nacks, []
        if acks:
            self._report(lambda: self.queue.ack(acks), "ack")
        if nacks:
            self._report(lambda: self.queue.nack_many(nacks), "nack")

    def _report(self, call: Callable[[], Any], what: str) -> Any:
        try:
            return call()
        except QueuekitError as e:
            # The leases will expire and the server redeliver: at-least-once holds, we only lose time.
            _log.warning("report_failed", what=what, error=str(e))
            return None
