"""Which names the lab's leftover sweep (tests/lab/leftovers.py) may remove: a lab name whose
owner process is gone, never a live owner's, never a name without a process id."""

from __future__ import annotations

import os

import pytest

from lab.leftovers import dead_owner, live_owner_ids

LIVE = {4242, 123456, 23456}


@pytest.mark.parametrize(("name", "dead"), [
    ("vgt28096rs", True),          # a session daemon's user
    ("vgt28096-h3", True),         # a fleet host's namespace
    ("vgbhr28096", True),          # an attacker host's veth end (tag before the pid)
    ("vgr28096", True),            # a bench's nftables table
    ("vg_l28096", True),           # a test's nftables table
    ("virtguard_b28096", True),
    ("vgt4242rs", False),          # its owner runs
    ("vgt23456sp", False),         # pid 123456 names itself by pid % 100000 (in LIVE both ways)
    ("virtguard_console", False),  # the product's default table: no process id
    ("virtguard_console_firewall", False),
    ("vgt-controller-abc", False),
    ("eth0", False),
    ("libvirt_network", False),
])
def test_only_names_of_dead_owners_are_leftovers(name, dead):
    assert dead_owner(name, LIVE) is dead


def test_this_process_is_a_live_owner():
    live = live_owner_ids()
    assert os.getpid() in live and os.getpid() % 100000 in live
    assert not dead_owner(f"vgt{os.getpid() % 100000}a", live)
