#!/usr/bin/env bash
# Installs what bidsflux needs on a Debian machine; idempotent and quiet when
# everything is already there.
#   scripts/install-deps.sh run    # running the pipeline (make dev)
#   scripts/install-deps.sh test   # running the tests (make test): adds DCMTK, pynetdicom, pydicom
#
# Python packages go into the interpreter's own site-packages when it allows
# it (pyenv, virtualenvs); on a Debian system Python (PEP 668
# "externally managed") they go into ./.venv, which the Makefile puts first
# on PATH.
set -euo pipefail
what="${1:-test}"
cd "$(dirname "$0")/.."

apt_pkgs=(nats-server git git-annex p7zip-full python3)
pip_pkgs=(datalad)
if [ "$what" = test ]; then
  # openssh-server: the fake GitLab's git-over-SSH endpoint (sshd, run by the tests).
  # docker.io, debootstrap, nftables: the deploy test (its own dockerd, images from Debian).
  # busybox-static: a one-file image for the provisioner's secrets test.
  apt_pkgs+=(dcmtk openssh-server curl docker.io debootstrap nftables busybox-static)
  pip_pkgs+=(pynetdicom pydicom)
fi

sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
apt_updated=""
apt_install() {
  local missing=()
  for p in "$@"; do
    [ -n "$p" ] || continue
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  echo "installing Debian packages: ${missing[*]}"
  if [ -z "$apt_updated" ]; then
    $sudo_cmd apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
}

# pyenv and similar shims may provide python3 without Debian's package.
if command -v python3 >/dev/null 2>&1; then
  kept=()
  for p in "${apt_pkgs[@]}"; do [ "$p" = python3 ] || kept+=("$p"); done
  apt_pkgs=("${kept[@]}")
fi
apt_install "${apt_pkgs[@]}"

python=python3
managed=$(python3 - <<'PY'
import os, sys, sysconfig
inside_venv = sys.prefix != sys.base_prefix
print("no" if inside_venv or not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else "yes")
PY
)
if [ "$managed" = yes ]; then
  if [ ! -x .venv/bin/python3 ]; then
    apt_install python3-venv
    echo "creating .venv for Python tools (the system Python is externally managed)"
    python3 -m venv .venv
  fi
  python=.venv/bin/python3
elif ! python3 -m pip --version >/dev/null 2>&1; then
  apt_install python3-pip
fi

pip_missing=()
for p in "${pip_pkgs[@]}"; do
  "$python" -m pip show -q "$p" >/dev/null 2>&1 || pip_missing+=("$p")
done
if [ "${#pip_missing[@]}" -gt 0 ]; then
  echo "installing Python packages: ${pip_missing[*]}"
  "$python" -m pip install -q --disable-pip-version-check "${pip_missing[@]}"
fi
