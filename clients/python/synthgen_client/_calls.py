"""What both clients send and how they read the answers, written once: the sync and async clients differ only in
how they wait for the network."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np

from synthgen_client.errors import JobFailedError

RETRY_STATUSES = (429, 503)
FINISHED = ("succeeded", "failed")


@dataclass
class Call:
    """One API request and the function that turns its answer into a result."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    data: dict[str, str] | None = None  # multipart form fields, with `files`
    files: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    accept: tuple[int, ...] = ()  # error statuses the caller reads itself instead of raising
    parse: Any = field(default=lambda response: response.json())

    def request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        """The request, built anew for each try (an upload's file is read again from its start)."""
        return http.build_request(self.method, self.path, json=self.json, params=self.params, data=self.data,
                                  files=self.files, headers=self.headers)


def retry_delay(response: httpx.Response, attempt: int, backoff_s: float) -> float:
    """Seconds to wait before retrying a 429/503: the server's Retry-After, at least the exponential back-off."""
    try:
        after = float(response.headers.get("retry-after", 0))
    except ValueError:
        after = 0.0
    return max(after, backoff_s * 2**attempt)


def _arrays(response: httpx.Response) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(response.content), allow_pickle=False) as arrays:
        return arrays["images"], arrays["labels"]


def models() -> Call:
    return Call("GET", "/v1/models", parse=lambda response: response.json()["models"])


def generate(model: str, n: int, label: str | int | None, seed: int | None, truncation: float,
             filters: dict[str, Any]) -> Call:
    body = {"n": n, "label": label, "seed": seed, "truncation": truncation, "format": "npz", **filters}
    return Call("POST", f"/v1/models/{model}/generate", json=body, parse=_arrays)


def submit_job(model: str, request: dict[str, Any]) -> Call:
    return Call("POST", "/v1/jobs", json={"model": model, **request})


def jobs(limit: int) -> Call:
    return Call("GET", "/v1/jobs", params={"limit": limit}, parse=lambda response: response.json()["jobs"])


def job(job_id: str) -> Call:
    return Call("GET", f"/v1/jobs/{job_id}")


def delete_job(job_id: str) -> Call:
    return Call("DELETE", f"/v1/jobs/{job_id}", parse=lambda response: None)


def check_finished(job: dict[str, Any]) -> dict[str, Any]:
    if job["state"] != "succeeded":
        raise JobFailedError(409, f"job {job['id']} {job['state']}: {job.get('error')}")
    return job


def dataset_request(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """A job request whose format defaults to the output path's suffix."""
    return {"format": path.suffix.lstrip(".") or "zip", **request}


def part_path(path: Path, job_id: str) -> Path:
    """Where a download of job `job_id`'s file to `path` collects its bytes: named after the job, so a part left by
    another job's download is never resumed."""
    return path.with_name(f"{path.name}.{job_id}.part")


def resume_point(part: Path, size: int | None) -> int:
    """Bytes already downloaded into the part file; a part longer than the file's `size` is not its start, so it
    is removed."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        return 0
    return have


def download(url: str, have: int) -> Call:
    """The GET of a job's file from byte `have` on; a 416 is read by `whole_part`."""
    return Call("GET", url, headers={"Range": f"bytes={have}-"} if have else None, accept=(416,))


def whole_part(response: httpx.Response, have: int, size: int | None) -> bool:
    """Whether a 416 to `bytes=have-` means the part file is already whole: it has the file's size, the job's `size`
    or, where the job lists none, the server's `Content-Range: bytes */SIZE`."""
    return size in (None, have) and response.headers.get("content-range") == f"bytes */{have}"


def augment(upload: IO[bytes], name: str, model: str, target_per_class: int, copies_per_image: int,
            augmentations: dict[str, float] | None, seed: int, convert: bool, include_originals: bool) -> Call:
    """The upload of a dataset zip (an open file named `name`) to augment; its answer is the augmented zip."""
    form = {"model": model, "target_per_class": str(target_per_class), "copies_per_image": str(copies_per_image),
            "augmentations": json.dumps(augmentations or {}), "seed": str(seed), "convert": str(convert).lower(),
            "include_originals": str(include_originals).lower()}
    return Call("POST", "/v1/augment", data=form, files={"dataset": (name, upload)})


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, dict) else str(value)


def submit_training(name: str, archive: bytes | None, dataset_id: str | None, options: dict[str, Any],
                    val_archive: bytes | None = None) -> Call:
    """A training of `name` on a zip's bytes or an earlier upload's id (and optionally a validation zip's bytes);
    `options` as the route's form fields."""
    fields = {"name": name, **({"dataset_id": dataset_id} if dataset_id else {}), **options}
    files = {key: (f"{key}.zip", data, "application/zip") for key, data in (("dataset", archive),
                                                                           ("val_dataset", val_archive))
             if data is not None}
    return Call("POST", "/v1/trainings", data={k: _form_value(v) for k, v in fields.items() if v is not None},
                files=files or None)


def training(training_id: str) -> Call:
    return Call("GET", f"/v1/trainings/{training_id}")


def check_trained(training: dict[str, Any]) -> dict[str, Any]:
    if training["state"] != "succeeded":
        raise JobFailedError(409, f"training {training['id']} {training['state']}: {training.get('error')}")
    return training
