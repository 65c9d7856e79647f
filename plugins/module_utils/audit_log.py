# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The audit trail: JSON Lines, one object per line, only ever appended.

Two kinds of record share one file:

* ``{"record": "event", "time", "graphics": {...}, "virtguard": {...}}`` for every graphics
  event, written by the ``classify`` event filter (through an ``AuditWriter``): the payload
  exactly as the source made it (certificate DN and SASL user name as received) and the
  policy's verdict;
* ``{"record": "remediation", "time", "action": "block"|"cut", "ok", ...}`` for every
  remediation action and its result, written by the ``audit_record`` module.

Lines. Text is stored literally: JSON escapes what JSON must (quotes, backslashes, control
characters), and this module also escapes, as ``\\uXXXX``, the three characters that Python's
``str.splitlines()`` breaks lines at and JSON leaves raw (U+0085, U+2028, U+2029), so that
every line reader sees one record per line and ``json.loads`` of a line gives back exactly
what was received. Bytes that were not UTF-8 (surrogate escapes, U+DC80-U+DCFF) are written
as ``\\udcXX`` escapes and read back as the same surrogates.

Whole records or nothing. The file is opened with ``O_APPEND`` and every append holds an
exclusive ``flock`` on it, so the writers of this module (the filter's writer, playbook runs)
take turns; the kernel serialises appends to one file anyway. The lock is waited for at most
``lock_timeout`` seconds (``DEFAULT_LOCK_TIMEOUT``), never without bound: anyone who can open
the file, a reader included, can take a ``flock`` on it and hold it for ever. Past the bound the
append fails (``AuditLockTimeout``) and its records count as lost. Under the lock an append:

1. checks that the file ends with a newline, and ends the line if it does not (a writer
   killed in the middle of a write, or one that ignores the lock, left a fragment): a record
   never glues onto a fragment;
2. writes its lines, looping on short writes;
3. if a write fails part-way (``ENOSPC``; ``EFBIG`` past ``RLIMIT_FSIZE``, since CPython
   ignores ``SIGXFSZ`` from start-up), keeps the whole lines it wrote and removes the rest
   with ``ftruncate``, but only if the file still ends exactly where its own bytes end. If
   another writer appended after them (one that ignores the lock) nothing is truncated,
   because truncating would destroy that writer's bytes; if truncating fails (an append-only
   file) the fragment's line is ended instead.

So after any failure the file ends at a line boundary, and no complete record of another
writer is ever removed.

The path must be the file itself: a symlink is refused (``O_NOFOLLOW``, also when the file is
opened again after a rotation), and so is anything that is not a regular file.

