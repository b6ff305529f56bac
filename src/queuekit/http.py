"""The server's HTTP side port: ``/healthz``, ``/readyz``, ``/metrics``, ``/stats``.

Counts only, never payloads. ``/stats`` is shaped for KEDA's ``metrics-api`` scaler:
``valueLocation: queues.<name>.ready``. Counters count since the server process started (they
do not continue from the journal after a restart; Prometheus' ``rate()`` handles the reset).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .settings import Address

GAUGES = (
    ("ready", "Tasks waiting to be delivered."),
    ("inflight", "Tasks leased to consumers and not yet acknowledged."),
    ("delayed", "Tasks waiting for their retry backoff to elapse."),
    ("dead", "Tasks in the dead-letter list."),
)
COUNTERS = (
    ("enqueued", "Tasks put since the server started."),
    ("acked", "Tasks acknowledged since the server started."),
    ("nacked", "Negative acknowledgements since the server started."),
    ("redelivered", "Leases that expired (task handed out again) since the server started."),
    ("dead_lettered", "Tasks moved to the dead-letter list since the server started."),
)


def render_metrics(stats: dict) -> str:
    """Prometheus text exposition format 0.0.4."""
    lines = []
    queues = stats["queues"]
    for name, help_text in GAUGES:
        metric = f"queuekit_tasks_{name}"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
        lines += [f'{metric}{{queue="{_label(q)}"}} {v[name]}' for q, v in sorted(queues.items())]
    for name, help_text in COUNTERS:
        metric = f"queuekit_tasks_{name}_total"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
        lines += [f'{metric}{{queue="{_label(q)}"}} {v[name]}' for q, v in sorted(queues.items())]
    lines += [
        "# HELP queuekit_gets_waiting Gets parked on the server until a task is ready.",
        "# TYPE queuekit_gets_waiting gauge",
    ]
    lines += [f'queuekit_gets_waiting{{queue="{_label(q)}"}} {v["waiting"]}' for q, v in sorted(queues.items())]
    lines += [
        "# HELP queuekit_connections Open client connections.",
        "# TYPE queuekit_connections gauge",
        f"queuekit_connections {stats['connections']}",
        "# HELP queuekit_durable 1 when tasks are journaled to disk.",
        "# TYPE queuekit_durable gauge",
        f"queuekit_durable {int(stats['durable'])}",
        "# HELP queuekit_journal_commits_total Journal transactions committed (group commits: many puts each).",
        "# TYPE queuekit_journal_commits_total counter",
        f"queuekit_journal_commits_total {stats['journal_commits']}",
        "# HELP queuekit_ready 1 when the server accepts work.",
        "# TYPE queuekit_ready gauge",
        f"queuekit_ready {int(stats['ready'])}",
        "# HELP queuekit_uptime_seconds Seconds since the server started.",
        "# TYPE queuekit_uptime_seconds gauge",
        f"queuekit_uptime_seconds {stats['uptime_seconds']}",
    ]
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def serve(address: Address, status: Any, get_stats: Callable[[], dict | None]) -> ThreadingHTTPServer:
    """Start the HTTP server in a daemon thread; ``status.ready`` and ``get_stats()`` feed it."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "queuekit"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, "text/plain", "ok\n")
            elif path == "/readyz":
                ready = status.ready
                self._send(200 if ready else 503, "text/plain", "ready\n" if ready else "not ready\n")
            elif path in ("/metrics", "/stats"):
                stats = get_stats()
                if stats is None:
                    self._send(503, "text/plain", "starting\n")
                elif path == "/metrics":
                    self._send(200, "text/plain; version=0.0.4; charset=utf-8", render_metrics(stats))
                else:
                    self._send(200, "application/json", json.dumps(stats, sort_keys=True) + "\n")
            else:
                self._send(404, "text/plain", "not found: try /healthz /readyz /metrics /stats\n")

        def _send(self, code: int, content_type: str, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not worth a log line each
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in address.host else socket.AF_INET

    httpd = Server(address.tuple(), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.25}, name="http", daemon=True).start()
    return httpd
