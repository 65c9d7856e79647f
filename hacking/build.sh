#!/usr/bin/env bash
# Builds the collection tarball into build/ (ansible-galaxy collection build, galaxy.yml's build_ignore).
# With --check-install, also installs the tarball into a temporary collections directory, as a user
# would, and checks that it works from there and from there only:
#   - ansible-doc renders every module and every role's argument spec;
#   - the rulebooks, the event source and the event filter are in the installed tree;
#   - the event source and the event filter load (runpy) from the installed path, in an isolated
#     interpreter whose sys.path holds neither the repository nor build/collections, and import the
#     collection's module_utils from the installed copy.
#   - ansible-builder create accepts decision-environment.yml, whose context gets this tarball.
# Usage: bash hacking/build.sh [--check-install]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export PATH="$repo/.venv/bin:$PATH"
started=$(date +%s)
check_install=false
case "${1:-}" in
  --check-install) check_install=true ;;
  "") ;;
  *) echo "usage: $0 [--check-install]" >&2; exit 2 ;;
esac

namespace=$(python -c 'import yaml; print(yaml.safe_load(open("galaxy.yml"))["namespace"])')
name=$(python -c 'import yaml; print(yaml.safe_load(open("galaxy.yml"))["name"])')
version=$(python -c 'import yaml; print(yaml.safe_load(open("galaxy.yml"))["version"])')
tarball=build/$namespace-$name-$version.tar.gz

# Built from a copy of the tracked files (as the working tree has them), so untracked files and
# local caches never reach the tarball; galaxy.yml's build_ignore then leaves out the dev tooling.
mkdir -p build
stage=$(mktemp -d /tmp/virtguard-console-build.XXXXXX)
tmp=
trap 'rm -rf "$stage" ${tmp:+"$tmp"}' EXIT
git ls-files -z | rsync -a --from0 --files-from=- --ignore-missing-args ./ "$stage/"
ansible-galaxy collection build --force --output-path build/ "$stage" >/dev/null
[ -s "$tarball" ] || { echo "build: FAILED: $tarball was not written" >&2; exit 1; }
echo "build: $tarball ($(du -k "$tarball" | cut -f1) KiB, $(tar -tzf "$tarball" | grep -vc '/$') files)"
if ! $check_install; then
  exit 0
fi

tmp=$(mktemp -d /tmp/virtguard-console-install.XXXXXX)
failures=0
fail() { echo "build: check FAILED: $*" >&2; failures=$((failures + 1)); }

# community.crypto (the roles' dependency) comes with the `ansible` package, as in a decision or
# execution environment built on it; --offline resolves dependencies against what is installed.
site_collections=$(python -c 'import ansible_collections; print(list(ansible_collections.__path__)[0])')
site_packages=$(dirname "$site_collections")
export ANSIBLE_COLLECTIONS_PATH="$tmp/collections:$site_packages"
if ! ansible-galaxy collection install --offline -p "$tmp/collections" "$tarball" >"$tmp/install.log" 2>&1; then
  cat "$tmp/install.log" >&2
  echo "build: check FAILED: ansible-galaxy collection install" >&2
  exit 1
fi
installed=$tmp/collections/ansible_collections/$namespace/$name
[ -f "$installed/MANIFEST.json" ] || fail "no MANIFEST.json in $installed"

# Run everything below from the temporary directory, never from the repository.
cd "$tmp"

modules=()
for path in "$installed"/plugins/modules/*.py; do
  modules+=("$(basename "$path" .py)")
done
((${#modules[@]})) || fail "no modules in the installed collection"
for module in "${modules[@]}"; do
  out=$(ansible-doc -t module "$namespace.$name.$module" 2>&1) || { fail "ansible-doc $module: $out"; continue; }
  for section in EXAMPLES RETURN; do
    grep -q "$section" <<<"$out" || fail "ansible-doc $module shows no $section"
  done
  grep -q "$installed" <<<"$out" || fail "ansible-doc $module was not read from the installed copy"
done

roles=()
for path in "$installed"/roles/*/; do
  roles+=("$(basename "$path")")
