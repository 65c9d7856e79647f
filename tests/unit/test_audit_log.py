"""The audit log: one JSON object per line, appended, literal text, concurrent writers, whole
records or nothing (with os.write stood in for where the kernel would fail), symlinks refused,
a lock held by another process waited for with a bound (a real flock), and the AuditWriter that
takes the filter's audit I/O off the event loop, counts every lost record and states the loss.

Real file-size limits and a real full disk: tests/integration/test_audit_log_limits.py."""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import multiprocessing
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.audit_log import (
    BATCH_BYTES,
    AuditError,
    AuditLockTimeout,
    AuditLog,
    AuditWriter,
    encode_record,
    event_record,
    health_record,
    lock_holders,
    remediation_record,
)
from lab.file_lock import HeldLock, exclusive_lock_free

HOSTILE = "O=Evil\\, Inc,CN={{ lookup(*'pipe~touch /tmp/x'.split('~')) }}\n\"quoted\" \u00e9"
# Every separator str.splitlines() knows (checked against Python below), "\r\n" included.
SPLITLINES_SEPARATORS = ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
COLLECTIONS = Path(__file__).resolve().parents[2] / "build" / "collections"


def lines(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def wait_until(condition: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Poll for something that must happen eventually (a generous bound, not a timing goal)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {limit}s")
        time.sleep(0.01)


# --- encoding -------------------------------------------------------------------------------


def test_records_are_single_lines_and_keep_text_literally(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    log.append(event_record({"identity": {"x509dname": HOSTILE}}, {"verdict": "cut"}))
    log.append(remediation_record("block", True, {"until": "later"}, {"session_id": "ab"}))
    log.close()
    first, second = lines(path)
    assert first["graphics"]["identity"]["x509dname"] == HOSTILE
    assert "{{ lookup(*'pipe~touch /tmp/x'.split('~')) }}" in path.read_text()  # greppable as received
    assert second["record"] == "remediation" and second["session_id"] == "ab" and second["ok"] is True


def test_each_kind_of_record_has_its_fields_and_a_utc_time() -> None:
    # the records' shape as readers of the audit take it (mutation testing, issue 21)
    graphics, verdict = {"phase": "connect"}, {"verdict": "cut"}
    assert event_record(graphics, verdict, "T") == {"record": "event", "time": "T", "graphics": graphics,
                                                    "virtguard": verdict}
    assert health_record({"state": "up"}, verdict, "T") == {"record": "health", "time": "T",
                                                            "hypervisor": {"state": "up"}, "virtguard": verdict}
    result = {"blocked": ["192.0.2.7/32"]}
    assert remediation_record("block", True, result, {"session_id": "ab", "result": "hidden"}, "T") == {
        "record": "remediation", "time": "T", "action": "block", "ok": True, "session_id": "ab", "result": result}
    assert remediation_record("cut", False, None, time_iso="T") == {
        "record": "remediation", "time": "T", "action": "cut", "ok": False, "result": None}
    for record in (event_record(graphics, verdict), health_record({}, verdict), remediation_record("cut", True, {})):
        assert datetime.datetime.fromisoformat(record["time"]).utcoffset() == datetime.timedelta(0)


def test_undecodable_bytes_survive_as_escapes_and_other_text_stays_literal() -> None:
    text = b"CN=\xff\xfe \xc3\xa9".decode("utf-8", "surrogateescape")
    data = encode_record({"dn": text})
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data)["dn"] == text
    assert b"\\udcff\\udcfe" in data and "\u00e9".encode() in data  # only the surrogates escaped


def test_the_separators_tested_are_all_that_splitlines_knows() -> None:
    breaking = [chr(code) for code in range(0x110000) if len(f"a{chr(code)}b".splitlines()) > 1]
    assert sorted(breaking) == sorted(s for s in SPLITLINES_SEPARATORS if len(s) == 1)


@pytest.mark.parametrize("separator", SPLITLINES_SEPARATORS, ids=lambda s: f"U+{ord(s[-1]):04X}x{len(s)}")
def test_a_dn_with_a_line_separator_stays_one_line_for_every_reader(tmp_path: Path, separator: str) -> None:
    dn = f"CN=alice{separator}CN=mallory"
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    log.append(event_record({"identity": {"x509dname": dn}}, {"verdict": "cut"}))
    log.append({"next": 1})
    log.close()
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 2  # Python's str.splitlines()
    with open(path, encoding="utf-8") as stream:  # io's line iteration (universal newlines)
        assert len(list(stream)) == 2
    with open(path, "rb") as stream:
        assert len(list(stream)) == 2
    assert json.loads(text.splitlines()[0])["graphics"]["identity"]["x509dname"] == dn
    assert not any(char in text for char in "\x85\u2028\u2029")  # escaped, not raw


@pytest.mark.parametrize("separator", ["\x85", "\u2028", "\u2029"], ids=lambda s: f"U+{ord(s):04X}")
def test_every_raw_separator_of_a_value_is_escaped_not_only_the_first(separator: str) -> None:
    dn = separator.join(["CN=alice", "OU=a", "O=b"])  # the separator twice (mutation testing, issue 21)
    data = encode_record({"dn": dn, "other": f"x{separator}y"})
    assert data.count(b"\n") == 1 and len(data.decode("utf-8").splitlines()) == 1
    assert separator not in data.decode("utf-8")
    assert json.loads(data) == {"dn": dn, "other": f"x{separator}y"}


def test_nan_and_infinities_are_written_as_strings_strict_readers_accept() -> None:
    data = encode_record({"a": float("nan"), "b": [float("inf"), -float("inf")], "c": 1.5})

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-JSON constant {constant} written")

    assert json.loads(data, parse_constant=refuse) == {"a": "NaN", "b": ["Infinity", "-Infinity"], "c": 1.5}


def test_a_record_json_cannot_hold_is_an_audit_error() -> None:
    with pytest.raises(AuditError, match="cannot be written as JSON"):
        encode_record({"x": object()})
    circular: dict[str, Any] = {}
    circular["self"] = circular
    with pytest.raises(AuditError, match="cannot be written as JSON"):
        encode_record(circular)
    deep: dict[str, Any] = {}
    for _level in range(100_000):
        deep = {"d": deep}
    with pytest.raises(AuditError, match="cannot be written as JSON"):
        encode_record(deep)


# --- the file ----------------------------------------------------------------------------------


def test_append_never_rewrites_earlier_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier": 1}\n')
    log = AuditLog(str(path), fsync="always")
    log.append({"later": 2})
    log.close()
    assert lines(path) == [{"earlier": 1}, {"later": 2}]


def test_new_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "new.jsonl"
    log = AuditLog(str(path))
    log.append({"a": 1})
    log.close()
    assert os.stat(path).st_mode & 0o777 == 0o640 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _writer(path: str, tag: int, count: int) -> None:
    log = AuditLog(path, fsync="never")
    for n in range(count):
        log.append({"writer": tag, "n": n, "pad": "x" * 3000})
    log.close()


def test_concurrent_writers_never_mix_lines(tmp_path: Path) -> None:
    path = str(tmp_path / "audit.jsonl")
    procs = [multiprocessing.Process(target=_writer, args=(path, tag, 300)) for tag in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    records = lines(tmp_path / "audit.jsonl")
    assert len(records) == 1200
    for tag in range(4):
        assert [r["n"] for r in records if r["writer"] == tag] == list(range(300))


def test_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    log.append({"n": 1})
    os.rename(path, tmp_path / "audit.jsonl.1")
    log._next_check = 0  # the once-a-second check is due
    log.append({"n": 2})
    log.close()
    assert lines(path) == [{"n": 2}]
    assert lines(tmp_path / "audit.jsonl.1") == [{"n": 1}]


def test_errors_name_the_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing" / "audit.jsonl")
    with pytest.raises(AuditError, match=f"cannot open audit log {missing}"):
        AuditLog(missing).append({})
    with pytest.raises(AuditError, match="fsync"):
        AuditLog("x", fsync="sometimes")


def test_open_checks_the_path_before_any_record(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"))
    log.open()
    assert log.fd is not None and (tmp_path / "audit.jsonl").exists()
    log.close()
    with pytest.raises(AuditError, match="cannot open audit log"):
        AuditLog(str(tmp_path / "missing" / "audit.jsonl")).open()


def test_a_symlink_at_the_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / "audit.jsonl").symlink_to(target)
    with pytest.raises(AuditError, match="is a symlink"):
        AuditLog(str(tmp_path / "audit.jsonl")).append({"n": 1})
    assert target.read_bytes() == b""


def test_a_symlink_put_in_the_files_place_after_a_rotation_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    log = AuditLog(str(path))
    log.append({"n": 1})
    os.rename(path, tmp_path / "audit.jsonl.1")
    path.symlink_to(target)
    log._next_check = 0  # the once-a-second check is due
    with pytest.raises(AuditError, match="is a symlink"):
        log.append({"n": 2})
    log.close()
    assert target.read_bytes() == b""
    assert lines(tmp_path / "audit.jsonl.1") == [{"n": 1}]


def test_a_path_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(AuditError, match="not a regular file"):
        AuditLog(str(fifo)).append({"n": 1})


# --- whole records or nothing (os.write stood in) ---------------------------------------------


def test_short_writes_are_continued_until_the_record_is_whole(tmp_path: Path) -> None:
    calls = []

    def seven_bytes_at_a_time(fd: int, data: memoryview) -> int:
        calls.append(len(data))
        return os.write(fd, data[:7])

    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), write=seven_bytes_at_a_time)
    log.append({"dn": HOSTILE})
    log.append({"n": 2})
    log.close()
    assert lines(path) == [{"dn": HOSTILE}, {"n": 2}]
    assert len(calls) > 2  # the stand-in did write less than asked


def fail_after(written_bytes: int, error: int = errno.ENOSPC) -> Callable[[int, memoryview], int]:
    """An os.write that writes ``written_bytes`` in all, then fails as a full disk does."""
    left = [written_bytes]

    def write(fd: int, data: memoryview) -> int:
        if left[0] <= 0:
            raise OSError(error, os.strerror(error))
        done = os.write(fd, data[: left[0]])
        left[0] -= done
        return done

    return write


def test_a_record_failing_part_way_leaves_no_fragment(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"earlier":1}\n')
    log = AuditLog(str(path), write=fail_after(10))
    with pytest.raises(AuditError, match="No space left on device") as failure:
        log.append({"lost": "x" * 100})
    assert failure.value.lines_written == 0
    assert path.read_bytes() == b'{"earlier":1}\n'
    log.close()
    AuditLog(str(path)).append({"later": 2})
    assert lines(path) == [{"earlier": 1}, {"later": 2}]


def test_a_file_size_limit_failing_part_way_leaves_no_fragment(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), write=fail_after(5, errno.EFBIG))
    with pytest.raises(AuditError, match="File too large"):
        log.append({"lost": 1})
    log.close()
    assert path.read_bytes() == b""


