#!/usr/bin/env bash
# lock.sh: re-pin requirements.lock (runtime) and requirements-dev.lock (runtime + tools) from
# pyproject.toml, with sha256 hashes of every file PyPI has for each pinned release, so that
# `pip install -r ...` runs in hash-checking mode (compose/Dockerfile passes --require-hashes).
#
#   scripts/lock.sh                 keep every version already pinned, add what is new
#   scripts/lock.sh --upgrade       move everything to the newest release pyproject allows
#
# Needs uv (a dev dependency: `make install` puts it in .venv). The dev lock is constrained by
# the runtime lock, so both pin the same versions of what they share.
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-.venv/bin/uv}"
PYVER=3.11.7  # the oldest 3.11 the project is tested on; markers are evaluated for it
keep=()
if [ "${1:-}" != "--upgrade" ]; then
  # The versions pinned now, as constraints (hashes stripped): a re-lock changes nothing else.
  sed -n 's/^\([A-Za-z0-9_.-]*==[^ ]*\).*/\1/p' requirements-dev.lock > /tmp/po-lock-pins.txt
  keep=(-c /tmp/po-lock-pins.txt)
fi
common=(--python-version "$PYVER" --generate-hashes --quiet --custom-compile-command "scripts/lock.sh")
"$UV" pip compile pyproject.toml "${common[@]}" "${keep[@]}" -o requirements.lock
"$UV" pip compile pyproject.toml --extra dev -c requirements.lock "${common[@]}" "${keep[@]}" \
  -o requirements-dev.lock
# The constraints file is a temporary one: name it for what it is in the "via" comments.
sed -i 's|-c /tmp/po-lock-pins.txt|(the versions pinned before)|' requirements.lock requirements-dev.lock
echo "requirements.lock: $(grep -c '^[A-Za-z]' requirements.lock) packages," \
  "requirements-dev.lock: $(grep -c '^[A-Za-z]' requirements-dev.lock) packages"
