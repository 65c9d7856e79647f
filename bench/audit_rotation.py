"""``python -m bench.audit_rotation``: how many audit records each logrotate configuration
loses while the classify filter's writer appends at a steady rate (real logrotate, real files;
tests/lab/log_rotation.py does the work). docs/rulebooks.md (*Audit records*) and
docs/troubleshooting.md say which settings to use; this checks what they say.

Not part of ``make bench``: it measures no speed, only what a setting loses."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench import ROOT
from lab.log_rotation import CONFIGURATIONS, rotate_while_writing


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_rotation", description=__doc__)
    parser.add_argument("--rotations", type=int, default=10, help="rotations per configuration (default 10)")
    parser.add_argument("--period", type=float, default=1.5, help="seconds between rotations (default 1.5)")
    parser.add_argument("--rate", type=float, default=500, help="records a second (default 500)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results = []
    for name, settings in CONFIGURATIONS.items():
        with tempfile.TemporaryDirectory(prefix="vgt-bench-rotation-", dir=ROOT / "build") as tmp:
            result = rotate_while_writing(Path(tmp), settings, args.rotations, args.period, args.rate)
        results.append({"configuration": name, "rotations": result.rotations, "submitted": result.submitted,
                        "found": result.found, "lost": result.lost, "broken_lines": result.broken_lines,
                        "lost_per_rotation": round(result.lost / result.rotations, 1)})
        if not args.json:
            print(f"{name:40} {result.rotations:3} rotations  {result.submitted:7} records  lost {result.lost:6}"
                  f" ({result.lost / result.rotations:.1f} a rotation)  broken lines {result.broken_lines}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
