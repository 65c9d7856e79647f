"""The buffer between libvirt's event thread and the asyncio loop: every event handed over, in
order and intact, whatever the interleaving of the thread that appends and the feeder that
sleeps; and the memory a backlog took is given back once it is read."""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time

import pytest

from ansible_collections.virtguard.console.plugins.plugin_utils.event_buffer import (
    EventBuffer,
    EventRecord,
    PackedChunk,
)
from lab.source_runner import FakeDomain, watcher_without_daemon


@pytest.fixture
def frequent_thread_switches():
    """Switch threads every microsecond, not every 5 ms, so that appends land between any two
    steps of the feeder."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def small_buffer(limit=10**9, chunk_bytes=4096, pack_after=0):
    buffer = EventBuffer(limit, asyncio.get_running_loop())
    buffer.CHUNK_BYTES = chunk_bytes  # many chunks, so that reading crosses from one to the next
    buffer.PACK_AFTER = pack_after  # pack from the first event held, unless a test says otherwise
    return buffer


class Marker:
    """An object between events, as a snapshot is."""

    def __init__(self, n):
        self.n = n


async def test_events_from_another_thread_all_reach_the_feeder_in_order(frequent_thread_switches):
    buffer = small_buffer()
    total = 30_000

    def produce():
        rnd = random.Random(7)
        n = 0
        while n < total:
            for _event in range(min(total - n, rnd.choice((1, 1, 1, 3, 40)))):  # single events, batches
                if n % 1000 == 999:
                    buffer.append(Marker(n))
                else:
                    buffer.append_event((n, "x" * rnd.randrange(300), {"node": "10.0.0.1"}, [("saslUsername", "u")]))
                n += 1
            if rnd.random() < 0.05:
                time.sleep(0.0002)  # the feeder catches up and goes to sleep

    producer = threading.Thread(target=produce)
    producer.start()
    got = []
    try:
        for _event in range(total):
            got.append(await asyncio.wait_for(buffer.get(), 5))  # a lost wake-up hangs here
    finally:
        producer.join()
    assert [item.n if isinstance(item, Marker) else item[0] for item in got] == list(range(total))
    assert all(item[2] == {"node": "10.0.0.1"} and item[3] == [("saslUsername", "u")]
               for item in got if not isinstance(item, Marker))
    assert len(buffer) == 0


async def test_an_event_appended_while_the_feeder_sleeps_wakes_it():
    buffer = small_buffer()
    feeder = asyncio.create_task(buffer.get())
    await asyncio.sleep(0.05)
    assert not feeder.done() and buffer.waiting
    threading.Thread(target=buffer.append_event, args=((1, "last event of a session"),)).start()
    assert await asyncio.wait_for(feeder, 2) == (1, "last event of a session")


async def test_hostile_text_comes_back_as_it_went_in():
    buffer = small_buffer()
    subject = [("x509dname", "CN={{ lookup('pipe', 'id') }};$(reboot)\x00\n"), ("saslUsername", "\udcff\u202e" * 3)]
    huge = "O=" + "A" * 200_000  # larger than a chunk: gets one of its own
    records: list[EventRecord] = [
        (0, 1.5, "d", "u", 1, 2, {"family": 0, "node": "::1", "service": "1"}, {}, "sasl", subject),
        (0, 2.5, "d", "u", 1, 1, {}, {}, "vencrypt+x509+sasl", [("x509dname", huge)]),
    ]
    for record in records:
        buffer.append_event(record)
    assert [await buffer.get(), await buffer.get()] == records


async def test_a_drained_backlog_gives_its_memory_back():
    buffer = small_buffer(chunk_bytes=64 * 1024)
    for n in range(5_000):
        buffer.append_event((n, "10.1.2.3", "43122", "vencrypt+x509+sasl", [("saslUsername", f"user{n}")]))
    chunks = list(buffer.parts)
    assert len(chunks) > 5 and len(buffer) == 5_000
    for n in range(5_000):
        assert (await buffer.get())[0] == n
    assert buffer.take() is None and buffer.waiting
    # every chunk read to its end is unmapped; the last stays for what comes next, rewound
    assert all(chunk.memory.closed for chunk in chunks[:-1])
    assert list(buffer.parts) == chunks[-1:] and chunks[-1].start == chunks[-1].end == 0


async def test_a_short_backlog_stays_as_tuples_and_a_long_one_is_packed_in_order():
    buffer = small_buffer(pack_after=100)
    records = [(n, "10.1.2.3", {"service": str(n)}) for n in range(300)]
    for record in records:
        buffer.append_event(record)
    kept = [part for part in buffer.parts if not isinstance(part, PackedChunk)]
    assert kept == records[:100] and all(a is b for a, b in zip(kept, records[:100], strict=True))
    assert sum(isinstance(part, PackedChunk) for part in buffer.parts) >= 1
    got = [await buffer.get() for _record in records]
    assert got == records
    # drained: short again, so the next events stay tuples
    buffer.append_event(records[0])
    assert buffer.parts[-1] is records[0]


async def test_full_at_the_limit():
    buffer = small_buffer(limit=2)
    buffer.append_event((1,))
    assert not buffer.full()
    buffer.append(Marker(2))
    assert buffer.full()
    await buffer.get()
    assert not buffer.full()


def test_a_callback_after_the_loop_closed_is_ignored():
    """libvirt may still be running a callback when the source stops and its loop closes."""
    loop = asyncio.new_event_loop()
    buffer = EventBuffer(10, loop)
    buffer.waiting = True  # the feeder was asleep
    loop.close()
    buffer.append_event((1, "late event"))
    assert len(buffer) == 1


async def test_a_domains_uuid_is_asked_once_per_start_and_never_mixed_up():
    watcher = watcher_without_daemon(asyncio.get_running_loop())
    buffer = watcher.buffer
    address = {"family": 0, "node": "10.0.0.1", "service": "1"}
    first = FakeDomain("web", 7, "uuid-a")
    restarted = FakeDomain("web", 9, "uuid-b")  # undefined, defined anew, started: a new id
    for dom in (first, first, first, restarted, restarted):
        watcher.on_graphics(None, dom, 0, address, address, "none", [], None)
    uuids = [buffer.take()[3] for _event in range(5)]
    assert uuids == ["uuid-a"] * 3 + ["uuid-b"] * 2
    assert (first.uuid_calls, restarted.uuid_calls) == (1, 1)
    for n in range(5000):  # bounded
        watcher.remember_uuid(f"d{n}", n, "u")
    assert len(watcher.uuids) <= 4096
