# virtguard.console: `make test` and `make demo` work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/build/collections
PYTEST_ARGS ?=

.PHONY: deps test unit integration demo

## Install what the targets below need (Debian packages, .venv, the collection link).
deps:
	bash hacking/bootstrap.sh

## The whole suite: unit tests, then integration tests against real libvirt daemons.
test: deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests/unit tests/integration

unit: deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests/unit

integration: deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests/integration
