"""The quick serving benchmark: a real `synthgen serve` process driven by an async httpx load generator at a
few concurrencies, next to the raw model's in-process samples/s. Prints a markdown table and writes JSON.

    python -m app.bench.quick --model mnist-cgan --seconds 10 --out bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from app.checkpoint import load_model
from app.export import npz_bytes
from app.sampling import draw_latents, render


def raw_samples_per_second(folder: Path, batch_size: int, seconds: float) -> float:
    """In-process ceiling: latents, one batched forward pass and npz encoding, no HTTP."""
    model = load_model(folder, "cpu")
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        z, labels = draw_latents(done, range(batch_size), model.latent_dim, model.num_classes)
        npz_bytes(render(model, z, labels, batch_size=batch_size), labels.numpy())
        done += batch_size
    return done / (time.perf_counter() - started)


async def drive(url: str, model: str, concurrency: int, n: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker(offset: int) -> None:
            nonlocal errors
            seed = offset
            while time.perf_counter() < stop:
                started = time.perf_counter()
                response = await client.post(f"/v1/models/{model}/generate",
                                             json={"n": n, "seed": seed, "format": "npz"})
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200
                seed += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "n": n, "requests": len(lat), "errors": errors,
            "samples_per_s": len(lat) * n / elapsed, "requests_per_s": len(lat) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--model", default="mnist-cgan")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    port = _free_port()
    env = {**os.environ, "SYNTHGEN_MAX_BATCH_SIZE": str(args.max_batch_size), "SYNTHGEN_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port), "--models-dir",
                               args.models_dir, "--device", "cpu"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        rows = [asyncio.run(drive(url, args.model, c, 1, args.seconds)) for c in args.concurrency]
    finally:
        server.terminate()
        server.wait(timeout=30)
    raw = raw_samples_per_second(Path(args.models_dir) / args.model, args.max_batch_size, args.seconds)
    print("| contender | concurrency | n | samples/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|")
    print(f"| raw (in-process, batch {args.max_batch_size}) | - | - | {raw:.0f} | - | - | - |")
    for row in rows:
        print(f"| synthgen | {row['concurrency']} | {row['n']} | {row['samples_per_s']:.0f} | {row['p50_ms']:.1f} | "
              f"{row['p99_ms']:.1f} | {row['errors']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "torch_threads": torch.get_num_threads()},
            "raw_samples_per_s": raw, "synthgen": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
