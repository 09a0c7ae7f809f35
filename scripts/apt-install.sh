#!/usr/bin/env bash
# Installs Debian packages for the test suite without leaving services behind: the packages'
# services (etcd, prometheus) neither start during the install nor stay enabled for the next boot.
# The tests run their own instances, on free ports, with their own data.
#
# Usage: scripts/apt-install.sh PKG...   (as root, or with password-less sudo)
# Runs `apt-get update` once if the first install attempt fails (stale or missing package lists).
set -euo pipefail
[ "$#" -gt 0 ] || { echo "apt-install.sh: no packages given" >&2; exit 2; }

root=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    root=(sudo -n)
  else
    echo "apt-install.sh: need root or password-less sudo to install: $*" >&2
    exit 1
  fi
fi
as_root() { "${root[@]}" env DEBIAN_FRONTEND=noninteractive "$@"; }

# policy-rc.d answering 101 ("action not allowed") keeps invoke-rc.d and deb-systemd-invoke from
# starting what the packages install. Only one this script created is removed again.
policy=/usr/sbin/policy-rc.d
created=""
cleanup() { [ -z "$created" ] || as_root rm -f "$policy"; }
trap cleanup EXIT
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
  as_root chmod +x "$policy"
  created=1
fi

install() { as_root apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
install "$@" || { as_root apt-get update -q >/dev/null && install "$@"; } || {
  echo "apt-install.sh: apt-get install $* failed" >&2
  exit 1
}

# The services the new packages ship: disabled (and stopped, where systemd runs).
if command -v systemctl >/dev/null 2>&1; then
  now=()
  [ -d /run/systemd/system ] && now=(--now)
  for pkg in "$@"; do
    # Most packages ship no unit: grep finds nothing, which is fine.
    units=$(dpkg -L "$pkg" 2>/dev/null | grep -E '^/(usr/)?lib/systemd/system/[^/@]+\.service$' || true)
    for unit in $units; do
      as_root systemctl disable "${now[@]}" --quiet "$(basename "$unit")" 2>/dev/null || true
    done
  done
fi
