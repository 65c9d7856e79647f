"""`make demo`, part one: a local hypervisor with two small domains, one with a VNC console and
one with a SPICE console, ansible-rulebook running the event source, real clients (gvnccapture,
a VNC session held open while the source starts, spicy-screenshot, and spicy held open with its
four channels), and the events shown as they arrive. Stops by itself and removes what it made."""

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
from lab.spice_clients import HeldSpicy, spice_screenshot, wait_for_channels  # noqa: E402

RULEBOOK = Path(__file__).with_name("console_events.yml")


def show(line: str) -> None:
    """One printed event as a one-line summary."""
    try:
        event = ast.literal_eval(line.strip())["graphics"]
    except (ValueError, SyntaxError, KeyError, TypeError):
        return
    ident = ", ".join(f"{k}={v}" for k, v in event["identity"].items()) or "no identity"
    session = event["session"]
    extra = f" after {session['duration_s']}s" if "duration_s" in session else ""
    channel = "primary" if session["primary"] else "channel"
    print(f"   {event['timestamp'][11:23]} {event['protocol']:<5} {event['phase']:<10}"
          f"{' (snapshot)' if event['snapshot'] else '':<11} {event['domain']['name']} from "
          f"{event['remote']['node']}:{event['remote']['service']} auth={event['auth_scheme'] or '-'} {ident} "
          f"session={session['id'][:8]} {channel} channels={session['channels']} "
          f"authenticated={session['authenticated']}{extra}", flush=True)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="virtguard-demo-"))
    hv: SessionHypervisor | None = None
    proc: subprocess.Popen[str] | None = None
    held: socket.socket | None = None
    try:
        print("== a libvirt session daemon with two small paused domains (VNC and SPICE on 127.0.0.1)")
        hv = SessionHypervisor("demo", qemu_conf='vnc_listen = "127.0.0.1"\nspice_listen = "127.0.0.1"\n').start()
        domain = hv.create_domain(f"{hv.user}-vm")
        desktop = hv.create_domain(f"{hv.user}-desktop", graphics="spice")
        print(f"   {hv.uri}\n   domain {domain.name}, VNC port {domain.vnc_port}\n"
              f"   domain {desktop.name}, SPICE port {desktop.vnc_port}")
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
        print("== spicy-screenshot (a real SPICE client: main and display channels, one session) takes a frame")
        status, said = spice_screenshot("127.0.0.1", port=desktop.vnc_port)
        print(f"   exit status {status}: {said.strip().splitlines()[-1] if said.strip() else ''}")
        pump(3)
        print("== spicy, held open: four channels (main, display, inputs, cursor), one session, then it leaves")
        with HeldSpicy("127.0.0.1", port=desktop.vnc_port):
            wait_for_channels(hv.virsh, desktop.name, 4)
            pump(2)
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
