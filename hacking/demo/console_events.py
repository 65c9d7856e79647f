"""`make demo`, part one: a local hypervisor with a small domain, ansible-rulebook running the
event source, real VNC clients (gvnccapture, and a session held open while the source starts),
and the events shown as they arrive. Stops by itself and removes what it made."""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "build" / "collections")]

from lab import rfb  # noqa: E402
from lab.hypervisor import SessionHypervisor  # noqa: E402

RULEBOOK = Path(__file__).with_name("console_events.yml")


def show(line: str) -> None:
    """One printed event as a one-line summary."""
    try:
        event = ast.literal_eval(line.strip())["graphics"]
    except (ValueError, SyntaxError, KeyError, TypeError):
        return
    ident = ", ".join(f"{k}={v}" for k, v in event["identity"].items()) or "no identity"
    extra = f" after {event['session']['duration_s']}s" if event["phase"] == "disconnect" else ""
    print(f"   {event['timestamp'][11:23]} {event['phase']:<10}{' (snapshot)' if event['snapshot'] else '':<11} "
          f"{event['domain']['name']} from {event['remote']['node']}:{event['remote']['service']} "
          f"auth={event['auth_scheme']} {ident} session={event['session']['id'][:8]} "
          f"authenticated={event['session']['authenticated']}{extra}", flush=True)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="virtguard-demo-"))
    hv: SessionHypervisor | None = None
    proc: subprocess.Popen[str] | None = None
    held: socket.socket | None = None
    try:
        print("== a libvirt session daemon with one small paused domain (VNC on 127.0.0.1)")
        hv = SessionHypervisor("demo").start()
        domain = hv.create_domain(f"{hv.user}-vm")
        print(f"   {hv.uri}\n   domain {domain.name}, VNC port {domain.vnc_port}")
        held = rfb.open_session("127.0.0.1", domain.vnc_port)
        print(f"   a VNC client is already connected from port {held.getsockname()[1]} (the snapshot will show it)")
        print("== ansible-rulebook with the virtguard.console.libvirt_graphics source")
        (work / "inventory.yml").write_text("all:\n  hosts:\n    localhost:\n")
        (work / "vars.yml").write_text(f"virtguard_uri: '{hv.uri}'\n")
        env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(ROOT / "build" / "collections"))
        rulebook = proc = subprocess.Popen(["ansible-rulebook", "-r", str(RULEBOOK), "-i", "inventory.yml",
                                            "--vars", "vars.yml", "-v"],
                                           cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, start_new_session=True)
        output = rulebook.stdout
        assert output is not None
        os.set_blocking(output.fileno(), False)

        def pump(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                line = output.readline()
                if not line:
                    if rulebook.poll() is not None:
                        raise SystemExit(f"ansible-rulebook exited with {rulebook.returncode}")
                    time.sleep(0.05)
                    continue
                if "watching graphics events" in line:
                    print("   source connected: " + line.split(" - ")[-1].strip())
                show(line)

        pump(12)
        print("== the client that was there first leaves")
        held.close()
        held = None
        pump(3)
        print("== gvnccapture (a real VNC client, exclusive: QEMU would drop other clients) takes a screenshot")
        result = subprocess.run(["gvnccapture", f"127.0.0.1:{domain.vnc_port - 5900}", str(work / "shot.png")],
                                capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)
        print("   " + " / ".join(result.stdout.split("\n")[:2]).strip())
        pump(3)
        print("== done: the demo stops by itself")
    finally:
        if held is not None:
            held.close()
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if hv is not None:
            hv.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
