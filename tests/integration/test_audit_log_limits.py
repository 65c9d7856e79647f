"""The audit log against the kernel's real limits: a file size limit (RLIMIT_FSIZE, EFBIG) and
a full file system (a 64 KiB tmpfs, ENOSPC), where a write stops part-way; and jq as a reader.

Each limit is set in a child process or on a file system of the test's own, so the test runner
itself is never limited."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.audit_log import (
    AuditError,
    AuditLog,
    AuditWriter,
    encode_record,
)
from ansible_collections.virtguard.console.plugins.plugin_utils.classify_filter import FilterState, classify_event
from ansible_collections.virtguard.console.plugins.plugin_utils.graphics_event import graphics_payload
from lab.hypervisor import wait_for

COLLECTIONS = Path(__file__).resolve().parents[2] / "build" / "collections"
RECORD = {"record": "event", "dn": "CN=" + "r" * 200}
LINE = len(encode_record(RECORD))

# Imports, RECORD and LINE, and an os.write that counts the writes the kernel cut short (the
# control that a test did reach the part-way failure it is about).
CHILD_PRELUDE = f"""
import json, os, resource, signal, sys
sys.path.insert(0, {str(COLLECTIONS)!r})
from ansible_collections.virtguard.console.plugins.module_utils.audit_log import (
    AuditError, AuditLog, AuditWriter, encode_record)
RECORD = {RECORD!r}
LINE = {LINE}
short_writes = 0

def counting_write(fd, data):
    global short_writes
    done = os.write(fd, data)
    if done < len(data):
        short_writes += 1
    return done
