"""All queuekit errors, rooted in one exception, and the process exit codes.

Errors raised on the server and sent to a queuekit client travel as pickles, so every class here
keeps the default ``(message,)`` args: no custom ``__init__`` that would break unpickling.
Errors sent to *stock* ``BaseManager`` clients are builtin exceptions instead (they cannot import
this module); see ``server.CompatQueue``.
"""

from __future__ import annotations

import enum
import multiprocessing


class ExitCode(enum.IntEnum):
    """Process exit codes of every ``queuekit`` command (documented in docs/reference.md)."""

    OK = 0
    ERROR = 1  # unexpected failure
    USAGE = 2  # bad command line (argparse also uses 2)
    CONFIG = 3  # bad settings: authkey file, address, handler
    AUTH = 4  # the authkey did not match
    UNAVAILABLE = 5  # server unreachable, health check failed
    DATA = 6  # bad data directory or journal
    INPUT = 7  # bad input to `produce`


class QueuekitError(Exception):
    """Root of every error queuekit raises on purpose."""

    exit_code = ExitCode.ERROR


class ConfigError(QueuekitError):
    """Settings are invalid; the process cannot start."""

    exit_code = ExitCode.CONFIG


class AuthkeyFileError(ConfigError):
    """The authkey file is missing, unreadable, empty or too short."""


class AuthenticationFailed(QueuekitError, multiprocessing.AuthenticationError):
    """The server and this client do not share the same authkey. Never retried."""

    exit_code = ExitCode.AUTH


class TLSError(AuthenticationFailed):
    """TLS could not be set up with the peer: a certificate not trusted, expired or for another
    name, no client certificate where one is required, or TLS on one side only. The message names
    the cause and the setting to fix. Never retried (exit code AUTH)."""


class PermissionDenied(QueuekitError, PermissionError):
    """The key this client authenticated with does not grant the call (its role or queues)."""

    exit_code = ExitCode.AUTH


class ServerUnavailable(QueuekitError, ConnectionError):
    """The server could not be reached (or stayed unreachable) within the allowed time."""

    exit_code = ExitCode.UNAVAILABLE


class ServerShuttingDown(ServerUnavailable):
    """The server is draining for shutdown and takes no new work; retry after it restarts."""


class NotLeader(ServerUnavailable):
    """The server is a standby: another server holds the leadership of the shared PostgreSQL
    journal (or this one has just lost it). Nothing was done; clients retry, trying their next
    address (``QUEUEKIT_SERVER=a:50000,b:50000``)."""


class PayloadError(QueuekitError, ValueError):
    """A task payload is not a JSON-compatible value. Nothing was enqueued."""


class PayloadTooLarge(PayloadError):
    """A task payload is larger than the configured maximum. Nothing was enqueued."""


class InvalidRequest(QueuekitError, ValueError):
    """A call had malformed arguments (bad queue name, bad batch size, wrong types)."""


class DataDirError(QueuekitError):
    """The data directory or its journal cannot be used. The server refuses to start."""

    exit_code = ExitCode.DATA


class InputError(QueuekitError):
    """Bad input to ``queuekit produce`` (the message names the line)."""

    exit_code = ExitCode.INPUT


class TaskError(QueuekitError):
    """Root of what waiting for a task's result can raise (``Queue.result``, ``Queue.call``)."""


class TaskDead(TaskError):
    """The task failed more than the server's max attempts and was dead-lettered (its last error
    is in the message); it has no result."""


class TaskCancelled(TaskError):
    """The task was cancelled (``cancel``) before it finished; it has no result."""


class ResultExpired(TaskError):
    """The server knows no such task: never created, or finished longer ago than the result store
    keeps (QUEUEKIT_RESULT_TTL / _MAX_COUNT / _MAX_BYTES evicted it)."""


class ResultTimeout(TaskError, TimeoutError):
    """The task did not finish within the time the caller waited; it may still finish later."""
