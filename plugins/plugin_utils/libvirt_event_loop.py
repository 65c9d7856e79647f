# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""libvirt's default event loop, run by one daemon thread per process for the event source."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from ansible_collections.virtguard.console.plugins.plugin_utils.libvirt_binding import libvirt

try:
    import libvirtaio
except ImportError:
    libvirtaio = None

LOGGER = logging.getLogger("virtguard.console.libvirt_graphics")  # the source's one logger

EVENT_THREAD_NAME = "libvirt default event loop (virtguard.console)"


def ensure_libvirt_event_loop() -> None:
    """libvirt's default event loop, run by one daemon thread per process and shared by every
    source of that process (ansible-rulebook loads each source afresh, so the thread's name
    is what marks it as started). libvirt's RPC decoding then runs in C beside the asyncio
    loop; the callbacks hand their events over in batches (docs/performance.md). A process
    that registered libvirt's asyncio integration (libvirtaio) before the first source keeps
    it: libvirt allows one event loop per process."""
    current = libvirtaio.getCurrentImpl() if libvirtaio is not None else None
    if current is not None:
        if current.loop is not asyncio.get_running_loop():
            raise RuntimeError(
                "libvirt's asyncio event implementation is already registered on another event loop "
                "in this process, and libvirt allows only one registration per process"
            )
        return
    if any(thread.name == EVENT_THREAD_NAME for thread in threading.enumerate()):
        return
    if libvirt.virEventRegisterDefaultImpl() < 0:
        raise RuntimeError("libvirt's default event loop could not be registered")
    threading.Thread(target=_run_libvirt_events, name=EVENT_THREAD_NAME, daemon=True).start()


def _run_libvirt_events() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            LOGGER.error("libvirt's event loop failed: %s", libvirt.virGetLastErrorMessage())
            time.sleep(0.1)
