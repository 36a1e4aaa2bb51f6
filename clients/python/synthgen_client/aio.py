"""The asynchronous client (the same calls as `Client`, awaited)."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from synthgen_client import _calls as calls
from synthgen_client.errors import error_for


class AsyncClient:
    """A synthgen server, for asyncio code. Answers 429/503 are retried with back-off honouring Retry-After."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0, max_retries: int = 3,
                 backoff_s: float = 0.5, transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout,
                                       transport=transport, follow_redirects=True)  # as Client's
        self.max_retries, self.backoff_s = max_retries, backoff_s

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, call: calls.Call, stream: bool = False) -> httpx.Response:
        """`call`'s answer, sent again after a 429/503 up to `max_retries` times; an error answer raises its typed
        error unless `call.accept` lists its status. The caller closes a streamed answer."""
        for attempt in range(self.max_retries + 1):
            response = await self._http.send(call.request(self._http), stream=stream)
            if response.status_code not in calls.RETRY_STATUSES or attempt == self.max_retries:
                break
            await response.aclose()
            await asyncio.sleep(calls.retry_delay(response, attempt, self.backoff_s))
        if response.status_code >= 400 and response.status_code not in call.accept:
            await response.aread()
            await response.aclose()
            raise error_for(response)
        return response

    async def _run(self, call: calls.Call) -> Any:
        return call.parse(await self._send(call))

    async def _stream_to(self, response: httpx.Response, out: Any, total: int, initial: int, name: str,
                         progress: bool) -> None:
        with tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
            async for chunk in response.aiter_bytes():
                out.write(chunk)
                bar.update(len(chunk))

    async def models(self) -> list[dict[str, Any]]:
        return await self._run(calls.models())

    async def generate(self, model: str, n: int, label: str | int | None = None, seed: int | None = None,
                       truncation: float = 1.0, **filters: Any) -> tuple[np.ndarray, np.ndarray]:
        """Samples as numpy arrays: images uint8 `[N, H, W]` (or `[N, H, W, C]`) and labels int64 `[N]`."""
        return await self._run(calls.generate(model, n, label, seed, truncation, filters))

    async def submit_job(self, model: str, **request: Any) -> dict[str, Any]:
        return await self._run(calls.submit_job(model, request))

    async def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        """The jobs of this client's API key, newest first."""
        return await self._run(calls.jobs(limit))

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._run(calls.job(job_id))

    async def delete_job(self, job_id: str) -> None:
        await self._run(calls.delete_job(job_id))

    async def wait(self, job_id: str, poll_s: float = 0.5, timeout_s: float | None = None) -> dict[str, Any]:
        """Poll until the job has finished; raises JobFailedError if it failed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        job = await self.job(job_id)
        while job["state"] not in calls.FINISHED:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout_s} s")
            await asyncio.sleep(poll_s)
            job = await self.job(job_id)
        return calls.check_finished(job)

    async def download(self, job_id: str, path: str | Path, progress: bool = False) -> Path:
        """Download a finished job's archive to `path` (a tar job's shards and manifest.json into the folder
        `path`); an interrupted download resumes from `<file>.<job id>.part` with Range."""
        path, job = Path(path), await self.job(job_id)
        if job["format"] != "tar":
            return await self._download_file(job["result_url"], path, job_id, job.get("result_bytes"), progress)
        path.mkdir(parents=True, exist_ok=True)
        for file in job["files"]:
            await self._download_file(file["url"], path / file["name"], job_id, file["bytes"], progress)
        return path

    async def _download_file(self, url: str, path: Path, job_id: str, size: int | None, progress: bool) -> Path:
        part = calls.part_path(path, job_id)
        have = calls.resume_point(part, size)
        if not have or have != size:  # else the part file is already whole
            async with aclosing(await self._send(calls.download(url, have), stream=True)) as response:
                if response.status_code == 416:
                    if not calls.whole_part(response, have, size):
                        part.unlink(missing_ok=True)
                        await response.aread()
                        raise error_for(response)
                else:
                    have = have if response.status_code == 206 else 0
                    with part.open("ab" if have else "wb") as out:
                        total = have + int(response.headers.get("content-length", 0))
                        await self._stream_to(response, out, total, have, path.name, progress)
        part.replace(path)
        return path

    async def download_dataset(self, model: str, path: str | Path, **request: Any) -> Path:
        """Generate a dataset as a server-side job, then download it (resumable)."""
        path = Path(path)
        job = await self.submit_job(model, **calls.dataset_request(path, request))
        await self.wait(job["id"])
        return await self.download(job["id"], path)

    async def augment(self, path_in: str | Path, path_out: str | Path, model: str, target_per_class: int = 0,
                      copies_per_image: int = 0, augmentations: dict[str, float] | None = None, seed: int = 0,
                      convert: bool = False, include_originals: bool = True, progress: bool = False) -> Path:
        """Upload a dataset zip and save the augmented zip."""
        path_in, path_out = Path(path_in), Path(path_out)
        with path_in.open("rb") as upload:
            call = calls.augment(upload, path_in.name, model, target_per_class, copies_per_image, augmentations, seed,
                                 convert, include_originals)
            async with aclosing(await self._send(call, stream=True)) as response:
                with path_out.open("wb") as out:
                    await self._stream_to(response, out, 0, 0, path_out.name, progress)
        return path_out

    async def train(self, name: str, dataset: str | Path | None = None, dataset_id: str | None = None,
                    wait: bool = True, val_dataset: str | Path | None = None, **options: Any) -> dict[str, Any]:
        """Train a model `name` on an ImageFolder zip (or an earlier upload's `dataset_id`); see `Client.train`."""
        archive = Path(dataset).read_bytes() if dataset is not None else None
        val_archive = Path(val_dataset).read_bytes() if val_dataset is not None else None
        training = await self._run(calls.submit_training(name, archive, dataset_id, options, val_archive))
        return await self.wait_training(training["id"]) if wait else training

    async def training(self, training_id: str) -> dict[str, Any]:
        return await self._run(calls.training(training_id))

    async def wait_training(self, training_id: str, poll_s: float = 2.0, timeout_s: float | None = None
                            ) -> dict[str, Any]:
        """Poll until the training has finished; raises JobFailedError if it failed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        training = await self.training(training_id)
        while training["state"] not in calls.FINISHED:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"training {training_id} still {training['state']} after {timeout_s} s")
            await asyncio.sleep(poll_s)
            training = await self.training(training_id)
        return calls.check_trained(training)
