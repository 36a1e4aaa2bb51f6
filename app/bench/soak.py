"""Soak test (not in CI): mixed traffic against a running synthgen for a while, reporting errors and the server's
memory over time. Bounded in count and time; loopback only.

    synthgen serve &                    # or any server of yours on this machine
    python -m app.bench.soak --url http://127.0.0.1:8000 --pid $! --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import time
import zipfile
from collections import Counter

import httpx

from app.bench.run import tree_rss_mb


def _small_upload() -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for label in ("3", "5"):
            png = io.BytesIO()
            Image.fromarray(np.zeros((28, 28), np.uint8)).save(png, format="PNG")
            archive.writestr(f"{label}/0.png", png.getvalue())
    return buffer.getvalue()


async def soak(url: str, model: str, minutes: float, users: int, pid: int | None) -> dict:
    stop = time.monotonic() + minutes * 60
    outcomes: Counter[str] = Counter()
    memory: list[tuple[float, float]] = []
    upload = _small_upload()

    async def user(client: httpx.AsyncClient, number: int) -> None:
        rng = random.Random(number)
        while time.monotonic() < stop:
            kind = rng.choices(["generate", "dataset", "job", "augment"], weights=[80, 10, 5, 5])[0]
            try:
                if kind == "generate":
                    response = await client.post(f"/v1/models/{model}/generate",
                                                 json={"n": rng.choice([1, 16, 64]), "format": "npz"})
                elif kind == "dataset":
                    response = await client.post(f"/v1/models/{model}/datasets", json={"per_class": 50})
                elif kind == "job":
                    response = await client.post("/v1/jobs", json={"model": model, "per_class": 20})
                    if response.status_code == 202:
                        await client.delete(f"/v1/jobs/{response.json()['id']}")
                else:
                    response = await client.post("/v1/augment", files={"dataset": ("d.zip", upload)},
                                                 data={"model": model, "target_per_class": "10"})
                outcomes[f"{kind} {response.status_code}"] += 1
            except httpx.HTTPError as exc:
                outcomes[f"{kind} {type(exc).__name__}"] += 1

    async def watch() -> None:
        started = time.monotonic()
        while time.monotonic() < stop:
            if pid:
                memory.append((round(time.monotonic() - started), tree_rss_mb(pid)))
                print(f"t={memory[-1][0]:5.0f}s rss={memory[-1][1]:7.1f} MB {dict(outcomes)}", flush=True)
            await asyncio.sleep(15)

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(watch(), *(user(client, i) for i in range(users)))
    # 429 and 503 are back-pressure by design (every simulated user shares one address, and so the per-client
    # upload limit): counted in the outcomes, not as errors
    errors = {k: v for k, v in outcomes.items() if not k.split()[1].startswith(("2", "429", "503"))}
    return {"outcomes": dict(outcomes), "errors": errors, "memory_mb": memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="mnist-cgan")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--pid", type=int, default=None, help="the server's process id, to follow its memory")
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        parser.error("the soak test only targets servers on this machine (loopback)")
    report = asyncio.run(soak(args.url, args.model, args.minutes, args.users, args.pid))
    print(json.dumps(report, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
