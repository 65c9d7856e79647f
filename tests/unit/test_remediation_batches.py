"""Remediation in batches: one run in flight per host, offenders waiting go into the next
run, a run ends when its sessions disconnect or its lease runs out, state stays bounded."""

from __future__ import annotations

from ansible_collections.virtguard.console.plugins.plugin_utils.remediation_batches import (
    Offender,
    RemediationBatches,
)

LEASE = 30.0


def offender(session_id: str, address: str = "192.0.2.7") -> Offender:
    return Offender(session_id, address, f"{address}/32", 40000, 5901, ["untrusted_network"])


def sessions(batch: list[Offender]) -> list[str]:
    return [o.session_id for o in batch]


def test_a_lone_offender_is_sent_at_once():
    batches = RemediationBatches(LEASE)
    batches.add("h", offender("a"))
    assert sessions(batches.take_batch("h", 0.0)) == ["a"]


def test_offenders_arriving_during_a_run_go_together_into_the_next_run():
    batches = RemediationBatches(LEASE)
    batches.add("h", offender("a"))
    assert sessions(batches.take_batch("h", 0.0)) == ["a"]
    for index, sid in enumerate("bcd"):
        batches.add("h", offender(sid, f"192.0.2.{10 + index}"))
        assert batches.take_batch("h", 0.1) == [], "a run is in flight"
    assert batches.ended("h", "a") is True  # the run's cut comes back as a disconnect
    assert sessions(batches.take_batch("h", 1.0)) == ["b", "c", "d"]
    assert batches.take_batch("h", 1.1) == [], "nothing waits any more"


def test_a_run_is_waited_for_exactly_the_lease():
    batches = RemediationBatches(LEASE)
    batches.add("h", offender("a"))
    assert sessions(batches.take_batch("h", 0.0)) == ["a"]
    batches.add("h", offender("b"))
    assert batches.take_batch("h", LEASE - 0.001) == [], "the run is in flight until its lease ends"
    # at the lease the run is given up: the still open session goes again with the waiting one
    assert sessions(batches.take_batch("h", LEASE)) == ["a", "b"]


def test_a_block_alone_is_sent_once_per_lease():
    batches = RemediationBatches(LEASE)
    block = Offender("", "2001:db8::7", "2001:db8::/64", None, None, ["bruteforce"])
    batches.add("h", block, 0.0)
    assert len(batches.take_batch("h", 0.0)) == 1
    batches.add("h", Offender("", "2001:db8::8", "2001:db8::/64", None, None, ["bruteforce"]), 1.0)
    assert batches.take_batch("h", 1.0) == [] and batches.held == 0
    batches.add("h", Offender("", "2001:db8::9", "2001:db8::/64", None, None, ["bruteforce"]), LEASE + 1)
    assert len(batches.take_batch("h", LEASE + 1)) == 1, "after the lease a failed block is sent again"


def test_an_offender_seen_again_after_its_run_is_remediated_again():
    """Nothing is taken as covered: a session still open after its run is sent again once the
    run's lease is over (the run failed to cut it)."""
    batches = RemediationBatches(LEASE)
    batches.add("h", offender("a"))
    assert sessions(batches.take_batch("h", 0.0)) == ["a"]
    batches.add("h", offender("a"))  # its initialize, say: the same session keeps its state
    assert batches.take_batch("h", LEASE - 1) == []
    assert sessions(batches.take_batch("h", LEASE)) == ["a"]


def test_a_new_session_from_an_address_already_remediated_is_a_new_offender():
    batches = RemediationBatches(LEASE)
    batches.add("h", offender("a"))
    batches.take_batch("h", 0.0)
    batches.ended("h", "a")
    batches.add("h", offender("b"))  # same address, another console port, after the cut
    assert sessions(batches.take_batch("h", 0.5)) == ["b"]


def test_hosts_are_independent():
    batches = RemediationBatches(LEASE)
    batches.add("h1", offender("a"))
    batches.add("h2", offender("b"))
    assert sessions(batches.take_batch("h1", 0.0)) == ["a"]
    assert sessions(batches.take_batch("h2", 0.0)) == ["b"]


def test_a_block_without_a_session_does_not_hold_the_host():
    batches = RemediationBatches(LEASE)
    batches.add("h", Offender("", "2001:db8::7", "2001:db8::/64", None, None, ["bruteforce"]))
    assert [o.network for o in batches.take_batch("h", 0.0)] == ["2001:db8::/64"]
    batches.add("h", offender("a"))
    assert sessions(batches.take_batch("h", 0.1)) == ["a"]
    assert batches.held == 1


def test_a_batch_has_at_most_max_batch_offenders_and_the_rest_follow():
    batches = RemediationBatches(LEASE, max_batch=2)
    for sid in "abc":
        batches.add("h", offender(sid))
    assert sessions(batches.take_batch("h", 0.0)) == ["a", "b"]
    batches.ended("h", "a")
    batches.ended("h", "b")
    assert sessions(batches.take_batch("h", 0.5)) == ["c"]


def test_held_offenders_are_bounded_oldest_forgotten_first():
    batches = RemediationBatches(LEASE, max_offenders=3)
    for sid in "abcde":
        batches.add("h", offender(sid))
    assert batches.held == 3 and batches.forgotten == 2
    assert sessions(batches.take_batch("h", 0.0)) == ["c", "d", "e"]