def test_a_batch_failing_after_two_lines_keeps_both(tmp_path: Path) -> None:
    # the last line break before the failure counts, not the first (mutation testing, issue 21)
    path = tmp_path / "audit.jsonl"
    records = [{"n": n, "pad": "y" * 20} for n in range(4)]
    batch = b"".join(encode_record(record) for record in records)
    log = AuditLog(str(path), write=fail_after(2 * len(encode_record(records[0])) + 5))
    with pytest.raises(AuditError, match="2 of 4 lines written") as failure:
        log.append_lines(batch)
    log.close()
    assert failure.value.lines_written == 2
    assert lines(path) == records[:2]


def test_a_batch_failing_part_way_keeps_its_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    batch = b"".join(encode_record({"n": n, "pad": "y" * 20}) for n in range(3))
    first_line = len(encode_record({"n": 0, "pad": "y" * 20}))
    log = AuditLog(str(path), write=fail_after(first_line + 5))
    with pytest.raises(AuditError) as failure:
        log.append_lines(batch)
    log.close()
    assert failure.value.lines_written == 1
    assert lines(path) == [{"n": 0, "pad": "y" * 20}]


def test_bytes_another_writer_appended_after_a_fragment_are_never_truncated(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    other = b'{"other":1}\n'
    calls = []

    def half_then_a_lockless_writer_then_full(fd: int, data: memoryview) -> int:
        calls.append(bytes(data))
        if len(calls) == 1:
            done = os.write(fd, data[: len(data) // 2])
            with open(path, "ab") as lockless:  # a writer that ignores the lock
                lockless.write(other)
            return done
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log = AuditLog(str(path), write=half_then_a_lockless_writer_then_full)
    with pytest.raises(AuditError):
        log.append({"mine": "m" * 40})
    log.close()
    assert path.read_bytes().endswith(other)  # kept, not truncated with the fragment
    AuditLog(str(path)).append({"later": 2})
    assert json.loads(path.read_text().splitlines()[-1]) == {"later": 2}


def test_a_fragment_that_cannot_be_truncated_gets_its_line_ended(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"earlier":1}\n')
    calls = []

    def fragment_then_full_but_a_newline_fits(fd: int, data: memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return os.write(fd, data[:6])
        if len(data) == 1:
            return os.write(fd, data)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def append_only_file(fd: int, length: int) -> None:  # as with chattr +a
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "ftruncate", append_only_file)
    log = AuditLog(str(path), write=fragment_then_full_but_a_newline_fits)
    with pytest.raises(AuditError):
        log.append({"lost": "z" * 30})
    log.close()
    assert path.read_bytes() == b'{"earlier":1}\n{"lost\n'  # the fragment's line ended, nothing glued to it


def test_a_fragment_another_writer_left_is_ended_before_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"earlier":1}\n{"killed": "mid-wri')
    log = AuditLog(str(path))
    log.append({"later": 2})
    log.close()
    earlier, fragment, later = path.read_text().splitlines()
    assert json.loads(earlier) == {"earlier": 1} and json.loads(later) == {"later": 2}
    assert fragment == '{"killed": "mid-wri'


def test_a_failed_append_after_ending_another_writers_fragment_leaves_none_of_its_own(tmp_path: Path) -> None:
    # The newline that ends the other writer's fragment counts in where our write starts: the
    # failed write's own fragment is then truncated (mutation testing, issue 21).
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"earlier":1}\n{"killed": "mid-wri')
    log = AuditLog(str(path), write=fail_after(1 + 10))  # the ending newline, then 10 bytes of ours
    with pytest.raises(AuditError, match="0 of 1 lines written") as failure:
        log.append({"lost": "x" * 100})
    log.close()
    assert failure.value.lines_written == 0
    assert path.read_bytes() == b'{"earlier":1}\n{"killed": "mid-wri\n'
    AuditLog(str(path)).append({"later": 2})
    assert path.read_text().splitlines()[-1] == '{"later":2}'


def test_the_lock_is_held_while_writing_and_while_undoing_a_fragment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    probe = os.open(path, os.O_RDONLY)  # another open file description: flock conflicts with it
    seen = []

    def lock_is_taken() -> bool:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False

    failing = fail_after(4)

    def write(fd: int, data: memoryview) -> int:
        seen.append(("write", lock_is_taken()))
        return failing(fd, data)

    real_ftruncate = os.ftruncate

    def ftruncate(fd: int, length: int) -> None:
        seen.append(("ftruncate", lock_is_taken()))
        real_ftruncate(fd, length)

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    log = AuditLog(str(path), write=write)
    try:
        with pytest.raises(AuditError):
            log.append({"n": 1})
    finally:
        log.close()
        os.close(probe)
    assert seen == [("write", True), ("write", True), ("ftruncate", True)]
    assert path.read_bytes() == b""


# --- the writer thread ---------------------------------------------------------------------------


class StuckDisk:
    """An os.write that waits until released: the writer thread stays inside its first write."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, fd: int, data: memoryview) -> int:
        self.entered.set()
        self.release.wait()
        return os.write(fd, data)


@pytest.fixture
def disk() -> Iterator[StuckDisk]:
    """Released at teardown whatever the test did: a writer left stuck would hang the atexit drain."""
    stuck = StuckDisk()
    yield stuck
    stuck.release.set()


def test_writer_writes_every_submitted_record_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditWriter(AuditLog(str(path))) as writer:
        for n in range(1000):
            writer.submit({"n": n})
        assert writer.flush() is True
        assert (writer.written, writer.failed, writer.error) == (1000, 0, None)
    assert [r["n"] for r in lines(path)] == list(range(1000))


def test_submit_keeps_the_record_as_it_was_when_submitted(tmp_path: Path, disk: StuckDisk) -> None:
    path = tmp_path / "audit.jsonl"
    writer = AuditWriter(AuditLog(str(path), write=disk))
    writer.submit({"n": 0})
    assert disk.entered.wait(30)  # the thread is inside its write; the next record waits in the queue
    graphics = {"identity": {"x509dname": "CN=alice"}}
    writer.submit({"graphics": graphics})
    del graphics["identity"]["x509dname"]  # what a later filter (json_filter) may do to the event
    disk.release.set()
    assert writer.close()
    assert lines(path)[1] == {"graphics": {"identity": {"x509dname": "CN=alice"}}}


def test_a_full_queue_makes_submit_wait_and_loses_nothing(tmp_path: Path, disk: StuckDisk) -> None:
    path = tmp_path / "audit.jsonl"
    writer = AuditWriter(AuditLog(str(path), write=disk), max_queued=2)
    writer.submit({"n": 0})
    assert disk.entered.wait(30)
    writer.submit({"n": 1})  # two held: the one being written and this one
    third = threading.Thread(target=writer.submit, args=({"n": 2},))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # waiting for room, not dropped, not queued beyond the bound
    disk.release.set()
    third.join(30)
    assert not third.is_alive()
    assert writer.close()
    assert [r["n"] for r in lines(path)] == [0, 1, 2]
    assert writer.failed == 0


def test_write_failures_are_counted_not_raised_and_later_records_are_written(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    def full_for_bad_records(fd: int, data: memoryview) -> int:
        if b'"bad"' in bytes(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    with AuditWriter(AuditLog(str(path), write=full_for_bad_records)) as writer:
        for record in ({"n": 1}, {"n": "bad"}, {"n": 3}):
            writer.submit(record)  # never raises
            assert writer.flush(30)  # one record per write, so that only the bad one fails
        assert (writer.written, writer.failed) == (2, 1)
        assert writer.error is not None and "No space left on device" in writer.error
    assert lines(path) == [{"n": 1}, {"n": 3}]


def test_a_batch_failing_part_way_counts_its_whole_lines_as_written(tmp_path: Path, disk: StuckDisk) -> None:
    path = tmp_path / "audit.jsonl"
    record = {"pad": "q" * 50}
    calls = []

    def stuck_then_full_after_a_line_and_a_half(fd: int, data: memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return disk(fd, data)
        if len(calls) == 2:
            return os.write(fd, data[: len(encode_record(record)) * 3 // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writer = AuditWriter(AuditLog(str(path), write=stuck_then_full_after_a_line_and_a_half))
    writer.submit(record)
    assert disk.entered.wait(30)
    for _record in range(3):  # queued while the thread is stuck: the next batch, one write
        writer.submit(record)
    disk.release.set()
    assert writer.close()
    assert (writer.written, writer.failed) == (2, 2)
    assert lines(path) == [record, record]


def test_a_record_json_cannot_hold_is_counted_as_failed(tmp_path: Path) -> None:
    with AuditWriter(AuditLog(str(tmp_path / "audit.jsonl"))) as writer:
        writer.submit({"x": object()})
        writer.submit({"n": 1})
        writer.submit({"y": object()})  # each one counted: the count adds up (mutation testing, issue 21)
        assert writer.flush(30)
        assert (writer.written, writer.failed) == (1, 2)
        assert writer.error is not None and "cannot be written as JSON" in writer.error


def test_a_path_that_cannot_be_opened_is_counted_as_failed(tmp_path: Path) -> None:
    with AuditWriter(AuditLog(str(tmp_path / "missing" / "audit.jsonl"))) as writer:
        writer.submit({"n": 1})
        assert writer.flush(30)
        assert (writer.written, writer.failed) == (0, 1)
        assert writer.error is not None and "cannot open audit log" in writer.error


def test_a_record_submitted_after_close_is_counted_as_failed(tmp_path: Path) -> None:
    writer = AuditWriter(AuditLog(str(tmp_path / "audit.jsonl")))
    assert writer.close()
    writer.submit({"n": 1})
    assert writer.failed == 1 and writer.error is not None and "closed" in writer.error


def test_flush_gives_up_after_its_timeout_while_the_disk_is_stuck(tmp_path: Path, disk: StuckDisk) -> None:
    writer = AuditWriter(AuditLog(str(tmp_path / "audit.jsonl"), write=disk))
    writer.submit({"n": 0})
    assert writer.flush(timeout=0.2) is False
    disk.release.set()
    assert writer.flush(timeout=30) is True
    assert writer.close()


def test_close_writes_what_is_queued_and_stops_the_thread(tmp_path: Path, disk: StuckDisk) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), write=disk)
    writer = AuditWriter(log)
    for n in range(100):
        writer.submit({"n": n})
    disk.release.set()
    assert writer.close()
    assert [r["n"] for r in lines(path)] == list(range(100))
    assert log.fd is None and not writer._thread.is_alive()


def test_a_quiet_stream_is_synced_when_its_interval_ends(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"), fsync="interval", fsync_interval=1.0)
    with AuditWriter(log) as writer:
        writer.submit({"n": 1})  # the first write syncs (none yet)
        assert writer.flush(30)
        writer.submit({"n": 2})  # within the interval: written, its sync owed
        assert writer.flush(30)
        # then nothing more comes: the thread syncs when the interval ends
        wait_until(lambda: log.sync_due_in(time.monotonic()) is None, "the owed sync")


def test_records_left_at_exit_are_written(tmp_path: Path) -> None:
    """The process submits and exits without flush or close: atexit drains the queue. The
    disk is slow (short writes with a pause), so the thread is far behind at exit."""
    path = tmp_path / "audit.jsonl"
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(COLLECTIONS)!r})
        from ansible_collections.virtguard.console.plugins.module_utils.audit_log import AuditLog, AuditWriter

        def slow_disk(fd, data):
            time.sleep(0.001)
            return os.write(fd, data[:1024])

        writer = AuditWriter(AuditLog({str(path)!r}, write=slow_disk))
        for n in range(10_000):
            writer.submit({{"n": n, "pad": "p" * 40}})
        print(writer.written, flush=True)
    """)
    run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) < 10_000  # the control: the thread had not written everything at exit
    assert [r["n"] for r in lines(path)] == list(range(10_000))


# --- the file's lock: never waited for without bound ------------------------------------------
# Real flock: another process that holds it as a reader would (lab.file_lock.HeldLock, LOCK_SH on
# a read-only descriptor), or an exclusive lock on another open file description in this process.


def append_in_thread(log: AuditLog, record: dict[str, Any]) -> tuple[threading.Thread, list[BaseException]]:
    """Runs ``log.append(record)`` on a thread (the old, unbounded flock would never return);
    the list gets what it raised."""
    raised: list[BaseException] = []

    def append() -> None:
        try:
            log.append(record)
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            raised.append(exc)

    thread = threading.Thread(target=append, daemon=True)
    thread.start()
    return thread, raised


def test_an_append_gives_up_on_a_lock_another_process_holds_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"earlier":1}\n')
    log = AuditLog(str(path), lock_timeout=0.5)
    with HeldLock(path) as reader:
        assert not exclusive_lock_free(path)  # the control: the reader does hold it
        thread, raised = append_in_thread(log, {"n": 1})
        thread.join(60)  # a deadline for a hang, not a timing goal
        assert not thread.is_alive(), "the append waited for the lock without bound"
    assert len(raised) == 1 and isinstance(raised[0], AuditLockTimeout), raised
    assert raised[0].lines_written == 0
    assert f"held by process {reader.pid}" in str(raised[0]) and str(path) in str(raised[0])
    assert path.read_bytes() == b'{"earlier":1}\n'
    log.append({"n": 2})  # the reader is gone: the same log writes again
    log.close()
    assert lines(path) == [{"earlier": 1}, {"n": 2}]


