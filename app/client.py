"""A Python client for pipelines (httpx, synchronous).

    from app.client import Client
    client = Client("http://127.0.0.1:8000", api_key=None)
    images, labels = client.generate("mnist-cgan", n=64, label="7", seed=0)
    client.download_dataset("mnist-cgan", "digits.zip", per_class=1000, seed=0)
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm


class SynthgenClientError(Exception):
    """The server answered with an error; `status` is the HTTP status, the message the server's detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            response.read()
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise SynthgenClientError(response.status_code, str(detail))
        return response

    def models(self) -> list[dict[str, Any]]:
        return self._check(self._http.get("/v1/models")).json()["models"]

    def generate(self, model: str, n: int, label: str | int | None = None, seed: int | None = None,
                 truncation: float = 1.0, **filters: Any) -> tuple[np.ndarray, np.ndarray]:
        """Samples as numpy arrays: images uint8 `[N, H, W]` (or `[N, H, W, C]`) and labels int64 `[N]`."""
        body = {"n": n, "label": label, "seed": seed, "truncation": truncation, "format": "npz", **filters}
        response = self._check(self._http.post(f"/v1/models/{model}/generate", json=body))
        with np.load(io.BytesIO(response.content), allow_pickle=False) as arrays:
            return arrays["images"], arrays["labels"]

    def submit_job(self, model: str, **request: Any) -> dict[str, Any]:
        """Queue a dataset job (per_class or n, seed, format, filters); returns the job."""
        return self._check(self._http.post("/v1/jobs", json={"model": model, **request})).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._check(self._http.get(f"/v1/jobs/{job_id}")).json()

    def wait(self, job_id: str, poll_s: float = 0.5, timeout_s: float | None = None,
             progress: bool = True) -> dict[str, Any]:
        """Poll until the job has finished; raises SynthgenClientError if it failed or was cancelled."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        job = self.job(job_id)
        with tqdm(total=job["total"], unit="sample", desc="generating", disable=not progress) as bar:
            while job["state"] in ("queued", "running"):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job['state']} after {timeout_s} s")
                time.sleep(poll_s)
                job = self.job(job_id)
                bar.update(job["done"] - bar.n)
        if job["state"] != "succeeded":
            raise SynthgenClientError(409, f"job {job_id} {job['state']}: {job.get('error')}")
        return job

    def download(self, job_id: str, path: str | Path, progress: bool = True) -> Path:
        """Download a finished job's archive; an interrupted download resumes from `PATH.part` with Range."""
        path = Path(path)
        part = path.with_name(path.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with self._http.stream("GET", f"/v1/jobs/{job_id}/result", headers=headers) as response:
            if response.status_code == 416:  # the part file is already complete
                part.replace(path)
                return path
            self._check(response)
            if response.status_code == 200:
                have = 0  # the server sent everything again
            total = have + int(response.headers.get("content-length", 0))
            with part.open("ab" if have else "wb") as out, tqdm(total=total, initial=have, unit="B",
                                                                unit_scale=True, desc=path.name,
                                                                disable=not progress) as bar:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    bar.update(len(chunk))
        part.replace(path)
        return path

    def download_dataset(self, model: str, path: str | Path, progress: bool = True, **request: Any) -> Path:
        """Generate a dataset as a server-side job, then download it (resumable). `request`: per_class or n,
        seed, format (default from the path's suffix), min_confidence, max_similarity, truncation, label."""
        path = Path(path)
        request.setdefault("format", path.suffix.lstrip(".") or "zip")
        job = self.submit_job(model, **request)
        self.wait(job["id"], progress=progress)
        return self.download(job["id"], path, progress=progress)

    def augment(self, path_in: str | Path, path_out: str | Path, model: str, target_per_class: int = 0,
                copies_per_image: int = 0, augmentations: dict[str, float] | None = None, seed: int = 0,
                convert: bool = False, include_originals: bool = True) -> Path:
        """Upload a dataset zip and save the augmented zip."""
        data = {"model": model, "target_per_class": str(target_per_class), "copies_per_image": str(copies_per_image),
                "augmentations": json.dumps(augmentations or {}), "seed": str(seed),
                "convert": str(convert).lower(), "include_originals": str(include_originals).lower()}
        path_out = Path(path_out)
        with Path(path_in).open("rb") as upload, self._http.stream(
                "POST", "/v1/augment", data=data, files={"dataset": (Path(path_in).name, upload)}) as response:
            self._check(response)
            with path_out.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return path_out
