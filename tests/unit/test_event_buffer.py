"""The buffer between libvirt's event thread and the asyncio loop: every event handed over, in
order, whatever the interleaving of the thread that appends and the feeder that sleeps."""

import asyncio
import collections
import random
import sys
import threading
import time

import pytest

from lab.source_runner import source_module

EventBuffer = source_module()["EventBuffer"]


@pytest.fixture
def frequent_thread_switches():
    """Switch threads every microsecond, not every 5 ms, so that the append lands between
    any two steps of the feeder's look-then-sleep."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


async def test_events_from_another_thread_all_reach_the_feeder_in_order(frequent_thread_switches):
    buffer = EventBuffer(10**9, asyncio.get_running_loop())
    total = 60_000

    def produce():
        rnd = random.Random(7)
        n = 0
        while n < total:
            for _ in range(min(total - n, rnd.choice((1, 1, 1, 3, 40)))):  # single events, batches
                buffer.append(n)
                n += 1
            if rnd.random() < 0.05:
                time.sleep(0.0002)  # the feeder catches up and goes to sleep

    producer = threading.Thread(target=produce)
    producer.start()
    got = []
    try:
        for _ in range(total):
            got.append(await asyncio.wait_for(buffer.get(), 5))  # a lost wake-up hangs here
    finally:
        producer.join()
    assert got == list(range(total))
    assert len(buffer) == 0


class AppendRightAfterTheLook(collections.deque):
    """The buffer's deque, with libvirt's append landing at the worst moment: just after the
    feeder looked and found nothing, before it said it would sleep (where a thread switch
    can put it)."""

    def __init__(self, buffer, late_events):
        super().__init__()
        self.buffer = buffer
        self.late_events = late_events

    def __len__(self):
        length = super().__len__()
        if length == 0 and self.late_events:
            self.buffer.append(self.late_events.pop(0))  # the look still says: nothing
        return length


async def test_an_event_appended_as_the_feeder_goes_to_sleep_wakes_it():
    """Without a later event to wake it (a session's last event may have none)."""
    buffer = EventBuffer(10, asyncio.get_running_loop())
    buffer.items = AppendRightAfterTheLook(buffer, ["last event"])
    assert await asyncio.wait_for(buffer.get(), 2) == "last event"


def test_a_callback_after_the_loop_closed_is_ignored():
    """libvirt may still be running a callback when the source stops and its loop closes."""
    loop = asyncio.new_event_loop()
    buffer = EventBuffer(10, loop)
    buffer.waiting = True  # the feeder was asleep
    loop.close()
    buffer.append("late event")
    buffer.call_on_loop(print)
    assert len(buffer) == 1


def test_full_at_the_limit():
    buffer = EventBuffer(2, asyncio.new_event_loop())
    buffer.append(1)
    assert not buffer.full()
    buffer.append(2)
    assert buffer.full()
