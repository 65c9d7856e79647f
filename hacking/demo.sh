#!/usr/bin/env bash
# `make demo`: the event source live, then one remediation live. Run as root after `make deps`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_COLLECTIONS_PATH="$PWD/build/collections"
python hacking/demo/console_events.py
echo
bash hacking/demo_remediation.sh
