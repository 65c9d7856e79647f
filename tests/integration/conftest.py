"""Fixtures shared by the integration tests: real libvirt session daemons with tiny domains."""

import pytest

from lab.hypervisor import SessionHypervisor, heal_event_delivery


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


@pytest.fixture(scope="session", autouse=True)
async def settle_libvirt_callbacks():
    """libvirt frees closed connections lazily and may still call back on the loop (the
    source's wake-ups, libvirtaio in a subprocess test): let that run before pytest closes
    the loop, not at exit."""
    yield
    import gc
    import asyncio
    gc.collect()
    await asyncio.sleep(0.5)


@pytest.fixture(autouse=True)
def shared_hypervisors_relay_events(request):
    """The session-wide daemons are shared by many tests: before each, check that they still
    relay events to a new listener and heal them if a libvirt race left their event queue
    stuck (lab.hypervisor.relays_events), so one test cannot blind the next."""
    for name in ("hypervisor", "second_hypervisor"):
        if name in request.fixturenames:
            hv = request.getfixturevalue(name)
            heal_event_delivery(hv.uri, hv.domains[0].name)