"""


def run_child(body: str, *args: str) -> dict[str, Any]:
    """Runs CHILD_PRELUDE + body in a new Python; the body prints one JSON object."""
    run = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(body), *args],
                         check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"child ended with {run.returncode}: {run.stderr}"
    result: dict[str, Any] = json.loads(run.stdout)
    return result


def whole_lines(path: Path) -> list[Any]:
    """The file's records; fails if it does not end at a line boundary or a line is not JSON."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"{path} ends with a fragment: {data[-80:]!r}"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def test_a_file_size_limit_leaves_only_whole_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    result = run_child("""
        limit = 10 * LINE + LINE // 2
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        log = AuditLog(sys.argv[1], fsync="never", write=counting_write)
        written, error = 0, None
        for _record in range(20):
            try:
                log.append(RECORD)
                written += 1
            except AuditError as exc:
                error = str(exc)
                break
        print(json.dumps({"written": written, "error": error, "short_writes": short_writes,
                          "sigxfsz_ignored": signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN}))
    """, str(path))
    # The child was not killed by SIGXFSZ: CPython ignores it, so the write fails with EFBIG.
    assert result["sigxfsz_ignored"] is True
    assert result["short_writes"] == 1  # the 11th record was cut at the limit
    assert result["written"] == 10 and "File too large" in result["error"]
    assert whole_lines(path) == [RECORD] * 10
    # A writer without the limit goes on from the line boundary.
    AuditLog(str(path)).append({"after": 1})
    assert whole_lines(path)[-1] == {"after": 1}


def test_the_writer_counts_what_a_file_size_limit_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    result = run_child("""
        limit = 10 * LINE + LINE // 2
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        writer = AuditWriter(AuditLog(sys.argv[1], fsync="never", write=counting_write))
        for _record in range(20):
            writer.submit(RECORD)  # never raises
        writer.flush()
        print(json.dumps({"written": writer.written, "failed": writer.failed, "error": writer.error,
                          "short_writes": short_writes}))
        writer.close()
    """, str(path))
    assert result["short_writes"] >= 1
    assert (result["written"], result["failed"]) == (10, 10)
    assert "File too large" in result["error"]
    assert whole_lines(path) == [RECORD] * 10


def test_writers_failing_at_their_size_limits_beside_another_leave_its_records_and_every_line_whole(
        tmp_path: Path) -> None:
    """Processes append at once. Four have file size limits that the file passes one after the
    other, so their writes fail, and they undo their fragments. The fifth (this test) has no
    limit: all its records are in the file, in order, and every line is whole.

    Each limited writer starts when the file ends less than one of its records below its limit,
    so its first write is always cut part-way (a short write), whatever the scheduler does; it
    then goes on writing while the free writer appends beside it."""
    path = tmp_path / "audit.jsonl"
    pad = 2000  # a limited writer's record is longer than the gap it starts in (below)
    limits = (30_000, 45_000, 60_000, 75_000)
    limited = [subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent("""
        limit = int(sys.argv[2])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        log = AuditLog(sys.argv[1], fsync="never", write=counting_write)
        written = failed = 0
        print("ready", flush=True)
        sys.stdin.readline()  # the file now ends just below the limit
        for n in range(400):
            try:
                log.append({"writer": limit, "n": n, "pad": "l" * int(sys.argv[3])})
                written += 1
            except AuditError:
                failed += 1
            if n == 0:
                print("first", flush=True)
        print(json.dumps({"written": written, "failed": failed, "short_writes": short_writes}))
    """), str(path), str(limit), str(pad)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for limit in limits]
    for child in limited:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    free = AuditLog(str(path), fsync="never")
    free.open()
    n = 0

    def append_free() -> None:
        nonlocal n
        free.append({"writer": "free", "n": n, "pad": "f" * 150})
        n += 1

    for limit, child in zip(limits, limited, strict=True):
        # Other limited writers are past their limits (every write of theirs fails), so the
        # file grows only by the free writer's records (about 190 bytes) until the gap.
        while path.stat().st_size < limit - pad // 2:
            append_free()
        assert limit - pad < path.stat().st_size < limit
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "first\n"  # its first write was tried in the gap
        for _record in range(50):  # then both write at once
            append_free()
    while n < 3000:
        append_free()
    free.close()
    results = []
    for child in limited:
        out, _err = child.communicate("", timeout=300)
        assert child.returncode == 0
        results.append(json.loads(out))
    records = whole_lines(path)
    assert [r["n"] for r in records if r["writer"] == "free"] == list(range(3000))
    assert len(records) == 3000 + sum(result["written"] for result in results)
    # the controls: every writer reached its limit, and its first write was cut short and undone
    assert all(result["failed"] > 0 for result in results), results
    assert all(result["short_writes"] > 0 for result in results), results


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs of the test's own (16 pages), unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)], check=False,
                         capture_output=True, text=True)
    if run.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(fs: Path) -> Path:
    """Fills the file system with a file of zeros; returns the file (unlink it to make room)."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_leaves_only_whole_records(tiny_fs: Path) -> None:
    path = tiny_fs / "audit.jsonl"
    record = {"dn": "CN=" + "d" * 1480}  # about 1500 bytes: lines straddle the 4 KiB pages
    short = []

    def counting_write(fd: int, data: memoryview) -> int:
        done = os.write(fd, data)
        if done < len(data):
            short.append(done)
        return done

    log = AuditLog(str(path), fsync="never", write=counting_write)
    written = 0
    with pytest.raises(AuditError, match="No space left on device"):
        for _record in range(100):
            log.append(record)
            written += 1
    log.close()
    assert short, "the control: the kernel wrote part of a record before running out of space"
    assert whole_lines(path) == [record] * written
    assert path.stat().st_size == written * len(encode_record(record))


def test_the_writer_counts_what_a_full_disk_refused_and_writes_once_there_is_room(tiny_fs: Path) -> None:
    filler = fill(tiny_fs)
    path = tiny_fs / "audit.jsonl"
    with AuditWriter(AuditLog(str(path), fsync="never")) as writer:
        for n in range(5):
            writer.submit({"n": n})
        assert writer.flush(60)
        assert (writer.written, writer.failed) == (0, 5)
        assert writer.error is not None and "No space left on device" in writer.error
        filler.unlink()
        for n in range(5, 10):
            writer.submit({"n": n})
        assert writer.flush(60)
        assert (writer.written, writer.failed) == (5, 5)
    assert whole_lines(path) == [{"n": n} for n in range(5, 10)]


