#!/bin/sh
# Smoke test of an installed synthgen: serve the models, wait for /readyz, generate a PNG grid from each model.
#   deploy/smoke.sh PYTHON MODELS_DIR
set -eu
PY="${1:-python}"
MODELS="${2:-models}"
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
DATA=$(mktemp -d)
SYNTHGEN_DATA_DIR="$DATA" "$PY" -m app serve --port "$PORT" --models-dir "$MODELS" --device cpu &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; rm -rf "$DATA"' EXIT
"$PY" - "$PORT" <<'PY'
import sys, time, urllib.request, json
base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(300):
    try:
        if urllib.request.urlopen(base + "/readyz", timeout=1).status == 200:
            break
    except OSError:
        time.sleep(0.2)
else:
    sys.exit("the server did not become ready")
models = json.load(urllib.request.urlopen(base + "/v1/models"))["models"]
assert models and all(m["status"] == "ready" for m in models), models
for model in models:
    request = urllib.request.Request(f"{base}/v1/models/{model['name']}/generate", method="POST",
                                     data=json.dumps({"n": 16, "seed": 0, "format": "png"}).encode(),
                                     headers={"Content-Type": "application/json"})
    body = urllib.request.urlopen(request, timeout=60).read()
    assert body[:8] == b"\x89PNG\r\n\x1a\n", body[:100]
    print(f"smoke: {model['name']} served a {len(body)}-byte PNG grid")
docs = urllib.request.urlopen(base + "/docs").read().decode()
assert "/static/swagger-ui/swagger-ui-bundle.js" in docs
assert urllib.request.urlopen(base + "/static/swagger-ui/swagger-ui-bundle.js").status == 200  # package data
print("smoke: /docs and its Swagger UI assets are served")
PY
