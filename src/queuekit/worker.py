"""The worker runtime behind ``queuekit consume``.

One process consumes one queue, or several in strict priority order, with these threads:

- *fetcher*: leases tasks in batches (up to ``concurrency + prefetch`` held at once) and carries the
  acks (and handler results) of finished tasks on its next get, so an ack costs no round trip;
- *handlers* (``concurrency`` seats): call ``handler(payload)`` or ``handler(payload, ctx)``;
  returning acks the task (the return value becomes its result), raising nacks it (the server
  retries it with backoff, then dead-letters it). With ``pool="process"`` each seat's thread hands
  its tasks to a child process (:mod:`queuekit.pool`) instead of calling the handler itself;
- *heartbeat*: renews the leases of every task held (running or buffered) every ``lease/3`` s and
  learns which of them were cancelled;
- *monitor*: every 0.1 s ends runs past their timeout (thread pool: the seat's thread is abandoned
  and replaced, since a thread cannot be killed; process pool: the child is terminated, then
  killed, and replaced) and, about once a second, writes the health file the probes read;
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
from collections.abc import Callable, Sequence
from typing import Any

from . import logs, probe, tracing
from .client import Client
from .consumer_metrics import Recorder, consumer_info
from .context import Seat, TaskHost, bind_seat, takes_context
from .errors import (
    AuthenticationFailed,
    ConfigError,
    ExitCode,
    PayloadError,
    QueuekitError,
    ServerUnavailable,
)
from .message import Task, encode_result

MAX_SLICE = 64  # most tasks a handler thread takes from the buffer at once
SLICE_BELOW_SECONDS = 0.001  # ...when tasks take less than this on average
FETCH_WAIT = 1.0  # server-side wait per get when this worker is idle: bounds the start of a drain
BUSY_FETCH_WAIT = 0.05  # ...while handlers run: their acks ride on the next get, so keep it short
MONITOR_INTERVAL = 0.1  # how often timeouts are enforced (so a run ends at most this late)
HEALTH_INTERVAL = 1.0  # how often the health file is rewritten (probe.STALE_SECONDS >> this)
KILL_GRACE = 5.0  # process pool: SIGTERM, then SIGKILL if the child still runs this much later
READY_SLACK = 5.0  # a server call outstanding this long past its own wait: not ready
STUCK_MARGIN = 30.0  # a run this long past its timeout that nothing ended: the worker is stuck
TIMEOUT_ERROR = "timeout"  # the nack error of a run past its timeout (last_error, dead letters)
POOLS = ("thread", "process")
_log = logs.get("consumer")


def load_handler(spec: str) -> Callable[..., Any]:
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


def check_result(value: Any, max_bytes: int) -> str | None:
    """None if a handler's return value can be stored as the task's result, else why not (the
    error the task is nacked with: a result is never dropped silently). Checked here, per task,
    because one bad value would make the client refuse the whole get that carries the acks."""
    if value is None:
        return None
    try:
        encode_result(value, max_bytes)
    except PayloadError as e:
        return f"unencodable result: {e}"
    return None


class _Outcomes:
    """What one slice of tasks came to: acked (with results), or nacked with an error."""

    __slots__ = ("done", "results", "failed")

    def __init__(self) -> None:
        self.done: list[Task] = []
        self.results: dict[int, Any] = {}  # task id -> return value, for the tasks in done
        self.failed: list[tuple[Task, float | None, str]] = []

    def fail(self, task: Task, error: str, trace: str | None = None) -> None:
        _log.error(
            "task_failed",
            queue=task.queue,
            task=task.id,
            attempts=task.attempts + 1,
            error=error[:500],
            traceback=trace or None,
        )
        self.failed.append((task, None, error))


class _Seat(Seat):
    """A handler seat of the worker: its thread, the slice it works through (a deque both the
    thread and the monitor pop from, so each task is started by exactly one of them), and, in the
    process pool, its child."""

    __slots__ = ("name", "pending", "abandoned", "overrun", "child", "kill_at", "thread")

    def __init__(self, name: str, host: TaskHost, timeout_of: Callable[[Task], float | None]):
        super().__init__(host, timeout_of)
        self.name = name
        self.pending: deque[Task] = deque()
        self.abandoned: Task | None = None  # thread pool: the task this seat's thread overran on
        self.overrun: tuple[Task, str] | None = None  # process pool: (task, why) its child was ended for
        self.child: Any = None  # pool.Child
        self.kill_at = 0.0
        self.thread: threading.Thread | None = None


class Worker(TaskHost):
    def __init__(
        self,
        client: Client,
        queue: str | Sequence[str],
        handler: Callable[..., Any],
        *,
        concurrency: int = 1,
        prefetch: int = 2,
        lease: float = 30.0,
        drain_timeout: float = 25.0,
        task_timeout: float = 0.0,
        pool: str = "thread",
        handler_spec: str | None = None,
        health_file: str | None = None,
    ):
        if pool not in POOLS:
            raise ConfigError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
        if pool == "process" and not handler_spec:
            raise ConfigError("the process pool needs the handler as a pkg.module:function spec")
        self.client = client
        self.queue_names = [queue] if isinstance(queue, str) else list(queue)
        # One queue: its handle. Several: a set that takes from them in priority order in one get.
        self.queue: Any = client.queue(self.queue_names[0])
        if len(self.queue_names) > 1:
            self.queue = client.queues(self.queue_names)
        self.handler = handler
        self.handler_spec = handler_spec
        self.with_ctx = takes_context(handler)
        self.concurrency = concurrency
        self.capacity = concurrency + prefetch
        self.lease = lease
        self.drain_timeout = drain_timeout
        self.task_timeout = task_timeout  # 0: none (unless the task carries one)
        self.pool = pool
        self.health_file = health_file
        self._cond = threading.Condition()
        self._buffer: deque[Task] = deque()
        self._running: dict[tuple[int, int], Task] = {}
        self._acks: list[Task] = []
        self._results: dict[int, Any] = {}  # task id -> the handler's return value, sent with its ack
        self._nacks: list[tuple[Task, float | None, str]] = []
        self._cancelled: set[int] = set()  # ids held here that cancel() reached
        self._seats: list[_Seat] = []
        self._abandoned = 0  # thread pool: abandoned threads still running a handler
        self._task_seconds = 1.0  # assume slow until measured
        self._unstarted: list[Task] = []  # taken by a handler thread when the drain began
        self._stop = threading.Event()  # set by signals: stop fetching and drain
        self._draining = False  # handlers stop taking buffered tasks
        self._done = threading.Event()  # heartbeat and monitor stop
        self._fatal: BaseException | None = None
        self._signals = 0
        self._server_ok = False
        self._call_since: float | None = None  # a fetch call outstanding since (monotonic)
        self._call_wait = 0.0
        self._threads: list[threading.Thread] = []
        self.processed = 0
        self.failed = 0
        self.timed_out = 0
        self._max_result_bytes = 0  # the server's, learnt once connected
        # Handler durations, waits, outcomes, and this consumer's info: reported on the heartbeat.
        self.metrics = Recorder(self._report_info)

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
        if self.health_file:
            # Once here, before connecting: left to the monitor, the first write came a
            # MONITOR_INTERVAL after its start, later than consumer_started when the server answered
            # at once, and a probe run meanwhile found no health file.
            self._write_health(time.monotonic())
        monitor = threading.Thread(target=self._monitor_loop, name="monitor", daemon=True)
        monitor.start()  # first: the probes see a live (not yet ready) consumer while it connects
        try:
            if not self._wait_for_server():
                return self._exit_code()
            self._max_result_bytes = self.client.max_result_bytes
            _log.info(
                "consumer_started",
                queue=",".join(self.queue_names),
                server=self.client.address,
                pid=os.getpid(),
                pool=self.pool,
                concurrency=self.concurrency,
                capacity=self.capacity,
                lease=self.lease,
                task_timeout=self.task_timeout,
                drain_timeout=self.drain_timeout,
                handler=self.handler_spec or getattr(self.handler, "__qualname__", "?"),
                context=self.with_ctx,
            )
            for i in range(self.concurrency):
                self._start_seat(f"handler-{i}")
            fetcher = threading.Thread(target=self._fetch_loop, name="fetcher", daemon=True)
            heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
            self._threads = [fetcher, heartbeat]
            for t in self._threads:
                t.start()
            while not self._stop.wait(0.5):
                pass
            return self._drain(fetcher)
        finally:
            self._done.set()
            monitor.join(2)
            self._remove_health_file()

    def _start_seat(self, name: str) -> _Seat:
        seat = _Seat(name, self, self._timeout_of)
        if self.pool == "process":
            from .pool import Child

            assert self.handler_spec is not None
            seat.child = Child(self.handler_spec, self._max_result_bytes)
            _log.info("handler_child_started", seat=name, child_pid=seat.child.pid)
        seat.thread = threading.Thread(target=self._handle_loop, args=(seat,), name=name, daemon=True)
        with self._cond:
            self._seats.append(seat)
        seat.thread.start()
        return seat

    def _wait_for_server(self) -> bool:
        """Connect before anything else; a consumer may well start before its server."""
        while not self._stop.is_set():
            try:
                self.client.ping()
                self._server_ok = True
                return True
            except AuthenticationFailed as e:
                self._fatal = e
                _log.error("fatal", reason="authentication", error=str(e))
                return False
            except ServerUnavailable as e:
                _log.warning("server_unreachable", error=str(e))
        return False

    def _drain(self, fetcher: threading.Thread) -> int:
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
            seats = list(self._seats)
        released = self._report(lambda: self.queue.release(unstarted), "release") if unstarted else 0
        for seat in seats:
            if seat.thread is not None:
                seat.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._cond:
            late, self._unstarted = self._unstarted, []
        if late:
            released = (released or 0) + (self._report(lambda: self.queue.release(late), "release") or 0)
        with self._cond:
            overdue = list(self._running.values())
            self._nacks.extend((task, 0.0, "worker stopped: drain timeout exceeded") for task in overdue)
        self._flush_outcomes()
        self.metrics.send(self.client)  # the last handlers' numbers
        for seat in seats:
            if seat.child is not None:
                seat.child.stop()
        code = self._exit_code()
        _log.info(
            "consumer_stopped",
            processed=self.processed,
            failed=self.failed,
            timed_out=self.timed_out,
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

    # -- TaskHost: what a task's context asks of us -------------------------------------------

    def _timeout_of(self, task: Task) -> float | None:
        limit = getattr(task, "timeout", None)  # the task's own (given at put) wins
        return (limit if limit is not None else self.task_timeout) or None

    def is_cancelled(self, task_id: int) -> bool:
        return task_id in self._cancelled

    def extend(self, task: Task, seconds: float | None) -> bool:
        lost = self.client.queue(task.queue).extend([task], seconds or self.lease)
        return task.id not in lost

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
                results, self._results = self._results, {}
                nacks, self._nacks = self._nacks, []
                # Outcomes of tasks still running ride on the next get, so that get must not sit
                # parked on the server while they wait (a caller of call() would wait with them:
                # 53 ms median in bench row 17). Every seat busy: a task taken now could not start
                # anyway, so only poll, and wait here, where the handler's finish wakes us
                # (idle_poll below). A buffered task counts: a free seat is about to run it (the
                # get after a delivery goes out before the handler took the task). A seat free
                # with nothing to take: park briefly, so a new task starts at once.
                all_busy = len(self._running) + len(self._buffer) >= self.concurrency
                wait = 0.0 if all_busy else BUSY_FETCH_WAIT if self._running or self._buffer else FETCH_WAIT
            self._call_wait = wait
            self._call_since = time.monotonic()
            try:
                if nacks:
                    self.queue.nack_many(nacks)
                    nacks = []
                if results:
                    tasks = self.queue.get_many(room, wait, lease=self.lease, ack=acks, results=results)
                else:
                    tasks = self.queue.get_many(room, wait, lease=self.lease, ack=acks)
                backoff = 0.1
                self._server_ok = True
            except AuthenticationFailed as e:
                self._fail_fatally(e)
                return
            except ServerUnavailable as e:
                self._server_ok = False
                _log.warning("server_unreachable", error=str(e))
                with self._cond:  # report them next time
                    self._acks[:0] = acks
                    results.update(self._results)
                    self._results = results
                    self._nacks[:0] = nacks
                self._call_since = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except QueuekitError as e:
                self._fail_fatally(e)
                return
            finally:
                self._call_since = None
            if tasks:
                with self._cond:
                    self._buffer.extend(tasks)
                    self._cond.notify_all()
            elif not wait:
                self._idle_poll()

    def _idle_poll(self) -> None:
        """After a poll (get without a server-side wait) that found nothing while every seat is
        busy: wait here until a handler finished (its outcomes are then sent at once with the next
        get) or BUSY_FETCH_WAIT passed (the next poll), instead of in a parked get."""
        with self._cond:
            self._cond.wait_for(
                lambda: (
                    self._stop.is_set()
                    or bool(self._acks or self._nacks)
                    or len(self._running) + len(self._buffer) < self.concurrency
                ),
                BUSY_FETCH_WAIT,
            )

    def _handle_loop(self, seat: _Seat) -> None:
        """Take a slice of the buffer per lock round (not one task: a lock round and a wake-up per
        task would cost more than a no-op handler), run it, report the outcomes in one round."""
        bind_seat(seat)
        handler = self.handler
        with_ctx = self.with_ctx
        child = seat.child
        cond = self._cond
        pending = seat.pending
        monotonic = time.monotonic
        while True:
            with cond:
                while not self._buffer and not self._draining and seat.abandoned is None:
                    cond.wait()
                if self._draining or seat.abandoned is not None:
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
                pending.extend(tasks)
            out = _Outcomes()
            done = out.done
            unstarted: list[Task] = []
            started = monotonic()
            while True:
                try:
                    task = pending.popleft()  # the monitor may empty it: each task is run once
                except IndexError:
                    break
                if self._draining:  # drain began: what this thread has not started goes back
                    unstarted.append(task)
                    unstarted.extend(_take_all(pending))
                    break
                seat.current = (task, monotonic())
                begun = self.metrics.begin()
                if child is not None:
                    with tracing.process(task, out.failed):
                        child = self._run_in_child(seat, task, out)
                    self.metrics.end(task, begun, out.failed)
                    continue
                try:
                    with tracing.process(task, out.failed):
                        value = handler(task.payload, seat.context()) if with_ctx else handler(task.payload)
                except Exception as e:
                    out.fail(task, f"{type(e).__name__}: {e}", traceback.format_exc())
                else:
                    if value is None:
                        done.append(task)
                    else:
                        self._returned(task, value, out)
                self.metrics.end(task, begun, out.failed, seat.abandoned)
            seat.current = None
            failed, results = out.failed, out.results
            ran = len(done) + len(failed)
            if ran:  # moving average of one task's duration
                self._task_seconds += ((monotonic() - started) / ran - self._task_seconds) * 0.2
            with cond:
                abandoned = seat.abandoned
                if abandoned is not None:  # the monitor gave up on this thread: it nacked that task
                    self._abandoned -= 1
                    done = [t for t in done if t is not abandoned]
                    failed = [f for f in failed if f[0] is not abandoned]
                    results.pop(abandoned.id, None)
                    # Only what this thread ran: the rest of its slice went back to the buffer.
                    tasks = done + [f[0] for f in failed]
                    _log.warning("abandoned_handler_returned", seat=seat.name, task=abandoned.id)
                for task in tasks:
                    self._running.pop(task.receipt, None)
                self._acks.extend(done)
                if results:
                    self._results.update(results)
                self._nacks.extend(failed)
                self._unstarted.extend(unstarted)
                self.processed += len(done)
                self.failed += len(failed)
                if self._cancelled:
                    self._cancelled.difference_update(t.id for t in tasks)
                cond.notify_all()
                if abandoned is not None:
                    return

    def _returned(self, task: Task, value: Any, out: _Outcomes) -> None:
        """A handler returned ``value``: stored as the result with the ack, or, if it cannot be
        encoded, the task is nacked saying why."""
        problem = check_result(value, self._max_result_bytes)
        if problem is not None:
            out.fail(task, problem)
            return
        out.done.append(task)
        out.results[task.id] = value

    def _run_in_child(self, seat: _Seat, task: Task, out: _Outcomes) -> Any:
        """Process pool: run ``task`` in the seat's child; returns the child to use next (a new
        one if this one died or was ended)."""
        from .pool import ChildDied, TaskMessage

        child = seat.child
        try:
            reply = child.run(TaskMessage(task, self._timeout_of(task)), lambda s: self._extend_quietly(task, s))
        except ChildDied as e:
            with self._cond:
                overrun, seat.overrun = seat.overrun, None
            if overrun is not None and overrun[0] is task and overrun[1] == "cancelled":
                out.done.append(task)  # reported as an ack: the server records it cancelled
            elif overrun is not None and overrun[0] is task:
                out.failed.append((task, None, TIMEOUT_ERROR))  # task_timeout was logged
            else:
                out.fail(task, f"{e} while running the task")
            return self._replace_child(seat, str(e))
        if reply[0] == "ok":
            if reply[1] is None:
                out.done.append(task)
            else:
                self._returned(task, reply[1], out)
        else:
            _, error, trace = reply
            out.fail(task, error, trace)
        return child

    def _replace_child(self, seat: _Seat, why: str) -> Any:
        from .pool import Child

        old = seat.child
        old.stop(0)
        if self._draining:  # no more tasks for this seat: no new child
            return old
        assert self.handler_spec is not None
        try:
            seat.child = Child(self.handler_spec, self._max_result_bytes)
        except QueuekitError as e:
            self._fail_fatally(e)
            seat.child = old
            return old
        _log.info("handler_child_replaced", seat=seat.name, old_pid=old.pid, child_pid=seat.child.pid, reason=why)
        return seat.child

    def _extend_quietly(self, task: Task, seconds: float | None) -> None:
        try:
            self.extend(task, seconds)
        except QueuekitError as e:
            _log.warning("lease_renewal_failed", tasks=1, error=str(e))

    @property
    def heartbeat_interval(self) -> float:
        return max(0.2, self.lease / 3)

    def _report_info(self) -> dict[str, Any]:
        """This consumer for the dashboard, sent with every heartbeat's metrics report."""
        with self._cond:
            in_flight = len(self._running) + len(self._buffer)
        return consumer_info(self.queue_names, self.concurrency, self.pool, in_flight, self.heartbeat_interval)

    def _heartbeat_loop(self) -> None:
        interval = self.heartbeat_interval
        while not self._done.wait(interval):
            self.metrics.send(self.client)
            with self._cond:
                held = list(self._running.values()) + list(self._buffer)
            if not held:
                continue
            try:
                answer = self.queue.heartbeat(held, self.lease)  # renews, and tells cancellations
                lost, cancelled = set(answer.lost), set(answer.cancelled)
                self._server_ok = True
            except ServerUnavailable as e:
                self._server_ok = False
                _log.warning("lease_renewal_failed", tasks=len(held), error=str(e))
                continue
            except QueuekitError as e:
                _log.error("lease_renewal_failed", tasks=len(held), error=str(e))
                continue
            if lost:
                with self._cond:
                    # A buffered task whose lease was lost belongs to someone else now: skip it.
                    self._buffer = deque(t for t in self._buffer if t.id not in lost)
                _log.warning("lease_lost", queue=",".join(self.queue_names), tasks=len(lost))
            if cancelled:
                self._on_cancelled(cancelled)

    def _on_cancelled(self, ids: set[int]) -> None:
        """Cancelled tasks: buffered ones are acked unstarted (the server records them cancelled),
        running ones see ``ctx.cancelled``; a process-pool child running one is ended."""
        with self._cond:
            # Remembered for running tasks only (cleared when they finish): bounded by the seats.
            self._cancelled |= {task.id for task in self._running.values() if task.id in ids}
            dropped = [t for t in self._buffer if t.id in ids]
            if dropped:
                self._buffer = deque(t for t in self._buffer if t.id not in ids)
                self._acks.extend(dropped)
                self._cond.notify_all()
            running = [(seat, seat.current) for seat in self._seats if seat.current and seat.current[0].id in ids]
        for task in dropped:
            _log.info("task_cancelled", queue=task.queue, task=task.id, where="buffered")
        for seat, current in running:
            task = current[0]
            _log.info("task_cancelled", queue=task.queue, task=task.id, where="running", pool=self.pool)
            if seat.child is not None:
                self._end_child(seat, current, "cancelled")

    def _monitor_loop(self) -> None:
        next_health = 0.0
        while not self._done.wait(MONITOR_INTERVAL):
            now = time.monotonic()
            try:
                self._enforce_timeouts(now)
                if self.health_file and now >= next_health:
                    next_health = now + HEALTH_INTERVAL
                    self._write_health(now)
            except Exception:  # keep watching; a dead monitor would leave the probe stale
                _log.error("monitor_error", exc_info=True)

    def _enforce_timeouts(self, now: float) -> None:
        with self._cond:
            seats = list(self._seats)
        for seat in seats:
            if seat.kill_at and now >= seat.kill_at and seat.child is not None:
                seat.kill_at = 0.0
                seat.child.kill()  # SIGTERM was not enough
            current = seat.current
            if current is None or seat.abandoned is not None or seat.overrun is not None:
                continue
            task, started = current
            limit = self._timeout_of(task)
            if limit and now - started > limit:
                if seat.child is not None:
                    self._end_child(seat, current, TIMEOUT_ERROR)
                else:
                    self._abandon(seat, current, limit)

    def _end_child(self, seat: _Seat, current: tuple[Task, float], why: str) -> None:
        """Process pool: terminate the child running ``current`` (its thread reports the outcome
        when it sees the child gone, and starts a new child)."""
        with self._cond:
            if seat.current is not current or seat.overrun is not None:
                return  # it finished meanwhile, or is being ended already
            seat.overrun = (current[0], why)
            seat.kill_at = time.monotonic() + KILL_GRACE
        task = current[0]
        if why == TIMEOUT_ERROR:
            self.timed_out += 1
            _log.warning(
                "task_timeout",
                queue=task.queue,
                task=task.id,
                attempts=task.attempts + 1,
                timeout=self._timeout_of(task),
                pool="process",
                child_pid=seat.child.pid,
            )
        seat.child.terminate()

    def _abandon(self, seat: _Seat, current: tuple[Task, float], limit: float) -> None:
        """Thread pool: a run past its timeout. The thread cannot be killed: nack the task now
        (its lease is no longer renewed), give the rest of the thread's slice to the others, and
        seat a fresh thread so the capacity stays."""
        task = current[0]
        with self._cond:
            if seat.current is not current or self._draining:
                return
            seat.abandoned = task
            self._seats.remove(seat)
            self._running.pop(task.receipt, None)
            rest = _take_all(seat.pending)
            for other in rest:
                self._running.pop(other.receipt, None)
            self._buffer.extendleft(reversed(rest))
            self.failed += 1
            self.timed_out += 1
            self._abandoned += 1
            # Logged before the nack is queued (the fetcher may send it at once): whoever sees the
            # server retry or dead-letter the task must find this line already written.
            _log.warning(
                "task_timeout",
                queue=task.queue,
                task=task.id,
                attempts=task.attempts + 1,
                timeout=limit,
                pool="thread",
                abandoned_threads=self._abandoned,
                concurrency=self.concurrency,
            )
            self._nacks.append((task, None, TIMEOUT_ERROR))
            self._cond.notify_all()
        self._start_seat(f"{seat.name.split('.')[0]}.{task.id}")

    # -- health -----------------------------------------------------------------------------

    def health(self, now: float | None = None) -> probe.ConsumerHealth:
        now = time.monotonic() if now is None else now
        why_not_live = ""
        with self._cond:
            abandoned = self._abandoned
            seats = list(self._seats)
        if abandoned >= self.concurrency:
            why_not_live = f"{abandoned} abandoned handler threads (timed out) >= concurrency {self.concurrency}"
        elif self._threads and not self._stop.is_set():
            dead = [t.name for t in self._threads if not t.is_alive()]
            dead += [s.name for s in seats if s.thread is not None and not s.thread.is_alive()]
            if dead:
                why_not_live = f"worker threads died: {', '.join(dead)}"
        if not why_not_live:
            for seat in seats:
                current = seat.current
                limit = self._timeout_of(current[0]) if current else None
                if current and limit and now - current[1] > limit + STUCK_MARGIN:
                    why_not_live = (
                        f"{seat.name} has run task {current[0].id} for {now - current[1]:.0f} s (timeout {limit:g} s)"
                    )
                    break
        since = self._call_since
        why_not_ready = ""
        if not self._server_ok:
            why_not_ready = "not connected to the server"
        elif since is not None and now - since > self._call_wait + READY_SLACK:
            why_not_ready = f"a call to the server has waited {now - since:.0f} s"
        elif self._stop.is_set():
            why_not_ready = "stopping"
        return probe.ConsumerHealth(
            pid=os.getpid(),
            written_at=time.time(),
            live=not why_not_live,
            ready=not why_not_ready,
            reason="; ".join(r for r in (why_not_live, why_not_ready) if r),
        )

    def _write_health(self, now: float) -> None:
        assert self.health_file is not None
        try:
            probe.write(self.health_file, self.health(now))
        except OSError as e:
            _log.warning("health_file_failed", path=self.health_file, error=str(e))
            self.health_file = None  # said once; the probes will report the missing file

    def _remove_health_file(self) -> None:
        if self.health_file:
            try:
                os.unlink(self.health_file)
            except OSError:
                pass

    # -- reporting --------------------------------------------------------------------------

    def _flush_outcomes(self) -> None:
        with self._cond:
            acks, self._acks = self._acks, []
            results, self._results = self._results, {}
            nacks, self._nacks = self._nacks, []
        by_queue: dict[str, list[Task]] = {}
        for task in acks:
            by_queue.setdefault(task.queue, []).append(task)
        for name, tasks in by_queue.items():
            queue = self.client.queue(name)
            plain = [t for t in tasks if t.id not in results]
            if plain:
                self._report(lambda q=queue, p=plain: q.ack(p), "ack")  # type: ignore[misc]
            for task in tasks:
                if task.id in results:
                    value = results[task.id]
                    self._report(lambda q=queue, t=task, v=value: q.ack(t, result=v), "ack")  # type: ignore[misc]
        if nacks:
            self._report(lambda: self.queue.nack_many(nacks), "nack")

    def _report(self, call: Callable[[], Any], what: str) -> Any:
        try:
            return call()
        except QueuekitError as e:
            # The leases will expire and the server redeliver: at-least-once holds, we only lose time.
            _log.warning("report_failed", what=what, error=str(e))
            return None


def _take_all(pending: deque[Task]) -> list[Task]:
    """Empty ``pending`` one popleft at a time: safe against another thread popping too."""
    out: list[Task] = []
    while True:
        try:
            out.append(pending.popleft())
        except IndexError:
            return out
