"""The audit log: one JSON object per line, appended, literal text, concurrent writers."""

import json
import multiprocessing
import os

import pytest

from ansible_collections.virtguard.console.plugins.module_utils.audit_log import (
    AuditError,
    AuditLog,
    encode_record,
    event_record,
    remediation_record,
)

HOSTILE = "O=Evil\\, Inc,CN={{ lookup(*'pipe~touch /tmp/x'.split('~')) }}\n\"quoted\" \u00e9"


def lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_records_are_single_lines_and_keep_text_literally(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    log.append(event_record({"identity": {"x509dname": HOSTILE}}, {"verdict": "cut"}))
    log.append(remediation_record("block", True, {"until": "later"}, {"session_id": "ab"}))
    log.close()
    first, second = lines(path)
    assert first["graphics"]["identity"]["x509dname"] == HOSTILE
    assert "{{ lookup(*'pipe~touch /tmp/x'.split('~')) }}" in path.read_text()  # greppable as received
    assert second["record"] == "remediation" and second["session_id"] == "ab" and second["ok"] is True


def test_undecodable_bytes_survive_as_escapes():
    text = b"CN=\xff\xfe".decode("utf-8", "surrogateescape")
    data = encode_record({"dn": text})
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data)["dn"] == text


def test_append_never_rewrites_earlier_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier": 1}\n')
    log = AuditLog(str(path), fsync="always")
    log.append({"later": 2})
    log.close()
    assert lines(path) == [{"earlier": 1}, {"later": 2}]
    assert oct(os.stat(path).st_mode & 0o777)  # exists, created earlier


def test_new_file_mode(tmp_path):
    path = tmp_path / "new.jsonl"
    AuditLog(str(path)).append({"a": 1})
    assert os.stat(path).st_mode & 0o777 == 0o640 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _writer(path, tag, count):
    log = AuditLog(path, fsync="never")
    for n in range(count):
        log.append({"writer": tag, "n": n, "pad": "x" * 3000})
    log.close()


def test_concurrent_writers_never_mix_lines(tmp_path):
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


def test_follows_rotation(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    log.append({"n": 1})
    os.rename(path, tmp_path / "audit.jsonl.1")
    log._next_check = 0  # the once-a-second check is due
    log.append({"n": 2})
    log.close()
    assert lines(path) == [{"n": 2}]
    assert lines(tmp_path / "audit.jsonl.1") == [{"n": 1}]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(AuditError, match="cannot open audit log"):
        AuditLog(str(tmp_path / "missing" / "audit.jsonl")).append({})
    with pytest.raises(AuditError, match="fsync"):
        AuditLog("x", fsync="sometimes")


def test_thousands_of_records_per_second(tmp_path):
    import time

    log = AuditLog(str(tmp_path / "audit.jsonl"))
    record = event_record({"phase": "connect", "remote": {"node": "192.0.2.7"}}, {"verdict": "cut"})
    started = time.perf_counter()
    for _record in range(5000):
        log.append(record)
    rate = 5000 / (time.perf_counter() - started)
    log.close()
    assert rate > 2000, rate