def test_an_exclusive_lock_on_another_descriptor_of_this_process_is_waited_for_with_a_bound(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    holder = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    log = AuditLog(str(path), lock_timeout=0)  # 0: one try
    try:
        thread, raised = append_in_thread(log, {"n": 1})
        thread.join(60)
        assert not thread.is_alive(), "the append waited for the lock without bound"
        assert len(raised) == 1 and isinstance(raised[0], AuditLockTimeout), raised
    finally:
        os.close(holder)
        log.close()
    assert path.read_bytes() == b""


def test_a_lock_released_within_the_bound_is_taken_and_nothing_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    log = AuditLog(str(path), lock_timeout=120)
    reader = HeldLock(path).hold()
    try:
        thread, raised = append_in_thread(log, {"n": 1})
        thread.join(0.5)
        assert thread.is_alive()  # the control: it is waiting for the lock, not failed, not written
        assert path.read_bytes() == b""
    finally:
        reader.release()
    thread.join(60)
    assert not thread.is_alive() and raised == []
    log.close()
    assert lines(path) == [{"n": 1}]


def test_a_negative_lock_timeout_is_refused(tmp_path: Path) -> None:
    for wrong in (-1.0, float("nan")):
        with pytest.raises(AuditError, match="lock_timeout"):
            AuditLog(str(tmp_path / "audit.jsonl"), lock_timeout=wrong)


def test_lock_holders_names_the_processes_that_hold_a_flock(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert lock_holders(fd) == []
        with HeldLock(path) as first, HeldLock(path) as second:  # two readers share the lock
            assert lock_holders(fd) == sorted([first.pid, second.pid])
    finally:
        os.close(fd)


# --- the writer under a held lock: every lost record counted, and stated ----------------------


class Statements(logging.Handler):
    """The statements an AuditWriter makes to its ``report`` logger."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.logger = logging.getLogger(f"test.audit.{id(self)}")
        self.logger.propagate = False
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def lost_in_all(self) -> list[int]:
        """The whole loss each statement gave, in order."""
        return [int(match.group(1)) for message in list(self.messages)
                for match in [re.search(r"(\d+) record\(s\) lost in all", message)] if match]


@pytest.fixture
def statements() -> Iterator[Statements]:
    handler = Statements()
    yield handler
    handler.logger.removeHandler(handler)


def test_records_that_wait_for_a_held_lock_in_vain_are_counted_one_by_one(
        tmp_path: Path, statements: Statements) -> None:
    """Records, not writes or batches: more than BATCH_BYTES queue while the thread waits for
    the lock, so the lost batch spans several writes; every record is counted once."""
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    record = {"pad": "z" * 1000}
    count = 3 * BATCH_BYTES // len(encode_record(record))
    with HeldLock(path):
        writer = AuditWriter(AuditLog(str(path), fsync="never", lock_timeout=0.5), report=statements.logger)
        for _record in range(count):
            writer.submit(record)
        assert writer.flush(120), "the writer waited for the lock without bound"
        assert (writer.written, writer.failed) == (0, count)
        assert writer.error is not None and "cannot lock audit log" in writer.error
    for n in range(5):
        writer.submit({"n": n})
    assert writer.close()
    assert (writer.written, writer.failed) == (5, count)
    assert lines(path) == [{"n": n} for n in range(5)]
    assert statements.lost_in_all()[-1] == count
    assert any("is written again" in message for message in statements.messages)


def test_every_loss_is_stated_even_when_no_record_follows(tmp_path: Path, statements: Statements) -> None:
    """The first loss is stated at once; later ones within report_interval, with no new record
    to prompt it: the last statement always gives the whole loss."""
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    with HeldLock(path):
        writer = AuditWriter(AuditLog(str(path), fsync="never", lock_timeout=0), report=statements.logger,
                             report_interval=0.5)
        writer.submit({"n": 0})
        assert writer.flush(60)
        wait_until(lambda: statements.lost_in_all() == [1], "the statement of the first loss")
        for n in range(1, 8):
            writer.submit({"n": n})
            assert writer.flush(60)  # one batch each: seven losses within the interval
        wait_until(lambda: statements.lost_in_all()[-1:] == [8], "the statement of the later losses")
        assert writer.failed == 8
        assert "could not be written since the last report" in statements.messages[-1]
        assert writer.close()
    assert path.read_bytes() == b""
    assert statements.lost_in_all()[-1] == 8
    assert "closed: 0 record(s) written, 8 record(s) lost in all" in statements.messages[-1]


def test_a_record_submitted_after_close_is_stated(tmp_path: Path, statements: Statements) -> None:
    writer = AuditWriter(AuditLog(str(tmp_path / "audit.jsonl")), report=statements.logger)
    assert writer.close()
    writer.submit({"n": 1})
    assert writer.failed == 1 and statements.lost_in_all() == [1]


# --- the statements word for word, and the writer's other edges (mutation testing, issue 21) ------


def test_the_statements_of_loss_recovery_and_close_give_exact_counts(tmp_path: Path, statements: Statements) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    writer = AuditWriter(AuditLog(str(path), fsync="never", lock_timeout=0), report=statements.logger,
                         report_interval=3600)
    with HeldLock(path):
        writer.submit({"n": 0})
        assert writer.flush(60)
        lock_error = writer.error
        wait_until(lambda: len(statements.messages) == 1, "the statement of the first loss")
        writer.submit({"n": 1})  # lost too, within the interval: stated with the recovery
        assert writer.flush(60)
    writer.submit({"n": 2})
    assert writer.flush(60)
    wait_until(lambda: len(statements.messages) == 2, "the statement of the recovery")
    assert writer.close()
    writer.submit({"n": 3})  # after close: stated at once
    assert statements.messages == [
        f"virtguard: audit log {path}: 1 record(s) could not be written since the last report "
        f"(1 record(s) lost in all, 0 written): {lock_error}",
        f"virtguard: audit log {path} is written again (2 record(s) lost in all, 1 of them since the last report)",
        f"virtguard: audit log {path} closed: 1 record(s) written, 2 record(s) lost in all",
        f"virtguard: audit log {path}: 1 record(s) could not be written since the last report "
        f"(3 record(s) lost in all, 1 written): audit writer for {path} is closed: a record was not written",
    ]


def test_a_record_lost_before_encoding_is_followed_by_a_recovery_statement(
        tmp_path: Path, statements: Statements) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditWriter(AuditLog(str(path)), report=statements.logger) as writer:
        writer.submit({"x": object()})
        writer.submit({"n": 1})
        assert writer.flush(30)
        wait_until(lambda: any("is written again (1 record(s) lost in all" in m for m in statements.messages),
                   "the statement that the audit is written again")


def test_a_failed_sync_is_the_writers_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    path = tmp_path / "audit.jsonl"
    writer = AuditWriter(AuditLog(str(path), fsync="always"))
    writer.submit({"n": 1})
    assert writer.close()
    assert writer.written == 1 and writer.error == f"cannot sync audit log {path}: Input/output error"
    assert lines(path) == [{"n": 1}]  # in the file, not known to be on the disk


def test_a_batch_is_written_in_full_writes_of_batch_bytes_and_each_outcome_counted(tmp_path: Path) -> None:
    """Five writes of BATCH_BYTES in one batch: written, failed by an unexpected exception,
    written in part (whole lines kept), written, failed again: every record counted once."""
    path = tmp_path / "audit.jsonl"
    line = encode_record({"p": "x" * 1015})
    assert len(line) == 1024 and BATCH_BYTES % len(line) == 0
    per_write = BATCH_BYTES // len(line)
    entered, release = threading.Event(), threading.Event()
    asked: list[int] = []

    def write(fd: int, data: memoryview) -> int:
        asked.append(len(data))
        call = len(asked)
        if call == 1:  # the first record: the writer waits here while the rest is queued
            entered.set()
            release.wait(30)
        if call in (3, 7):
            raise ValueError("boom")
        if call == 4:  # half of the third write, then a full disk
            return os.write(fd, data[: BATCH_BYTES // 2])
        if call == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    writer = AuditWriter(AuditLog(str(path), fsync="never", write=write))
    writer.submit({"n": 0})
    assert entered.wait(30)
    for _line in range(5 * per_write):
        writer.submit({"p": "x" * 1015})
    release.set()
    assert writer.close()
    assert asked == [len(encode_record({"n": 0})), BATCH_BYTES, BATCH_BYTES, BATCH_BYTES, BATCH_BYTES // 2,
                     BATCH_BYTES, BATCH_BYTES]
    written = 1 + per_write + per_write // 2 + per_write
    assert (writer.written, writer.failed) == (written, 2 * per_write + per_write // 2)
    assert writer.error == f"cannot append to audit log {path}: ValueError: boom"
    assert len(path.read_bytes().splitlines()) == writer.written


def test_only_the_interval_policy_owes_a_sync_and_only_for_unsynced_lines(tmp_path: Path) -> None:
    interval = AuditLog(str(tmp_path / "interval.jsonl"), fsync="interval", fsync_interval=3600)
    interval.append({"n": 1})  # the first append syncs at once (none was made yet)
    assert interval.sync_due_in(time.monotonic()) is None
    interval.append({"n": 2})  # within the interval: owed a sync at its end
    due = interval.sync_due_in(time.monotonic())
    assert due is not None and 0 < due <= 3600
    interval.close()
    assert interval.sync_due_in(time.monotonic()) is None
    for policy in ("always", "never"):
        log = AuditLog(str(tmp_path / f"{policy}.jsonl"), fsync=policy)
        log.append({"n": 1})
        log.append({"n": 2})
        assert log.sync_due_in(time.monotonic()) is None
        log.close()


def test_the_first_append_syncs_at_once_also_soon_after_a_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """time.monotonic() counts from the boot here: a machine up for less than the interval
    must still sync the first record at once (found on a machine up for 7 minutes)."""
    synced: list[int] = []
    monkeypatch.setattr(time, "monotonic", lambda: 5.0)
    monkeypatch.setattr(os, "fsync", synced.append)
    log = AuditLog(str(tmp_path / "audit.jsonl"), fsync="interval", fsync_interval=3600)
    assert log.sync_due_in(5.0) is None  # nothing written, nothing owed
    log.append({"n": 1})
    assert len(synced) == 1
    assert log.sync_due_in(5.0) is None
    log.append({"n": 2})  # within the interval of that sync: owed at its end
    assert len(synced) == 1
    assert log.sync_due_in(5.0) == 3600
    assert log.sync_due_in(3605.0) == 0
    log.close()


def test_a_failed_sync_is_tried_again_an_interval_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), fsync="interval", fsync_interval=3600)
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(AuditError, match=f"^cannot sync audit log {re.escape(str(path))}: Input/output error$"):
        log.append({"n": 1})
    due = log.sync_due_in(time.monotonic())
    assert due is not None and 0 < due <= 3600
    log.close()


def test_the_writers_bound_its_report_and_its_thread(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^max_queued must be at least 1, got 0$"):
        AuditWriter(AuditLog(str(tmp_path / "refused.jsonl")), max_queued=0)
    path = tmp_path / "audit.jsonl"
    with AuditWriter(AuditLog(str(path)), max_queued=1) as writer:
        writer.submit({"n": 1})
        writer.submit({"n": 2})
        assert writer.report.name == "ansible_collections.virtguard.console.plugins.module_utils.audit_log"
        # a daemon thread: a process that never closes its writer still exits (atexit drains it)
        assert writer._thread.daemon and writer._thread.name == f"audit-writer {path}"
    assert lines(path) == [{"n": 1}, {"n": 2}]


def test_a_writer_that_lost_nothing_states_nothing(tmp_path: Path, statements: Statements) -> None:
    with AuditWriter(AuditLog(str(tmp_path / "audit.jsonl")), report=statements.logger) as writer:
        writer.submit({"n": 1})
        assert writer.flush(30)
    assert statements.messages == []


def test_close_with_a_timeout_gives_up_while_the_disk_is_stuck(tmp_path: Path, disk: StuckDisk) -> None:
    writer = AuditWriter(AuditLog(str(tmp_path / "audit.jsonl"), write=disk))
    writer.submit({"n": 0})
    assert disk.entered.wait(30)
    assert writer.close(timeout=0.01) is False  # the thread goes on draining
    disk.release.set()
    assert writer.close(timeout=30) is True


def test_close_in_a_forked_child_leaves_the_parents_writer_alone(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditWriter(AuditLog(str(path))) as writer:
        writer.submit({"n": 1})
        assert writer.flush(30)
        pid = os.fork()
        if pid == 0:  # the child: close() is a no-op that says done
            os._exit(0 if writer.close(timeout=0) is True else 1)
        assert os.waitpid(pid, 0)[1] == 0
        writer.submit({"n": 2})
    assert lines(path) == [{"n": 1}, {"n": 2}]
