"""A libvirt connection that stays up but stops delivering events: a proxy in front of a
daemon's UNIX socket that passes every call, reply and keepalive, and drops the daemon's event
messages once ``silence()`` is called, on the connections open at that moment only (a new
connection delivers again). It plays libvirt's stuck event queue, a lost event stream, any
connection that is alive to keepalive and blind to events, on demand.

libvirt's RPC messages are framed by a 4-byte big-endian length (the length word included),
followed by the header ``program, version, procedure, type, serial, status`` (XDR, 4 bytes
each). Events are messages (type 2) of the remote and QEMU programs; keepalive has a program of
its own and is never dropped.
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

REMOTE_PROGRAM = 0x20008086
QEMU_PROGRAM = 0x20008087
MESSAGE = 2  # VIR_NET_MESSAGE: an event (calls are 0, replies 1)


class EventSilencer:
    """``EventSilencer(daemon_socket, proxy_socket).start()``; connect to ``uri(…)``."""

    def __init__(self, upstream: str, path: Path) -> None:
        self.upstream = upstream
        self.path = path
        self.dropped = 0  # event messages dropped so far
        self._silenced: set[int] = set()  # ids of the connections whose events are dropped
        self._open: set[int] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._next_id = 0

    def start(self) -> EventSilencer:
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        self.path.chmod(0o666)
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, daemon=True, name="event-silencer").start()
        return self

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.path.unlink(missing_ok=True)

    def silence(self) -> int:
        """Drop the events of every connection open now; how many connections that is."""
        with self._lock:
            self._silenced |= self._open
            return len(self._open)

    def _accept(self) -> None:
        listener = self._listener
        while listener is not None:
            try:
                client, _address = listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.connect(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._next_id += 1
                ident = self._next_id
                self._open.add(ident)
            threading.Thread(target=self._pass, args=(client, server), daemon=True).start()
            threading.Thread(target=self._filter, args=(server, client, ident), daemon=True).start()

    @staticmethod
    def _pass(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _filter(self, server: socket.socket, client: socket.socket, ident: int) -> None:
        pending = b""
        try:
            while data := server.recv(65536):
                pending += data
                out = []
                while len(pending) >= 4:
                    (length,) = struct.unpack(">I", pending[:4])
                    if len(pending) < length:
                        break
                    message, pending = pending[:max(length, 4)], pending[max(length, 4):]
                    program, _version, _procedure, kind = struct.unpack(">IIIi", message[4:20]) \
                        if len(message) >= 20 else (0, 0, 0, -1)
                    with self._lock:
                        silenced = ident in self._silenced
                    if silenced and kind == MESSAGE and program in (REMOTE_PROGRAM, QEMU_PROGRAM):
                        self.dropped += 1
                        continue
                    out.append(message)
                if out:
                    client.sendall(b"".join(out))
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(ident)
                self._silenced.discard(ident)
            for sock in (server, client):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def uri(path: Path) -> str:
    """The session URI that reaches a daemon through the silencer at ``path``."""
    return f"qemu+unix:///session?socket={path}"
