"""The synchronous and asynchronous clients against a real server; retries against a scripted transport."""

from __future__ import annotations

import asyncio
import io
import sys
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from synthgen_client import AsyncClient, Client, InvalidRequestError, NotFoundError, OverloadedError
from synthgen_client.cli import main


def test_installs_without_torch() -> None:
    assert "torch" not in sys.modules
    with pytest.raises(ImportError):
        import torch  # noqa: F401


def test_generate_and_typed_errors(url: str) -> None:
    with Client(url) as client:
        assert [m["name"] for m in client.models()] == ["digits-gan", "digits-vae"]
        images, labels = client.generate("digits-gan", n=5, label=2, seed=1)
        assert images.shape == (5, 8, 8) and images.dtype == np.uint8 and labels.tolist() == [2] * 5
        again, _ = client.generate("digits-gan", n=5, label=2, seed=1)
        assert np.array_equal(images, again)
        with pytest.raises(InvalidRequestError, match="unknown label") as refused:
            client.generate("digits-gan", n=1, label="cat")
        assert refused.value.status == 422 and len(refused.value.request_id) >= 8
        with pytest.raises(NotFoundError):
            client.generate("no-such-model", n=1)


def test_dataset_job_download_resumes(url: str, tmp_path: Path) -> None:
    with Client(url) as client:
        path = client.download_dataset("digits-gan", tmp_path / "d.zip", per_class=20, seed=3, progress=False)
        with zipfile.ZipFile(path) as archive:
            assert sum(name.endswith(".png") for name in archive.namelist()) == 200
        # an interrupted download resumes: keep the first 1,000 bytes as a .part file and download again
        job = client.submit_job("digits-gan", per_class=20, seed=3)
        client.wait(job["id"], progress=False)
        assert job["id"] in [listed["id"] for listed in client.jobs(limit=10)]
        whole = client.download(job["id"], tmp_path / "whole.zip", progress=False).read_bytes()
        (tmp_path / f"r.zip.{job['id']}.part").write_bytes(whole[:1000])
        assert client.download(job["id"], tmp_path / "r.zip", progress=False).read_bytes() == whole
        client.delete_job(job["id"])
        with pytest.raises(NotFoundError):
            client.job(job["id"])


def test_augment(url: str, tmp_path: Path) -> None:
    with Client(url) as client:
        source = client.download_dataset("digits-gan", tmp_path / "d.zip", per_class=4, seed=3, progress=False)
        upload = tmp_path / "upload.zip"
        with zipfile.ZipFile(source) as archive, zipfile.ZipFile(upload, "w") as small:
            for name in [n for n in archive.namelist() if n.startswith(("3/", "5/"))]:
                small.writestr(name, archive.read(name))
        out = client.augment(upload, tmp_path / "augmented.zip", "digits-gan", target_per_class=10)
        with zipfile.ZipFile(out) as archive:
            assert sum(name.endswith(".png") for name in archive.namelist()) == 20


@pytest.mark.anyio
async def test_async_client(url: str, tmp_path: Path) -> None:
    async with AsyncClient(url) as client:
        results = await asyncio.gather(*(client.generate("digits-vae", n=3, seed=seed) for seed in range(4)))
        assert [images.shape for images, _ in results] == [(3, 8, 8)] * 4
        path = await client.download_dataset("digits-vae", tmp_path / "v.npz", n=7, seed=2)
        assert any(job["model"] == "digits-vae" for job in await client.jobs())
        with np.load(path) as arrays:
            assert arrays["images"].shape == (7, 8, 8)
        shards = await client.download_dataset("digits-vae", tmp_path / "shards", n=7, seed=2, format="tar",
                                               shard_size=3)
        assert sorted(p.name for p in shards.iterdir()) == [f"digits-vae-seed2-{i:06d}.tar" for i in range(3)] + [
            "manifest.json"]


def test_dataset_command(url: str, tmp_path: Path) -> None:
    assert main(["dataset", "--server", url, "--model", "digits-vae", "--n", "7", "--seed", "2",
                 "--out", str(tmp_path / "v.npz")]) == 0
    with np.load(tmp_path / "v.npz") as arrays:
        assert arrays["images"].shape == (7, 8, 8)
    assert main(["dataset", "--server", url, "--model", "digits-vae", "--out", str(tmp_path / "x.zip")]) == 2


