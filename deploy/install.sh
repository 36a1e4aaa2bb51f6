#!/bin/sh
# Installs synthgen into the active Python environment. The Dockerfile and CI both run this script, so the
# image's install steps are replayed (and smoke-tested) in CI without a Docker engine.
#   TORCH=cpu          install torch==2.13.0 first (TORCH_INDEX_URL may point at the CPU wheel index)
#   TORCH=preinstalled keep the torch of the base image (the CUDA image)
set -eu
TORCH="${TORCH:-cpu}"
SRC="${1:-.}"
python -m pip install --no-cache-dir --upgrade pip
if [ "$TORCH" = "cpu" ]; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        python -m pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0
    else
        python -m pip install --no-cache-dir torch==2.13.0
    fi
fi
python -m pip install --no-cache-dir "$SRC"
python -c "import app, torch; print('synthgen', app.__version__, 'torch', torch.__version__)"
