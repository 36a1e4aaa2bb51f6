#!/bin/sh
# Installs synthgen into the active Python environment. The Dockerfile and CI both run this script, so the
# image's install steps are replayed (and smoke-tested) in CI without a Docker engine, for both branches.
#   TORCH=cpu          install torch==2.13.0 first (TORCH_INDEX_URL may point at the CPU wheel index)
#   TORCH=preinstalled keep the torch of the base image (the CUDA image): pip must not replace it, so the install
#                      is planned first (pip --dry-run --report) and refused if it would touch torch or CUDA wheels
#   EXTRAS=ray         optional dependencies too (ray: `synthgen export --ray`, the image of a KubeRay cluster)
set -eu
TORCH="${TORCH:-cpu}"
SRC="${1:-.}${EXTRAS:+[$EXTRAS]}"
python -m pip install --no-cache-dir --upgrade pip
case "$TORCH" in
cpu)
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        python -m pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0
    else
        python -m pip install --no-cache-dir torch==2.13.0
    fi
    ;;
preinstalled)
    python -c "import torch; print('keeping the preinstalled torch', torch.__version__, 'cuda', torch.version.cuda)"
    REPORT=$(mktemp)
    python -m pip install --no-cache-dir --quiet --dry-run --report "$REPORT" "$SRC" >/dev/null
    python - "$REPORT" <<'PY'
import json, sys
planned = [item["metadata"]["name"].lower() for item in json.load(open(sys.argv[1]))["install"]]
touched = [name for name in planned if name == "torch" or name.startswith(("nvidia-", "triton"))]
if touched:
    sys.exit(f"refusing: the install would add or replace {touched}; the base image's torch must satisfy the project")
print(f"the install plan ({len(planned)} packages) keeps the preinstalled torch")
PY
    rm -f "$REPORT"
    ;;
*)
    echo "TORCH must be cpu or preinstalled, not $TORCH" >&2
    exit 2
    ;;
esac
python -m pip install --no-cache-dir "$SRC"
python -c "import app, torch; print('synthgen', app.__version__, 'torch', torch.__version__)"
