"""Measurement 12: remediation that no single input switches off or turns against its users
(issue 17). The shipped rulebooks through the real ansible-rulebook, against one real session
daemon whose consoles listen on ``::``, with clients that have addresses of their own
(bench/storm.py's AttackerHost; a link-local client namespace from tests/lab/netns.py). Every cut
is judged on the hypervisor: its kernel's connections (``ss``) and QEMU's client lists
(``query-vnc``); times are libvirt's, from a session's connect event to its disconnect event
(the audit's event records), as in bench/storm.py.

- lone: untrusted sessions one at a time: the reference every time below stands beside;
- link_local: a link-local offender (``ss`` prints it with its zone), then offenders one at a
  time after it;
- domain_end: a domain destroyed under its offender, the offender's run in flight or the
  offender queued behind another's run, then an offender alone on another console of the host
  (once the runs ended, or at once beside the dead session's run);
- full_set: a block set of 10 and 30 offenders that reconnect every 0.4 s: how much of a fixed
  window the offenders that did not fit in the set of single addresses are connected, and where
  that time goes;
- protected: bruteforce against failed logins through a console proxy, from a trusted admin,
  next to a trusted admin in its /64, and from clients an exclusive client drops; what is blocked
  and what is cut, beside controls that must be blocked;
- audit_lock: a reader holding the audit file's ``flock`` through a storm: every offender cut,
  and the loss the activation states against what is missing from the file (a ``virsh event``
  witness).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.stats import load_average, median, percentile
from bench.storm import (
    Activation,
    AttackerHost,
    client_address,
    event_seconds,
    lone,
    lone_offender,
    open_sessions,
    sessions_cut,
    wait_all_gone,
    wait_cut_on_hypervisor,
)
from lab import rfb
from lab.audit_loss import audit_loss, events_stated_exactly, missing_events, missing_remediations, stated_lost_in_all
from lab.file_lock import HeldLock, exclusive_lock_free
from lab.hypervisor import Domain, EventWitness, SessionHypervisor, wait_for
from lab.netns import ClientNamespace
from lab.reconnecting_offenders import ReconnectingOffenders
from lab.rulebook_runner import read_jsonl
from lab.server_view import connected_clients, established_peers, nft_blocked_networks

Log = Callable[[str], None]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Console ports of this measurement's daemon: apart from bench/storm.py's (27000..27199) and
# from the 5900+ that other suites' daemons use.
PORT_BASE = 27400
# 198.18.SUBNET.0/24 of the clients that need /24s of their own (AttackerHost.addresses4_in),
# far above the addresses AttackerHost.addresses4 counts up from 198.18.0.10.
FULL_SET_SUBNET = 210  # one /24 per group of offenders: 210, 211, ...
PROTECTED_SUBNET = 220  # 220..223: trusted admin, bystander, control, exclusive taker
LOCK_TRUSTED_SUBNET = 230
TRUSTED_HOST = 200  # the full set's trusted neighbour, in the last group's /24


def measure(lab: Any, log: Log, lone_runs: int = 5, followers: int = 5, domain_rounds: int = 3,
            set_size: int = 10, groups: tuple[int, ...] = (13, 13, 4), window_s: float = 60.0, pause_s: float = 0.4,
            threshold: int = 4, lock_storm: int = 100, consoles: int = 5) -> dict[str, Any]:
    conf = (f'vnc_listen = "::"\nremote_display_port_min = {PORT_BASE}\n'
            f"remote_display_port_max = {PORT_BASE + 99}\n")
    hv = SessionHypervisor("rs", qemu_conf=conf)
    lab.hypervisors.append(hv)
    attacker = AttackerHost("r").create()
    table = f"vgr{os.getpid() % 100000}"
    workdir = Path(tempfile.mkdtemp(prefix="vgt-bench-resilience-", dir=ROOT / "build"))
    log(f"#   activations' logs and audits: {workdir}")
    result: dict[str, Any] = {"consoles": consoles}
    try:
        hv.start()
        with ThreadPoolExecutor(4) as pool:
            domains = list(pool.map(lambda n: hv.create_domain(f"{hv.user}-d{n}", listen="::"), range(consoles)))
        # a console that asks for a password, where logins fail
        locked = hv.create_domain(f"{hv.user}-pw", listen="::", password="unknown")
        variables = {"virtguard_uri": hv.uri, "virtguard_trusted_networks": ["192.0.2.0/24"],
                     "virtguard_nft_table": table, "virtguard_block_seconds": 600}
        with Activation("unauthorized_console", variables, workdir / "unauthorized") as activation:
            # The reference: lone sessions before and after the phases it stands beside, so that it
            # sees the same machine as they do (others' load here changes from minute to minute).
            load = load_average()
            before = lone(activation, attacker, hv, domains[0], lone_runs, log)
            result["link_local"] = after_link_local(activation, attacker, hv, domains[0], followers, log)
            result["domain_end"] = after_domain_end(activation, attacker, hv, domains[:2], domain_rounds, log)
            after = lone(activation, attacker, hv, domains[0], lone_runs, log)
            latencies = before["latencies_s"] + after["latencies_s"]
            result["lone"] = {"runs": before["runs"] + after["runs"], "cut": len(latencies), "latencies_s": latencies,
                              "p50_s": median(latencies), "p50_before_s": before["p50_s"],
                              "p50_after_s": after["p50_s"], "load": load, "load_after": load_average()}
        drop_table(table)
        result["full_set"] = full_set(hv, attacker, domains[:2], table, workdir / "full_set", set_size, groups,
                                      window_s, pause_s, log)
        drop_table(table)
        result["protected"] = protected(hv, attacker, domains[:2], locked, table, workdir / "protected",
                                        threshold, log)
        drop_table(table)
        result["audit_lock"] = audit_lock(hv, attacker, domains, table, workdir / "audit_lock", lock_storm, log)
    finally:
        attacker.delete()
        drop_table(table)
        lab.release([hv])
    return result


def drop_table(table: str) -> None:
    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)


def covered(address: str, networks: set[Network]) -> bool:
    value = ipaddress.ip_address(address)
    return any(value in network for network in networks)


# -- a link-local offender, then offenders one at a time -------------------------------------


def after_link_local(activation: Activation, attacker: AttackerHost, hv: SessionHypervisor, domain: Domain,
                     followers: int, log: Log) -> dict[str, Any]:
    """A client at ``fe80::…`` (through a veth whose link-local addresses are usable at once)
    holds a session on ``domain`` until it is cut; then ``followers`` offenders, one at a time."""
    load = load_average()
    ns = ClientNamespace(0, tag="r", link_local=True).create()
    try:
        assert ns.host_ll is not None and ns.client_ll is not None
        sock = ns.call(rfb.open_session, f"{ns.host_ll}%{ns.ns_link}", domain.vnc_port)
        try:
            port = sock.getsockname()[1]
            shown = subprocess.run(["ss", "-t", "-n", "-H", "state", "established", f"( sport = :{domain.vnc_port} )"],
                                   capture_output=True, text=True, check=True).stdout
            # the control: the hypervisor shows the client with its zone, the form ss refuses back
            zoned = f"[{ns.host_ll}]%{ns.host_link}:{domain.vnc_port}" in shown
            gone_s = wait_cut_on_hypervisor(hv, [domain], {(ns.client_ll, port)}, 60)
            own = wait_for(lambda: sessions_cut(activation, {ns.client_ll}), 30, "the link-local cut record",
                           interval=0.2) if gone_s is not None else {}
        except TimeoutError:
            own = {}
        finally:
            sock.close()
        records = [r for r in activation.remediations("cut")
                   if any(c["peer_port"] == port and c["peer_address"].split("%", 1)[0] == ns.client_ll
                          for c in r["result"].get("cut", []))]
        latencies: list[float | None] = []
        sources = []
        for _follower in range(followers):
            time.sleep(1)
            latency, source = lone_offender(activation, attacker, hv, domain)
            latencies.append(latency)
            sources.append(source)
    finally:
        ns.delete()
    cut = [s for s in latencies if s is not None]
    # Independent of the machine's speed: each later offender's run went out with its own session's
    # event, alone, and no batch after the link-local one's carried it again.
    batches = sent_batches(activation.read())
    sent_alone = sum(1 for source in sources if own_batch(batches, source) == [source])
    carried_again = max(0, sum(1 for _address, batch in batches if ns.client_ll in batch) - 1)
    blocked_128 = any(f"{ns.client_ll}/128" in r.get("networks", []) and r["ok"]
                      for r in activation.remediations("block"))
    log(f"#   link-local offender shown with its zone: {zoned}, gone on the hypervisor after {gone_s} s; "
        f"offenders after it, connect to cut: {', '.join('not cut' if s is None else f'{s:.2f}' for s in latencies)}")
    return {"load": load, "zoned": zoned, "link_local_cut": gone_s is not None and bool(own),
            "link_local_s": max(own.values()) if own else None,
            "cut_records_ok": bool(records) and all(r["ok"] and not r["result"].get("failed") for r in records),
            "followers": followers, "followers_cut": len(cut), "latencies_s": latencies,
            "worst_s": max(cut) if cut else None, "followers_sent_alone": sent_alone,
            "link_local_batches_after_its_own": carried_again, "link_local_blocked_128": blocked_128}


def sent_batches(records: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Every batch the filter sent, in order: the address of the event that carried it, and the
    batch's addresses."""
    return [(r["virtguard"]["remote"]["address"], [b["address"] for b in r["virtguard"]["batch"]])
            for r in records if r["record"] == "event" and r["virtguard"].get("remediate")]


