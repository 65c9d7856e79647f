"""logrotate against the audit writer, for real (tests/lab/log_rotation.py): the settings that
docs/rulebooks.md recommends lose no record while the classify filter's writer appends, and
``compress`` without ``delaycompress``, which the docs warn against, does lose records.

Why: the writer notices a rotation at its first write a second or less after it (it looks at
the path at most once a second) and until then appends to the renamed file. ``delaycompress``
leaves that file as it is until the next rotation; ``compress`` alone compresses it at once and
deletes it, with whatever the writer appends to it afterwards. (``copytruncate`` loses what is
appended between its copy and its truncation: a few records a rotation, too few to be certain
of in a short test; ``python -m bench.audit_rotation`` measures every setting.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.log_rotation import CONFIGURATIONS, rotate_while_writing

pytestmark = pytest.mark.slow

ROTATIONS = 5


@pytest.mark.parametrize("name", ["create, compress, delaycompress", "create, nocompress"])
def test_the_recommended_logrotate_settings_lose_no_record(tmp_path: Path, name: str) -> None:
    result = rotate_while_writing(tmp_path, CONFIGURATIONS[name], rotations=ROTATIONS, period=1.5)
    rotated = sorted(p.name for p in tmp_path.glob("audit.jsonl.*"))
    assert len(rotated) == ROTATIONS, rotated  # the control: logrotate did rotate every time
    assert result.submitted > 0 and result.written == result.submitted
    assert (result.lost, result.broken_lines) == (0, 0), result


def test_compress_without_delaycompress_loses_records(tmp_path: Path) -> None:
    result = rotate_while_writing(tmp_path, CONFIGURATIONS["create, compress (no delaycompress)"],
                                  rotations=ROTATIONS, period=1.5)
    assert len(list(tmp_path.glob("audit.jsonl.*.gz"))) == ROTATIONS
    # the writer counted them as written: they went into a file that logrotate had deleted
    assert result.written == result.submitted
    assert result.lost > 0, result
