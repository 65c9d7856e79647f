"""Offenders that keep coming back: client addresses in a network namespace, each connecting
(a real RFB handshake: a session QEMU reports), holding its session until the hypervisor ends
it, waiting ``pause`` seconds and connecting again, until stopped. They run in a process of
their own inside the namespace, so that their threads take no CPU from the caller's.

Used by tests/integration/test_remediation_full_set.py and bench/resilience.py (a block set
smaller than the attack)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from lab.rulebook_runner import ROOT

# Each source address in a thread of its own; the counts are the offenders' own view, for
# reports only (the hypervisor's view is what tests judge).
_RECONNECTING = textwrap.dedent("""
    import json, socket, sys, threading, time
    from lab import rfb
    host, pause, sources = sys.argv[1], float(sys.argv[3]), sys.argv[4:]
    ports = [int(p) for p in sys.argv[2].split(",")]
    stop = threading.Event()
    counts = {source: {"sessions": 0, "refused": 0, "other": 0} for source in sources}

    def offend(index, source):
        port = ports[index % len(ports)]
        while not stop.is_set():
            try:
                sock = rfb.open_session(host, port, timeout=3, source=(source, 0))
            except ConnectionRefusedError:
                counts[source]["refused"] += 1
            except OSError:
                counts[source]["other"] += 1
            else:
                counts[source]["sessions"] += 1
                sock.settimeout(0.3)
                while not stop.is_set():
                    try:
                        if not sock.recv(65536):
                            break
                    except socket.timeout:
                        continue
                    except OSError:
                        break
                sock.close()
            stop.wait(pause)

    threads = [threading.Thread(target=offend, args=(i, s), daemon=True) for i, s in enumerate(sources)]
    for thread in threads:
        thread.start()
    print("started", flush=True)
    sys.stdin.read()
    stop.set()
    for thread in threads:
        thread.join(10)
    print(json.dumps(counts), flush=True)
""")


class ReconnectingOffenders:
    """``ReconnectingOffenders(netns, host, ports, sources, pause)`` returns once every offender
    of ``sources`` (addresses of the namespace ``netns``) has started; offender ``i`` goes to
    ``ports[i % len(ports)]`` on ``host``. ``stop()`` ends them."""

    def __init__(self, netns: str, host: str, ports: list[int], sources: list[str], pause: float) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", _RECONNECTING, host,
             ",".join(map(str, ports)), str(pause), *sources],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "started":
            self.proc.kill()
            _out, err = self.proc.communicate()
            raise RuntimeError(f"the offenders did not start: {line}{err}")

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> dict[str, dict[str, int]]:
        """Stop them; what each address met (sessions, refused, other failures), in its own view."""
        if self.proc.poll() is not None:
            return {}
        try:
            out, _err = self.proc.communicate("", timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            return {}
        lines = out.strip().splitlines()
        counts: dict[str, dict[str, int]] = json.loads(lines[-1]) if lines else {}
        return counts

    def kill(self) -> None:
        """End them at once (cleanup after a failure)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
