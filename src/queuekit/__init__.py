"""queuekit: a reliable task queue on ``multiprocessing.managers``.

At-least-once delivery with leases and acks, retries with backoff and a dead-letter list, an
optional durable journal, batching, and a worker runtime with a graceful drain. The runtime uses
the Python standard library only.
"""

__version__ = "0.1.0"

from .client import Client, Queue, connect  # noqa: E402
from .context import NoTaskContext, TaskContext, current_task  # noqa: E402
from .errors import (  # noqa: E402
    AuthenticationFailed,
    ConfigError,
    PayloadError,
    PayloadTooLarge,
    PermissionDenied,
    QueuekitError,
    ServerUnavailable,
    TLSError,
)
from .message import Task  # noqa: E402

__all__ = [
    "__version__",
    "connect",
    "Client",
    "Queue",
    "Task",
    "TaskContext",
    "current_task",
    "NoTaskContext",
    "QueuekitError",
    "ConfigError",
    "AuthenticationFailed",
    "ServerUnavailable",
    "PayloadError",
    "PayloadTooLarge",
    "PermissionDenied",
    "TLSError",
]
