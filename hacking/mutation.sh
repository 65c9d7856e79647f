#!/usr/bin/env bash
# Mutation testing (`make mutation`; not part of `make test`): mutmut 3 over plugins/module_utils and
# plugins/plugin_utils with the unit suite (tests/unit), on a copy of the work tree in build/mutation.
#
#   make mutation                                             every file, one after the other
#   make mutation MUTATE="plugins/module_utils/audit_log.py plugins/module_utils/tcp_cut.py"
#   MUTATION_JOBS=2 make mutation ...                         mutmut's --max-children (default 1)
#   MUTATION_FRESH=1 make mutation                            forget mutmut's cache (build/mutation/mutants)
#   MUTATION_REV=HEAD make mutation                           a commit's files, not the work tree's
#   MUTATION_SURVIVORS=1 make mutation                        only what the last run left alive (after new tests)
#   MUTATION_REPORT=1 make mutation                           the last runs' report, no run
#
# Prints, per file and overall, killed / total and every mutant that was not killed; the full
# report is also written to build/mutation/report.txt. Show one mutant's diff with
#   cd build/mutation && ../../.venv/bin/mutmut show NAME
#
# Layout: the code is imported as ansible_collections.virtguard.console.plugins..., and mutmut names a
# mutant by the path of its file relative to where it runs. So mutmut runs in build/mutation, whose
# ansible_collections/virtguard/console is a COPY of the work tree (git's files, untracked ones
# included), and mutates files ansible_collections/virtguard/console/plugins/... into its own copy
# build/mutation/mutants/ansible_collections/virtguard/console, which is where the tests run from (their
# conftest.py and build/collections link resolve inside that copy). The repository's own files are
# never written, nor imported by the mutated run.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=$REPO/.venv
WORK=$REPO/build/mutation
COPY=$WORK/ansible_collections/virtguard/console
JOBS=${MUTATION_JOBS:-1}
PREFIX=ansible_collections/virtguard/console

if [ -n "${MUTATE:-}" ]; then
  read -r -a files <<<"$MUTATE"
else
  files=(plugins/module_utils/*.py plugins/plugin_utils/*.py)
fi
for f in "${files[@]}"; do
  case "$f" in
    plugins/module_utils/*.py | plugins/plugin_utils/*.py) [ -f "$f" ] || { echo "mutation: no such file: $f" >&2; exit 2; } ;;
    *) echo "mutation: $f: only plugins/module_utils/*.py and plugins/plugin_utils/*.py are mutated" >&2; exit 2 ;;
  esac
done

if [ -n "${MUTATION_FRESH:-}" ]; then
  rm -rf "$WORK"
fi
mkdir -p "$COPY"

# The copy: the work tree's files as git sees them (tracked and untracked, not ignored), or with
# MUTATION_REV=<commit> that commit's (a tree someone is editing may not pass its tests just now).
# Staged, then synchronised without mtimes (no -t): a file whose content changed gets a new mtime,
# newer than its mutants, so mutmut makes them anew; an unchanged file keeps its cached mutants.
rm -rf "$WORK/stage"
mkdir -p "$WORK/stage"
if [ -n "${MUTATION_REV:-}" ]; then
  git archive --format=tar "$MUTATION_REV" | tar -x -C "$WORK/stage"
else
  git ls-files -z --cached --others --exclude-standard | rsync -a --from0 --files-from=- ./ "$WORK/stage/"
fi
rsync -rlp --checksum --delete --exclude=/build "$WORK/stage/" "$COPY/"
# What bootstrap.sh links in a clone, inside the copy (tests find the collection through it).
mkdir -p "$COPY/build/collections/ansible_collections/virtguard"
ln -sfn ../../../.. "$COPY/build/collections/ansible_collections/virtguard/console"

# mutmut's settings (it reads setup.cfg in the directory it runs in). Everything the unit tests need
# beside the two mutated directories is copied into mutants/ as it is (also_copy).
{
  echo "[mutmut]"
  echo "use_git_change_detection = false"
  echo "source_paths ="
  echo "    $PREFIX/plugins/module_utils"
  echo "    $PREFIX/plugins/plugin_utils"
  echo "pytest_add_cli_args_test_selection ="
  echo "    $PREFIX/tests/unit"
  # A mutant that makes a test wait (a lock, a wait_until bound of 30 s) fails it after 15 s, not
  # after pytest.ini's 900 (the slowest unit test takes 2 s; mutmut's own limit counts CPU time only).
  # test_source_starts_from_a_clone runs the source from the clone in a subprocess (.venv/bin/python
  # there): it reaches no mutated function in the test's own process, so no mutant could pick it.
  echo "pytest_add_cli_args ="
  echo "    --timeout=15"
  echo "    --deselect=$PREFIX/tests/unit/test_source_starts_from_a_clone.py"
  echo "also_copy ="
  for entry in "$COPY"/* "$COPY"/.[!.]*; do
    [ -e "$entry" ] || continue
    name=${entry#"$COPY"/}
    case "$name" in
      plugins) for sub in "$COPY"/plugins/*; do
                 case "${sub##*/}" in module_utils | plugin_utils) ;; *) echo "    $PREFIX/plugins/${sub##*/}" ;; esac
               done ;;
      build) ;;
      *) echo "    $PREFIX/$name" ;;
    esac
  done
} >"$WORK/setup.cfg"

