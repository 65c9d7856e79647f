# -*- coding: utf-8 -*-
# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The audit trail: JSON Lines, one object per line, only ever appended.

Two kinds of record share one file:

* ``{"record": "event", "time", "graphics": {...}, "virtguard": {...}}`` for every graphics
  event, written by the ``classify`` event filter: the payload exactly as the source made it
  (certificate DN and SASL user name as received) and the policy's verdict;
* ``{"record": "remediation", "time", "action": "block"|"cut", "ok", ...}`` for every
  remediation action and its result, written by the remediation playbooks.

Writing: the file is opened with ``O_APPEND`` and each record is one ``write()`` of one whole
line, so records from several processes (the filter, playbook runs) never interleave or
overwrite each other, and nothing earlier is ever rewritten. Text is stored literally: JSON
escapes only what JSON must (quotes, backslashes, control characters), so ``json.loads`` of a
line gives back exactly what was received; bytes that are not UTF-8 (surrogate escapes) are
kept as ``\\udcXX`` escapes.

Durability (``fsync``): ``always`` syncs after every record (remediation records: rare and
important); ``interval`` syncs at most once per ``fsync_interval`` seconds, on a write (the
event stream: thousands of records per second must not wait for the disk; a crash loses at
most the last interval); ``never`` leaves it to the kernel.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import json
import os
import time

FSYNC_POLICIES = ("always", "interval", "never")


class AuditError(Exception):
    """The audit file cannot be opened or written."""


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def encode_record(record):
    """One record as one line of bytes (newline included)."""
    try:
        text = json.dumps(record, ensure_ascii=False, sort_keys=False, separators=(",", ":"))
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate (undecodable bytes from the client): keep it as a \\udcXX escape
        data = json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    if b"\n" in data:  # cannot happen with json.dumps; guard the one-line invariant anyway
        raise AuditError("record would span several lines")
    return data + b"\n"


def event_record(graphics, verdict, time_iso=None):
    return {"record": "event", "time": time_iso or utc_now(), "graphics": graphics, "virtguard": verdict}


def remediation_record(action, ok, result, context=None, time_iso=None):
    """``result`` says what was done (addresses blocked until when, connections cut, errors);
    ``context`` ties it to the session (session id, reasons, hypervisor)."""
    record = {"record": "remediation", "time": time_iso or utc_now(), "action": action, "ok": bool(ok)}
    record.update(context or {})
    record["result"] = result
    return record


class AuditLog:
    """An append-only JSON Lines file. Keep one per path and process; not thread-safe."""

    def __init__(self, path, fsync="interval", fsync_interval=1.0, mode=0o640):
        if fsync not in FSYNC_POLICIES:
            raise AuditError("fsync must be one of %s, got %r" % (", ".join(FSYNC_POLICIES), fsync))
        self.path = path
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.mode = mode
        self.fd = None
        self._identity = None
        self._last_sync = 0.0
        self._next_check = 0.0

    def _open(self):
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        except OSError as exc:
            raise AuditError("cannot open audit log %s: %s" % (self.path, exc))
        stat = os.fstat(fd)
        self.fd, self._identity = fd, (stat.st_dev, stat.st_ino)

    def _reopen_if_rotated(self, now):
        """Follow a log rotation (the path now names another file), checked once a second."""
        if now < self._next_check:
            return
        self._next_check = now + 1.0
        try:
            stat = os.stat(self.path)
            if (stat.st_dev, stat.st_ino) == self._identity:
                return
        except OSError:
            pass
        self.close()
        self._open()

    def append(self, record):
        data = encode_record(record)
        now = time.monotonic()
        if self.fd is None:
            self._open()
        else:
            self._reopen_if_rotated(now)
        try:
            written = os.write(self.fd, data)
            if written != len(data):
                raise AuditError("short write to %s (%d of %d bytes)" % (self.path, written, len(data)))
            if self.fsync == "always" or (self.fsync == "interval" and now - self._last_sync >= self.fsync_interval):
                os.fsync(self.fd)
                self._last_sync = now
        except OSError as exc:
            raise AuditError("cannot append to audit log %s: %s" % (self.path, exc))

    def sync(self):
        if self.fd is not None:
            os.fsync(self.fd)
            self._last_sync = time.monotonic()

    def close(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass


def append_once(path, record, fsync="always"):
    """Open, append one record, close: for short-lived writers such as modules."""
    log = AuditLog(path, fsync=fsync)
    try:
        log.append(record)
    finally:
        log.close()
