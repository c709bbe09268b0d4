# syntax=docker/dockerfile:1
# Two production images from one file (docker-compose.yml builds both):
#   docker build --target api -t sdfarm-api .        API, dispatcher and client: no torch
#   docker build --target worker -t sdfarm-worker .  a GPU worker on PyTorch's CUDA runtime image

ARG PYTHON_IMAGE=python:3.11-slim
# Its torch must fall within the `worker` extra's range, or pip installs a second torch on top.
ARG TORCH_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# -- wheel: the project built once; neither final image carries the source tree ----------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY producer ./producer
COPY worker ./worker
RUN pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

# -- api: `pip install .` on slim Python --------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install /wheels/sdfarm-*.whl
RUN useradd --create-home --uid 10001 sdfarm
USER sdfarm
WORKDIR /home/sdfarm
EXPOSE 8000
CMD ["sdfarm", "api", "--host", "0.0.0.0", "--port", "8000"]

# -- worker: `pip install .[worker]` over the CUDA build of torch the base image ships ----------
FROM ${TORCH_IMAGE} AS worker
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/sdfarm-*.whl)[worker]"
RUN useradd --create-home --uid 10001 sdfarm
# Compiled graphs (`--compile`) persist here across restarts, so a restarted worker starts warm:
# a volume in docker-compose.yml (worker/compile_cache.py). Owned by the worker's user, which a
# named volume mounted here inherits.
ENV SDFARM_COMPILE_CACHE_DIR=/var/cache/sdfarm/compile
RUN mkdir -p /var/cache/sdfarm/compile && chown -R sdfarm /var/cache/sdfarm
VOLUME /var/cache/sdfarm/compile
USER sdfarm
WORKDIR /home/sdfarm
# Model weights are mounted read-only at /models (see docker-compose.yml).
CMD ["sdfarm", "worker", "--device", "cuda"]
