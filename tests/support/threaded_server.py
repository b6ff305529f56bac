"""A listening socket on loopback that serves each connection on a thread of its own: the base
of the tests' fake servers (a malicious one, a frozen or slow one), which supply ``handle``."""

from __future__ import annotations

import socket
import threading


class ThreadedServer:
    def __init__(self, rcvbuf: int | None = None):
        """``rcvbuf``: a fixed receive buffer for the accepted connections (set before the first
        accept, so no autotuning)."""
        self.sock = socket.create_server(("127.0.0.1", 0))
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def handle(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except OSError:  # closed: the test is over
                return
            thread = threading.Thread(target=self.handle, args=(sock,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def close(self) -> None:
        self.sock.close()