def test_dataset_command_checks_out_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d.zip").mkdir()
    (tmp_path / "t.tar").write_bytes(b"")
    nowhere = "http://127.0.0.1:9"  # never asked: the bad --out is refused first
    for out, problem in (("nodir/x.zip", "there is no folder"), ("d.zip", "is a folder"), ("t.tar", "is a file")):
        assert main(["dataset", "--server", nowhere, "--model", "m", "--n", "1", "--out", str(tmp_path / out)]) == 2
        assert problem in capsys.readouterr().err

    def unwritable(*args: Any, **kwargs: Any) -> Path:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Client, "download_dataset", unwritable)
    assert main(["dataset", "--server", nowhere, "--model", "m", "--n", "1", "--out", str(tmp_path / "x.zip")]) == 2
    assert "cannot write" in capsys.readouterr().err


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=np.zeros((1, 2, 2), np.uint8), labels=np.zeros(1, np.int64))
    return buffer.getvalue()


def test_retries_honour_retry_after_then_give_up(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr("synthgen_client.sync.time.sleep", waits.append)
    answers = [httpx.Response(503, headers={"Retry-After": "2"}, json={"detail": "busy", "request_id": "r1"}),
               httpx.Response(429, json={"detail": "slow down", "request_id": "r2"}),
               httpx.Response(200, content=_npz())]
    with Client("http://test", transport=httpx.MockTransport(lambda request: answers.pop(0)), backoff_s=0.5) as client:
        images, _ = client.generate("m", n=1)
    assert images.shape == (1, 2, 2) and waits == [2.0, 1.0]  # Retry-After, then back-off 0.5·2¹
    busy = httpx.MockTransport(lambda request: httpx.Response(503, json={"detail": "busy", "request_id": "r3"}))
    with Client("http://test", transport=busy, max_retries=2) as client, pytest.raises(OverloadedError) as error:
        client.generate("m", n=1)
    assert error.value.detail == "busy" and error.value.request_id == "r3" and len(waits) == 4


ARCHIVE = bytes(range(256)) * 40


class FakeServer:
    """Job `j1`, a succeeded zip job whose archive is `archive` (its listed `size`), served with Range as synthgen
    serves it, and /v1/augment; `download` and `augment` first answer 503 (Retry-After: 0) that many times."""

    def __init__(self, archive: bytes = ARCHIVE, **busy: int) -> None:
        self.archive, self.requests = archive, []
        self.size: int | None = len(archive)
        self.busy = {"/v1/jobs/j1/result": busy.get("download", 0), "/v1/augment": busy.get("augment", 0)}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if self.busy.get(path):
            self.busy[path] -= 1
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": "busy"})
        if path == "/v1/jobs/j1":
            return httpx.Response(200, json={
                "id": "j1", "state": "succeeded", "format": "zip", "result_url": "/v1/jobs/j1/result",
                "result_bytes": self.size, "files": [{"name": "j1.zip", "bytes": self.size,
                                                      "url": "/v1/jobs/j1/files/j1.zip"}]})
        if path == "/v1/augment":
            return httpx.Response(200, content=b"augmented")
        start, size = int(request.headers.get("range", "bytes=0-")[6:-1]), len(self.archive)
        if start >= size:
            return httpx.Response(416, headers={"Content-Range": f"bytes */{size}"}, json={"detail": "past the end"})
        if "range" not in request.headers:
            return httpx.Response(200, content=self.archive)
        return httpx.Response(206, content=self.archive[start:],
                              headers={"Content-Range": f"bytes {start}-{size - 1}/{size}"})


async def _do(client: Client | AsyncClient, method: str, *args: Any, **kwargs: Any) -> Any:
    """`method` of either client, awaited for the async one."""
    result = getattr(client, method)(*args, **kwargs)
    return await result if isinstance(client, AsyncClient) else result


async def _close(client: Client | AsyncClient) -> None:
    await _do(client, "aclose" if isinstance(client, AsyncClient) else "close")


def _client(kind: type[Client] | type[AsyncClient], server: FakeServer, max_retries: int = 3) -> Client | AsyncClient:
    return kind("http://test", transport=httpx.MockTransport(server), max_retries=max_retries, backoff_s=0)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", [Client, AsyncClient])
async def test_streamed_calls_are_retried(kind: type[Client] | type[AsyncClient], tmp_path: Path) -> None:
    (tmp_path / "in.zip").write_bytes(b"the upload")
    server = FakeServer(download=1, augment=2)
    client = _client(kind, server)
    out = await _do(client, "augment", tmp_path / "in.zip", tmp_path / "out.zip", "m", target_per_class=2)
    assert out.read_bytes() == b"augmented"
    uploads = [r for r in server.requests if r.url.path == "/v1/augment"]
    assert len(uploads) == 3 and all(b"the upload" in r.content for r in uploads)  # the file sent whole each time
    assert (await _do(client, "download", "j1", tmp_path / "r.zip", progress=False)).read_bytes() == ARCHIVE
    assert [r.url.path for r in server.requests].count("/v1/jobs/j1/result") == 2
    await _close(client)
    # still busy after the retries: the typed error, and no empty file left behind
    client = _client(kind, FakeServer(download=2, augment=2), max_retries=1)
    with pytest.raises(OverloadedError):
        await _do(client, "augment", tmp_path / "in.zip", tmp_path / "out2.zip", "m")
    with pytest.raises(OverloadedError):
        await _do(client, "download", "j1", tmp_path / "r2.zip", progress=False)
    await _close(client)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zip", "out.zip", "r.zip"]


def test_train_a_model_and_use_it(url: str, tmp_path: Path) -> None:
    with Client(url) as client:
        images = client.download_dataset("digits-gan", tmp_path / "d.zip", per_class=10, seed=4, progress=False)
        others = client.download_dataset("digits-gan", tmp_path / "v.zip", per_class=10, seed=5, progress=False)
        tiny = {"g_channels": 8, "d_channels": 8, "latent_dim": 16, "embed_dim": 8}
        training = client.train("client-digits", images, arch="gan", epochs=1, hyperparameters=tiny,
                                eval_per_class=10, progress=False, val_dataset=others)
        assert training["model"] == "client-digits@1" and training["candidates"]["gan"]["tstr_accuracy"] >= 0
        assert training["val_dataset"]["images"] == 100 and training["val_dataset_id"] != training["dataset_id"]
        samples, labels = client.generate("client-digits@1", n=3, label=7, seed=0)
        assert samples.shape == (3, 8, 8) and labels.tolist() == [7] * 3
        with pytest.raises(InvalidRequestError, match="unknown gan hyper-parameter"):
            client.train("client-digits", dataset_id=training["dataset_id"], hyperparameters={"colour": 1})


@pytest.mark.anyio
@pytest.mark.parametrize("kind", [Client, AsyncClient])
async def test_download_resumes_only_its_own_part(kind: type[Client] | type[AsyncClient], tmp_path: Path) -> None:
    server = FakeServer()
    client = _client(kind, server)

    async def download(name: str) -> bytes:
        return (await _do(client, "download", "j1", tmp_path / name, progress=False)).read_bytes()

    # another job's parts, shorter and longer than this file, are neither resumed nor taken as the result
    (tmp_path / "a.zip.part").write_bytes(b"x" * 5000)
    (tmp_path / "b.zip.part").write_bytes(b"x" * 20000)
    assert await download("a.zip") == ARCHIVE and await download("b.zip") == ARCHIVE
    # this job's part resumes with Range; one longer than the file is not its start, so it starts again
    (tmp_path / "c.zip.j1.part").write_bytes(ARCHIVE[:1000])
    (tmp_path / "d.zip.j1.part").write_bytes(ARCHIVE + b"junk")
    assert await download("c.zip") == ARCHIVE and server.requests[-1].headers["range"] == "bytes=1000-"
    assert await download("d.zip") == ARCHIVE and "range" not in server.requests[-1].headers
    # a whole part is not fetched again; where the job lists no size, a 416 means whole only if the server's
    # Content-Range gives the part's length
    (tmp_path / "e.zip.j1.part").write_bytes(ARCHIVE)
    fetched = len(server.requests)
    assert await download("e.zip") == ARCHIVE and [r.url.path for r in server.requests[fetched:]] == ["/v1/jobs/j1"]
    server.size = None
    (tmp_path / "f.zip.j1.part").write_bytes(ARCHIVE)
    (tmp_path / "g.zip.j1.part").write_bytes(ARCHIVE + b"junk")
    assert await download("f.zip") == ARCHIVE
    with pytest.raises(InvalidRequestError):
        await download("g.zip")
    assert not (tmp_path / "g.zip").exists() and not (tmp_path / "g.zip.j1.part").exists()
    await _close(client)


def test_a_download_redirected_to_the_store_is_fetched_without_the_key(tmp_path: Path) -> None:
    # a server with SYNTHGEN_RESULTS_REDIRECT answers downloads with 307 to a presigned URL of the object store
    data, seen = b"zip bytes from the store", []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers.get("authorization")))
        if request.url.host == "store.example":
            return httpx.Response(200, content=data)
        if request.url.path == "/v1/jobs/j1":
            return httpx.Response(200, json={"id": "j1", "format": "zip", "result_url": "/v1/jobs/j1/result",
                                             "result_bytes": len(data)})
        return httpx.Response(307, headers={"Location": "https://store.example/j1.zip?signature=x"})

    with Client("http://api.example", api_key="k" * 16, transport=httpx.MockTransport(handler)) as client:
        assert client.download("j1", tmp_path / "d.zip", progress=False).read_bytes() == data
    assert seen[-1] == ("store.example", None) and seen[0][1] == "Bearer " + "k" * 16
