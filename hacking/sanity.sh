#!/usr/bin/env bash
# ansible-test sanity on the collection, as Galaxy and Automation Hub run it.
# ansible-test works on the collection at .../ansible_collections/NAMESPACE/NAME and resolves the
# current directory, so a symlink will not do: the tracked files are copied to
# build/ansible_collections/virtguard/console and the tests run there, in per-test virtual
# environments (--venv) built from PyPI and cached under ~/.ansible/test/venv.
# Usage: bash hacking/sanity.sh [extra ansible-test sanity options, e.g. --test pylint]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export PATH="$repo/.venv/bin:$PATH"
python_version=3.11
dest=build/ansible_collections/virtguard/console
started=$(date +%s)

# ansible-test bootstraps pip in each new virtual environment with a script it downloads from a
# host that is out of reach here; a stand-in in its cache (hacking/get_pip_standin.py: ensurepip,
# then pip install with the arguments given, minus --no-setuptools and --no-wheel) does the same from PyPI.
# The pip version is the one ansible-test pins (ansible_test/_internal/python_requirements.py).
pip_version=$(python - <<'PY'
import re, ansible_test, pathlib
src = pathlib.Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py"
print(re.search(r"pip='([0-9.]+)'", src.read_text()).group(1))
PY
)
get_pip=~/.ansible/test/cache/get_pip_${pip_version//./_}.py
if [ ! -e "$get_pip" ] || grep -q "Stand-in for the pip bootstrap script" "$get_pip"; then
  mkdir -p "$(dirname "$get_pip")"
  cp hacking/get_pip_standin.py "$get_pip"
fi

# A fresh copy of the tracked files (plus staged ones), so stale or untracked files never count.
rm -rf "$dest"
mkdir -p "$dest"
git ls-files -z | rsync -a --from0 --files-from=- --ignore-missing-args ./ "$dest/"
# build/ is ignored by the repository's git, and ansible-test lists targets with git from the
# nearest repository: the copy gets its own (empty) one, whose ls-files lists every copied file.
git -C "$dest" init -q

# The standard set, every test's requirements from PyPI (no other network needed). Not run:
# pslint (PowerShell; the collection has none and pwsh is not installed). The shell script test
# needs the shellcheck binary (a Debian package; without it the test is skipped). Only Python 3.11,
# the one Python of Debian 12: modules also compile on 3.8-3.10 (checked by hand; RHEL 9 hosts
# run them on 3.9), but a fresh machine has no such interpreter to run ansible-test with.
status=0
(cd "$dest" && ansible-test sanity --python "$python_version" --venv --color no --skip-test pslint "$@") || status=$?

elapsed=$(( $(date +%s) - started ))
if ((status)); then
  echo "sanity: FAILED (ansible-test exit $status) in ${elapsed}s; results in $dest/tests/output/bot/" >&2
  exit "$status"
fi
ignores=0
for file in tests/sanity/ignore-*.txt; do
  [ -e "$file" ] && ignores=$((ignores + $(grep -c . "$file" || true)))
done
echo "sanity: ok in ${elapsed}s (ansible-test sanity, Python $python_version, ignore entries: $ignores)"