Durability (``fsync``): ``always`` syncs after every write (remediation records: rare and
important); ``interval`` syncs at most once per ``fsync_interval`` seconds (the event stream:
thousands of records per second must not wait for the disk; a crash loses at most the last
interval; the ``AuditWriter`` also syncs a pending interval when the stream goes quiet);
``never`` leaves it to the kernel.
"""

from __future__ import annotations

import atexit
import collections
import datetime
import errno
import fcntl
import json
import logging
import math
import os
import stat
import threading
import time
from typing import Any, Callable, Mapping

FSYNC_POLICIES = ("always", "interval", "never")
DEFAULT_MAX_QUEUED = 100_000
# One write() of a writer's batch stays within this size (whole lines; a longer line goes alone).
BATCH_BYTES = 1 << 20

# The line breaks of str.splitlines() that json.dumps(ensure_ascii=False) leaves raw. The others
# (\n \r \v \f \x1c \x1d \x1e) are control characters, which JSON always escapes.
RAW_LINE_BREAKS = ("\x85", "\u2028", "\u2029")

# How long an append waits for the file's lock. Our writers hold it for one append: an fstat,
# a one-byte pread and one write of at most BATCH_BYTES (measured here: 0.4 ms for 1 MiB, 0.01 ms
# for a remediation's two records; the fsync comes after the lock is released), and few want it
# at once: the filter's writer and one audit_record per remediation run in flight. So a lock
# still taken after 2 s is held by something else (a reader that locked the file, a stopped
# process), and waiting longer only stalls: the filter's queue grows by 2 s of events while it
# waits (at most about 9,000: one activation's engine takes 3,500 to 4,500 events/s,
# docs/performance.md; far below DEFAULT_MAX_QUEUED, where submit would start to block the
# event loop), and a playbook run lasts 2 s longer. A disk under writeback throttling (the
# kernel pauses a writer at most 0.2 s at a time) stays well below it.
DEFAULT_LOCK_TIMEOUT = 2.0
# flock has no timeout: the lock is tried without blocking (LOCK_NB), first again after 1 ms,
# then at intervals doubling up to 50 ms (a free lock is had at once; a held one costs at most
# about 45 tries over 2 s).
LOCK_RETRY_FIRST = 0.001
LOCK_RETRY_MAX = 0.05
# The AuditWriter states lost records in the log at most this often (the first loss at once).
DEFAULT_REPORT_INTERVAL = 10.0

# What AuditLog calls to write: os.write, or a stand-in in unit tests.
WriteFunction = Callable[[int, memoryview], int]


class AuditError(Exception):
    """The audit file cannot be opened or written.

    ``lines_written`` counts the whole lines of the failed write that are in the file all the
    same (a batch cut short keeps the lines written before the failure)."""

    def __init__(self, message: str, lines_written: int = 0) -> None:
        super().__init__(message)
        self.lines_written = lines_written


class AuditLockTimeout(AuditError):
    """Another process held the audit file's lock for longer than the append's ``lock_timeout``."""


def lock_holders(fd: int) -> list[int]:
    """The pids /proc/locks names as holding a ``flock`` on the file of ``fd`` (Linux; best
    effort, empty when unknown): for the message that says who stalls the audit."""
    try:
        info = os.fstat(fd)
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            table = locks.read()
    except OSError:
        return []
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    pids = []
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  READ  1234 fd:00:5678 0 EOF"; waiters are marked "->" and skipped
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted and fields[4].isdigit():
            pids.append(int(fields[4]))
    return sorted(set(pids))


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _finite(value: Any) -> Any:
    """``value`` with NaN and the infinities as the strings JSON writers know them by."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


# Stateless, so one serves every thread; json.dumps would build an encoder per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _dumps(record: Any) -> str:
    return _ENCODER.encode(record)


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One record as one line of UTF-8 bytes (newline included).

    Raises ``AuditError`` for a record JSON cannot hold (an object that is not a str, number,
    bool, None, list or dict). NaN and the infinities, which strict readers such as ``jq``
    refuse, are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``."""
    try:
        try:
            text = _dumps(record)
        except ValueError as exc:
            if not str(exc).startswith("Out of range float"):
                raise
            text = _dumps(_finite(record))
    except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise AuditError(f"a record cannot be written as JSON: {exc}") from None
    for char in RAW_LINE_BREAKS:
        if char in text:  # only ever inside a JSON string, where \\uXXXX means the same
            text = text.replace(char, f"\\u{ord(char):04x}")
    # A lone surrogate (undecodable bytes from the client) cannot be UTF-8: backslashreplace
    # writes it as \\udcXX, which is its JSON escape. (A high surrogate followed by a low one
    # would read back as the pair's character; surrogate escapes are only ever low ones.)
    data = text.encode("utf-8", "backslashreplace")
    if b"\n" in data:  # cannot happen with json.dumps; guard the one-line invariant anyway
        raise AuditError("a record would span several lines")
    return data + b"\n"


def event_record(graphics: Mapping[str, Any], verdict: Mapping[str, Any],
                 time_iso: str | None = None) -> dict[str, Any]:
    return {"record": "event", "time": time_iso or utc_now(), "graphics": graphics, "virtguard": verdict}


def health_record(health: Any, verdict: Mapping[str, Any], time_iso: str | None = None) -> dict[str, Any]:
    """A hypervisor health event of the source (its watch changed state) and the filter's verdict."""
    return {"record": "health", "time": time_iso or utc_now(), "hypervisor": health, "virtguard": verdict}


