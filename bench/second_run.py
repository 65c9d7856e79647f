"""Measurement 16: a second remediation run beside a young one (issue 17's full set), side by
side with one run in flight per host, in alternating rounds on one session daemon: each round
runs, for each value of ``virtguard_second_run_wait`` (``0``: one run in flight), the full set
of bench/resilience.py (a block set of 10, 30 reconnecting offenders: the share of 60 s the
overflow is connected) and, in an activation of its own, lone sessions then a storm of 200 as in
bench/storm.py (its p50 and last cut, and the runs). Judged on the hypervisor, as there.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.resilience import drop_table, full_set
from bench.stats import load_average, median
from bench.storm import Activation, AttackerHost, lone, storm
from lab.hypervisor import SessionHypervisor

Log = Callable[[str], None]
PORT_BASE = 27600  # apart from bench/storm.py's (27000..) and bench/resilience.py's (27400..)
CONSOLES = 10


def measure(lab: Any, log: Log, rounds: int = 2, waits: tuple[float, ...] = (0.0, 0.25), storm_size: int = 200,
            lone_runs: int = 3, busy_delays: tuple[float, ...] = (0.5,)) -> dict[str, Any]:
    """Each round runs every variant: each ``virtguard_second_run_wait`` of ``waits`` with each
    ``virtguard_busy_heartbeat_delay`` of ``busy_delays`` (the filter's clock in a storm)."""
    conf = (f'vnc_listen = "::"\nremote_display_port_min = {PORT_BASE}\n'
            f"remote_display_port_max = {PORT_BASE + 99}\n")
    hv = SessionHypervisor("sr", qemu_conf=conf)
    lab.hypervisors.append(hv)
    table = f"vgs{os.getpid() % 100000}"
    workdir = Path(tempfile.mkdtemp(prefix="vgt-bench-second-run-", dir=ROOT / "build"))
    rows: list[dict[str, Any]] = []
    variants = list(itertools.product(waits, busy_delays))
    attacker: AttackerHost | None = None
    try:
        hv.start()
        with ThreadPoolExecutor(4) as pool:
            domains = list(pool.map(lambda n: hv.create_domain(f"{hv.user}-d{n}", listen="::"), range(CONSOLES)))
        for round_ in range(rounds):
            for wait, busy in variants:
                # a fresh attacker host a variant: the full set's addresses are fixed
                if attacker is not None:
                    attacker.delete()
                attacker = AttackerHost("q").create()
                extra = {"virtguard_second_run_wait": wait, "virtguard_busy_heartbeat_delay": busy}
                load = load_average()
                drop_table(table)
                fs = full_set(hv, attacker, domains[:2], table, workdir / f"full_set_{round_}_{wait}_{busy}", 10,
                              (13, 13, 4), 60.0, 0.4, log, extra_variables=extra)
                drop_table(table)
                variables = {"virtguard_uri": hv.uri, "virtguard_trusted_networks": ["192.0.2.0/24"],
                             "virtguard_nft_table": table, "virtguard_block_seconds": 600, **extra}
                storm_dir = workdir / f"storm_{round_}_{wait}_{busy}"
                with Activation("unauthorized_console", variables, storm_dir) as activation:
                    lone_cut = lone(activation, attacker, hv, domains[0], lone_runs, log)
                    stormed = storm(activation, attacker, [d.vnc_port for d in domains], storm_size, log)
                drop_table(table)
                row = {"round": round_, "second_run_wait": wait, "busy_heartbeat_delay": busy, "load": load,
                       "lone_p50_s": lone_cut["p50_s"],
                       "full_set_overflow_ss": fs.get("overflow_share_ss"),
                       "full_set_overflow_sessions": fs.get("overflow_share_events"),
                       "full_set_after_first_cut": fs.get("overflow_share_after_first_cut"),
                       "full_set_runs": [r["batch_size"] for r in fs.get("runs", [])],
                       "trusted_blocked": fs.get("trusted_blocked"),
                       "storm_p50_s": stormed["p50_s"], "storm_last_s": stormed["max_s"],
                       "storm_runs": stormed["batch_sizes"], "storm_not_cut": stormed["not_cut"]}
                log(f"#   round {round_}, second_run_wait {wait:g}, busy_heartbeat_delay {busy:g}: full set overflow "
                    f"{100 * (row['full_set_overflow_ss'] or 0):.1f} % (ss), storm p50 {row['storm_p50_s']}")
                rows.append(row)
    finally:
        if attacker is not None:
            attacker.delete()
        drop_table(table)
        lab.release([hv])
    summary = {}
    for wait, busy in variants:
        mine = [r for r in rows if r["second_run_wait"] == wait and r["busy_heartbeat_delay"] == busy]
        summary[f"{wait:g}, {busy:g}"] = {
            key: median([r[key] for r in mine if r[key] is not None] or [0.0])
            for key in ("full_set_overflow_ss", "full_set_overflow_sessions", "storm_p50_s", "storm_last_s",
                        "lone_p50_s")}
    return {"rounds": rows, "medians": summary}
