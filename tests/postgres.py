"""Real PostgreSQL for tests: a database of its own per test, and a TCP proxy to cut.

The machine's server is at 127.0.0.1:5432 (trust auth, user postgres); CI starts it too.
Each test gets `tierroute_test_<random>`, dropped afterwards, so parallel runs never meet.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
from collections.abc import Iterator

import pytest

HOST = os.environ.get("TIERROUTE_TEST_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("TIERROUTE_TEST_PG_PORT", "5432"))
ADMIN_URL = f"postgresql://postgres@{HOST}:{PORT}/test"


def _reachable() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "needs psycopg 3 (pip install 'tierroute[postgres]')"
    try:
        with socket.create_connection((HOST, PORT), timeout=2):
            pass
        psycopg.connect(ADMIN_URL, connect_timeout=3).close()
    except (OSError, psycopg.Error) as e:
        return f"PostgreSQL at {HOST}:{PORT} is unreachable ({e})"
    return None


_WHY_NOT = _reachable()
needs_postgres = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


@contextlib.contextmanager
def database(port: int = PORT) -> Iterator[str]:
    """A fresh database; yields its URL (through `port`, e.g. a proxy's) and drops it after."""
    import psycopg

    name = f"tierroute_test_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@{HOST}:{port}/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class TcpProxy:
    """Forwards a local port to PostgreSQL; `cut()` closes the port and every connection
    through it (the server looks gone), `restore()` opens the same port again."""

    def __init__(self, target: tuple[str, int] = (HOST, PORT)) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            with contextlib.suppress(OSError):  # wakes the accept() blocked on it
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