def lost_in_all(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The whole loss each of the filter's audit statements gave, in order (the activation log)."""
    return [int(found.group(1)) for record in list(caplog.records) if record.name == "virtguard.console.classify"
            for found in [re.search(r"(\d+) record\(s\) lost in all", record.getMessage())] if found]


def graphics_event(n: int) -> dict[str, Any]:
    return graphics_payload("connect", "2025-01-01T00:00:00+00:00", {"uri": "qemu:///system", "hostname": "h"},
                            {"name": "vm", "uuid": "u", "id": 1},
                            {"family": "ipv4", "node": "0.0.0.0", "service": "5901"},
                            {"family": "ipv4", "node": "10.1.1.1", "service": str(40000 + n)}, "none", [],
                            {"id": f"session{n}", "authenticated": False})


def test_the_activation_log_states_exactly_how_many_records_a_full_disk_lost(
        tiny_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The classify filter's audit on a file system that fills up during a storm of events.

    It used to under-report: the filter logged the count of lost records only when an event came,
    at most once per 10 s, so what was lost in the last 10 s of a storm, or after its last event
    (the writer thread trails the events), was never stated (a storm lost 1,673 records here and
    the log said 1). Now the writer states every loss within 10 s, event or not, again when the
    file is written again and at close; the last statement gives the whole loss, which is exactly
    the records missing from the file: one record per event classified, less the file's lines."""
    caplog.set_level(logging.INFO, logger="virtguard.console.classify")
    filler = fill(tiny_fs)
    os.truncate(filler, filler.stat().st_size - 48 * 1024)  # room for about 80 records
    path = tiny_fs / "audit.jsonl"
    state = FilterState.from_arguments({"trusted_networks": ["10.0.0.0/8"], "remediation": False,
                                        "audit_log": str(path)})
    assert state.audit is not None
    try:
        events = flagged = 0
        for n in range(2000):
            flagged += bool(classify_event(state, graphics_event(n), 0.0)["virtguard"].get("audit_error"))
            events += 1
        assert state.audit.flush(120)
        missing = events - len(whole_lines(path))
        assert 0 < missing < events, "the control: some records were written, then the disk was full"
        assert flagged > 0  # events carry audit_error, the signal a rule matches
        # no event follows: the whole loss is stated all the same (within the 10 s report interval)
        wait_for(lambda: lost_in_all(caplog)[-1:] == [missing], 60, f"a statement of all {missing} lost records")
        # room again: the next record is written, and the statements give the same whole loss
        filler.unlink()
        classify_event(state, graphics_event(5000), 0.0)
    finally:
        assert state.audit.close(120)  # also when the test failed: the tmpfs is unmounted next
    records = whole_lines(path)
    assert len(records) == events - missing + 1 and records[-1]["graphics"]["session"]["id"] == "session5000"
    assert lost_in_all(caplog)[-2:] == [missing, missing]
    messages = [r.getMessage() for r in caplog.records if r.name == "virtguard.console.classify"]
    assert "is written again" in messages[-2] and "closed:" in messages[-1]


SEPARATORS = ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def test_jq_reads_every_record_back_whatever_line_separator_a_dn_holds(tmp_path: Path) -> None:
    jq = shutil.which("jq")
    if jq is None:
        pytest.skip("jq is not installed")
    path = tmp_path / "audit.jsonl"
    dns = [f"CN=alice{separator}CN=mallory" for separator in SEPARATORS]
    log = AuditLog(str(path))
    for dn in dns:
        log.append({"dn": dn})
    log.close()
    # line by line, as a log shipper would hand lines to jq
    for line, dn in zip(path.read_text(encoding="utf-8").splitlines(), dns, strict=True):
        run = subprocess.run([jq, "--ascii-output", "-c", ".dn"], input=line, capture_output=True, text=True,
                             check=True)
        assert json.loads(run.stdout) == dn
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(dns)
