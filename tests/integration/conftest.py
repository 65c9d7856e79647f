"""Fixtures shared by the integration tests: real libvirt session daemons with tiny domains."""

import pytest

from lab.hypervisor import SessionHypervisor


@pytest.fixture(scope="session")
def hypervisor():
    """A session daemon with two paused domains, for the whole test run."""
    hv = SessionHypervisor("a").start()
    hv.domains = [hv.create_domain(f"{hv.user}-d{n}") for n in range(2)]
    yield hv
    hv.stop()


@pytest.fixture(scope="session")
def second_hypervisor():
    hv = SessionHypervisor("b").start()
    hv.domains = [hv.create_domain(f"{hv.user}-d0")]
    yield hv
    hv.stop()
