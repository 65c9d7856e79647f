"""A storm of whole VNC sessions on a hypervisor's consoles, from threads of this process:
QEMU then raises hundreds to thousands of graphics events a second. ``sessions`` counts the
sessions that ran to their end, for the storm's rate."""

from __future__ import annotations

import contextlib
import threading

from lab import rfb


class SessionStorm:
    """Whole sessions, back to back (or ``pause`` seconds apart), from ``clients_per_port``
    clients on each console, from ``start()`` to ``stop()`` (QEMU then raises hundreds of
    graphics events a second)."""

    def __init__(self, ports: list[int], clients_per_port: int = 8, pause: float = 0.0) -> None:
        self.pause = pause
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.sessions = 0  # whole sessions run so far
        self.threads = [threading.Thread(target=self._client, args=(port,), daemon=True)
                        for port in ports for _client in range(clients_per_port)]

    def _client(self, port: int) -> None:
        while not self.stopping.is_set():
            # QEMU may drop a client under load, or never accept it (its VNC backlog is 1): a
            # short timeout keeps stop() short
            with contextlib.suppress(OSError):
                rfb.run_session("127.0.0.1", port, timeout=0.5)
                with self.lock:
                    self.sessions += 1
            if self.pause:
                self.stopping.wait(self.pause)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            if thread.is_alive():
                thread.join(30)
