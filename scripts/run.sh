#!/usr/bin/env bash
# Installs botd (if needed) and runs the daemon on ./config.toml: embedded model, embedded
# Redis, http://127.0.0.1:8080. Extra arguments go to `botd run` (e.g. --config PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${BOTD_VENV:-.venv}/bin/botd" run "$@"
