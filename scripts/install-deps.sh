#!/usr/bin/env bash
# Installs what bidsflux needs on a Debian machine; idempotent and quiet when
# everything is already there.
#   scripts/install-deps.sh run    # running the pipeline (make dev)
#   scripts/install-deps.sh test   # running the tests (make test): adds DCMTK, pynetdicom, pydicom
set -euo pipefail
what="${1:-test}"

apt_pkgs=(nats-server git git-annex p7zip-full)
pip_pkgs=(datalad)
if [ "$what" = test ]; then
  apt_pkgs+=(dcmtk)
  pip_pkgs+=(pynetdicom pydicom)
fi

missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

pip_missing=()
for p in "${pip_pkgs[@]}"; do
  python3 -m pip show -q "$p" >/dev/null 2>&1 || pip_missing+=("$p")
done
if [ "${#pip_missing[@]}" -gt 0 ]; then
  echo "installing Python packages: ${pip_missing[*]}"
  python3 -m pip install -q --disable-pip-version-check "${pip_missing[@]}"
fi
