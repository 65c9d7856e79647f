#!/usr/bin/env bash
# ansible-lint with the production profile on the whole collection (roles, playbooks, rulebooks,
# galaxy.yml, meta/, changelogs, and the test playbooks). Configuration: .ansible-lint and .yamllint.
# Then the Python code: ruff (linter) and mypy (type checker), both configured in pyproject.toml.
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

# Python: ruff over every Python file of the repository (pycodestyle, pyflakes, isort, pyupgrade,
# bugbear, simplify; plugins/ held to Python 3.8), then mypy (strict for plugins/ and extensions/,
# every function checked in tests/, bench/ and hacking/). Both run from the root with pyproject.toml's
# settings, as by hand. mypy sees the collection as ansible_collections.virtguard.console through the
# build/collections link; its paths are printed relative to the repository root.
ruff check --no-fix --output-format concise || status=1
mypy --no-color-output 2>&1 | sed -e 's#^build/collections/ansible_collections/virtguard/console/##' || status=1

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
    sys.exit(f"lint: changelog fragments in no release: {', '.join(sorted(fragments - released))}; "
             f"run antsibull-changelog release --version {version} --refresh-fragments")
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
  echo "lint: FAILED (ansible-lint --profile production, ruff, mypy and changelog checks) in ${elapsed}s" >&2
  exit "$status"
fi
echo "lint: ok in ${elapsed}s (ansible-lint --profile production; ruff; mypy; changelog fragments released, CHANGELOG.rst current)"
