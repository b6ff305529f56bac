"""The server process: wires journal, broker, manager server, HTTP port and reaper together.

:class:`ServerApp` has a two-phase life: :meth:`~ServerApp.start` opens the journal, starts the
HTTP port (so ``/healthz`` answers during a long recovery while ``/readyz`` says 503), recovers
the journal's tasks and starts serving; :meth:`~ServerApp.stop` stops accepting, answers waiting
gets, gives calls in progress a grace period, saves the leases still held and closes the journal.
:func:`run` is the ``queuekit server`` command: signal handlers only set a flag, the main thread
does the work.

With a PostgreSQL journal (``QUEUEKIT_JOURNAL_URL``) several servers share the database and only
one, the leader, serves (queuekit.leader). ``start`` then opens a standby: the HTTP port (``/readyz``
503, "standby"; ``/metrics`` and ``/stats`` answer, without queues: :meth:`ServerApp.stats`) and a
queue port that refuses every client with :class:`NotLeader`; a
``leadership`` thread campaigns. On winning it loads the state from the database into a new broker
and replaces the standby listener with a serving one on the same port; each term's server refuses
every request once the term's deadline has passed (the loop asks before each one), whichever
thread notices first. When the term ends (probe failed, deadline passed, superseded) the thread
steps down: connections closed, broker and journal dropped (nothing more is written), a standby
listener again, and a new journal session to campaign with.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import signal
import socket
import ssl
import threading
import time
from typing import Any

from . import __version__, consumer_metrics, http, keys, logs, transport
from .broker import Broker
from .errors import ConfigError, ExitCode, NotLeader
from .journal import Journal
from .leader import STEPDOWN_REASONS, Election
from .message import TaskStatus
from .server import TLS_FAILURE_REASONS, QueuekitServer
from .settings import ServerSettings, load_journal_password

REAPER_INTERVAL = 0.2  # seconds between lease-expiry / retry-promotion passes
KEY_POLL_INTERVAL = 0.5  # seconds between checks of the key files (and of the stop flag)
REOPEN_MAX_DELAY = 5.0  # seconds at most between attempts to reopen the journal after losing leadership
STANDBY = "not the leader: this queuekit server is a standby (another server leads the journal); try another address"

_log = logs.get("server")


def open_journal(settings: ServerSettings) -> Journal:
    if settings.journal_url:
        from .journal_postgres import PostgresJournal  # psycopg: only with a journal URL

        password = settings.journal_password
        if settings.journal_password_file:
            # Read at every open, not once: after a rotation (a Secret's mounted file is replaced in
            # place) the next reconnect uses the new password, with no restart. Unreadable now: the
            # ConfigError names the file and the open is retried like any failed one.
            password = load_journal_password(settings.journal_password_file)
        return PostgresJournal(settings.journal_url, password)
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
        self._tls_context: ssl.SSLContext | None = None
        # Leadership (a PostgreSQL journal): the current term's election, the campaign thread.
        self.ha = bool(settings.journal_url)
        self.election: Election | None = None
        self._stop_campaign = threading.Event()
        self._campaign_thread: threading.Thread | None = None
        self._transition = threading.Lock()  # one change of role at a time (campaign thread vs stop)
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        # Since the process started (/metrics): terms won, terms ended by reason.
        self.elections = 0
        self.stepdowns: collections.Counter[str] = collections.Counter(dict.fromkeys(STEPDOWN_REASONS, 0))
        # The journal session the leadership thread holds (campaigning or leading; None while it
        # has none: the database is unreachable) and the attempts to open one that failed: only
        # that thread writes them (``_start_standby`` before the thread exists).
        self._session: Journal | None = None
        self.journal_open_failures = 0
        # Each change of role replaces the queue server (and the journal): what the replaced ones
        # counted is kept here, so that /metrics' counters only grow. ``_swap`` makes the change
        # and the tally one step for stats().
        self._swap = threading.Lock()
        self._past = _Tally()

    # -- what the HTTP port and the API report ----------------------------------------------

    @property
    def durable(self) -> bool:
        return self.journal is not None and self.journal.durable

    @property
    def ready(self) -> bool:
        """Serving, state loaded, accepting new connections, the journal (if any) still commits,
        and with a shared journal: leading (readiness is leadership)."""
        return (
            self.serving
            and self.server is not None
            and self.server.accepting
            and self.journal is not None
            and self.journal.healthy
            and (not self.ha or (self.election is not None and self.election.valid()))
        )

    @property
    def leading(self) -> bool:
        """With a shared journal: this server holds a valid term (its deadline has not passed)."""
        election = self.election
        return self.ha and self.broker is not None and election is not None and election.valid()

    @property
    def journal_connected(self) -> bool:
        """With a shared journal: this server holds a journal session that has not failed (it
        leads, or campaigns with it). False while it cannot open one, or once its session failed."""
        session = self._session
        broken = getattr(session, "broken", None)
        return self.ha and session is not None and not (broken is not None and broken.is_set())

    @property
    def not_ready_reason(self) -> str | None:
        """What ``/readyz`` says beside the 503 (None: nothing particular)."""
        if self.ha and not self.ready:
            return "standby" if not self.serving else "leadership lost"
        return None

    def stats(self) -> dict[str, Any] | None:
        """``/stats``; None until the server serves (or, with a shared journal, stands by): HTTP
        answers 503 then. ``role``: ``single`` (no shared journal), ``leader`` (holds a term's
        state), ``standby`` (holds no state: no queues, no results)."""
        with self._swap:
            server, broker, journal = self.server, self.broker, self.journal
            if server is None:
                return None
            if broker is None or journal is None:
                if not self.ha:
                    return None
                role, broker, journal = "standby", None, None
            else:
                role = "leader" if self.ha else "single"
            counted = self._past.plus(server, journal)
        stats: dict[str, Any] = {"role": role, "queues": broker.stats() if broker is not None else {}}
        if broker is not None:
            stats["results"] = broker.result_store()
        stats.update(
            connections=server.connection_count(),
            durable=journal.durable if journal is not None else True,  # a standby's: PostgreSQL
            journal_commits=counted.journal_commits,
            auth_failures=counted.auth_failures,
            connections_refused=dict(counted.refused),
            tls_handshakes=counted.tls_handshakes,
            tls_handshake_failures={**dict.fromkeys(TLS_FAILURE_REASONS, 0), **counted.tls_failures},
            ready=self.ready,
            uptime_seconds=round(time.monotonic() - self.started, 3),
        )
        if self.ha:
            stats["leadership"] = {
                "leader": self.leading,
                "elections": self.elections,
                "stepdowns": dict(self.stepdowns),
                "journal_connected": self.journal_connected,
                "journal_open_failures": self.journal_open_failures,
            }
        return stats

    def task_status(self, task_id: int) -> TaskStatus | None:
        """``GET /tasks/<id>``; None until the server serves (HTTP answers 503 then)."""
        broker = self.broker
        return None if broker is None else broker.status(None, task_id)

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
        broker = self.broker = self._new_broker(journal)
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
        if self.ha:  # the leadership thread owns the journal, and makes the broker once it leads
            self.journal = self.broker = None
            self._start_standby(journal)
            return
        t0 = time.monotonic()
        counts = broker.recover()
        if journal.durable:
            _log.info(
                "recovered",
                tasks=sum(counts.values()),
                seconds=round(time.monotonic() - t0, 3),
                **{f"queue.{name}": n for name, n in sorted(counts.items())},
            )
        tls_context = self._tls_context = self._load_tls() if self._tls_files else None
        server = self.server = self._listen(broker)
        if server.plaintext_address is not None:
            _log.warning(
                "plaintext_listener",
                bind=transport.format_peer(server.plaintext_address),
                detail="QUEUEKIT_PLAINTEXT_BIND: a second queue port without TLS, for stock clients; "
                "its traffic is not encrypted (same keys, handshake and limits)",
            )
        self._start_reaper(broker)
        self.serving = True
        _log.info(
            "server_ready",
            bind=transport.format_peer(server.address),
            http=transport.format_peer(self.web.server_address[:2]) if self.web else "off",
            durable=journal.durable,
            tls="mutual" if settings.tls_client_ca_file else "on" if tls_context else "off",
            plaintext=transport.format_peer(server.plaintext_address) if server.plaintext_address else None,
        )

    # -- leadership (a PostgreSQL journal shared by several servers) -------------------------

    def _listen(self, broker: Broker, gate: Any = None) -> QueuekitServer:
        """A queue server for ``broker`` on the bind address, started. Once the first one has
        bound, later ones (standby, then leader, then standby...) take the same ports."""
        settings = self.settings
        try:
            server = QueuekitServer(broker, settings, self, self._grants, self._tls_context)
        except OSError as e:
            raise ConfigError(f"cannot listen on {settings.bind}: {e.strerror or e}") from None
        server.gate = gate
        server.start()
        if settings.bind.port == 0 or (settings.plaintext_bind is not None and settings.plaintext_bind.port == 0):
            bound: Any = server.address  # (host, port) once listening
            port = int(bound[1])
            plaintext = server.plaintext_address
            self.settings = dataclasses.replace(
                settings,
                bind=dataclasses.replace(settings.bind, port=port),
                plaintext_bind=dataclasses.replace(settings.plaintext_bind, port=plaintext[1])
                if settings.plaintext_bind is not None and plaintext is not None
                else None,
            )
        return server

    def _new_broker(self, journal: Journal) -> Broker:
        settings = self.settings
        return Broker(
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

    def _standby_server(self) -> QueuekitServer:
        """A queue port that authenticates clients and refuses them all (they try the next address)."""
        s = self.settings
        idle = Broker(journal=Journal(), max_task_bytes=s.max_task_bytes, max_queues=1)
        return self._listen(idle, gate=lambda: NotLeader(STANDBY))

    def _start_standby(self, journal: Any) -> None:
        """Serve as a standby (a refusing queue port) and campaign in the background. The first
        journal opened in ``start``, so an unreachable database or a foreign schema stops the
        server at once (exit 5, 6); the sessions after it are retried."""
        settings = self.settings
        _log.info(
            "leadership",
            holder=self.holder,
            probe_interval=settings.leader_probe_interval,
            lease=settings.leader_lease,
            detail="a shared journal: serving only while leading; standby until then",
        )
        self._tls_context = self._load_tls() if self._tls_files else None
        self._session = journal  # the leadership thread's from here on
        server = self.server = self._standby_server()
        _log.info(
            "server_ready",
            bind=transport.format_peer(server.address),
            http=transport.format_peer(self.web.server_address[:2]) if self.web else "off",
            durable=True,
            role="standby",
        )
        thread = self._campaign_thread = threading.Thread(
            target=self._campaign, args=(journal,), name="leadership", daemon=True
        )
        thread.start()

    def _campaign(self, journal: Any) -> None:
        """The leadership thread: campaign as a standby, lead while the term lasts, step down, again."""
        stop, interval = self._stop_campaign, self.settings.leader_probe_interval
        delay = interval
        failed_since: float | None = None  # monotonic time of the first failed reopen in a row
        while not stop.is_set():
            if journal is None:
                try:
                    journal = open_journal(self.settings)
                    delay = interval
                except Exception as e:  # the database is down or restarting: retry, standby meanwhile
                    self.journal_open_failures += 1  # only this thread writes it
                    failed_since = failed_since if failed_since is not None else time.monotonic()
                    _log.warning(
                        "journal_reopen_failed",
                        error=f"{type(e).__name__}: {e}"[:300],
                        retry_in=delay,
                        failures=self.journal_open_failures,
                    )
                    stop.wait(delay)
                    delay = min(delay * 2, REOPEN_MAX_DELAY)
                    continue
                self._session = journal
                if failed_since is not None:
                    _log.info(
                        "journal_reopened",
                        journal=journal.description,
                        seconds=round(time.monotonic() - failed_since, 3),
                        failures=self.journal_open_failures,
                    )
                    failed_since = None
            try:
                election = Election(journal, self.holder, self.settings.leader_lease)
                term = None
                while term is None and not stop.is_set() and not journal.broken.is_set():
                    term = election.attempt()
                    if term is None:
                        stop.wait(interval)
            except Exception as e:  # the session failed: a new one campaigns
                _log.warning("leader_campaign_failed", error=f"{type(e).__name__}: {e}"[:300])
                term = None
            if term is None:
                self._session = None  # said before the close: never connected while closing
                _close_quietly(journal)
                journal = None
                continue
            self.elections += 1  # only this thread writes it
            try:
                self._lead(journal, election, term)
            except Exception as e:  # loading failed (the session broke?): give the term up
                _log.error("leader_start_failed", exc_info=e, error=f"{type(e).__name__}: {e}"[:300])
                election.lose(f"start failed: {type(e).__name__}", "start_failed")
            while election.lost is None and not stop.wait(interval):
                if journal.broken.is_set():
                    election.lose("the journal's session failed", "session_failed")
                elif not election.renew():
                    break
            if stop.is_set() and election.lost is None:
                return  # stop() shuts the leader down gracefully
            self._session = None  # _step_down closes it
            self._step_down(election)
            journal = None

    def _lead(self, journal: Any, election: Election, term: Any) -> None:
        """Won: load the state into a new broker and serve it in place of the standby port."""
        t0 = time.monotonic()
        broker = self._new_broker(journal)
        counts = broker.recover()
        loaded = time.monotonic() - t0
        _log.info(
            "recovered",
            tasks=sum(counts.values()),
            seconds=round(loaded, 3),
            **{f"queue.{name}": n for name, n in sorted(counts.items())},
        )
        with self._transition:
            standby = self.server
            if standby is not None:
                standby.stop(0.0)  # the standby port: its clients go and find the leader
            self.journal, self.broker, self.election = journal, broker, election  # _step_down closes them
            server = self._listen(broker, gate=lambda: None if election.valid() else NotLeader(STANDBY))
            with self._swap:
                self._past.retire(standby, None)
                self.server = server
            self._start_reaper(broker, election.valid)
            self.serving = True
        _log.info(
            "leader_elected",
            epoch=term.epoch,
            holder=self.holder,
            previous=term.previous_holder,
            since_last_heartbeat=term.since_heartbeat,
            fenced_pid=term.fenced_pid,
            tasks=sum(counts.values()),
            load_seconds=round(loaded, 3),
            seconds=round(time.monotonic() - t0, 3),
        )
        _log.info(
            "server_ready",
            bind=transport.format_peer(self.server.address),
            http=transport.format_peer(self.web.server_address[:2]) if self.web else "off",
            durable=True,
            role="leader",
        )

    def _step_down(self, election: Election) -> None:
        """The term is over: serve nothing more, drop the state, back to standby. Nothing is
        written: the session is gone, or the lease has passed and another server may lead."""
        t0 = time.monotonic()
        with self._transition:
            self.serving = False
            self._stop_reaper.set()
            server, journal = self.server, self.journal
            if server is not None:
                server.stop(0.0)
            connections = server.connection_count() if server is not None else 0
            if journal is not None:
                _close_quietly(journal)
            standby = self._standby_server()
            with self._swap:
                self._past.retire(server, journal)
                self.journal = self.broker = None
                self.server = standby
            if election.lost_reason is not None:  # always set here (the term ended); only this thread writes
                self.stepdowns[election.lost_reason] += 1
        _log.warning(
            "leader_lost",
            epoch=election.term.epoch if election.term else None,
            reason=election.lost,
            seconds=round(time.monotonic() - t0, 3),
            connections=connections,
            detail="stepped down: connections closed, state dropped; campaigning as a standby",
        )

    def stop(self) -> None:
        if self._campaign_thread is not None:
            self._stop_campaign.set()
            self._campaign_thread.join(timeout=30.0)
        with self._transition:
            self._stop()

    def _stop(self) -> None:
        server, broker, journal = self.server, self.broker, self.journal
        t0 = time.monotonic()
        _log.info("server_stopping", connections=server.connection_count() if server else 0)
        self.serving = False
        self._stop_reaper.set()  # no lease expires while the server drains
        if self.web is not None and self.web.dashboard is not None:
            self.web.dashboard.stop()  # nor by its history's samples (broker.stats services leases)
        if server is not None:
            server.stop(self.settings.shutdown_grace_seconds)
        saved = broker.save_leases() if broker is not None else 0
        if journal is not None:
            journal.flush(timeout=2.0)
            journal.close()
        if self.web is not None:
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
        self._tls_context = context  # for the servers of later terms too
        self.server.set_tls_context(context)
        _log.info("tls_reloaded", why=why)
        return True

    def tls_changed(self) -> bool:
        """The certificate files changed since they were last read (polled, like the keys)."""
        return bool(self._tls_files) and _files_signature(self._tls_files) != self._tls_signature

    def _start_reaper(self, broker: Broker, valid: Any = None) -> None:
        """Housekeeping for ``broker`` until this term's ``_stop_reaper`` is set; ``valid``: a
        leader's term, checked before each pass (a thawed leader expires no lease)."""
        stop = self._stop_reaper = threading.Event()
        self._reaper = threading.Thread(target=self._reap, args=(broker, stop, valid), name="reaper", daemon=True)
        self._reaper.start()

    def _reap(self, broker: Broker, stop: threading.Event, valid: Any) -> None:
        while not stop.wait(REAPER_INTERVAL):
            if valid is not None and not valid():
                continue
            try:
                broker.tick()
            except Exception as e:  # never let housekeeping die silently
                _log.error("reaper_failed", exc_info=e)


