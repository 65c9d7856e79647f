"""Measurements 1 and 3: the source and a bare libvirt listener watch the same bursts of real
sessions at once, each in its own process; the source's events carry libvirt's callback time,
so the same bursts give the latency the source adds between the callback and the queue."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bench.burst import Burst, ListenerProcess, run_burst, wait_for_events
from bench.stats import median

if TYPE_CHECKING:
    from bench.lab import BenchHypervisor, Lab


def side_by_side(lab: Lab, hypervisors: list[BenchHypervisor], bursts: int, sessions: int, concurrency: int,
                 profile: str | None = None, log: Callable[[str], object] = print, paced_sessions: int = 0,
                 paced_rate: float = 0) -> dict[str, Any]:
    uris = [hv.uri for hv in hypervisors]
    ports = [d.vnc_port for hv in hypervisors for d in hv.domains]
    bare = ListenerProcess(lab, "bare", uris)
    source = ListenerProcess(lab, "source", uris, profile=profile)
    listeners = [bare, source]
    try:
        # warm-up: imports, first allocations, QEMU's first clients; not counted
        for listener in listeners:
            listener.ask("mark")
        warm = run_burst(ports, min(sessions, 300), concurrency)
        wait_for_events(listeners, warm.expected_events)
        rss_start = source.ask("report")["rss_kib"]
        rows = []
        for n in range(bursts):
            for listener in listeners:
                listener.ask("mark")
            burst = run_burst(ports, sessions, concurrency)
            wait_for_events(listeners, burst.expected_events)
            b, s = bare.ask("report"), source.ask("report")
            row = {
                "burst": n + 1,
                "sessions": burst.sessions,
                "failed_sessions": burst.failed,
                "expected": burst.expected_events,
                "driver_s": burst.ended - burst.started,
                "bare_events": b["count"],
                "source_events": s["count"],
                "bare_lost": max(0, burst.expected_events - b["count"]),
                **_source_figures(s, burst.expected_events),
                "bare_eps": _rate(b, burst),
                "source_eps": _rate(s, burst),
                "bare_cpu_us": 1e6 * b["cpu_s"] / max(1, b["count"]),
                "source_cpu_us": 1e6 * s["cpu_s"] / max(1, s["count"]),
                "source_cpu_us_by_thread": {role: 1e6 * cpu / max(1, s["count"])
                                            for role, cpu in s["cpu_s_by_thread"].items()},
                "source_rss_kib": s["rss_kib"],
            }
            row["ratio"] = row["source_eps"] / row["bare_eps"] if row["bare_eps"] else 0.0
            rows.append(row)
            log(f"#   burst {n + 1}/{bursts}: {burst.sessions} sessions in {row['driver_s']:.2f}s; "
                f"bare {b['count']} ev {row['bare_eps']:.0f}/s, source {s['count']} ev {row['source_eps']:.0f}/s, "
                f"ratio {row['ratio']:.3f}, lost {row['source_lost']}, "
                f"p99 {row['latency_p99_ms']:.2f} ms")
        paced = None
        if paced_sessions:
            # the same listeners at a steady rate that both keep up with: what the source adds
            # to each event when no backlog builds up in front of the queue
            for listener in listeners:
                listener.ask("mark")
            flow = run_burst(ports, paced_sessions, concurrency, rate=paced_rate)
            wait_for_events(listeners, flow.expected_events)
            b, s = bare.ask("report"), source.ask("report")
            paced = {
                "sessions": flow.sessions, "rate_sessions_per_s": paced_rate,
                "expected": flow.expected_events, "driver_s": flow.ended - flow.started,
                "bare_events": b["count"], **_source_figures(s, flow.expected_events),
            }
            log(f"#   steady flow: {flow.sessions} sessions at {paced_rate:g}/s in {paced['driver_s']:.2f}s; "
                f"source {s['unique']} of {flow.expected_events} ev, p50 {paced['latency_p50_ms']:.2f} ms, "
                f"p99 {paced['latency_p99_ms']:.2f} ms")
    finally:
        for listener in listeners:
            listener.stop()
    ratios = [r["ratio"] for r in rows]
    return {
        "uris": len(uris),
        "domains": len(ports),
        "rows": rows,
        "ratio_median": median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "bare_eps_median": median([r["bare_eps"] for r in rows]),
        "source_eps_median": median([r["source_eps"] for r in rows]),
        "bare_cpu_us_median": median([r["bare_cpu_us"] for r in rows]),
        "source_cpu_us_median": median([r["source_cpu_us"] for r in rows]),
        "source_cpu_us_by_thread_median": {
            role: median([r["source_cpu_us_by_thread"][role] for r in rows])
            for role in rows[0]["source_cpu_us_by_thread"]},
        "source_lost": sum(r["source_lost"] for r in rows) + (paced["source_lost"] if paced else 0),
        "bare_lost": sum(r["bare_lost"] for r in rows),
        "duplicates": sum(r["source_duplicates"] for r in rows) + (paced["source_duplicates"] if paced else 0),
        "failed_sessions": sum(r["failed_sessions"] for r in rows),
        "latency_p50_ms": median([r["latency_p50_ms"] for r in rows]),
        "latency_p99_ms_worst": max(r["latency_p99_ms"] for r in rows),
        "latency_p99_ms_median": median([r["latency_p99_ms"] for r in rows]),
        "latency_max_ms": max(r["latency_max_ms"] for r in rows),
        "paced": paced,
        "rss_kib_start": rss_start,
        "rss_kib_end": rows[-1]["source_rss_kib"],
    }


def _source_figures(report: dict[str, Any], expected: int) -> dict[str, Any]:
    """What the source's report says of one run: events seen once, lost, seen twice, latency."""
    return {
        "source_unique": report["unique"],
        "source_lost": max(0, expected - report["unique"]),
        "source_duplicates": report["count"] - report["unique"],
        "session_ids_reused": report["session_ids_reused"],
        "latency_p50_ms": report["latency_ms"]["p50"],
        "latency_p99_ms": report["latency_ms"]["p99"],
        "latency_max_ms": report["latency_ms"]["max"],
    }


def _rate(report: dict[str, Any], burst: Burst) -> float:
    """Events per second from the start of the burst to the listener's last event."""
    if not report["count"] or report["last"] is None:
        return 0.0
    return float(report["count"] / max(1e-6, report["last"] - burst.started))
