"""``queuekit`` command line: parses arguments and calls the modules that do the work."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from . import __version__, logs
from .errors import ConfigError, ExitCode, QueuekitError
from .settings import ClientSettings, ServerSettings, TunnelSettings, WorkerSettings, health_file_setting

if TYPE_CHECKING:  # the client is imported only by the commands that use it
    from .client import Client

_log = logs.get("cli")
WATCH_EVERY_INTERVAL = -1.0  # `stats --watch` without seconds: every --interval


def _client_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument(
        "--server",
        metavar="HOST:PORT[,HOST:PORT]",
        help="server address; several, comma-separated, are tried in turn (a leader and its standbys) "
        "(env QUEUEKIT_SERVER, default localhost:50000)",
    )
    g.add_argument(
        "--authkey-file",
        metavar="PATH",
        help="authkey file (env QUEUEKIT_AUTHKEY_FILE, default /run/secrets/queuekit_authkey)",
    )
    g.add_argument(
        "--connect-timeout",
        type=float,
        metavar="S",
        help="give up reaching the server after S seconds (env QUEUEKIT_CONNECT_TIMEOUT, default 30)",
    )
    g.add_argument(
        "--call-timeout",
        type=float,
        metavar="S",
        help="a call without a reply S seconds after the server's own wait is retried at the next address "
        "(env QUEUEKIT_CALL_TIMEOUT, default 10)",
    )
    g.add_argument(
        "--tls-ca-file",
        metavar="PATH",
        help="connect with TLS; the server's certificate must be signed by this CA (env QUEUEKIT_TLS_CA_FILE)",
    )
    g.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name the server's certificate must hold (env QUEUEKIT_TLS_SERVER_NAME, default the server's host)",
    )
    g.add_argument(
        "--tls-client-cert-file",
        metavar="PATH",
        help="client certificate for mutual TLS (env QUEUEKIT_TLS_CLIENT_CERT_FILE)",
    )
    g.add_argument(
        "--tls-client-key-file",
        metavar="PATH",
        help="the client certificate's key (env QUEUEKIT_TLS_CLIENT_KEY_FILE)",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="env QUEUEKIT_LOG_LEVEL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="queuekit", description="A reliable task queue on multiprocessing.managers.")
    parser.add_argument("--version", action="version", version=f"queuekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("server", help="run the queue server")
    p.add_argument("--bind", metavar="HOST:PORT", help="manager address (env QUEUEKIT_BIND, default 127.0.0.1:50000)")
    p.add_argument(
        "--http", metavar="HOST:PORT|off", help="health/metrics port (env QUEUEKIT_HTTP, default 127.0.0.1:8080)"
    )
    p.add_argument("--authkey-file", metavar="PATH", help="env QUEUEKIT_AUTHKEY_FILE")
    p.add_argument(
        "--keys-dir",
        metavar="DIR",
        help="key files <role>.<label> for producer/consumer/admin keys, re-read on SIGHUP and change "
        "(env QUEUEKIT_KEYS_DIR)",
    )
    p.add_argument(
        "--http-token-file",
        metavar="PATH",
        help="bearer token required for /metrics and /stats (env QUEUEKIT_HTTP_TOKEN_FILE, default none)",
    )
    p.add_argument(
        "--tls-cert-file",
        metavar="PATH",
        help="serve TLS with this PEM certificate chain, re-read on SIGHUP and change (env QUEUEKIT_TLS_CERT_FILE)",
    )
    p.add_argument("--tls-key-file", metavar="PATH", help="the certificate's PEM key (env QUEUEKIT_TLS_KEY_FILE)")
    p.add_argument(
        "--tls-client-ca-file",
        metavar="PATH",
        help="mutual TLS: clients must present a certificate from this CA (env QUEUEKIT_TLS_CLIENT_CA_FILE)",
    )
    p.add_argument(
        "--plaintext-bind",
        metavar="[HOST:]PORT",
        help="with TLS: a second listener WITHOUT TLS for stock clients, 127.0.0.1 unless a host is given; its "
        "traffic is not encrypted (env QUEUEKIT_PLAINTEXT_BIND, default off)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="journal directory; unset = memory only (env QUEUEKIT_DATA_DIR)")
    p.add_argument("--sync", choices=("full", "normal"), help="journal fsync mode (env QUEUEKIT_SYNC, default full)")
    p.add_argument(
        "--journal-url",
        metavar="URL",
        help="PostgreSQL journal instead of --data-dir: postgresql://USER@HOST:PORT/DB, without a password "
        "(env QUEUEKIT_JOURNAL_URL; needs queuekit[postgres])",
    )
    p.add_argument(
        "--journal-password-file",
        metavar="PATH",
        help="file holding the journal database's password (env QUEUEKIT_JOURNAL_PASSWORD_FILE)",
    )
    p.add_argument(
        "--leader-probe-interval",
        type=float,
        metavar="S",
        help="with --journal-url: seconds between the leader's heartbeats (env QUEUEKIT_LEADER_PROBE_INTERVAL, "
        "default 1)",
    )
    p.add_argument(
        "--leader-lease",
        type=float,
        metavar="S",
        help="with --journal-url: a leader serves until this long after its last heartbeat; a standby fences a "
        "leader silent for longer (env QUEUEKIT_LEADER_LEASE, default 5)",
    )
    p.add_argument("--max-task-bytes", type=int, metavar="N", help="env QUEUEKIT_MAX_TASK_BYTES (default 1048576)")
    p.add_argument("--max-attempts", type=int, metavar="N", help="failures before dead-lettering (default 5)")
    p.add_argument("--lease", type=float, metavar="S", help="default lease seconds (env QUEUEKIT_LEASE_SECONDS)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--check", action="store_true", help="probe a running server's /healthz and exit 0 if healthy")
    p.set_defaults(run=cmd_server)

    p = sub.add_parser("consume", help="run a worker that calls a handler for each task")
    p.add_argument("--handler", metavar="MODULE:FUNCTION", help="env QUEUEKIT_HANDLER")
    p.add_argument(
        "--queue",
        metavar="NAME[,NAME]",
        help="queue, or several in strict priority order, e.g. high,default,low (env QUEUEKIT_QUEUE, default tasks)",
    )
    p.add_argument("--concurrency", type=int, metavar="N", help="handler seats (env QUEUEKIT_CONCURRENCY, default 1)")
    p.add_argument("--prefetch", type=int, metavar="M", help="extra tasks held (env QUEUEKIT_PREFETCH, default 2xN)")
    p.add_argument("--lease", type=float, metavar="S", help="env QUEUEKIT_LEASE_SECONDS (default 30)")
    p.add_argument("--drain-timeout", type=float, metavar="S", help="env QUEUEKIT_DRAIN_TIMEOUT (default 25)")
    p.add_argument(
        "--task-timeout",
        type=float,
        metavar="S",
        help="a run past S seconds is ended and nacked with error timeout, unless the task has its own "
        "timeout; 0 = none (env QUEUEKIT_TASK_TIMEOUT, default 600)",
    )
    p.add_argument(
        "--pool",
        choices=("thread", "process"),
        help="run handlers in threads, or in child processes that can be killed at the timeout "
        "(env QUEUEKIT_POOL, default thread)",
    )
    p.add_argument(
        "--health-file",
        metavar="PATH",
        help="where the consumer writes its health for --probe (env QUEUEKIT_HEALTH_FILE, default none; "
        "the consumer image sets /tmp/queuekit-consumer.health)",
    )
    p.add_argument(
        "--probe",
        choices=("live", "ready"),
        help="exit 0 if the running consumer (its --health-file) is live: not stuck, or ready: connected",
    )
    p.add_argument("--check", action="store_true", help="exit 0 if the server is reachable and the key matches")
    _client_options(p)
    p.set_defaults(run=cmd_consume)

    p = sub.add_parser("check", help="exit 0 if the server is reachable and the key matches")
    _client_options(p)
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("produce", help="put JSON lines (or generated demo tasks) into a queue")
    p.add_argument("file", nargs="?", default="-", metavar="FILE|-", help="JSON lines, one task each (default stdin)")
    p.add_argument("--queue", metavar="NAME", help="env QUEUEKIT_QUEUE (default tasks)")
    p.add_argument("--batch", type=int, default=100, metavar="N", help="tasks per round trip (default 100)")
    p.add_argument("--generate", type=int, metavar="N", help='put N demo tasks {"n": i, "ms": MS} instead')
    p.add_argument("--task-ms", type=int, default=0, metavar="MS", help="work time in generated tasks")
    p.add_argument("--rate", type=float, metavar="R", help="at most R tasks per second")
    _client_options(p)
    p.set_defaults(run=cmd_produce)

    p = sub.add_parser("stats", help="show per-queue counts")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=WATCH_EVERY_INTERVAL,
        metavar="S",
        help="repeat until Ctrl-C (exit 0): redrawn in place on a terminal, one snapshot after another "
        "otherwise; every S seconds if given, else --interval",
    )
    p.add_argument("--interval", type=float, metavar="S", help="seconds between --watch snapshots (default 2)")
    p.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N snapshots")
    _client_options(p)
    p.set_defaults(run=cmd_stats)

    p = sub.add_parser("dead", help="inspect, requeue or purge dead letters")
    p.add_argument("action", choices=("list", "requeue", "purge"))
    p.add_argument("--queue", metavar="NAME", required=True)
    p.add_argument("--id", type=int, action="append", dest="ids", metavar="TASK_ID", help="only these tasks")
    p.add_argument("--limit", type=int, default=100, help="list at most this many")
    p.add_argument("--yes", action="store_true", help="confirm purging every dead task of the queue")
    _client_options(p)
    p.set_defaults(run=cmd_dead)

    # Task lifecycle by id (issue 13). Without --queue the server looks in every queue (a key
    # limited to queues must give it).
    for name, text in (
        ("status", "show where a task is in its life (JSON)"),
        ("cancel", "cancel a task: removed if waiting, flagged if in flight"),
        ("result", "wait for a task's result and print it (JSON)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("task_id", type=int, metavar="ID", help="the id put returned")
        p.add_argument("--queue", metavar="NAME", help="the task's queue (default: any)")
        if name == "result":
            p.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds (default: wait)")
        _client_options(p)
        p.set_defaults(run=cmd_task, task_command=name)

    p = sub.add_parser(
        "tunnel",
        help="plaintext on loopback, TLS to the server: for stock BaseManager clients",
        description="Accept plaintext connections on --listen and forward each, byte for byte, over TLS to "
        "--server (the clients' authkey handshake passes through, inside TLS). Runs until SIGTERM/SIGINT.",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="where stock clients connect, plaintext (env QUEUEKIT_TUNNEL_LISTEN, default 127.0.0.1:50000)",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow --listen on a non-loopback address: the listening side is plaintext, so tasks, results and "
        "queue names would cross that network in clear (only the authkey is never sent)",
    )
    p.add_argument("--server", metavar="HOST:PORT", help="the TLS queuekit server (env QUEUEKIT_SERVER)")
    p.add_argument(
        "--tls-ca-file",
        metavar="PATH",
        help="required: the server's certificate must be signed by this CA (env QUEUEKIT_TLS_CA_FILE)",
    )
    p.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name the server's certificate must hold (env QUEUEKIT_TLS_SERVER_NAME, default the server's host)",
    )
    p.add_argument(
        "--tls-client-cert-file",
        metavar="PATH",
        help="mutual TLS: client certificate (env QUEUEKIT_TLS_CLIENT_CERT_FILE)",
    )
    p.add_argument(
        "--tls-client-key-file", metavar="PATH", help="the client certificate's key (env QUEUEKIT_TLS_CLIENT_KEY_FILE)"
    )
    p.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="connections at once, more are closed (env QUEUEKIT_TUNNEL_MAX_CONNECTIONS, default 256)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        metavar="S",
        help="close a connection with no bytes either way for S seconds, 0 never "
        "(env QUEUEKIT_TUNNEL_IDLE_TIMEOUT, default 3600)",
    )
    p.add_argument(
        "--handshake-timeout",
        type=float,
        metavar="S",
        help="TCP connect + TLS handshake to the server (env QUEUEKIT_HANDSHAKE_TIMEOUT, default 10)",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="env QUEUEKIT_LOG_LEVEL")
    p.set_defaults(run=cmd_tunnel)

    p = sub.add_parser("keygen", help="print a new random authkey (32 bytes, hex)")
    p.set_defaults(run=cmd_keygen)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("run", "command")}
    try:
        logs.configure(flags.get("log_level") or _env_log_level(), fmt=logs.log_format())
        return int(args.run(flags))
    except QueuekitError as e:
        _log.error("fatal", command=args.command, exit_code=int(e.exit_code), error=str(e))
        return int(e.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.ERROR)


def _env_log_level() -> str:
    import os

    level = os.environ.get("QUEUEKIT_LOG_LEVEL", "info").strip().lower() or "info"
    return level if level in ("debug", "info", "warning", "error") else "info"


def _client(
    flags: dict, name: str, settings: ClientSettings | None = None, connect_timeout: float | None = None
) -> Client:
    from .client import Client

    s = settings or ClientSettings.load(flags)
    return Client(
        s.server,
        s.authkey,
        connect_timeout=connect_timeout or s.connect_timeout,
        call_timeout=s.call_timeout,
        name=name,
        authkey_source=f"key file {s.authkey_file}",
        tls_ca_file=s.tls_ca_file,
        tls_cert_file=s.tls_cert_file,
        tls_key_file=s.tls_key_file,
        tls_server_name=s.tls_server_name,
    )


def cmd_server(flags: dict) -> int:
    if flags.pop("check"):
        return _check_http(ServerSettings.load(flags, need_authkey=False))
    from . import app

    return app.run(ServerSettings.load(flags))


def _check_http(settings: ServerSettings) -> int:
    if settings.http is None:
        import socket

        try:
            socket.create_connection(("127.0.0.1", settings.bind.port), timeout=3).close()
            return ExitCode.OK
        except OSError:
            return ExitCode.UNAVAILABLE
    url = f"http://127.0.0.1:{settings.http.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return ExitCode.OK if r.status == 200 else ExitCode.UNAVAILABLE
    except (urllib.error.URLError, OSError) as e:
        print(f"queuekit: {url}: {e}", file=sys.stderr)
        return ExitCode.UNAVAILABLE


def cmd_check(flags: dict) -> int:
    settings = ClientSettings.load(flags)
    timeout = flags.get("connect_timeout") or 5.0
    with _client(flags, "check", settings, connect_timeout=timeout) as client:
        info = client.ping()
    print(f"ok server={settings.server} version={info.get('version')} durable={str(info.get('durable')).lower()}")
    return ExitCode.OK


def cmd_consume(flags: dict) -> int:
    if flags.pop("check"):
        return cmd_check(flags)
    if flags.get("probe"):
        return _probe_consumer(flags["probe"], health_file_setting(flags))
    import os
    import socket

    from .worker import Worker, load_handler

    settings = WorkerSettings.load(flags)
    handler = load_handler(settings.handler)
    client = _client(flags, f"consume@{socket.gethostname()}:{os.getpid()}", settings.client)
    worker = Worker(
        client,
        settings.queues,
        handler,
        concurrency=settings.concurrency,
        prefetch=settings.prefetch,
        lease=settings.lease_seconds,
        drain_timeout=settings.drain_timeout,
        task_timeout=settings.task_timeout,
        pool=settings.pool,
        handler_spec=settings.handler,
        health_file=settings.health_file,
    )
    worker.install_signal_handlers()
    try:
        return worker.run()
    finally:
        client.close()


def _probe_consumer(which: str, health_file: str | None) -> int:
    """``consume --probe live|ready``: read the running consumer's health file (never the server:
    liveness must not fail because the server is down)."""
    from . import probe

    if not health_file:
        raise ConfigError("--probe reads the consumer's health file: set QUEUEKIT_HEALTH_FILE (--health-file)")
    ok, message = probe.verdict(probe.read(health_file), which)
    print(message, file=sys.stdout if ok else sys.stderr)
    return ExitCode.OK if ok else ExitCode.UNAVAILABLE


def cmd_produce(flags: dict) -> int:
    import contextlib
    import os

    from . import tty
    from .produce import generate, produce, read_json_lines

    settings = ClientSettings.load(flags)
    queue_name = flags.get("queue") or os.environ.get("QUEUEKIT_QUEUE") or "tasks"
    if flags["batch"] < 1:
        raise QueuekitError("--batch must be >= 1")
    progress = tty.Progress(sys.stderr) if tty.is_terminal(sys.stderr) else None  # quiet unless a terminal
    with _client(flags, "producer", settings) as client, contextlib.ExitStack() as done:
        if progress is not None:
            done.callback(progress.close)
        queue = client.queue(queue_name)
        update = progress.update if progress is not None else None
        if flags.get("generate") is not None:
            items = generate(flags["generate"], flags["task_ms"])
            count = produce(queue, items, batch=flags["batch"], rate=flags.get("rate"), progress=update)
        else:
            source = flags["file"]
            stream = sys.stdin if source == "-" else open(source, encoding="utf-8")
            try:
                name = "stdin" if source == "-" else source
                count = produce(
                    queue,
                    read_json_lines(stream, name, client.max_task_bytes),
                    batch=flags["batch"],
                    rate=flags.get("rate"),
                    progress=update,
                )
            finally:
                if stream is not sys.stdin:
                    stream.close()
    print(f"produced={count} queue={queue_name}")
    return ExitCode.OK


def cmd_stats(flags: dict) -> int:
    from . import tty
    from .errors import ConfigError

    watch = flags.get("watch") is not None
    every = flags.get("watch")
    interval = every if every not in (None, WATCH_EVERY_INTERVAL) else flags.get("interval")
    interval = 2.0 if interval is None else interval
    count = flags.get("count")
    if interval <= 0 or (count is not None and count < 1):
        raise ConfigError("--watch/--interval must be > 0 seconds and --count >= 1")
    redraw = watch and not flags["json"] and tty.is_terminal(sys.stdout)
    shown = 0
    with _client(flags, "stats") as client:
        try:
            while True:
                stats = client.stats()
                if redraw:  # in place: home + clear, then the table and when it was taken
                    sys.stdout.write(tty.CLEAR_HOME)
                    print(f"queuekit stats every {interval:g} s, {time.strftime('%H:%M:%S')} (Ctrl-C to stop)\n")
                if flags["json"]:
                    print(json.dumps(stats, sort_keys=True))
                else:
                    _print_stats(stats)
                shown += 1
                if not watch or shown == count:
                    return ExitCode.OK
                if not redraw and not flags["json"]:
                    print()  # one snapshot after another, a blank line between
                sys.stdout.flush()
                time.sleep(interval)
        except KeyboardInterrupt:  # the way to end --watch: not an error
            return ExitCode.OK


def _print_stats(stats: dict) -> None:
    cols = ("ready", "inflight", "delayed", "dead", "enqueued", "acked", "nacked", "redelivered", "dead_lettered")
    rows = [("queue",) + cols] + [
        (name,) + tuple(str(v[c]) for c in cols) for name, v in sorted(stats["queues"].items())
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print(
        f"connections={stats['connections']} durable={str(stats['durable']).lower()} "
        f"uptime={stats['uptime_seconds']:.0f}s"
    )


def cmd_dead(flags: dict) -> int:
    with _client(flags, "dead") as client:
        queue = client.queue(flags["queue"])
        action, ids = flags["action"], flags.get("ids")
        if action == "list":
            for item in queue.dead_list(flags["limit"]):
                print(json.dumps(item, sort_keys=True))
        elif action == "requeue":
            print(f"requeued={queue.dead_requeue(ids)} queue={queue.name}")
        else:
            if ids is None and not flags["yes"]:
                raise QueuekitError("purge drops every dead task of the queue: add --yes (or pick tasks with --id)")
            print(f"purged={queue.dead_purge(ids)} queue={queue.name}")
    return ExitCode.OK


def cmd_task(flags: dict) -> int:
    """``queuekit status|cancel|result ID``."""
    command, task_id, queue = flags["task_command"], flags["task_id"], flags.get("queue")
    with _client(flags, command) as client:
        if command == "status":
            print(json.dumps(client.status(task_id, queue)._asdict(), sort_keys=True))
        elif command == "cancel":
            print(f"state={client.cancel(task_id, queue)} id={task_id}")
        else:  # TaskDead, TaskCancelled, ResultExpired, ResultTimeout: one line, exit 1
            print(json.dumps(client.result(task_id, flags.get("timeout"), queue), sort_keys=True))
    return ExitCode.OK


def cmd_tunnel(flags: dict) -> int:
    from . import tunnel

    return tunnel.run(TunnelSettings.load(flags))


def cmd_keygen(flags: dict) -> int:
    print(secrets.token_hex(32))
    return ExitCode.OK
