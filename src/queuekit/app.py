"""The server process: wires journal, broker, manager server, HTTP port and reaper together.

:class:`ServerApp` has a two-phase life: :meth:`~ServerApp.start` opens the journal, starts the
HTTP port (so ``/healthz`` answers during a long recovery while ``/readyz`` says 503), recovers
the journal's tasks and starts serving; :meth:`~ServerApp.stop` stops accepting, answers waiting
gets, gives calls in progress a grace period, saves the leases still held and closes the journal.
:func:`run` is the ``queuekit server`` command: signal handlers only set a flag, the main thread
does the work.
"""

from __future__ import annotations

import os
import signal
import ssl
import threading
import time
from typing import Any

from . import __version__, consumer_metrics, http, keys, logs, transport
from .broker import Broker
from .errors import ConfigError, ExitCode
from .journal import Journal
from .server import QueuekitServer
from .settings import ServerSettings

REAPER_INTERVAL = 0.2  # seconds between lease-expiry / retry-promotion passes
KEY_POLL_INTERVAL = 0.5  # seconds between checks of the key files (and of the stop flag)

_log = logs.get("server")


def open_journal(settings: ServerSettings) -> Journal:
    if settings.journal_url:
        from .journal_postgres import PostgresJournal  # psycopg: only with a journal URL

        return PostgresJournal(settings.journal_url, settings.journal_password)
    if not settings.data_dir:
        return Journal()
    from .journal_sqlite import SqliteJournal

    return SqliteJournal(settings.data_dir, sync=settings.sync)


