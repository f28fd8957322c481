#!/usr/bin/env bash
# Creates the virtual environment (.venv, or $BOTD_VENV) and installs botd into it.
#   scripts/install.sh          the daemon
#   scripts/install.sh test     the daemon and the test tools
# The first install compiles llama.cpp for this machine's CPU (about 4 minutes on 2 cores);
# pip caches the result, so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BOTD_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "botd needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# A set SOURCE_DATE_EPOCH makes llama.cpp build for a generic CPU, which halves its speed here.
unset SOURCE_DATE_EPOCH
extras=""
if [ "${1:-}" = "test" ]; then extras="[test]"; fi
echo "installing botd into $VENV (the first time compiles llama.cpp: a few minutes)..." >&2
"$VENV/bin/python" -m pip install --quiet --progress-bar off -e ".$extras"