class _Tally:
    """The counters of the queue servers and journals an app has replaced (one per change of
    role): added to the current ones' in stats()."""

    def __init__(self) -> None:
        self.journal_commits = 0
        self.auth_failures = 0
        self.tls_handshakes = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.tls_failures: collections.Counter[str] = collections.Counter()

    def retire(self, server: QueuekitServer | None, journal: Journal | None) -> None:
        """Keep what ``server`` and ``journal`` counted (they are being replaced)."""
        if server is not None:
            self.auth_failures += server.auth_failures
            self.tls_handshakes += server.tls_handshakes
            # dict(): one C-level copy, while the server's threads may still add a key
            self.refused.update(dict(server.refused))
            self.tls_failures.update(dict(server.tls_failures))
        if journal is not None:
            self.journal_commits += journal.commits

    def plus(self, server: QueuekitServer, journal: Journal | None) -> _Tally:
        """A new tally: this one plus what the current ``server`` and ``journal`` counted."""
        total = copy.deepcopy(self)
        total.retire(server, journal)
        return total


def _close_quietly(journal: Any) -> None:
    """Close a journal whose session may be dead (nothing of it matters any more)."""
    try:
        journal.close()
    except Exception as e:
        _log.debug("journal_close_failed", error=f"{type(e).__name__}: {e}"[:200])


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