done
for role in "${roles[@]}"; do
  [ -f "$installed/roles/$role/meta/argument_specs.yml" ] || fail "role $role has no meta/argument_specs.yml"
  ansible-doc -t role "$namespace.$name.$role" >/dev/null 2>&1 || fail "ansible-doc -t role $role"
done

rulebooks=("$installed"/extensions/eda/rulebooks/*.yml)
[ -f "${rulebooks[0]}" ] || fail "no rulebooks in extensions/eda/rulebooks"
for rulebook in "${rulebooks[@]}"; do
  python -c 'import sys, yaml; rb = yaml.safe_load(open(sys.argv[1])); assert isinstance(rb, list) and rb[0]["rules"]' \
    "$rulebook" || fail "rulebook $(basename "$rulebook") does not parse as a rulebook"
done
for playbook in "$installed"/playbooks/*.yml; do
  ansible-playbook --syntax-check "$playbook" >/dev/null 2>&1 || fail "playbook $(basename "$playbook") fails --syntax-check"
done

# -I: no PYTHONPATH, no user site, no script directory or cwd on sys.path.
plugins=(extensions/eda/plugins/event_source/libvirt_graphics.py extensions/eda/plugins/event_filter/classify.py)
for plugin in "${plugins[@]}"; do
  [ -f "$installed/$plugin" ] || { fail "$plugin missing"; continue; }
  python -I - "$installed/$plugin" "$installed" "$repo" <<'PY' || fail "$plugin does not load from the installed path"
import os, runpy, sys

path, installed, repo = (os.path.realpath(arg) for arg in sys.argv[1:4])
collection_roots = {repo, os.path.join(repo, "build", "collections")}
assert not collection_roots & {os.path.realpath(p or ".") for p in sys.path}, sys.path
namespace = runpy.run_path(path, run_name="virtguard_check")
assert callable(namespace["main"]), "no main()"
collection_modules = [m for n, m in sys.modules.items() if n.startswith("ansible_collections.virtguard.console.")]
assert collection_modules, "imported nothing from the collection"
for module in collection_modules:
    where = os.path.realpath(getattr(module, "__file__", None) or list(module.__path__)[0])
    assert where.startswith(installed + os.sep), f"{module.__name__} imported from {where}, not the installed copy"
print(f"  {os.path.basename(path)}: loaded, {len(collection_modules)} collection modules from the installed copy")
PY
done

# The decision environment: ansible-builder accepts the definition and its build context holds this
# tarball (no container engine here, so `create` only, which writes the context).
cd "$repo"
de_tarball=$(python -c 'import yaml; print(yaml.safe_load(open("decision-environment.yml"))["additional_build_files"][0]["src"])')
[ "$de_tarball" = "$tarball" ] || fail "decision-environment.yml copies $de_tarball, the build writes $tarball"
if ansible-builder create -f decision-environment.yml -c "$tmp/de-context" >"$tmp/de.log" 2>&1; then
  [ -f "$tmp/de-context/_build/collections/$(basename "$tarball")" ] || fail "the decision environment's context lacks the tarball"
  echo "  decision-environment.yml: ansible-builder create ok"
else
  cat "$tmp/de.log" >&2
  fail "ansible-builder create -f decision-environment.yml"
fi

elapsed=$(( $(date +%s) - started ))
if ((failures)); then
  echo "build: check-install FAILED ($failures problem(s)) in ${elapsed}s" >&2
  exit 1
fi
echo "build: check-install ok in ${elapsed}s: ${#modules[@]} modules and ${#roles[@]} roles documented (ansible-doc), ${#rulebooks[@]} rulebooks, ${#plugins[@]} EDA plugins loaded from $tarball installed in a temporary directory; decision environment context ok"
