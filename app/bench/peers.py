"""The contenders synthgen is measured against, serving the same generator with the same output (npz bytes):

- `litserve`: LitServe with its own request batching (same max batch size and batch timeout);
- `plain`: the FastAPI app a user writes in an afternoon: one forward pass per request, no batching;
- `canned`: FastAPI answering every request with npz bytes computed once per `n`: the HTTP stack's ceiling.

    python -m app.bench.peers litserve --model models/mnist-cgan --port 8001 --max-batch-size 256 --wait-ms 5
    python -m app.bench.peers plain --model models/mnist-cgan --port 8002
    python -m app.bench.peers canned --model models/mnist-cgan --port 8003

and the raw model in-process, without HTTP (`raw`: latents, a forward pass at a fixed batch size, npz bytes),
printing its rate as JSON:

    python -m app.bench.peers raw --model models/mnist-cgan --batch-size 64 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import litserve as ls
import torch
from fastapi import FastAPI, Response

from app.core.model import SyntheticModel, load_model
from app.core.sampling import draw_latents, render
from app.engine.archives import npz_bytes


def _generate(model: SyntheticModel, requests: list[tuple[int, int]]) -> list[bytes]:
    """One forward pass for every (n, seed) request; one npz per request."""
    latents = [draw_latents(seed, range(n), model.latent_dim, model.num_classes) for n, seed in requests]
    z, labels = torch.cat([z for z, _ in latents]), torch.cat([y for _, y in latents])
    images = render(model, z, labels, batch_size=max(len(z), 1))
    out, start = [], 0
    for n, _ in requests:
        out.append(npz_bytes(images[start : start + n], labels[start : start + n].numpy()))
        start += n
    return out


def _parse(body: dict) -> tuple[int, int]:
    return int(body.get("n", 1)), int(body.get("seed", 0))


def plain_app(folder: Path, device: str) -> FastAPI:
    app = FastAPI()
    model = load_model(folder, device)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/generate")
    def generate(body: dict) -> Response:  # a sync route: FastAPI runs it in its thread pool, one request each
        return Response(_generate(model, [_parse(body)])[0], media_type="application/octet-stream")

    return app


def canned_app(folder: Path, device: str) -> FastAPI:
    app = FastAPI()
    model = load_model(folder, device)
    answers: dict[int, bytes] = {}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/generate")
    async def generate(body: dict) -> Response:  # no model work per request: what HTTP alone costs
        n = _parse(body)[0]
        if n not in answers:
            answers[n] = _generate(model, [(n, 0)])[0]
        return Response(answers[n], media_type="application/octet-stream")

    return app


class GeneratorAPI(ls.LitAPI):
    """LitServe's contract for the same generator (module level: LitServe pickles it into its workers)."""

    def __init__(self, folder: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.folder = folder

    def setup(self, device: str) -> None:
        self.model = load_model(self.folder, device)

    def decode_request(self, request: dict) -> tuple[int, int]:
        return _parse(request)

    def batch(self, inputs: list) -> list:
        return inputs

    def predict(self, requests):
        return _generate(self.model, requests if isinstance(requests, list) else [requests])

    def unbatch(self, outputs: list) -> list:
        return outputs

    def encode_response(self, output) -> Response:
        return Response(output[0] if isinstance(output, list) else output, media_type="application/octet-stream")


def litserve_server(folder: Path, max_batch_size: int, wait_ms: float, device: str) -> ls.LitServer:
    api = GeneratorAPI(folder, max_batch_size=max_batch_size, batch_timeout=wait_ms / 1000)
    return ls.LitServer(api, accelerator=device, devices=1, workers_per_device=1)


def raw_rate(folder: Path, batch_size: int, seconds: float, device: str) -> float:
    """Samples a second of latents + one forward pass per batch + npz bytes, in-process."""
    model = load_model(folder, device)
    z, labels = draw_latents(0, range(batch_size), model.latent_dim, model.num_classes)
    render(model, z, labels, batch_size=batch_size)  # warm-up: the first pass of a shape pays for its set-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        z, labels = draw_latents(done, range(batch_size), model.latent_dim, model.num_classes)
        npz_bytes(render(model, z, labels, batch_size=batch_size), labels.numpy())
        done += batch_size
    return done / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=["litserve", "plain", "canned", "raw"])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--port", type=int, help="servers: the port")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=64, help="raw: the batch size")
    parser.add_argument("--seconds", type=float, default=10.0, help="raw: how long to measure")
    args = parser.parse_args(argv)
    if args.peer == "raw":
        rate = raw_rate(Path(args.model), args.batch_size, args.seconds, args.device)
        print(json.dumps({"batch_size": args.batch_size, "samples_per_s": rate}))
    elif args.peer in ("plain", "canned"):
        import uvicorn

        app = (plain_app if args.peer == "plain" else canned_app)(Path(args.model), args.device)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    else:
        server = litserve_server(Path(args.model), args.max_batch_size, args.wait_ms, args.device)
        server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