class ServerApp:
    """One queuekit server: ``start()``, then ``stop()`` (each once)."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.started = time.monotonic()
        self.serving = False
        self.journal: Journal | None = None
        self.broker: Broker | None = None
        self.server: QueuekitServer | None = None
        self.web: http.HTTPPort | None = None
        self.reports = consumer_metrics.Store()  # what consumers report (API report), for /metrics
        self._stop_reaper = threading.Event()
        # Where the accepted keys come from (the authkey file only if it was loaded).
        self._key_sources = (settings.authkey_file if settings.authkey.reveal() else None, settings.keys_dir)
        self._key_signature: tuple = ()
        self._grants: list[keys.Grant] = []
        self._reaper: threading.Thread | None = None
        tls_files = (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        self._tls_files: tuple[str, ...] = tuple(f for f in tls_files if f)
        self._tls_signature: tuple = ()

    # -- what the HTTP port and the API report ----------------------------------------------

    @property
    def durable(self) -> bool:
        return self.journal is not None and self.journal.durable

    @property
    def ready(self) -> bool:
        """Serving, state loaded, accepting new connections, and the journal (if any) still commits."""
        return (
            self.serving
            and self.server is not None
            and self.server.accepting
            and self.journal is not None
            and self.journal.healthy
        )

    def stats(self) -> dict[str, Any] | None:
        """``/stats``; None until the server serves (HTTP answers 503 then)."""
        server, broker, journal = self.server, self.broker, self.journal
        if server is None or broker is None or journal is None:
            return None
        return {
            "queues": broker.stats(),
            "results": broker.result_store(),
            "connections": server.connection_count(),
            "durable": journal.durable,
            "journal_commits": journal.commits,
            "auth_failures": server.auth_failures,
            "connections_refused": dict(server.refused),
            "ready": self.ready,
            "uptime_seconds": round(time.monotonic() - self.started, 3),
        }

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        settings = self.settings
        self._grants = keys.load_grants(*self._key_sources)
        self._key_signature = keys.sources_signature(*self._key_sources)
        _log.info("keys_loaded", roles=keys.summary(self._grants), keys_dir=settings.keys_dir)
        journal = self.journal = open_journal(settings)
        _log.info(
            "server_starting",
            version=__version__,
            pid=os.getpid(),
            bind=settings.bind,
            http=settings.http or "off",
            journal=journal.description,
            sync=settings.sync if journal.durable else None,
            max_attempts=settings.max_attempts,
            max_task_bytes=settings.max_task_bytes,
        )
        if not journal.durable:
            _log.warning(
                "not_durable", detail="no --data-dir/QUEUEKIT_DATA_DIR: queued tasks are lost when the server stops"
            )
        broker = self.broker = Broker(
            journal=journal,
            max_task_bytes=settings.max_task_bytes,
            max_queues=settings.max_queues,
            max_attempts=settings.max_attempts,
            retry_base=settings.retry_base_seconds,
            retry_max=settings.retry_max_seconds,
            default_lease=settings.lease_seconds,
            max_result_bytes=settings.max_result_bytes,
            result_ttl=settings.result_ttl,
            result_max_count=settings.result_max_count,
            result_max_bytes=settings.result_max_bytes,
        )
        if settings.http:
            try:
                self.web = http.serve(
                    settings.http,
                    self,
                    self.stats,
                    token=settings.http_token,
                    max_queues=settings.http_max_queues,
                    reported=self.reports.snapshot,
                )
            except OSError as e:
                raise ConfigError(f"cannot listen for HTTP on {settings.http}: {e.strerror or e}") from None
            from . import dashboard  # the web page on the HTTP port, and its history sampler

            self.web.dashboard = dashboard.for_app(self)
        t0 = time.monotonic()
        counts = broker.recover()
        if journal.durable:
            _log.info(
                "recovered",
                tasks=sum(counts.values()),
                seconds=round(time.monotonic() - t0, 3),
                **{f"queue.{name}": n for name, n in sorted(counts.items())},
            )
        tls_context = self._load_tls() if self._tls_files else None
        try:
            server = self.server = QueuekitServer(broker, settings, self, self._grants, tls_context)
        except OSError as e:
            raise ConfigError(f"cannot listen on {settings.bind}: {e.strerror or e}") from None
        server.start()
        if server.plaintext_address is not None:
            _log.warning(
                "plaintext_listener",
                bind=transport.format_peer(server.plaintext_address),
                detail="QUEUEKIT_PLAINTEXT_BIND: a second queue port without TLS, for stock clients; "
                "its traffic is not encrypted (same keys, handshake and limits)",
            )
        self._reaper = threading.Thread(target=self._reap, name="reaper", daemon=True)
        self._reaper.start()
        self.serving = True
        _log.info(
            "server_ready",
            bind=transport.format_peer(server.address),
            http=transport.format_peer(self.web.server_address[:2]) if self.web else "off",
            durable=journal.durable,
            tls="mutual" if settings.tls_client_ca_file else "on" if tls_context else "off",
            plaintext=transport.format_peer(server.plaintext_address) if server.plaintext_address else None,
        )

    def stop(self) -> None:
        server, broker, journal = self.server, self.broker, self.journal
        t0 = time.monotonic()
        _log.info("server_stopping", connections=server.connection_count() if server else 0)
        self.serving = False
        self._stop_reaper.set()  # no lease expires while the server drains
        if server is not None:
            server.stop(self.settings.shutdown_grace_seconds)
        saved = broker.save_leases() if broker is not None else 0
        if journal is not None:
            journal.flush(timeout=2.0)
            journal.close()
        if self.web is not None:
            if self.web.dashboard is not None:
                self.web.dashboard.stop()
            self.web.shutdown()
        _log.info(
            "server_stopped", seconds=round(time.monotonic() - t0, 3), leases_saved=saved if self.durable else None
        )

    def reload_keys(self, why: str) -> bool:
        """Re-read the key sources; on success the server accepts exactly the new keys and
        closes connections of keys that are gone. A set that does not load changes nothing."""
        self._key_signature = keys.sources_signature(*self._key_sources)
        try:
            grants = keys.load_grants(*self._key_sources)
        except ConfigError as e:
            _log.error("keys_reload_failed", why=why, error=str(e), detail="the keys in force stay")
            return False
        if grants != self._grants and self.server is not None:
            removed = [g.name for g in self._grants if g not in grants]
            self._grants = grants
            self.server.set_grants(grants)
            _log.info("keys_loaded", why=why, roles=keys.summary(grants), removed=",".join(removed) or None)
        else:
            _log.info("keys_unchanged", why=why, roles=keys.summary(grants))
        return True

    def keys_changed(self) -> bool:
        """The key files changed since they were last read (polled: Kubernetes updates a mounted
        Secret in place, and nobody sends SIGHUP)."""
        return keys.sources_signature(*self._key_sources) != self._key_signature

    def _load_tls(self) -> ssl.SSLContext:
        """A TLS context from the certificate files (raises ConfigError naming the setting)."""
        settings = self.settings
        assert settings.tls_cert_file and settings.tls_key_file
        self._tls_signature = _files_signature(self._tls_files)
        context = transport.server_tls_context(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        )
        _log.info("tls_loaded", cert=settings.tls_cert_file, client_ca=settings.tls_client_ca_file)
        return context

    def reload_tls(self, why: str) -> bool:
        """Re-read the certificate files: new connections get the new certificate; connections
        made already keep theirs. Files that do not load change nothing."""
        if not self._tls_files or self.server is None:
            return True
        try:
            context = self._load_tls()
        except ConfigError as e:
            _log.error("tls_reload_failed", why=why, error=str(e), detail="the certificate in force stays")
            return False
        self.server.set_tls_context(context)
        _log.info("tls_reloaded", why=why)
        return True

    def tls_changed(self) -> bool:
        """The certificate files changed since they were last read (polled, like the keys)."""
        return bool(self._tls_files) and _files_signature(self._tls_files) != self._tls_signature

    def _reap(self) -> None:
        broker = self.broker
        assert broker is not None
        while not self._stop_reaper.wait(REAPER_INTERVAL):
            try:
                broker.tick()
            except Exception as e:  # never let housekeeping die silently
                _log.error("reaper_failed", exc_info=e)


def _files_signature(paths: tuple[str, ...]) -> tuple:
    """Changes whenever one of the files changes (size, modification time, inode): cheap to poll.
    ``stat`` follows symlinks, so a Kubernetes Secret volume's swap of its data counts."""
    sig: list[tuple] = []
    for path in paths:
        try:
            st = os.stat(path)
            sig.append((path, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError as e:
            sig.append((path, "error", e.errno))
    return tuple(sig)


def run(settings: ServerSettings) -> int:
    """``queuekit server``: serve until SIGTERM/SIGINT (a second one exits at once)."""
    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(signum: int, frame: Any) -> None:  # only set flags: the main thread does the work
        signals["count"] += 1
        if signals["count"] > 1:
            os._exit(ExitCode.ERROR)
        stop.set()

    reload = threading.Event()

    def on_hangup(signum: int, frame: Any) -> None:
        reload.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    app = ServerApp(settings)
    app.start()
    while not stop.wait(KEY_POLL_INTERVAL):
        if reload.is_set():
            reload.clear()
            app.reload_keys("sighup")
            app.reload_tls("sighup")
            continue
        if app.keys_changed():
            app.reload_keys("files_changed")
        if app.tls_changed():
            app.reload_tls("files_changed")
    app.stop()
    return ExitCode.OK
