#!/usr/bin/env bash
# Installs botd with its test tools and runs the linter, the type checker and the whole test suite
# (real model, real redis-server, real HTTP on 127.0.0.1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
VENV="${BOTD_VENV:-.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/mypy" core connectors bots
# The layer rules (pyproject.toml, [tool.importlinter]): imports point down, no platform imports
# another, no import cycle at any depth, the config models import no platform library.
"$VENV/bin/lint-imports" --no-cache --no-logo
# The documentation site: a broken link or #anchor fails the build (mkdocs.yml, validation).
# Not --quiet: it hides the warnings that --strict counts, and the build passes whatever they say.
NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict 2>&1 | { grep -v '^INFO' || true; }
exec "$VENV/bin/python" -m pytest -q "$@"
