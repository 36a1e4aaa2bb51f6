"""Object storage (moto's standalone S3 server on 127.0.0.1). Job results: nothing visible under a final key
before the result is complete, downloads proxied with Range or redirected to a presigned URL, the same bytes as on
the local default, deletion. Model folders: downloaded at start and checked against their configs' sha256."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from app.engine.results import S3Results
from tests.conftest import serve
from tests.helpers import wait_for_job

pytestmark = pytest.mark.anyio
JOB = {"model": "digits-gan", "n": 20, "seed": 3, "format": "tar", "shard_size": 7}


def _settings(s3: dict[str, str]) -> dict[str, str]:
    return {"results_url": s3["SYNTHGEN_RESULTS_URL"], "s3_endpoint_url": s3["SYNTHGEN_S3_ENDPOINT_URL"]}


def test_nothing_is_visible_before_the_commit(s3_settings: dict[str, str]) -> None:
    store = S3Results(s3_settings["SYNTHGEN_RESULTS_URL"],
                      boto3.client("s3", endpoint_url=s3_settings["SYNTHGEN_S3_ENDPOINT_URL"]))
    writer = store.writer("job1")
    writer.open("a.tar")
    writer.write(b"x" * (9 * 1024 * 1024))  # more than a part
    writer.close_file()
    writer.open("manifest.json")
    writer.write(b"{}")
    writer.close_file()
    assert store.files("job1") == []  # two multipart uploads pending, no object yet
    resumed = store.writer("job1", writer.state())  # a worker taking over keeps the finished files' uploads
    resumed.commit()
    assert sorted(store.files("job1")) == [("a.tar", 9 * 1024 * 1024), ("manifest.json", 2)]
    store.delete("job1")
    assert store.files("job1") == []


def test_a_takeover_keeps_the_other_attempts_uploads_and_completes_what_was_completed(
        s3_settings: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    store = S3Results(s3_settings["SYNTHGEN_RESULTS_URL"],
                      boto3.client("s3", endpoint_url=s3_settings["SYNTHGEN_S3_ENDPOINT_URL"]))
    first = store.writer("job2")
    first.open("a.tar")
    first.write(b"a" * 10)
    first.close_file()
    lost = store.writer("job2", first.state())  # took the job over, then lost it: drops only its own upload
    lost.open("b.tar")
    lost.write(b"b")
    lost.close_file()
    lost.abort()
    pending = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.key("job2") + "/")["Uploads"]
    assert [upload["Key"].rsplit("/", 1)[1] for upload in pending] == ["a.tar"]
    store.writer("job2", first.state()).commit()  # then died before the job was recorded as done

    def no_such_upload(**kwargs: object) -> None:  # what MinIO answers for an upload completed already
        raise ClientError({"Error": {"Code": "NoSuchUpload", "Message": "gone"}}, "CompleteMultipartUpload")

    monkeypatch.setattr(store.client, "complete_multipart_upload", no_such_upload)
    store.writer("job2", first.state()).commit()  # the worker taking it over completes it again
    assert store.files("job2") == [("a.tar", 10)]
    store.delete("job2")


async def test_results_in_s3_are_the_same_bytes_and_downloadable(models_dir: Path, tmp_path: Path,
                                                                 s3_settings: dict[str, str]) -> None:
    async with serve(models_dir, data_dir=tmp_path / "local") as client:
        local = await wait_for_job(client, (await client.post("/v1/jobs", json=JOB)).json()["id"])
        expected = {f["name"]: hashlib.sha256((await client.get(f["url"])).content).hexdigest() for f in local["files"]}
    async with serve(models_dir, data_dir=tmp_path / "s3", **_settings(s3_settings)) as client:
        job = await wait_for_job(client, (await client.post("/v1/jobs", json=JOB)).json()["id"])
        assert job["state"] == "succeeded", job
        got = {f["name"]: hashlib.sha256((await client.get(f["url"])).content).hexdigest() for f in job["files"]}
        assert got == expected and len(got) == 4  # three shards and the manifest
        shard = job["files"][0]
        whole = (await client.get(shard["url"])).content
        part = await client.get(shard["url"], headers={"Range": "bytes=100-"})
        assert part.status_code == 206 and part.content == whole[100:]
        assert (await client.delete(f"/v1/jobs/{job['id']}")).status_code == 204
    bucket, prefix = s3_settings["SYNTHGEN_RESULTS_URL"][5:].split("/", 1)
    listing = boto3.client("s3", endpoint_url=s3_settings["SYNTHGEN_S3_ENDPOINT_URL"]).list_objects_v2(
        Bucket=bucket, Prefix=f"{prefix}/{job['id']}")
    assert listing.get("KeyCount", 0) == 0  # deleting the job deleted its objects


async def test_downloads_may_redirect_to_a_presigned_url(models_dir: Path, s3_settings: dict[str, str]) -> None:
    async with serve(models_dir, results_redirect=True, **_settings(s3_settings)) as client:
        job = await wait_for_job(client, (await client.post("/v1/jobs", json={**JOB, "format": "zip"})).json()["id"])
        answer = await client.get(job["result_url"])
        assert answer.status_code == 307 and "Signature" in answer.headers["location"]
        archive = httpx.get(answer.headers["location"])
        assert archive.status_code == 200 and archive.content[:2] == b"PK"
        assert len(archive.content) == job["result_bytes"]


async def test_models_are_read_from_the_store_and_verified(tiny_gan: Path, tmp_path: Path,
                                                          s3_settings: dict[str, str]) -> None:
    bucket = s3_settings["SYNTHGEN_RESULTS_URL"][5:].split("/", 1)[0]
    s3 = boto3.client("s3", endpoint_url=s3_settings["SYNTHGEN_S3_ENDPOINT_URL"])
    for name in ("digits-gan", "tampered-gan"):
        for file in tiny_gan.rglob("*"):
            if file.is_file():
                s3.upload_file(str(file), bucket, f"models/{name}/{file.relative_to(tiny_gan)}")
    weights = (tiny_gan / "generator.safetensors").read_bytes()
    s3.put_object(Bucket=bucket, Key="models/tampered-gan/generator.safetensors", Body=weights[:-8] + b"\0" * 8)
    s3.put_object(Bucket=bucket, Key="models/../escape/config.json", Body=b"{}")  # not <model>/<file>: skipped
    empty = tmp_path / "no-local-models"
    empty.mkdir()
    trained = tmp_path / "data" / "models" / "mine" / "1"  # a model trained through the API: kept across starts
    shutil.copytree(tiny_gan, trained)
    async with serve(empty, data_dir=tmp_path / "data", models_url=f"s3://{bucket}/models",
                     s3_endpoint_url=s3_settings["SYNTHGEN_S3_ENDPOINT_URL"]) as client:
        models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert models["digits-gan"]["status"] == "ready"
        assert models["tampered-gan"]["status"] == "failed" and "sha256" in models["tampered-gan"]["error"]
        assert (await client.post("/v1/models/digits-gan/generate", json={"n": 2})).status_code == 200
    assert not (tmp_path / "escape").exists()
    assert sorted(p.name for p in (tmp_path / "data" / "store-models").iterdir()) == ["digits-gan", "tampered-gan"]
    assert (trained / "config.json").is_file()