def own_batch(batches: list[tuple[str, list[str]]], address: str) -> list[str] | None:
    """The batch that an event of ``address``'s own session carried with ``address`` in it: its
    remediation went out at once, not held behind another run. None when no such batch."""
    for carrier, batch in batches:
        if carrier == address and address in batch:
            return batch
    return None


# -- a domain destroyed under its offender ---------------------------------------------------


def after_domain_end(activation: Activation, attacker: AttackerHost, hv: SessionHypervisor, domains: list[Domain],
                     rounds: int, log: Log) -> dict[str, Any]:
    """Each round, three times a domain destroyed under its offender, then one offender alone on
    ``domains[0]`` (its connect-to-cut time):

    - ``in flight``: the offender's run was sent (destroyed 0.5 s after its connect); the next
      offender comes once that run's ansible-playbook has ended, as offenders a few seconds
      apart do: only the filter's state can make it wait (before, the dead session held the
      host's queue for the whole holdoff);
    - ``in flight, at once``: the same, the next offender right after the destroy, while the
      dead session's ansible-playbook still runs beside its own;
    - ``queued``: the offender queued behind another offender's run (on ``domains[1]``),
      destroyed at once; the next offender comes once that run has ended."""
    load = load_average()
    rows: list[dict[str, Any]] = []
    for n in range(rounds):
        for k, kind in enumerate(("in flight", "in flight, at once", "queued")):
            doomed = hv.create_domain(f"{hv.user}-x{n}{k}", listen="::")
            held: list[tuple[socket.socket, str]] = []
            try:
                if kind == "queued":  # a run in flight, so that the doomed domain's offender is queued behind it
                    held += open_sessions(attacker, attacker.host_ip, [domains[1].vnc_port], attacker.addresses4(1), 1)
                source = attacker.addresses4(1)
                held += open_sessions(attacker, attacker.host_ip, [doomed.vnc_port], source, 1)
                if kind != "queued":
                    time.sleep(0.5)
                hv.destroy_domain(doomed.name)
                latency, following = lone_offender(activation, attacker, hv, domains[0],
                                                   idle_first=kind != "in flight, at once")
                records = activation.read()
                ended = [r for r in records if r["record"] == "event"
                         and r["virtguard"]["remote"]["address"] == source[0]
                         and r["graphics"]["phase"] == "disconnect"]
            finally:
                for sock, _source in held:
                    sock.close()
            # independent of the machine's speed: the next offender's run went out with its own
            # session's event, alone (not held behind the dead session's run until the holdoff)
            rows.append({"kind": kind, "latency_s": latency,
                         "ended_by": [r["virtguard"].get("ended_by") for r in ended],
                         "sent_alone": own_batch(sent_batches(records), following) == [following]})
    log("#   domain stopped under an offender, the next offender's connect to cut: "
        + ", ".join(f"{r['kind']} {'not cut' if r['latency_s'] is None else round(r['latency_s'], 2)}"
                    for r in rows))
    summary: dict[str, Any] = {"load": load, "rounds": rows}
    for kind in ("in flight", "in flight, at once", "queued"):
        mine = [r["latency_s"] for r in rows if r["kind"] == kind]
        cut = [s for s in mine if s is not None]
        summary[kind] = {"asked": len(mine), "cut": len(cut), "worst_s": max(cut) if cut else None,
                         "p50_s": median(cut) if cut else None,
                         "ended_by_domain": sum(r["ended_by"] == ["domain"] for r in rows if r["kind"] == kind),
                         "sent_alone": sum(r["sent_alone"] for r in rows if r["kind"] == kind)}
    return summary


