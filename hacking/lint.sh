#!/usr/bin/env bash
# ansible-lint with the production profile on the whole collection (roles, playbooks, rulebooks,
# galaxy.yml, meta/, changelogs, and the test playbooks). Configuration: .ansible-lint and .yamllint.
# Also checks the changelog: fragments all released, CHANGELOG.rst generated from changelogs/.
# ansible-lint runs exactly as a contributor runs it by hand from the repository root: ansible.cfg
# resolves the collection through build/collections (hacking/bootstrap.sh links it there), and
# .ansible-lint sets the profile and offline mode (nothing installed into ~/.ansible or .ansible/).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export PATH="$repo/.venv/bin:$PATH"
started=$(date +%s)
[ -e build/collections/ansible_collections/virtguard/console/galaxy.yml ] || {
  echo "lint: build/collections/ansible_collections/virtguard/console is missing; run hacking/bootstrap.sh" >&2
  exit 1
}

status=0
# Without ANSIBLE_COLLECTIONS_PATH (the Makefile exports one): what ansible.cfg gives the hand run.
env -u ANSIBLE_COLLECTIONS_PATH ansible-lint --nocolor "$@" || status=$?

# The changelog: every fragment belongs to a release in changelogs/changelog.yaml, and CHANGELOG.rst
# is what antsibull-changelog generates from it (checked in a scratch copy; nothing here is written).
antsibull-changelog lint || status=1
python - <<'PY' || status=1
import pathlib, sys, yaml
releases = yaml.safe_load(open("changelogs/changelog.yaml"))["releases"]
released = {name for release in releases.values() for name in release.get("fragments", [])}
fragments = {path.name for path in pathlib.Path("changelogs/fragments").glob("*.y*ml")}
if fragments - released:
    version = yaml.safe_load(open("galaxy.yml"))["version"]
    sys.exit("lint: changelog fragments in no release: %s; run antsibull-changelog release --version %s "
             "--refresh-fragments" % (", ".join(sorted(fragments - released)), version))
PY
scratch=$(mktemp -d /tmp/virtguard-changelog.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
cp -r galaxy.yml CHANGELOG.rst changelogs "$scratch/"
(cd "$scratch" && antsibull-changelog generate >/dev/null 2>&1)
if ! cmp -s CHANGELOG.rst "$scratch/CHANGELOG.rst"; then
  echo "lint: CHANGELOG.rst is not what antsibull-changelog generates from changelogs/; run antsibull-changelog generate" >&2
  status=1
fi
elapsed=$(( $(date +%s) - started ))
if ((status)); then
  echo "lint: FAILED (ansible-lint --profile production and changelog checks) in ${elapsed}s" >&2
  exit "$status"
fi
echo "lint: ok in ${elapsed}s (ansible-lint --profile production; changelog fragments released, CHANGELOG.rst current)"