# The link again inside mutmut's copy, where the tests run (also_copy leaves build/ out).
mkdir -p "$WORK/mutants/$PREFIX/build/collections/ansible_collections/virtguard"
ln -sfn ../../../.. "$WORK/mutants/$PREFIX/build/collections/ansible_collections/virtguard/console"
export ANSIBLE_COLLECTIONS_PATH=$WORK/mutants/$PREFIX/build/collections

# One mutmut run per file (its own time, its own score); mutants named on the command line are always
# tested again, so each run measures the file as it is now. Nice: mutation testing gives way.
# MUTATION_SURVIVORS=1: only the mutants of each file that the last run did not kill (after adding
# tests; a kill stands as long as the code is the same, and mutmut makes a changed function's
# mutants anew, untested). MUTATION_REPORT=1: no run, the report of the last runs only.
MUTMUT=(nice -n 19 "$VENV/bin/mutmut")
# Which tests reach which function is traced again on every run (mutmut would only trace new tests):
# after code moved (0.6.0's module_utils -> plugin_utils), the old map sent no test to the moved
# functions, and graphics_event.py and console_policy.py scored 73.7 and 61.1 % against 95.7 and
# 89.4 % with a fresh map.
[ -n "${MUTATION_REPORT:-}" ] || rm -f "$WORK/mutants/mutmut-stats.json"
times_file=$WORK/times.tsv  # seconds of each file's last whole run
touch "$times_file"
cd "$WORK"
for f in "${files[@]}"; do
  [ -z "${MUTATION_REPORT:-}" ] || break
  module=$PREFIX/${f%.py}
  module=${module//\//.}
  if [ -n "${MUTATION_SURVIVORS:-}" ]; then
    mapfile -t names < <("$VENV/bin/python" - "$PREFIX/$f" <<'PY'
import sys
from mutmut.mutation.data import SourceFileMutationData
from mutmut.stats import status_by_exit_code
data = SourceFileMutationData(path=sys.argv[1])
data.load()
for key, code in data.exit_code_by_key.items():
    if status_by_exit_code[code] not in ("killed", "timeout"):
        print(key)
PY
    )
    ((${#names[@]})) || { echo "mutation: $f: no survivor to test again"; continue; }
    echo "mutation: $f (${#names[@]} survivors of the last run)"
  else
    names=("$module.*")
    echo "mutation: $f"
  fi
  start=$(date +%s)
  # mutmut redraws a spinner with carriage returns: keep its lines, not its frames, and its log.
  if ! "${MUTMUT[@]}" run --max-children "$JOBS" "${names[@]}" >"$WORK/run.log" 2>&1; then
    tr '\r' '\n' <"$WORK/run.log" | grep -v '^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]' | tail -n 60
    echo "mutation: mutmut failed on $f (log: $WORK/run.log)" >&2
    exit 1
  fi
  if [ -z "${MUTATION_SURVIVORS:-}" ]; then
    grep -v -F "$f	" "$times_file" >"$times_file.new" || true
    printf '%s\t%s\n' "$f" "$(($(date +%s) - start))" >>"$times_file.new"
    mv "$times_file.new" "$times_file"
  fi
done

"$VENV/bin/python" - "$times_file" "${files[@]}" <<'PY' | tee "$WORK/report.txt"
"""Killed / total per file and overall, and each mutant not killed with its change."""
import sys
from pathlib import Path

from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

PREFIX = "ansible_collections/virtguard/console/"
seconds = dict(line.split("\t") for line in Path(sys.argv[1]).read_text().splitlines())
rows, survivors = [], []
for f in sys.argv[2:]:
    data = SourceFileMutationData(path=PREFIX + f)
    data.load()
    statuses = {key: status_by_exit_code[code] for key, code in data.exit_code_by_key.items()}
    killed = sum(status in ("killed", "timeout") for status in statuses.values())
    rows.append((f, killed, len(statuses), seconds.get(f, "-")))
    for key, status in sorted(statuses.items(), key=lambda item: (item[0].rpartition("__mutmut_")[0],
                                                                  int(item[0].rpartition("_")[2]))):
        if status in ("killed", "timeout"):
            continue
        diff = get_diff_for_mutant(key, path=PREFIX + f).splitlines()[3:]
        change = [line for line in diff if line[:1] in "-+"]
        survivors.append((f, key.rpartition(".")[2], status, change))

print("\nmutation score (killed / total; a timeout counts as killed; seconds of the file's last whole run)")
for f, killed, total, secs in rows:
    print(f"  {f:50} {killed:5} / {total:<5} {100 * killed / total if total else 100:6.1f} %  {secs:>5} s")
killed, total = sum(r[1] for r in rows), sum(r[2] for r in rows)
print(f"  {'overall':50} {killed:5} / {total:<5} {100 * killed / total if total else 100:6.1f} %")
print(f"\nnot killed: {len(survivors)}")
for f, name, status, change in survivors:
    print(f"  {f} {name} ({status})")
    for line in change:
        print(f"      {line}")
PY
