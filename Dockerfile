# syntax=docker/dockerfile:1
# synthgen image, two variants of one recipe:
#   docker build -t synthgen .                              CUDA (PyTorch CUDA runtime base; tag: PYTORCH_IMAGE)
#   docker build --build-arg VARIANT=cpu -t synthgen:cpu .  CPU (python slim + the CPU build of torch)
#   docker run --gpus all -p 8000:8000 synthgen             models/ is baked in; mount a volume over it to replace
#   docker build --build-arg EXTRAS=ray -t synthgen:ray .   with Ray, for `synthgen export --ray` and KubeRay
ARG VARIANT=cuda
ARG PYTORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base-cpu
ENV TORCH=cpu TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${PYTORCH_IMAGE} AS base-cuda
ENV TORCH=preinstalled

# hadolint ignore=DL3006
FROM base-${VARIANT} AS synthgen
ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SYNTHGEN_MODELS_DIR=/srv/synthgen/models SYNTHGEN_DATA_DIR=/srv/synthgen/data
WORKDIR /srv/synthgen
COPY pyproject.toml README.md ./
COPY app ./app
COPY deploy/install.sh ./deploy/install.sh
# the same script CI replays in a fresh virtual environment (make docker-check)
RUN EXTRAS="${EXTRAS}" sh deploy/install.sh . \
    && useradd --system --uid 10001 --home-dir /srv/synthgen synthgen \
    && mkdir -p /srv/synthgen/data && chown synthgen /srv/synthgen/data
COPY models ./models
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
CMD ["synthgen", "serve", "--host", "0.0.0.0", "--port", "8000"]