# -- a full block set ------------------------------------------------------------------------


def full_set(hv: SessionHypervisor, attacker: AttackerHost, domains: list[Domain], table: str, workdir: Path,
             set_size: int, groups: tuple[int, ...], window_s: float, pause_s: float, log: Log,
             extra_variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """Offenders in /24s of their own (``groups`` of them per /24; a trusted neighbour in the last
    one) reconnecting every ``pause_s`` against a set of ``set_size``. The window: ``window_s``
    from the first offender's first connect (libvirt's time); measured on the hypervisor's
    sockets (``ss``, sampled every 0.25 s) and from libvirt's connect and disconnect events.
    ``extra_variables``: more of the rulebook's variables (bench/second_run.py)."""
    load = load_average()
    offenders_of = [attacker.addresses4_in(FULL_SET_SUBNET + g, list(range(10, 10 + n))) for g, n in enumerate(groups)]
    offenders = [address for group in offenders_of for address in group]
    (trusted,) = attacker.addresses4_in(FULL_SET_SUBNET + len(groups) - 1, [TRUSTED_HOST])
    ports = [d.vnc_port for d in domains]
    variables = {"virtguard_uri": hv.uri, "virtguard_trusted_networks": [f"{trusted}/32"],
                 "virtguard_block_set_size": set_size, "virtguard_block_seconds": 600, "virtguard_nft_table": table,
                 **(extra_variables or {})}
    samples: list[tuple[float, set[str]]] = []  # (wall-clock time, offenders connected in the kernel's view)
    blocked_at: float | None = None
    with Activation("unauthorized_console", variables, workdir) as activation:
        running = ReconnectingOffenders(attacker.name, attacker.host_ip, ports, offenders, pause_s)
        try:
            started = time.monotonic()
            while True:
                now = time.time()
                connected = {str(address) for address, _port in established_peers(ports)} & set(offenders)
                samples.append((now, connected))
                if blocked_at is None:
                    blocks = nft_blocked_networks(table)
                    if not connected and all(covered(a, blocks) for a in offenders):
                        blocked_at = now
                    elif time.monotonic() - started > window_s + 120:
                        break  # never all blocked: the figures say so
                elif time.monotonic() - started >= window_s + 5 and now >= blocked_at + 5:
                    break
                time.sleep(0.25)
            kept_trying = running.running()
            counts = running.stop()
        finally:
            running.kill()
        blocks = nft_blocked_networks(table)
        connected_after = {str(a) for a, _p in established_peers(ports)} & set(offenders)
        try:
            sock = attacker.call(rfb.open_session, attacker.host_ip, ports[0], 5.0, (trusted, 0))
            client = (trusted, sock.getsockname()[1])
            trusted_in = wait_for(lambda: client in {(str(a), p) for a, p in connected_clients(hv, domains[:1])},
                                  10, "the trusted neighbour's session", interval=0.2)
            sock.close()
        except (OSError, TimeoutError):
            trusted_in = False
        activation.wait_idle()  # the last runs' audit records
        records = activation.read()
    result = connected_time(samples, records, offenders, blocks, window_s)
    result.update({
        "load": load, "set_size": set_size, "groups": list(groups), "pause_s": pause_s, "kept_trying": kept_trying,
        "all_blocked": blocked_at is not None and all(covered(a, blocks) for a in offenders),
        # samples after every offender was blocked that still had one connected, and connections at the end
        "connected_after_blocked": len(connected_after) + sum(
            1 for t, c in samples if blocked_at is not None and t > blocked_at and c),
        "trusted_blocked": covered(trusted, blocks), "trusted_session": bool(trusted_in),
        "offenders_own_counts": {k: sum(c.get(k, 0) for c in counts.values())
                                 for k in ("sessions", "refused", "other")},
    })
    return result


def connected_time(samples: list[tuple[float, set[str]]], records: list[dict[str, Any]], offenders: list[str],
                   blocks: set[Network], window_s: float) -> dict[str, Any]:
    """The share of the window each group was connected, and where the overflow's time went:
    before each offender's first cut (the batches of the storm) or after it (sessions that got
    through again before a block held)."""
    # the overflow: offenders that did not fit in the set of single addresses (a wider network holds them)
    overflow = [a for a in offenders if ipaddress.ip_network(a) not in blocks]
    sessions = offender_sessions(records, set(offenders))
    if not sessions:
        return {"offenders": len(offenders), "overflow": len(overflow), "window_s": window_s, "runs": []}
    begin = sessions[0]["connect"]
    end = begin + window_s
    window = [c for t, c in samples if begin <= t <= end]
    runs = remediation_runs(records, sessions, begin)
    first_cut: dict[str, float] = {}
    for session in sessions:
        if session["cut"] and session["disconnect"] is not None:
            first_cut[session["address"]] = min(first_cut.get(session["address"], session["disconnect"]),
                                                session["disconnect"])

    def sampled(group: list[str]) -> float | None:
        if not group or not window:
            return None
        return sum(len(c & set(group)) for c in window) / (len(window) * len(group))

    def evented(group: list[str], part: str = "all") -> float | None:
        """Connected share of the window; ``part``: all, before or after each address's first cut."""
        if not group:
            return None
        total = 0.0
        for s in sessions:
            if s["address"] not in group:
                continue
            cut_at = first_cut.get(s["address"], end)
            lo, hi = {"all": (begin, end), "before": (begin, min(cut_at, end)),
                      "after": (max(cut_at, begin), end)}[part]
            total += overlap(s, lo, hi)
        return total / (window_s * len(group))

    firsts = {a: min(s["connect"] for s in sessions if s["address"] == a) for a in overflow
              if any(s["address"] == a for s in sessions)}
    to_first_cut = sorted(first_cut[a] - firsts[a] for a in firsts if a in first_cut)
    after = [s for s in sessions if s["address"] in first_cut and s["connect"] >= first_cut[s["address"]]
             and s["connect"] <= end]
    return {
        "offenders": len(offenders), "overflow": len(overflow), "window_s": window_s, "samples": len(window),
        "overflow_share_ss": sampled(overflow), "overflow_share_events": evented(overflow),
        "all_share_ss": sampled(offenders), "all_share_events": evented(offenders),
        "overflow_share_before_first_cut": evented(overflow, "before"),
        "overflow_share_after_first_cut": evented(overflow, "after"),
        "overflow_to_first_cut_p50_s": percentile(to_first_cut, 50),
        "overflow_to_first_cut_max_s": to_first_cut[-1] if to_first_cut else None,
        "overflow_never_cut": len(overflow) - len(to_first_cut),
        "sessions_after_first_cut": len(after),
        "sessions_in_window": sum(1 for s in sessions if s["connect"] <= end),
        "sessions_open_at_window_end": sum(1 for s in sessions if s["connect"] <= end
                                           and (s["disconnect"] is None or s["disconnect"] > end)),
        "runs": runs,
    }


def offender_sessions(records: list[dict[str, Any]], offenders: set[str]) -> list[dict[str, Any]]:
    """Every session of ``offenders`` from libvirt's connect and disconnect events, in the order
    they connected: address, port, connect and disconnect times (None: still open), and whether
    a remediation's cut record lists it (``cut``)."""
    found: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["record"] != "event" or record["virtguard"]["remote"]["address"] not in offenders:
            continue
        session = record["graphics"]["session"]["id"]
        phase = record["graphics"]["phase"]
        if phase == "connect":
            found[session] = {"address": record["virtguard"]["remote"]["address"],
                              "port": record["virtguard"]["remote"]["port"], "connect": event_seconds(record),
                              "disconnect": None, "cut": False}
        elif phase == "disconnect" and session in found:
            found[session]["disconnect"] = event_seconds(record)
    by_client = {(s["address"], s["port"]): s for s in sorted(found.values(), key=lambda s: s["connect"])}
    for client in cut_clients(records):
        if client in by_client:
            by_client[client]["cut"] = True
    return sorted(found.values(), key=lambda s: s["connect"])


def cut_clients(records: list[dict[str, Any]], record: dict[str, Any] | None = None) -> set[tuple[str, int]]:
    """(client address, client port) of every connection the cut records (or ``record``) list as cut."""
    chosen = [record] if record else [r for r in records if r["record"] == "remediation" and r["action"] == "cut"]
    return {(client_address(c["peer_address"]), c["peer_port"]) for r in chosen for c in r["result"].get("cut", [])}


def remediation_runs(records: list[dict[str, Any]], sessions: list[dict[str, Any]], begin: float
                     ) -> list[dict[str, Any]]:
    """Each run (its block and cut records, written together): batch size, networks widened,
    addresses left out, and when its cut landed (the last disconnect of the sessions it cut),
    in seconds after ``begin``."""
    blocks = [r for r in records if r["record"] == "remediation" and r["action"] == "block"]
    cuts = [r for r in records if r["record"] == "remediation" and r["action"] == "cut"]
    ends = {(s["address"], s["port"]): s["disconnect"] for s in sessions if s["disconnect"] is not None}
    runs = []
    for block, cut in zip(blocks, cuts, strict=False):
        landed = [ends[c] for c in cut_clients(records, cut) if c in ends]
        runs.append({"batch_size": block.get("batch_size"), "ok": block["ok"] and cut["ok"],
                     "widened": [w["network"] for w in block["result"].get("widened", [])],
                     "not_blocked": len(block["result"].get("not_blocked", [])),
                     "cut_at_s": max(landed) - begin if landed else None})
    return runs


def overlap(session: dict[str, Any], begin: float, end: float) -> float:
    """Seconds of ``session`` inside [begin, end]; a session still open counts to the end."""
    stop: float = session["disconnect"] if session["disconnect"] is not None else end
    start: float = session["connect"]
    return max(0.0, min(stop, end) - max(start, begin))


# -- protected addresses under bruteforce ----------------------------------------------------


def fail_logins(host: str, port: int, source: str, times: int) -> int:
    """Connect and leave before the handshake, ``times`` times (a failed login on a console that
    asks for a password); how many connections were refused (the address was blocked)."""
    refused = 0
    for _attempt in range(times):
        try:
            sock = socket.create_connection((host, port), 5, (source, 0))
        except OSError:
            refused += 1
            continue
        try:
            sock.recv(12)  # the server's RFB version: QEMU has the client
        except OSError:
            pass
        sock.close()
    return refused


def dropped_by_exclusive(host: str, port: int, source: str, times: int) -> int:
    """Shared sessions tried beside an exclusive client; how many QEMU dropped."""
    dropped = 0
    for _attempt in range(times):
        try:
            rfb.open_session(host, port, timeout=5, source=(source, 0)).close()
        except OSError:
            dropped += 1
    return dropped


def protected(hv: SessionHypervisor, attacker: AttackerHost, domains: list[Domain], locked: Domain, table: str,
              workdir: Path, threshold: int, log: Log) -> dict[str, Any]:
    """The bruteforce rulebook (threshold ``threshold``) with a trusted IPv4 admin, a trusted IPv6
    admin and a console proxy (a loopback address of its own on the hypervisor), each holding a
    session on ``domains[0]``:

    - proxy: twice the threshold of failed logins through the proxy;
    - trusted admin: twice the threshold of failed logins from the IPv4 admin;
    - same /64: an attacker in the IPv6 admin's /64 fails the threshold (a /64 block would hold
      the admin);
    - exclusive client: a client takes ``domains[1]`` exclusively, then the IPv4 admin and an
      untrusted bystander each try twice the threshold of shared sessions there (no
      authentication: dropped, never failed logins).

    The controls: an untrusted address (holding a session) that fails the threshold is blocked and
    its session cut; the same-/64 attacker is blocked by its own /128."""
    load = load_average()
    console, shared_console = domains
    admin4, bystander, control, taker = (attacker.addresses4_in(PROTECTED_SUBNET + n, [10])[0] for n in range(4))
    attacker6, admin6 = attacker.addresses6(2)
    pid = os.getpid()
    proxy = f"127.{100 + pid % 100}.{pid // 100 % 250}.7"
    variables = {"virtguard_uri": hv.uri, "virtguard_nft_table": table, "virtguard_bruteforce_threshold": threshold,
                 "virtguard_bruteforce_window": 30, "virtguard_block_seconds": 60,
                 "virtguard_trusted_networks": [f"{admin4}/32", f"{admin6}/128"],
                 "virtguard_console_proxies": [proxy]}
    attempts = 2 * threshold
    held: dict[str, socket.socket] = {}
    with Activation("bruteforce", variables, workdir) as activation:
        try:
            held["proxy"] = rfb.open_session("127.0.0.1", console.vnc_port, source=(proxy, 0))
            for name, host, source in (("admin4", attacker.host_ip, admin4), ("admin6", attacker.host_ip6, admin6),
                                       ("control", attacker.host_ip, control),
                                       ("attacker6", attacker.host_ip6, attacker6)):
                held[name] = attacker.call(rfb.open_session, host, console.vnc_port, 10.0, (source, 0))
            clients = {name: (sock.getsockname()[0].split("%", 1)[0], sock.getsockname()[1])
                       for name, sock in held.items()}
            clients = {name: (str(ipaddress.ip_address(a)), p) for name, (a, p) in clients.items()}
            fail_logins("127.0.0.1", locked.vnc_port, proxy, attempts)
            attacker.call(fail_logins, attacker.host_ip, locked.vnc_port, admin4, attempts)
            attacker.call(fail_logins, attacker.host_ip6, locked.vnc_port, attacker6, threshold)
            attacker.call(fail_logins, attacker.host_ip, locked.vnc_port, control, threshold)
            exclusive = attacker.call(rfb.open_session, attacker.host_ip, shared_console.vnc_port, 10.0, (taker, 0),
                                      False)
            try:
                dropped = {name: attacker.call(dropped_by_exclusive, attacker.host_ip, shared_console.vnc_port,
                                               source, attempts)
                           for name, source in (("admin4", admin4), ("bystander", bystander))}
            finally:
                exclusive.close()
            controls_cut = {name: wait_cut_on_hypervisor(hv, [console], {clients[name]}, 90)
                            for name in ("control", "attacker6")}

            def victims_recorded() -> bool:
                return len(exclusive_disconnects(activation.read(), shared_console, (admin4, bystander))) \
                    >= sum(dropped.values())

            def reported() -> bool:
                found = reports(activation.read())
                return found.get(proxy, 0) > 0 and found.get(admin4, 0) > 0
            for done, what in ((victims_recorded, "the exclusive client's victims' disconnects"),
                               (reported, "the proxy's and the admin's brute-force reports")):
                try:
                    wait_for(done, 60, what, interval=0.5)
                except TimeoutError:
                    log(f"#   protected: no {what} within 60 s")
            time.sleep(3)  # a remediation run, had one been sent for a protected address, has started by now
            activation.wait_idle()  # and ended
            blocks = nft_blocked_networks(table)
            still = {(str(a), p) for a, p in connected_clients(hv, [console])}
            records = activation.read()
        finally:
            for sock in held.values():
                sock.close()
    remediated = [r for r in records if r["record"] == "remediation"]
    protected_remediated = sorted({a for r in remediated for a in (admin4, admin6, proxy)
                                   if covered(a, {ipaddress.ip_network(n) for n in r.get("networks", [])})})
    victims = exclusive_disconnects(records, shared_console, (admin4, bystander))
    found = reports(records)
    cases: dict[str, dict[str, Any]] = {
        "proxy": {"blocked": covered(proxy, blocks), "session_cut": clients["proxy"] not in still,
                  "reports": found.get(proxy, 0)},
        "trusted admin": {"blocked": covered(admin4, blocks), "session_cut": clients["admin4"] not in still,
                          "reports": found.get(admin4, 0)},
        "same /64": {"blocked": covered(admin6, blocks), "session_cut": clients["admin6"] not in still,
                     "attacker_blocked_128": ipaddress.ip_network(attacker6) in blocks,
                     "prefix_blocked": ipaddress.ip_network(f"{attacker6}/64", strict=False) in blocks},
        "exclusive client": {"blocked": covered(admin4, blocks), "bystander_blocked": covered(bystander, blocks),
                             "dropped": dropped, "disconnects": len(victims),
                             "failed_logins": sum(1 for v in victims if v["virtguard"].get("failed_login"))},
    }
    result: dict[str, Any] = {
        "load": load, "threshold": threshold, "attempts": attempts, "cases": cases,
        "control": {"blocked": covered(control, blocks), "session_cut": controls_cut["control"] is not None},
        "attacker6_session_cut": controls_cut["attacker6"] is not None,
        "remediations": len(remediated), "protected_in_remediations": protected_remediated,
    }
    result["trusted_blocked"] = sum(case["blocked"] for case in cases.values())
    result["trusted_cut"] = sum(case.get("session_cut", False) for case in cases.values())
    log(f"#   protected: {result['cases']}; control {result['control']}")
    return result


def exclusive_disconnects(records: list[dict[str, Any]], console: Domain, sources: tuple[str, ...]
                          ) -> list[dict[str, Any]]:
    return [r for r in records if r["record"] == "event" and r["graphics"]["phase"] == "disconnect"
            and r["virtguard"]["remote"]["address"] in sources
            and r["graphics"]["local"]["service"] == str(console.vnc_port)]


def reports(records: list[dict[str, Any]]) -> dict[str, int]:
    """Brute-force reports (verdict report) by address."""
    found: dict[str, int] = {}
    for record in records:
        if record["record"] == "event" and record["virtguard"]["verdict"] == "report":
            address = record["virtguard"]["remote"]["address"]
            found[address] = found.get(address, 0) + 1
    return found


# -- a reader's lock on the audit file -------------------------------------------------------


def audit_lock(hv: SessionHypervisor, attacker: AttackerHost, domains: list[Domain], table: str, workdir: Path,
               count: int, log: Log) -> dict[str, Any]:
    """unauthorized_console; a storm of ``count`` with the audit file free (the reference of the
    same activation), then a reader holds a shared ``flock`` on it (as a log reader may) and a
    storm of ``count`` more comes. Then the reader goes, a trusted session's disconnect marks the
    end, and the loss stated is set against what is missing (lab.audit_loss)."""
    load = load_average()
    (sentinel,) = attacker.addresses4_in(LOCK_TRUSTED_SUBNET, [10])
    variables = {"virtguard_uri": hv.uri, "virtguard_nft_table": table, "virtguard_block_seconds": 120,
                 "virtguard_trusted_networks": [f"{sentinel}/32"]}
    workdir.mkdir(parents=True, exist_ok=True)
    activation = Activation("unauthorized_console", variables, workdir)
    activation.audit.write_bytes(b"")  # the reader opens it
    reader = HeldLock(activation.audit)
    result: dict[str, Any] = {"load": load, "storm": count}
    with activation:
        witness = EventWitness(hv.uri, domains[0].name)
        try:
            result["free"] = storm_on_hypervisor(activation, attacker, hv, domains, count, audited=True)
            result["free_runs_end_s"] = runs_end(activation, time.monotonic())
            reader.hold()
            result["lock_held_before"] = not exclusive_lock_free(activation.audit)
            started = time.monotonic()
            result["locked"] = storm_on_hypervisor(activation, attacker, hv, domains, count, audited=False)
            result["locked_runs_end_s"] = runs_end(activation, started)
            result["lock_held_after"] = not exclusive_lock_free(activation.audit)
            text = activation.run.output()
            result["loss_stated_while_locked"] = bool(stated_lost_in_all(text))
            result["audit_error_rule"] = "virtguard: appending to the audit log failed" in text
            reader.release()
            result["end_marked"] = mark_the_end(activation, attacker, witness, domains[0], sentinel)
            counts = audit_loss(witness.output(), activation.run.output(), read_jsonl(activation.audit))
        finally:
            reader.release()
            witness.close()
    result["counts"] = counts
    result["missing_events"] = missing_events(counts)
    result["missing_remediations"] = missing_remediations(counts)
    result["exact"] = (events_stated_exactly(counts)
                       and counts["stated_lost_remediations"] == result["missing_remediations"])
    log(f"#   audit lock: {counts}")
    return result


def storm_on_hypervisor(activation: Activation, attacker: AttackerHost, hv: SessionHypervisor,
                        domains: list[Domain], count: int, audited: bool) -> dict[str, Any]:
    """One held session from each of ``count`` new addresses, spread over ``domains``; judged on
    the hypervisor alone (a locked audit file has no event records to time the cuts by): the
    time from the first session opened until none is in the kernel's connections (``ss``), and
    until QEMU's client lists (``query-vnc``) agree. With ``audited``, also each session's
    connect-to-cut time from the audit (libvirt's times)."""
    sources = attacker.addresses4(count)
    ports = [d.vnc_port for d in domains]
    started = time.monotonic()
    opened = open_sessions(attacker, attacker.host_ip, ports, sources, threads=len(domains))
    open_s = time.monotonic() - started
    clients = {(source, sock.getsockname()[1]) for sock, source in opened}
    ss_gone = wait_all_gone(ports, clients, 180)
    ss_gone_s = None if ss_gone is None else time.monotonic() - started
    gone = wait_cut_on_hypervisor(hv, domains, clients, 60)
    gone_s = None if ss_gone is None or gone is None else time.monotonic() - started
    left = clients & {(str(a), p) for a, p in connected_clients(hv, domains)}
    values: list[float] = []
    if audited:
        activation.wait_idle()  # the last runs' audit records
        values = sorted(sessions_cut(activation, set(sources)).values())
    for sock, _source in opened:
        sock.close()
    return {"opened": len(opened), "open_s": open_s, "ss_gone_s": ss_gone_s, "gone_s": gone_s,
            "not_cut": len(left), "p50_s": percentile(values, 50), "max_s": values[-1] if values else None,
            "timed": len(values)}


def runs_end(activation: Activation, since: float, timeout: float = 120) -> float | None:
    """Seconds from ``since`` until the activation has no ansible-playbook running, or None."""
    try:
        wait_for(lambda: not activation.run.playbook_runs_left(), timeout, "the playbook runs to end", interval=0.5)
    except TimeoutError:
        return None
    return time.monotonic() - since


def mark_the_end(activation: Activation, attacker: AttackerHost, witness: EventWitness, domain: Domain,
                 trusted: str) -> bool:
    """A trusted session after the reader let go: once its disconnect is in the audit, the
    activation said the audit is written again and the witness saw it, both counts are complete."""
    sock = attacker.call(rfb.open_session, attacker.host_ip, domain.vnc_port, 10.0, (trusted, 0))
    port = str(sock.getsockname()[1])
    sock.close()
    try:
        wait_for(lambda: any(r["record"] == "event" and r["graphics"]["remote"]["service"] == port
                             and r["graphics"]["phase"] == "disconnect" for r in activation.read()),
                 60, "the trusted session's disconnect record", interval=0.3)
        wait_for(lambda: "is written again" in activation.run.output(), 60, "the statement that the audit is "
                 "written again", interval=0.3)
        wait_for(lambda: f"{trusted} {port}]" in witness.output(), 60, "the witness to see the trusted session",
                 interval=0.3)
    except TimeoutError:
        return False
    time.sleep(1)  # the witness prints the disconnect line after the one naming the session's connect
    return True
