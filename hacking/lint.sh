#!/usr/bin/env bash
# ansible-lint with the production profile on the whole collection (roles, playbooks, rulebooks,
# galaxy.yml, meta/, changelogs, and the test playbooks). Configuration: .ansible-lint and .yamllint.
# The collection resolves through build/collections (hacking/bootstrap.sh links it there), so
# ansible-lint runs offline and installs nothing into ~/.ansible.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export PATH="$repo/.venv/bin:$PATH"
export ANSIBLE_COLLECTIONS_PATH="$repo/build/collections${ANSIBLE_COLLECTIONS_PATH:+:$ANSIBLE_COLLECTIONS_PATH}"
started=$(date +%s)
[ -e build/collections/ansible_collections/virtguard/console/galaxy.yml ] || {
  echo "lint: build/collections/ansible_collections/virtguard/console is missing; run hacking/bootstrap.sh" >&2
  exit 1
}

status=0
ansible-lint --profile production --offline --nocolor "$@" || status=$?
elapsed=$(( $(date +%s) - started ))
if ((status)); then
  echo "lint: FAILED (ansible-lint --profile production, exit $status) in ${elapsed}s" >&2
  exit "$status"
fi
echo "lint: ok in ${elapsed}s (ansible-lint --profile production)"
