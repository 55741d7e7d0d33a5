# syntax=docker/dockerfile:1
#
# tiue-serve images, two targets (docs/deploy.md has the whole story):
#   docker build --target cpu -t tiue-serve:cpu .   # python slim + CPU torch (the default target)
#   docker build --target gpu -t tiue-serve:gpu .   # NVIDIA TensorRT runtime + CUDA torch
#
# Build arguments:
#   BASE_IMAGE       base of the cpu target (any Debian/Ubuntu with python3 >= 3.10 and venv)
#   GPU_BASE_IMAGE   base of the gpu target (CUDA/TensorRT runtime with python3)
#   TORCH_VERSION    must stay equal to the pin in pyproject.toml
#   TORCH_INDEX_URL  where torch comes from (cpu: the CPU wheel index; gpu: PyPI's CUDA build)
#   PIP_NO_INDEX / PIP_FIND_LINKS
#                    offline builds: download wheels on the host, then
#                    --build-context wheels=DIR --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels
#                    (deploy/smoke_podman.sh does exactly that).

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG GPU_BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3
ARG TORCH_VERSION=2.13.0

# An empty wheelhouse; `--build-context wheels=DIR` replaces it for offline builds.
FROM scratch AS wheels


# ---------------------------------------------------------------- cpu: build the virtualenv
FROM ${BASE_IMAGE} AS cpu-build
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_NO_INDEX=0
ARG PIP_FIND_LINKS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
# torch alone first: it is most of the image and changes least often, so it keeps its own layer.
RUN --mount=type=bind,from=wheels,target=/wheels \
    /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# Dependencies next, from pyproject.toml alone (empty packages stand in for the code), so that a
# change to the code reinstalls only the project itself.
COPY pyproject.toml /src/
RUN --mount=type=bind,from=wheels,target=/wheels \
    mkdir -p /src/engine /src/service \
    && touch /src/engine/__init__.py /src/service/__init__.py \
    && /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" "/src[onnx]"
COPY . /src
RUN --mount=type=bind,from=wheels,target=/wheels \
    /opt/venv/bin/pip install --no-cache-dir --no-deps --force-reinstall /src \
    && /opt/venv/bin/pip check
# Drop what serving never loads, here, so that the runtime stage copies only the rest (about 200 MB):
# torch's C++ test programs, headers and CMake files (the image has no compiler to use them), the
# test suites and test data that packages ship, and pip and setuptools (nothing installs at run time).
# Then import everything that serves, so a trim that went too far fails the build, not a pod.
RUN site=$(/opt/venv/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    && rm -rf "$site/torch/test" "$site/torch/include" "$site/torch/share" "$site/onnx/backend/test" \
    && find "$site/torch/bin" -mindepth 1 ! -name torch_shm_manager -exec rm -rf {} + \
    && find "$site" -type d -name tests -prune -exec rm -rf {} + \
    && /opt/venv/bin/python3 -m pip uninstall --yes --quiet pip setuptools \
    && /opt/venv/bin/python3 -c 'import torch, onnx, onnxruntime, onnxscript, service.app, engine.pipeline' \
    && /opt/venv/bin/tiue --help > /dev/null


# ---------------------------------------------------------------- gpu: build the virtualenv
FROM ${GPU_BASE_IMAGE} AS gpu-build
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG PIP_NO_INDEX=0
ARG PIP_FIND_LINKS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# The base image fixes the distribution; python3-venv follows its python3, so it is not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
# --system-site-packages: reuse the base image's TensorRT bindings, which match its libnvinfer.
RUN python3 -m venv --system-site-packages /opt/venv
RUN --mount=type=bind,from=wheels,target=/wheels \
    /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml /src/
RUN --mount=type=bind,from=wheels,target=/wheels \
    mkdir -p /src/engine /src/service \
    && touch /src/engine/__init__.py /src/service/__init__.py \
    && /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" "/src[tensorrt,onnx-gpu]"
COPY . /src
RUN --mount=type=bind,from=wheels,target=/wheels \
    /opt/venv/bin/pip install --no-cache-dir --no-deps --force-reinstall /src


# ---------------------------------------------------------------- gpu: runtime
FROM ${GPU_BASE_IMAGE} AS gpu
LABEL org.opencontainers.image.title="tiue-serve" \
      org.opencontainers.image.description="TiUE text-to-image inference service (CUDA / TensorRT)"
RUN groupadd --gid 10001 tiue \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin tiue \
    && install -d -o 10001 -g 10001 -m 0755 /models /var/cache/tiue/engines /var/cache/tiue/compile
COPY --from=gpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TIUE_HOST=0.0.0.0 \
    TIUE_PORT=8000 \
    TIUE_BACKEND=tensorrt \
    TIUE_DEVICE=cuda \
    TIUE_PRECISION=fp16 \
    TIUE_ENGINE_DIR=/var/cache/tiue/engines \
    TIUE_COMPILE_CACHE_DIR=/var/cache/tiue/compile \
    TIUE_BUILD_ENGINES=false
VOLUME ["/models", "/var/cache/tiue/engines", "/var/cache/tiue/compile"]
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('TIUE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["tiue"]
CMD ["serve"]


# ---------------------------------------------------------------- cpu: runtime (last: the default target)
FROM ${BASE_IMAGE} AS cpu
LABEL org.opencontainers.image.title="tiue-serve" \
      org.opencontainers.image.description="TiUE text-to-image inference service (CPU)"
RUN groupadd --gid 10001 tiue \
    && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin tiue \
    && install -d -o 10001 -g 10001 -m 0755 /models /var/cache/tiue/engines /var/cache/tiue/compile
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TIUE_HOST=0.0.0.0 \
    TIUE_PORT=8000 \
    TIUE_BACKEND=torch \
    TIUE_DEVICE=cpu \
    TIUE_PRECISION=fp32 \
    TIUE_ENGINE_DIR=/var/cache/tiue/engines \
    TIUE_COMPILE_CACHE_DIR=/var/cache/tiue/compile \
    OMP_WAIT_POLICY=PASSIVE
# TIUE_THREADS is left to the server: it follows the container's CPU limit (cgroup cpu.max) at start.
VOLUME ["/models", "/var/cache/tiue/engines", "/var/cache/tiue/compile"]
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('TIUE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["tiue"]
CMD ["serve"]
