#!/usr/bin/env bash
# Installs everything `make test`, `make demo` and `make bench` need on a Debian 12 machine (as root):
# Debian packages for libvirt, QEMU, the VNC and SPICE test clients and the host tools, a virtualenv with the
# pinned Python tool chain, and the collection linked where ansible finds it.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
  libvirt-dev pkg-config gcc python3-dev python3-venv
  gvncviewer gnutls-bin sasl2-bin libsasl2-modules libsasl2-modules-db
  nftables iproute2 procps openjdk-17-jre-headless git rsync
  shellcheck jq openssh-server spice-client-gtk xvfb xauth logrotate
)
PYTHON=${PYTHON:-python3}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q -o Dpkg::Options::=--force-confold "${missing[@]}"
fi

# The session daemons' QEMU runs as unprivileged users of group kvm (the lab's hypervisors).
getent group kvm >/dev/null || groupadd -r kvm

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! cmp -s requirements-dev.txt .venv/.requirements-installed; then
  echo "bootstrap: installing the Python tool chain into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  cp requirements-dev.txt .venv/.requirements-installed
fi

# ansible and ansible-rulebook find the collection at build/collections/ansible_collections/virtguard/console.
mkdir -p build/collections/ansible_collections/virtguard
ln -sfn ../../../.. build/collections/ansible_collections/virtguard/console
echo "bootstrap: ready"
