# virtguard.console: `make test` and `make demo` work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/build/collections
PYTEST_ARGS ?=

.PHONY: deps test unit integration lint sanity build bench demo changelog mutation

## Install what the targets below need (Debian packages, .venv, the collection link).
deps:
	bash hacking/bootstrap.sh

## The whole suite: unit and integration tests against real libvirt daemons, lint, sanity, build.
test: deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests/unit tests/integration
	bash hacking/lint.sh
	bash hacking/sanity.sh
	bash hacking/build.sh --check-install

unit: deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests/unit

integration: deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests/integration

## ansible-lint (production profile) over the whole collection, then ruff and mypy (pyproject.toml), and the changelog.
lint: deps
	bash hacking/lint.sh

## ansible-test sanity, with the collection copied to build/ansible_collections/virtguard/console.
sanity: deps
	bash hacking/sanity.sh

## The collection tarball in build/.
build: deps
	bash hacking/build.sh

## CHANGELOG.rst from changelogs/ (antsibull-changelog).
changelog: deps
	cd $(CURDIR) && antsibull-changelog generate

## The performance report's figures (docs/performance.md); not part of `make test`.
bench: deps
	$(VENV)/bin/python -m bench

## Mutation testing (mutmut) of plugins/module_utils and plugins/plugin_utils with the unit suite, on a copy of the
## tree in build/mutation; not part of `make test`. Some files only: MUTATE="plugins/module_utils/audit_log.py ...";
## MUTATION_JOBS=2 for two mutmut workers (default 1); MUTATION_REV=HEAD for a commit's files instead of the work
## tree's. Prints killed / total per file and overall, and the survivors.
mutation: deps
	MUTATE="$(MUTATE)" MUTATION_JOBS="$(MUTATION_JOBS)" MUTATION_REV="$(MUTATION_REV)" bash hacking/mutation.sh

## A local hypervisor, a domain, ansible-rulebook with the source, a real VNC client, live events.
demo: deps
	bash hacking/demo.sh