def test_a_disconnect_of_an_unknown_session_changes_nothing():
    batches = RemediationBatches(LEASE)
    assert batches.ended("h", "zz") is False
    batches.add("h", offender("a"))
    batches.take_batch("h", 0.0)
    assert batches.ended("h", "zz") is False
    assert batches.in_flight("h", 1.0)


# -- a second run beside a young one (the start of a storm) -------------------------------


def test_a_second_run_goes_beside_a_young_run_once_an_offender_has_waited():
    batches = RemediationBatches(LEASE, second_run_wait=0.5, second_run_window=1.0)
    batches.add("h", offender("a"), 0.0)
    assert sessions(batches.take_batch("h", 0.0, heartbeat=True)) == ["a"]
    batches.add("h", offender("b", "192.0.2.10"), 0.1)
    assert batches.take_batch("h", 0.1, heartbeat=True) == [], "b has not waited yet"
    batches.add("h", offender("c", "192.0.2.11"), 0.55)
    assert batches.take_batch("h", 0.599, heartbeat=True) == [], "b has waited 0.499 s"
    # b has waited the wait: the second run takes every offender waiting, c too
    assert sessions(batches.take_batch("h", 0.6, heartbeat=True)) == ["b", "c"]
    assert len(batches.in_flight("h", 0.6)) == 2


def test_never_more_than_two_runs_of_a_host_at_a_time():
    batches = RemediationBatches(LEASE, second_run_wait=0.5, second_run_window=1.0)
    batches.add("h", offender("a"), 0.0)
    batches.take_batch("h", 0.0, heartbeat=True)
    batches.add("h", offender("b", "192.0.2.10"), 0.0)
    assert sessions(batches.take_batch("h", 0.5, heartbeat=True)) == ["b"]
    batches.add("h", offender("c", "192.0.2.11"), 0.5)
    assert batches.take_batch("h", 0.99, heartbeat=True) == [], "two runs are in flight"
    # the first run's cut comes back; the second, sent 1.0 s ago, is no longer young: c waits
    batches.ended("h", "a")
    assert batches.take_batch("h", 1.5, heartbeat=True) == []
    batches.ended("h", "b")
    assert sessions(batches.take_batch("h", 1.6, heartbeat=True)) == ["c"]
    assert [sorted(r.sessions) for r in batches.in_flight("h", 1.6)] == [["c"]]


def test_no_second_run_beside_a_run_sent_the_window_ago_or_more():
    """A run that has been going that long is nearly done: the waiting offenders go with its
    end, not beside it."""
    batches = RemediationBatches(LEASE, second_run_wait=0.5, second_run_window=1.0)
    batches.add("h", offender("a"), 0.0)
    batches.take_batch("h", 0.0, heartbeat=True)
    batches.add("h", offender("b", "192.0.2.10"), 0.4)
    assert batches.take_batch("h", 1.0, heartbeat=True) == [], "the run in flight was sent 1.0 s ago"
    batches.add("h", offender("c", "192.0.2.11"), 0.45)
    assert sessions(batches.take_batch("h", 0.999, heartbeat=True)) == ["b", "c"], "0.999 s: still young"


def test_a_second_run_wait_of_zero_keeps_one_run_in_flight():
    batches = RemediationBatches(LEASE, second_run_wait=0.0)
    batches.add("h", offender("a"), 0.0)
    batches.take_batch("h", 0.0, heartbeat=True)
    batches.add("h", offender("b", "192.0.2.10"), 0.0)
    assert batches.take_batch("h", 0.9, heartbeat=True) == []
    batches.ended("h", "a")
    assert sessions(batches.take_batch("h", 1.0, heartbeat=True)) == ["b"]


def test_the_second_run_counts_the_wait_of_the_oldest_offender_waiting():
    """An offender sent before and given up (its lease over) has waited since it was queued."""
    batches = RemediationBatches(2.0, second_run_wait=0.5, second_run_window=1.0)
    batches.add("h", offender("a"), 0.0)
    batches.take_batch("h", 0.0, heartbeat=True)  # run 1: a, never cut
    batches.add("h", offender("b", "192.0.2.10"), 2.0)
    assert sessions(batches.take_batch("h", 2.0, heartbeat=True)) == ["a", "b"], "lease over: a again, with b"
    batches.add("h", offender("c", "192.0.2.11"), 2.2)
    assert batches.take_batch("h", 2.6, heartbeat=True) == [], "c has waited 0.4 s"
    assert sessions(batches.take_batch("h", 2.7, heartbeat=True)) == ["c"]


def test_only_a_heartbeat_sends_a_second_run():
    """A heartbeat comes after every event the source had before it: the second run then takes
    every offender that had arrived, not the few of a storm the filter had seen so far."""
    batches = RemediationBatches(LEASE, second_run_wait=0.25, second_run_window=1.0)
    batches.add("h", offender("a"), 0.0)
    batches.take_batch("h", 0.0)
    batches.add("h", offender("b", "192.0.2.10"), 0.1)
    batches.add("h", offender("c", "192.0.2.11"), 0.4)
    assert batches.take_batch("h", 0.4) == [], "a console event, not a heartbeat"
    batches.add("h", offender("d", "192.0.2.12"), 0.45)
    assert sessions(batches.take_batch("h", 0.5, heartbeat=True)) == ["b", "c", "d"]
