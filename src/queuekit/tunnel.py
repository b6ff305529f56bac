"""``queuekit tunnel``: plaintext in on loopback, TLS out to the server, for stock clients.

A stock ``multiprocessing.managers.BaseManager`` client cannot speak TLS. Pointed at the tunnel
(``--listen``, loopback by default), each of its connections is forwarded over its own TLS
connection to the queuekit server (``--server``), byte for byte: the tunnel does not parse the
manager protocol and holds no authkey, so the client's HMAC handshake with the server runs end to
end, inside TLS. The tunnel verifies the server like a queuekit client does
(``QUEUEKIT_TLS_CA_FILE``, ``QUEUEKIT_TLS_SERVER_NAME``, and a client certificate for mutual TLS).

Bounded: at most ``max_connections`` connections (more are closed at once and logged), the TCP
connect and TLS handshake to the server within ``handshake_timeout``, a connection with no bytes
either way for ``idle_timeout`` seconds is closed. The local side is plaintext, so listening on
anything but loopback needs ``--allow-remote``. SIGTERM/SIGINT: the handler only sets a flag; the
main coroutine stops listening, closes every connection and returns (a second signal exits at once).

One standard-library ``asyncio`` loop in one thread: ``asyncio``'s TLS transport handles the
non-blocking TLS reads and writes (want-read/want-write, buffered records) for every connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import socket
import ssl
from typing import Any

from . import logs, transport
from .client import (
    _CLIENT_CERT_REFUSED,
    _NOT_TLS,
    _X509_CERT_HAS_EXPIRED,
    _X509_HOSTNAME_MISMATCH,
    _X509_IP_MISMATCH,
    tls_failure,
)
from .errors import ConfigError, ExitCode
from .settings import TunnelSettings

BUFFER_BYTES = 256 * 1024  # read at most this much at once, per direction (then written and drained)
CLOSE_WAIT = 2.0  # seconds a connection's orderly close (TLS close_notify) may take before it is cut

_log = logs.get("tunnel")


def is_loopback(host: str) -> bool:
    """``host`` is a loopback address, or a name all of whose addresses are loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def tls_reason(e: ssl.SSLError, cert_file: str | None) -> str:
    """A short token for why the TLS handshake with the server failed (the log's ``reason``)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        if e.verify_code in (_X509_HOSTNAME_MISMATCH, _X509_IP_MISMATCH):
            return "certificate_name_mismatch"
        if e.verify_code == _X509_CERT_HAS_EXPIRED:
            return "certificate_expired"
        return "certificate_not_trusted"
    reason = e.reason or type(e).__name__
    if reason in ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE") and not cert_file:
        return "client_certificate_required"
    if reason in _CLIENT_CERT_REFUSED:
        return "client_certificate_refused"
    if reason in _NOT_TLS:
        return "server_not_tls"
    return reason.lower()


class Tunnel:
    """Accepts plaintext connections on ``settings.listen`` and relays each over TLS."""

    def __init__(self, settings: TunnelSettings):
        self.settings = settings
        # Raises ConfigError naming the setting (a missing or unreadable CA, certificate or key).
        self.context = transport.client_tls_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    async def serve(self, stop: asyncio.Event) -> None:
        """Listen, relay until ``stop`` is set, then close every connection."""
        s = self.settings
        try:
            server = await asyncio.start_server(
                self._accepted, s.listen.host, s.listen.port, limit=BUFFER_BYTES, backlog=128, reuse_address=True
            )
        except OSError as e:
            raise ConfigError(f"cannot listen on {s.listen}: {e.strerror or e}") from None
        listening = transport.format_peer(server.sockets[0].getsockname())
        if not is_loopback(s.listen.host):
            _log.warning(
                "tunnel_listening_remote",
                listen=listening,
                detail="--allow-remote: plaintext on this network (tasks, results, queue names in clear)",
            )
        _log.info(
            "tunnel_ready",
            listen=listening,
            server=s.server,
            tls="mutual" if s.tls_cert_file else "on",
            server_name=s.tls_server_name,
            max_connections=s.max_connections,
            idle_timeout=s.idle_timeout or "off",
        )
        await stop.wait()
        self._stopping = True
        _log.info("tunnel_stopping", connections=len(self._tasks))
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(server.wait_closed(), CLOSE_WAIT)
        except TimeoutError:
            pass
        _log.info("tunnel_stopped")

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = transport.format_peer(writer.get_extra_info("peername"))
        if self._stopping or len(self._tasks) >= self.settings.max_connections:
            _log.warning("tunnel_refused", peer=peer, reason="stopping" if self._stopping else "max_connections")
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(peer, reader, writer)
        finally:
            self._tasks.discard(task)

    async def _relay(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = self.settings
        _tune(writer)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(
                    s.server.host,
                    s.server.port,
                    ssl=self.context,
                    server_hostname=s.tls_server_name or s.server.host,
                    ssl_handshake_timeout=s.handshake_timeout,
                    limit=BUFFER_BYTES,
                ),
                s.handshake_timeout,
            )
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except (OSError, EOFError) as e:
            reason, detail = self._upstream_failure(e)
            _log.warning("tunnel_upstream_failed", peer=peer, server=s.server, reason=reason, detail=detail)
            writer.transport.abort()  # the local client sees its connection closed
            return
        _tune(up_writer)
        loop = asyncio.get_running_loop()
        started = loop.time()
        _log.info("tunnel_connected", peer=peer, server=s.server)
        counts = [0, 0]  # bytes from the client to the server, from the server to the client
        last = [started]  # the last time bytes moved either way
        up = asyncio.create_task(_pump(reader, up_writer, counts, 0, last))
        down = asyncio.create_task(_pump(up_reader, writer, counts, 1, last))
        tasks = {up, down}
        if s.idle_timeout:
            tasks.add(asyncio.create_task(_idle(last, s.idle_timeout)))
        reason, error = "shutdown", None
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finished = up if up in done else down if down in done else None
            if finished is None:
                reason = "idle_timeout"
            else:
                side = "client" if finished is up else "server"
                failure = finished.exception()
                reason = f"{side}_error" if failure else f"{side}_closed"
                error = repr(failure)[:200] if failure else None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(_close(writer), _close(up_writer))
            _log.info(
                "tunnel_closed",
                peer=peer,
                bytes_in=counts[0],
                bytes_out=counts[1],
                seconds=round(loop.time() - started, 3),
                reason=reason,
                error=error,
            )

    def _upstream_failure(self, e: BaseException) -> tuple[str, str]:
        """``reason`` and ``detail`` for a connection to the server that could not be made."""
        s = self.settings
        if isinstance(e, ssl.SSLError):
            error = tls_failure(e, s.server, s.tls_ca_file, s.tls_cert_file, s.tls_server_name)
            return tls_reason(e, s.tls_cert_file), str(error) if error else f"TLS with {s.server} failed: {e}"
        if isinstance(e, TimeoutError):
            return "timeout", (
                f"no TLS connection to {s.server} within {s.handshake_timeout:g} s (QUEUEKIT_HANDSHAKE_TIMEOUT)"
            )
        if isinstance(e, socket.gaierror):
            return "name_not_resolved", f"{s.server.host}: {e.strerror or e}: check --server / QUEUEKIT_SERVER"
        if isinstance(e, ConnectionRefusedError):
            return "connection_refused", f"nothing listens on {s.server}: check --server / QUEUEKIT_SERVER"
        if isinstance(e, EOFError | ConnectionResetError):
            return "eof", f"{s.server} closed the connection during the TLS handshake"
        return type(e).__name__, str(e)[:200]


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counts: list[int], i: int, last: list[float]
) -> None:
    """Copy ``reader`` to ``writer`` until the end of the stream (waiting for ``writer`` to drain:
    a slow reader on one side slows the other side down, no unbounded buffer)."""
    loop = asyncio.get_running_loop()
    while data := await reader.read(BUFFER_BYTES):
        counts[i] += len(data)
        last[0] = loop.time()
        writer.write(data)
        await writer.drain()


async def _idle(last: list[float], idle_timeout: float) -> None:
    """Returns once no bytes moved for ``idle_timeout`` seconds."""
    loop = asyncio.get_running_loop()
    while (remaining := last[0] + idle_timeout - loop.time()) > 0:
        await asyncio.sleep(remaining)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_WAIT)
    except (OSError, asyncio.CancelledError):  # includes TimeoutError and ssl.SSLError
        writer.transport.abort()


def _tune(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            transport.tune_socket(sock)  # no delay, keepalive (a peer that vanished is noticed)
        except OSError:
            pass


def run(settings: TunnelSettings) -> int:
    """``queuekit tunnel``: relay until SIGTERM/SIGINT (a second one exits at once)."""
    if not settings.allow_remote and not is_loopback(settings.listen.host):
        raise ConfigError(
            f"--listen {settings.listen} is not a loopback address: the tunnel's side is plaintext, so tasks, "
            "results and queue names would cross that network in clear; listen on 127.0.0.1 (or pass --allow-remote)"
        )
    tunnel = Tunnel(settings)
    return asyncio.run(_main(tunnel))


async def _main(tunnel: Tunnel) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = {"count": 0}

    def on_signal(*_: Any) -> None:  # only a flag: the main coroutine does the work
        signals["count"] += 1
        if signals["count"] > 1:
            os._exit(ExitCode.ERROR)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    await tunnel.serve(stop)
    return ExitCode.OK
