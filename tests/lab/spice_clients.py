"""Real SPICE clients for the lab (Debian's spice-client-gtk): ``spicy-screenshot``, which
connects, saves one frame and leaves (two channels: main and display), and ``spicy`` held open
under ``xvfb-run`` (four channels: main, display, inputs, cursor), in a network namespace if
asked; and QEMU's own view of a SPICE server's clients (``query-spice``).

CAs: spicy (spice-gtk's command line options) reads ``$HOME/.spicec/spice_truststore.pem``
unless ``--spice-ca-file`` says otherwise; spicy-screenshot takes no such option and leaves
OpenSSL's default verify paths, which ``SSL_CERT_FILE`` names. Each client gets a HOME of its
own with the CA in both places.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab.hypervisor import PREFIX, wait_for

# query-spice's channel-type of the main channel
MAIN_CHANNEL = 1


def _client_env(ca_pem: bytes | None) -> tuple[dict[str, str], Path]:
    home = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-spice-home-"))
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_CACHE_HOME=str(home / ".cache"), XDG_RUNTIME_DIR=str(home))
    if ca_pem is not None:
        (home / ".spicec").mkdir()
        (home / ".spicec" / "spice_truststore.pem").write_bytes(ca_pem)
        env["SSL_CERT_FILE"] = str(home / ".spicec" / "spice_truststore.pem")
    env.pop("DISPLAY", None)
    return env, home


def _in_netns(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def _target(host: str, port: int | None, tls_port: int | None, password: str | None,
            username: str | None = None) -> list[str]:
    """The options of spicy and spicy-screenshot that say where to connect and how to log in;
    a SASL ``username`` goes in a ``spice://user@host`` URI, the only way spicy-screenshot has."""
    if username is not None:
        ports = "&".join(f"{key}={value}" for key, value in (("port", port), ("tls-port", tls_port)) if value)
        argv = ["--uri", f"spice://{username}@{host}?{ports}"]
    else:
        argv = ["-h", host]
        argv += ["-p", str(port)] if port is not None else []
        argv += ["-s", str(tls_port)] if tls_port is not None else []
    return argv + (["-w", password] if password is not None else [])


def spice_screenshot(host: str, port: int | None = None, tls_port: int | None = None, password: str | None = None,
                     ca_pem: bytes | None = None, netns: str | None = None, username: str | None = None,
                     timeout: float = 60) -> tuple[int, str]:
    """One whole ``spicy-screenshot`` session; returns its exit status and what it printed
    (0 and "wrote screen shot" when it got a frame). A SASL login takes ``username`` and
    ``password``; with SCRAM it needs TLS (spice-gtk asks for a security layer on a plain
    connection)."""
    env, home = _client_env(ca_pem)
    argv = ["spicy-screenshot", "-o", str(home / "shot.ppm"), *_target(host, port, tls_port, password, username)]
    try:
        done = subprocess.run(_in_netns(netns, argv), env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
        return done.returncode, done.stdout + done.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)


class HeldSpicy:
    """``spicy`` connected to a SPICE console and held open (under ``xvfb-run``) until ``close``."""

    def __init__(self, host: str, port: int | None = None, tls_port: int | None = None, password: str | None = None,
                 ca_pem: bytes | None = None, netns: str | None = None, username: str | None = None,
                 secure_channels: bool = False) -> None:
        """``secure_channels``: every channel over TLS or none (spicy's ``--spice-secure-channels=all``)."""
        self.env, self.home = _client_env(ca_pem)
        # xvfb-run's own temporary directory, which it leaves when stopped by a signal: in
        # self.home, removed by close()
        self.env["TMPDIR"] = str(self.home)
        argv = ["xvfb-run", "-a", "-e", str(self.home / "xvfb.log"), "spicy",
                *_target(host, port, tls_port, password, username)]
        argv += ["--spice-secure-channels=all"] if secure_channels else []
        self.log = open(self.home / "spicy.log", "wb")  # noqa: SIM115 closed in close()
        self.proc = subprocess.Popen(_in_netns(netns, argv), env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def close(self) -> None:
        """Stop spicy (and its X server): its channels all disconnect."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        self.log.close()
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> HeldSpicy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def spice_channels(virsh: Callable[..., Any], domain: str) -> list[dict[str, Any]]:
    """QEMU's connected SPICE channels of ``domain``; ``virsh`` is a lab host's ``virsh`` method
    (SessionHypervisor, FleetHost)."""
    answer = json.loads(virsh("qemu-monitor-command", domain, json.dumps({"execute": "query-spice"})).stdout)
    channels: list[dict[str, Any]] = answer["return"].get("channels", [])
    return channels


def wait_for_channels(virsh: Callable[..., Any], domain: str, count: int, host: str | None = None,
                      timeout: float = 60) -> list[dict[str, Any]]:
    """Until QEMU lists exactly ``count`` channels (of clients at ``host``, if given) on the domain."""
    def channels() -> tuple[list[dict[str, Any]]] | None:
        found = [c for c in spice_channels(virsh, domain) if host is None or c["host"] == host]
        return (found,) if len(found) == count else None
    result: tuple[list[dict[str, Any]]] = wait_for(channels, timeout, f"{count} SPICE channels on {domain}",
                                                   interval=0.2)
    return result[0]