def remediation_record(action: str, ok: bool, result: Any, context: Mapping[str, Any] | None = None,
                       time_iso: str | None = None) -> dict[str, Any]:
    """``result`` says what was done (addresses blocked until when, connections cut, errors);
    ``context`` ties it to the session (session id, reasons, hypervisor)."""
    record: dict[str, Any] = {"record": "remediation", "time": time_iso or utc_now(), "action": action,
                              "ok": bool(ok)}
    record.update(context or {})
    record["result"] = result
    return record


class AuditLog:
    """An append-only JSON Lines file. Keep one per path and process; not thread-safe (the
    ``AuditWriter`` gives one to its thread).

    ``write`` is what writes to the file descriptor: ``os.write``, or a stand-in in tests.
    ``lock_timeout`` is how long an append waits for the file's lock (0: one try)."""

    def __init__(self, path: str, fsync: str = "interval", fsync_interval: float = 1.0, mode: int = 0o640,
                 write: WriteFunction = os.write, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        if fsync not in FSYNC_POLICIES:
            raise AuditError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        if math.isnan(lock_timeout) or lock_timeout < 0:
            raise AuditError(f"lock_timeout must be 0 or more seconds, got {lock_timeout!r}")
        self.path = path
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.lock_timeout = lock_timeout
        self.mode = mode
        self.fd: int | None = None
        self._write = write
        self._identity: tuple[int, int] | None = None
        self._last_sync: float | None = None  # none yet: the first append syncs at once
        self._unsynced = False
        self._next_check = 0.0

    def open(self) -> None:
        """Open the file now (``append`` opens it otherwise), to check the path at start-up."""
        if self.fd is None:
            self._open()

    def _open(self) -> None:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.path, flags, self.mode)
        except OSError as exc:
            if exc.errno == errno.ELOOP and os.path.islink(self.path):
                raise AuditError(f"cannot open audit log {self.path}: the path is a symlink, which is refused "
                                 "(give the file itself)") from None
            raise AuditError(f"cannot open audit log {self.path}: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise AuditError(f"cannot open audit log {self.path}: not a regular file")
        self.fd, self._identity = fd, (info.st_dev, info.st_ino)

    def _reopen_if_rotated(self, now: float) -> None:
        """Follow a log rotation (the path now names another file), checked once a second."""
        if now < self._next_check:
            return
        self._next_check = now + 1.0
        try:
            info = os.lstat(self.path)  # a symlink put in the file's place is another file: refused
            if (info.st_dev, info.st_ino) == self._identity:
                return
        except OSError:
            pass
        if self._unsynced and self.fsync != "never" and self.fd is not None:
            try:  # what the rotated file got last is owed a sync too
                os.fsync(self.fd)
            except OSError:
                pass
        self.close()
        self._open()

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record, whole or not at all; raises ``AuditError``."""
        self.append_lines(encode_record(record))

    def append_lines(self, data: bytes) -> None:
        """Append whole lines (``encode_record`` outputs, joined), in one write when the kernel
        allows. On a failure raises ``AuditError`` whose ``lines_written`` counts the lines that
        are in the file; the file then ends at a line boundary (see the module's docstring)."""
        if not data:
            return
        if not data.endswith(b"\n"):
            raise AuditError("only whole lines are appended")
        now = time.monotonic()
        if self.fd is None:
            self._open()
        else:
            self._reopen_if_rotated(now)
        fd = self.fd
        if fd is None:  # _open() sets it or raises
            raise AuditError(f"audit log {self.path} is not open")
        self._lock(fd)
        try:
            start = self._end_at_line_boundary(fd)
            self._write_whole(fd, data, start)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._unsynced = True
        if self.fsync == "always" or (self.fsync == "interval" and self._sync_owed(now)):
            try:
                self.sync()
            except AuditError as exc:  # the lines are in the file, not yet on the disk
                raise AuditError(str(exc), lines_written=data.count(b"\n")) from None

    def _lock(self, fd: int) -> None:
        """Take the file's exclusive lock within ``lock_timeout`` seconds, or raise
        ``AuditLockTimeout`` (``AuditError`` when flock itself fails)."""
        deadline = time.monotonic() + self.lock_timeout
        pause = LOCK_RETRY_FIRST
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except OSError as exc:
                raise AuditError(f"cannot lock audit log {self.path}: {exc.strerror}") from None
            left = deadline - time.monotonic()
            if left <= 0:
                holders = lock_holders(fd)
                held_by = f" by process {', '.join(map(str, holders))}" if holders else ""
                raise AuditLockTimeout(
                    f"cannot lock audit log {self.path}: its lock was held{held_by} for more than "
                    f"{self.lock_timeout:g}s (a reader that locks the file, or a stuck writer)")
            time.sleep(min(pause, left))
            pause = min(pause * 2, LOCK_RETRY_MAX)

    def _end_at_line_boundary(self, fd: int) -> int:
        """End a fragment left at the end of the file; returns the file's size."""
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                if self._write(fd, memoryview(b"\n")) != 1:
                    raise OSError(errno.EIO, "write() wrote nothing")
                size += 1
        except OSError as exc:
            raise AuditError(f"cannot append to audit log {self.path}: {exc.strerror or exc} "
                             "(while ending a fragment another writer left)") from None
        return size

    def _write_whole(self, fd: int, data: bytes, start: int) -> None:
        """Write ``data`` at the end of the file (``start`` bytes long under the lock)."""
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                written = self._write(fd, view[done:])
                if written <= 0:  # a regular file never does this; be safe against a stand-in
                    raise OSError(errno.EIO, "write() wrote nothing")
                done += written
        except OSError as exc:
            kept = self._undo_fragment(fd, data, start, done)
            lines = data.count(b"\n")
            raise AuditError(f"cannot append to audit log {self.path}: {exc.strerror or exc} "
                             f"({kept} of {lines} lines written)", lines_written=kept) from None

    def _undo_fragment(self, fd: int, data: bytes, start: int, done: int) -> int:
        """After a write that failed with ``done`` bytes of ``data`` written from ``start``:
        keep the whole lines, remove the rest; returns the number of whole lines kept."""
        whole = data.rfind(b"\n", 0, done) + 1
        lines = data.count(b"\n", 0, whole)
        if whole == done:
            return lines
        try:
            if os.fstat(fd).st_size != start + done:
                # Someone that ignores the lock appended after our fragment: truncating would
                # destroy their bytes. The next append ends the line if it is still open.
                return lines
            os.ftruncate(fd, start + whole)
        except OSError:
            try:  # cannot remove it (an append-only file): at least end its line
                self._write(fd, memoryview(b"\n"))
            except OSError:
                pass  # the next append ends it
        return lines

    def sync_due_in(self, now: float) -> float | None:
        """Seconds until the ``interval`` policy owes a sync of written lines (0 when overdue),
        or None when none is owed."""
        if self.fsync != "interval" or not self._unsynced or self.fd is None:
            return None
        if self._last_sync is None:
            return 0.0
        return max(0.0, self._last_sync + self.fsync_interval - now)

    def _sync_owed(self, now: float) -> bool:
        """Whether the ``interval`` policy syncs at an append made at ``now``: the first time, and
        an interval after the last sync (``time.monotonic()`` may be below the interval after a boot)."""
        return self._last_sync is None or now - self._last_sync >= self.fsync_interval

    def sync(self) -> None:
        if self.fd is not None:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                self._last_sync = time.monotonic()  # tried: the next try is an interval away, not at once
                raise AuditError(f"cannot sync audit log {self.path}: {exc.strerror}") from None
            self._last_sync = time.monotonic()
            self._unsynced = False

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass


class AuditWriter:
    """Appends records to an ``AuditLog`` from a daemon thread, so that a caller on an asyncio
    event loop never waits for the disk. The writer owns the log: nothing else may use it.

    ``submit(record)`` encodes the record on the caller (a snapshot: what the record held when
    submitted, whatever later changes the caller makes to its dicts) and queues the line; the
    thread writes queued lines in batches, whole lines only. At most ``max_queued`` records
    are held: when that many wait, ``submit`` blocks until the thread has written some
    (backpressure: a disk slower than the event stream slows the stream; nothing is dropped).
    The thread never waits for the file's lock longer than the log's ``lock_timeout``; a batch
    whose lock was not had is lost whole, at once (its other writes do not wait again).

    Failures are never raised to the caller: a record that cannot be encoded or written is
    counted in ``failed`` and the reason kept in ``error`` (the last one); the thread goes on
    with the next records. ``written`` counts the records in the file. Both count records, not
    writes: every submitted record ends up in exactly one of them.

    The loss is stated in ``report`` (a logger; the activation log for the filter), as ERROR
    lines that give the exact number of records lost since the last statement and in all:

    * ``virtguard: audit log PATH: N record(s) could not be written since the last report
      (T record(s) lost in all, W written): ERROR``: at the first loss, then at most once per
      ``report_interval`` seconds while records are lost, and within ``report_interval`` seconds
      of a loss not yet stated, whether or not more records come;
    * ``virtguard: audit log PATH is written again (T record(s) lost in all, N of them since the
      last report)``: when records are written after a loss (a WARNING);
    * ``virtguard: audit log PATH closed: W record(s) written, T record(s) lost in all``: at
      ``close()`` when any was lost.

    So the last statement in the log always gives the whole loss, once the records are handled.

    ``close()`` writes what is queued, syncs (unless ``fsync`` is ``never``) and stops the
    thread; it is registered with ``atexit``, so what was submitted is written at interpreter
    shutdown too. A record submitted after ``close()`` is counted in ``failed`` and stated."""

    def __init__(self, log: AuditLog, max_queued: int = DEFAULT_MAX_QUEUED, report: logging.Logger | None = None,
                 report_interval: float = DEFAULT_REPORT_INTERVAL) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self.log = log
        self.max_queued = max_queued
        self.report = report or logging.getLogger(__name__)
        self.report_interval = report_interval
        self.error: str | None = None
        self.failed = 0
        self.written = 0
        self._lines: collections.deque[bytes] = collections.deque()
        self._submitted = 0
        self._handled = 0  # written or failed, of those submitted
        self._closing = False
        self._writer_waiting = False
        self._stated_failed = 0  # ``failed`` as the last statement gave it
        self._stated_at: float | None = None
        self._losing = False  # the last records handled were lost
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the thread waits for lines
        self._progress = threading.Condition(self._lock)  # submit (room) and flush wait for the thread
        self._owner_pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name=f"audit-writer {log.path}", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def submit(self, record: Mapping[str, Any]) -> None:
        """Queue one record. Cheap and never waits for I/O, except when ``max_queued``
        records already wait (backpressure, see the class)."""
        try:
            line = encode_record(record)
        except AuditError as exc:
            with self._lock:
                self._count_failure(1, str(exc))
            return
        with self._lock:
            while (self._submitted - self._handled >= self.max_queued and not self._closing
                   and self._thread.is_alive()):
                self._progress.wait(1.0)
            if not self._closing and self._thread.is_alive():
                self._lines.append(line)
                self._submitted += 1
                if self._writer_waiting:
                    self._writer_waiting = False
                    self._work.notify()
                return
            # closed, or (cannot happen: the thread catches everything) stopped; never hang
            why = "is closed" if self._closing else "has stopped"
            self._count_failure(1, f"audit writer for {self.log.path} {why}: a record was not written")
        self._state_loss()  # the thread may be gone: state it here

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted before the call is handled (written, or counted
        in ``failed``); False if ``timeout`` seconds passed first. Blocks: not for the loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._submitted
            while self._handled < target:
                if not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._progress.wait(remaining if remaining is not None else 1.0)
            return True

    def close(self, timeout: float | None = None) -> bool:
        """Write what is queued, sync, close the file and stop the thread; True once done,
        False if ``timeout`` seconds passed first (the thread then goes on draining)."""
        if os.getpid() != self._owner_pid:  # a forked child: the thread and its lines are the parent's
            return True
        with self._lock:
            self._closing = True
            self._work.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        atexit.unregister(self.close)
        return True

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _count_failure(self, records: int, error: str) -> None:
        """Under the lock."""
        self.failed += records
        self.error = error
        self._losing = True
        if self._writer_waiting:  # its wait may end later than the statement of this loss is due
            self._writer_waiting = False
            self._work.notify()

    def _statement_due_in(self, now: float) -> float | None:
        """Under the lock: seconds until lost records not yet stated are owed a statement (0:
        now), or None when every loss is stated."""
        if self.failed == self._stated_failed:
            return None
        if self._stated_at is None:
            return 0.0
        return max(0.0, self._stated_at + self.report_interval - now)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._lines and not self._closing:
                    now = time.monotonic()
                    dues = [due for due in (self.log.sync_due_in(now), self._statement_due_in(now)) if due is not None]
                    if dues and min(dues) == 0:
                        break
                    self._writer_waiting = True
                    self._work.wait(min(dues) if dues else None)
                    self._writer_waiting = False
                batch, self._lines = self._lines, collections.deque()
                closing = self._closing
            if batch:
                written, failed, error = self._write_batch(batch)
                with self._lock:
                    self.written += written
                    self._handled += len(batch)
                    self.failed += failed
                    if error is not None:  # also a failed sync, the lines being in the file
                        self.error = error
                    recovered = self._losing and not failed
                    self._losing = failed > 0
                    self._progress.notify_all()
                if recovered:
                    self._state_recovery()
                elif failed:
                    self._state_loss(when_due=True)
            elif closing:
                break
            else:
                if self.log.sync_due_in(time.monotonic()) == 0:
                    self._sync_quietly()
                self._state_loss(when_due=True)
        if self.log.fsync != "never":
            self._sync_quietly()
        self.log.close()
        self._state_close()
        with self._lock:
            self._progress.notify_all()

    def _state_loss(self, when_due: bool = False) -> None:
        """State the records lost since the last statement, if any (``when_due``: only once
        ``report_interval`` has passed since the last statement)."""
        with self._lock:
            due_in = self._statement_due_in(time.monotonic())
            if due_in is None or (when_due and due_in > 0):
                return
            since, total, written, error = self.failed - self._stated_failed, self.failed, self.written, self.error
            self._stated_failed, self._stated_at = total, time.monotonic()
        self.report.error("virtguard: audit log %s: %d record(s) could not be written since the last report "
                          "(%d record(s) lost in all, %d written): %s", self.log.path, since, total, written, error)

    def _state_recovery(self) -> None:
        with self._lock:
            since, total = self.failed - self._stated_failed, self.failed
            self._stated_failed, self._stated_at = total, time.monotonic()
        self.report.warning("virtguard: audit log %s is written again (%d record(s) lost in all, %d of them "
                            "since the last report)", self.log.path, total, since)

    def _state_close(self) -> None:
        with self._lock:
            total, written = self.failed, self.written
            self._stated_failed, self._stated_at = total, time.monotonic()
        if total:
            self.report.error("virtguard: audit log %s closed: %d record(s) written, %d record(s) lost in all",
                              self.log.path, written, total)

    def _write_batch(self, batch: collections.deque[bytes]) -> tuple[int, int, str | None]:
        """Write the lines in writes of up to BATCH_BYTES; returns (written, failed, last error).
        Once the lock was not had in time, the batch's other writes fail without waiting again."""
        written = failed = 0
        error: str | None = None
        chunks: list[list[bytes]] = [[]]
        size = 0
        for line in batch:
            if chunks[-1] and size + len(line) > BATCH_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(line)
            size += len(line)
        for index, chunk in enumerate(chunks):
            try:
                self.log.append_lines(b"".join(chunk))
                written += len(chunk)
            except AuditLockTimeout as exc:
                failed += sum(len(rest) for rest in chunks[index:])
                error = str(exc)
                break
            except AuditError as exc:
                written += exc.lines_written
                failed += len(chunk) - exc.lines_written
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 (never let the thread die: the records are counted)
                failed += len(chunk)
                error = f"cannot append to audit log {self.log.path}: {type(exc).__name__}: {exc}"
        return written, failed, error

    def _sync_quietly(self) -> None:
        try:
            self.log.sync()
        except AuditError as exc:
            with self._lock:
                self.error = str(exc)
