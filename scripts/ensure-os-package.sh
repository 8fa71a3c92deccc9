#!/usr/bin/env bash
# ensure-os-package.sh COMMAND PACKAGE: install PACKAGE from the OS packages when COMMAND is missing.
set -euo pipefail
cmd="$1"; pkg="$2"
command -v "$cmd" >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "'$cmd' is missing: install the OS package '$pkg' (e.g. sudo apt-get install $pkg), then retry." >&2
  exit 1
fi
echo "installing $pkg from the OS packages ..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "$pkg" >/dev/null
command -v "$cmd" >/dev/null 2>&1 || { echo "installing $pkg did not provide '$cmd'" >&2; exit 1; }
