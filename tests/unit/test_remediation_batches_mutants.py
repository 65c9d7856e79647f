"""The lease's boundary for a brute force's block alone in remediation_batches (mutation testing,
issue 21): it is sent once per ``lease``, so it may be queued again at exactly ``lease`` after it
was sent, not a moment earlier. (The run's lease boundary: test_remediation_batches.py,
test_a_run_is_waited_for_exactly_the_lease.)"""

from __future__ import annotations

from ansible_collections.virtguard.console.plugins.plugin_utils.remediation_batches import (
    Offender,
    RemediationBatches,
)

LEASE = 30.0


def block_alone() -> Offender:
    return Offender("", "192.0.2.9", "192.0.2.9/32", None, None, ["bruteforce"])


def test_a_block_alone_is_queued_again_at_exactly_the_lease():
    batches = RemediationBatches(LEASE)
    batches.add("h", block_alone(), 0.0)
    assert [o.network for o in batches.take_batch("h", 0.0)] == ["192.0.2.9/32"]
    batches.add("h", block_alone(), LEASE - 0.001)  # sent within the lease: refused by that block
    assert batches.take_batch("h", LEASE - 0.001) == []
    batches.add("h", block_alone(), LEASE)
    assert [o.network for o in batches.take_batch("h", LEASE)] == ["192.0.2.9/32"]
