"""A minimal RFB 3.8 client: enough of the VNC handshake to make QEMU raise
the connect, initialize and disconnect graphics events of one session."""

from __future__ import annotations

import socket
import struct

SECURITY_NONE = 1


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection during the handshake")
        data += chunk
    return data


def handshake(sock: socket.socket, shared: bool = True) -> str:
    """Complete version, security type None and ClientInit; return the desktop name. ``shared``
    False asks for the console exclusively (ClientInit shared-flag 0): with QEMU's default share
    policy the other clients are dropped, and later shared ones are refused at ClientInit."""
    version = _recv_exact(sock, 12)
    if not version.startswith(b"RFB 003."):
        raise ConnectionError(f"not an RFB server: {version!r}")
    sock.sendall(b"RFB 003.008\n")
    count = _recv_exact(sock, 1)[0]
    if count == 0:
        (reason_len,) = struct.unpack("!I", _recv_exact(sock, 4))
        raise ConnectionError(_recv_exact(sock, reason_len).decode(errors="replace"))
    types = _recv_exact(sock, count)
    if SECURITY_NONE not in types:
        raise ConnectionError(f"server offers no security type None: {list(types)}")
    sock.sendall(bytes([SECURITY_NONE]))
    (result,) = struct.unpack("!I", _recv_exact(sock, 4))
    if result != 0:
        raise ConnectionError(f"security handshake failed ({result})")
    sock.sendall(b"\x01" if shared else b"\x00")  # ClientInit: shared-flag
    _width, _height = struct.unpack("!HH", _recv_exact(sock, 4))
    _recv_exact(sock, 16)  # pixel format
    (name_len,) = struct.unpack("!I", _recv_exact(sock, 4))
    return _recv_exact(sock, name_len).decode(errors="replace")


def open_session(host: str, port: int, timeout: float = 10.0,
                 source: tuple[str, int] | None = None, shared: bool = True) -> socket.socket:
    """Connect and complete the handshake; the caller closes the socket to disconnect."""
    sock = socket.create_connection((host, port), timeout=timeout, source_address=source)
    try:
        handshake(sock, shared)
    except BaseException:
        sock.close()
        raise
    return sock


def run_session(host: str, port: int, timeout: float = 10.0) -> None:
    """One whole session: connect, initialize, disconnect."""
    open_session(host, port, timeout).close()
