#!/usr/bin/env bash
# Builds a folder of wheels -- botd, every dependency, and llama-cpp-python compiled here -- that
# installs botd on a box with no network (no PyPI, no mirror, no compiler needed there).
#
#   scripts/wheelhouse.sh                  ./wheelhouse, the daemon's wheels
#   scripts/wheelhouse.sh --test DIR       DIR, also the test tools (pytest, ruff, mypy, ...)
#
# On the offline box (same OS, CPU architecture and Python minor version as here):
#   python3 -m venv /opt/botd/venv
#   /opt/botd/venv/bin/pip install --no-index --find-links /path/to/wheelhouse botd
#
# llama.cpp is compiled for THIS machine's CPU (GGML_NATIVE): build the wheelhouse on a machine of
# the same CPU family as the target, or ask for a portable build, which is slower (prompt reading
# about halved on x86): CMAKE_ARGS="-DGGML_NATIVE=OFF" scripts/wheelhouse.sh
# pip's wheel cache remembers an earlier build of llama-cpp-python; with CMAKE_ARGS set the cache
# is skipped, so the flags really apply. Mirrors: set PIP_INDEX_URL (see docs/deployment.md, "pip mirrors").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The docs extra too: the Docker image builds the documentation site from the wheelhouse.
extras="[docs]"
if [ "${1:-}" = "--test" ]; then extras="[test]"; shift; fi
OUT="${1:-wheelhouse}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "botd needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
    exit 1
fi
# A set SOURCE_DATE_EPOCH makes llama.cpp build for a generic CPU, which halves its speed.
unset SOURCE_DATE_EPOCH
mkdir -p "$OUT"
cache=()
if [ -n "${CMAKE_ARGS:-}" ]; then cache=(--no-cache-dir); fi

start=$(date +%s)
echo "building wheels into $OUT (the first time compiles llama.cpp: about 4 minutes on 2 cores)..." >&2
# pip, setuptools and wheel too, so the offline venv can upgrade its own pip from the folder; and
# async-timeout, which redis-py needs on Python older than 3.11.3 (Debian 12's python3 is 3.11.2):
# pip resolves for the Python that runs this script, and would leave it out.
"$PYTHON" -m pip wheel --progress-bar off "${cache[@]}" --wheel-dir "$OUT" pip setuptools wheel "async-timeout>=4.0.3"
"$PYTHON" -m pip wheel --progress-bar off "${cache[@]}" --wheel-dir "$OUT" ".$extras"

# What is inside, for the admin who carries the folder across.
ls -1 "$OUT" | grep '\.whl$' > "$OUT/MANIFEST.txt"
"$PYTHON" - "$OUT" <<'EOF'
import pathlib
import platform
import sys

out = pathlib.Path(sys.argv[1])
wheels = sorted(out.glob("*.whl"))
size = sum(w.stat().st_size for w in wheels)
print(f"{len(wheels)} wheels, {size / 2**20:.0f} MiB, for Python {platform.python_version()} "
      f"on {platform.system()} {platform.machine()}", file=sys.stderr)
EOF
echo "done in $(( $(date +%s) - start )) s. Offline install:" >&2
echo "  python3 -m venv VENV && VENV/bin/pip install --no-index --find-links $OUT botd$extras" >&2
