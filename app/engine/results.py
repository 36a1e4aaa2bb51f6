"""Where job results live: a folder per job under the data directory (the default), or an S3-compatible object store
(`SYNTHGEN_RESULTS_URL=s3://bucket/prefix`).

Either way nothing appears under a result's final name until the whole result is complete: locally the files are
written into a folder of the attempt's own, `<job>.part/<attempt>/`, and that folder renamed; in S3 every file is a
multipart upload completed only when the job commits. A writer's `state()` (the files written so far, and in S3
their pending uploads) goes into the job's checkpoint, so a worker taking the job over resumes from them."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

from app.errors import InvalidInputError, NotFoundError
from app.settings import Settings

PART_BYTES = 8 * 1024 * 1024  # S3 parts (at least 5 MiB but the last)


def _missing(job_id: str, name: str) -> NotFoundError:
    return NotFoundError(f"job {job_id} has no file {name!r} (it was deleted or expired, or never existed); its files "
                         "are listed in the job's `files`")


class ResultWriter(Protocol):
    def open(self, name: str) -> None: ...
    def write(self, data: bytes) -> None: ...
    def close_file(self) -> int: ...
    def state(self) -> dict[str, Any]: ...
    def commit(self) -> None: ...
    def uncommit(self) -> None: ...
    def abort(self) -> None: ...


class LocalResults:
    """Results as files under `root/<job id>/`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def writer(self, job_id: str, resume: dict[str, Any] | None = None, attempt: int = 0) -> LocalWriter:
        return LocalWriter(self.root / f"{job_id}.part", attempt, self.root / job_id, resume)

    def files(self, job_id: str) -> list[tuple[str, int]]:
        try:
            return [(entry.name, entry.stat().st_size) for entry in os.scandir(self.root / job_id)]
        except FileNotFoundError:
            return []

    def open(self, job_id: str, name: str) -> tuple[IO[bytes], int]:
        try:
            handle = (self.root / job_id / name).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise _missing(job_id, name) from None
        return handle, os.fstat(handle.fileno()).st_size

    def url(self, job_id: str, name: str) -> str | None:
        return None

    def delete(self, job_id: str) -> None:
        for folder in (self.root / job_id, self.root / f"{job_id}.part"):
            shutil.rmtree(folder, ignore_errors=True)


class LocalWriter:
    """Writes into a folder of its own, `<job>.part/<attempt>/`, so that a worker whose job was taken over (it
    stalled past its lease) never writes into the new owner's files. A worker taking a job over starts from the
    checkpointed files an earlier attempt left: in its folder, or in the result folder if it died between committing
    and recording the job; the other attempts' folders are removed."""

    def __init__(self, parts: Path, attempt: int, final: Path, resume: dict[str, Any] | None) -> None:
        self.parts, self.part, self.final = parts, parts / str(attempt), final
        self.files: dict[str, int] = dict((resume or {}).get("files", {}))
        parts.mkdir(parents=True, exist_ok=True)
        self._set_aside()
        shutil.rmtree(self.part, ignore_errors=True)
        self.part.mkdir()
        folders = [parts, *(entry for entry in parts.iterdir() if entry.is_dir() and entry != self.part)]
        for name, size in self.files.items():
            found = next((folder / name for folder in folders
                          if (folder / name).is_file() and (folder / name).stat().st_size == size), None)
            if found is None:
                raise FileNotFoundError(f"checkpointed file {name!r} is gone")
            try:
                os.link(found, self.part / name)
            except OSError:  # a file system without hard links
                shutil.copyfile(found, self.part / name)
        for entry in folders[1:]:
            shutil.rmtree(entry, ignore_errors=True)
        self._handle: IO[bytes] | None = None
        self._name = ""

    def _set_aside(self) -> None:
        """A result folder an earlier attempt committed but never recorded goes among the attempts' folders."""
        if self.final.exists():
            shutil.rmtree(self.parts / "committed", ignore_errors=True)
            self.final.replace(self.parts / "committed")

    def open(self, name: str) -> None:
        self._handle, self._name = (self.part / name).open("wb"), name

    def write(self, data: bytes) -> None:
        self._handle.write(data)  # type: ignore[union-attr]

    def close_file(self) -> int:
        handle, self._handle = self._handle, None
        handle.flush()  # type: ignore[union-attr]
        os.fsync(handle.fileno())  # type: ignore[union-attr]
        handle.close()  # type: ignore[union-attr]
        self.files[self._name] = os.stat(self.part / self._name).st_size
        return self.files[self._name]

    def state(self) -> dict[str, Any]:
        return {"files": dict(self.files)}

    def commit(self) -> None:
        self._set_aside()
        self.part.replace(self.final)
        shutil.rmtree(self.parts / "committed", ignore_errors=True)
        with contextlib.suppress(OSError):  # empty unless another attempt writes there now: then it stays
            self.parts.rmdir()

    def uncommit(self) -> None:
        """Back to the part folder (the job could not be recorded as done)."""
        self.parts.mkdir(exist_ok=True)
        self.final.replace(self.part)

    def abort(self) -> None:
        """Remove this attempt's files (only: another worker may have taken the job over)."""
        if self._handle is not None:
            self._handle.close()
        shutil.rmtree(self.part, ignore_errors=True)
        with contextlib.suppress(OSError):  # the job's part folder too, unless another attempt writes there
            self.parts.rmdir()


class S3Results:
    """Results as objects `<prefix>/<job id>/<name>` in an S3-compatible store."""

    def __init__(self, url: str, client: Any, redirect: bool = False, presign_s: int = 900) -> None:
        self.bucket, self.prefix = split_s3_url(url)
        self.client, self.redirect, self.presign_s = client, redirect, presign_s

    def key(self, job_id: str, name: str = "") -> str:
        return "/".join(filter(None, (self.prefix, job_id, name)))

    def writer(self, job_id: str, resume: dict[str, Any] | None = None, attempt: int = 0) -> S3Writer:
        return S3Writer(self, job_id, resume)

    def files(self, job_id: str) -> list[tuple[str, int]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.key(job_id) + "/")
        return [(item["Key"].rsplit("/", 1)[1], item["Size"]) for page in pages for item in page.get("Contents", [])]

    def open(self, job_id: str, name: str) -> tuple[IO[bytes], int]:
        try:
            size = self.client.head_object(Bucket=self.bucket, Key=self.key(job_id, name))["ContentLength"]
        except self.client.exceptions.ClientError:
            raise _missing(job_id, name) from None
        return S3Reader(self, self.key(job_id, name)), size  # type: ignore[return-value]

    def url(self, job_id: str, name: str) -> str | None:
        """A presigned download URL when downloads redirect to the store."""
        if not self.redirect:
            return None
        return self.client.generate_presigned_url("get_object", ExpiresIn=self.presign_s,
                                                  Params={"Bucket": self.bucket, "Key": self.key(job_id, name)})

    def delete(self, job_id: str) -> None:
        keys = [{"Key": self.key(job_id, name)} for name, _ in self.files(job_id)]
        if keys:
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.key(job_id) + "/")
        for upload in uploads.get("Uploads", []):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])


class S3Writer:
    """One multipart upload per file, completed together at `commit`."""

    def __init__(self, store: S3Results, job_id: str, resume: dict[str, Any] | None) -> None:
        self.store, self.job_id = store, job_id
        resume = resume or {}
        self.files: dict[str, int] = dict(resume.get("files", {}))
        self.uploads: dict[str, dict[str, Any]] = {name: upload for name, upload in resume.get("uploads", {}).items()
                                                   if name in self.files}
        self._resumed = set(self.uploads)
        client, bucket = store.client, store.bucket
        pending = client.list_multipart_uploads(Bucket=bucket, Prefix=store.key(job_id) + "/").get("Uploads", [])
        kept = {upload["upload_id"] for upload in self.uploads.values()}
        for upload in pending:  # a file the crashed worker had not finished
            if upload["UploadId"] not in kept:
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        self._name, self._buffer, self._size = "", io.BytesIO(), 0

    def open(self, name: str) -> None:
        upload = self.store.client.create_multipart_upload(Bucket=self.store.bucket, Key=self.store.key(self.job_id,
                                                                                                        name))
        self.uploads[name] = {"upload_id": upload["UploadId"], "parts": []}
        self._name, self._buffer, self._size = name, io.BytesIO(), 0

    def write(self, data: bytes) -> None:
        self._buffer.write(data)
        self._size += len(data)
        if self._buffer.tell() >= PART_BYTES:
            self._upload_part()

    def _upload_part(self) -> None:
        upload = self.uploads[self._name]
        number = len(upload["parts"]) + 1
        answer = self.store.client.upload_part(Bucket=self.store.bucket, Key=self.store.key(self.job_id, self._name),
                                               UploadId=upload["upload_id"], PartNumber=number,
                                               Body=self._buffer.getvalue())
        upload["parts"].append([number, answer["ETag"]])
        self._buffer = io.BytesIO()

    def close_file(self) -> int:
        if self._buffer.tell() or not self.uploads[self._name]["parts"]:
            self._upload_part()
        self.files[self._name] = self._size
        return self._size

    def state(self) -> dict[str, Any]:
        return {"files": dict(self.files), "uploads": {name: self.uploads[name] for name in self.files}}

    def commit(self) -> None:
        client, bucket = self.store.client, self.store.bucket
        for name in self.files:
            upload, key = self.uploads[name], self.store.key(self.job_id, name)
            parts = [{"PartNumber": number, "ETag": etag} for number, etag in upload["parts"]]
            try:
                client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["upload_id"],
                                                 MultipartUpload={"Parts": parts})
            except client.exceptions.ClientError as exc:  # completed by an attempt that died before recording the job
                code = exc.response.get("Error", {}).get("Code")
                if code != "NoSuchUpload" or self._size_of(key) != self.files[name]:
                    raise

    def _size_of(self, key: str) -> int | None:
        try:
            return self.store.client.head_object(Bucket=self.store.bucket, Key=key)["ContentLength"]
        except self.store.client.exceptions.ClientError:
            return None

    def uncommit(self) -> None:
        """The job could not be recorded as done: its objects stay for the worker that takes it over to replace."""

    def abort(self) -> None:
        """Abort the uploads this writer began (only: the checkpointed ones are a worker's taking the job over)."""
        for name, upload in self.uploads.items():
            if name not in self._resumed:
                with contextlib.suppress(self.store.client.exceptions.ClientError):
                    self.store.client.abort_multipart_upload(Bucket=self.store.bucket,
                                                             Key=self.store.key(self.job_id, name),
                                                             UploadId=upload["upload_id"])


class S3Reader(io.RawIOBase):
    """A read-only stream over an object: `seek` then `read`, one ranged GET per position."""

    def __init__(self, store: S3Results, key: str) -> None:
        self.store, self.key, self._position, self._body = store, key, 0, None

    def seek(self, offset: int, whence: int = 0) -> int:
        self._position, self._body = offset, None
        return offset

    def read(self, size: int = -1) -> bytes:
        if self._body is None:
            answer = self.store.client.get_object(Bucket=self.store.bucket, Key=self.key,
                                                  Range=f"bytes={self._position}-")
            self._body = answer["Body"]
        data = self._body.read(size if size >= 0 else None)
        self._position += len(data)
        return data

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
        super().close()


def split_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/prefix → (bucket, prefix)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise InvalidInputError(f"{url!r} must look like s3://bucket/prefix")
    return parts.netloc, parts.path.strip("/")


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for the configured endpoint and credentials (unset: boto3's own lookup)."""
    import boto3

    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
                        aws_access_key_id=settings.s3_access_key_id, aws_secret_access_key=secret)


def result_storage(settings: Settings, data_dir: Path) -> LocalResults | S3Results:
    """The storage the settings name: S3 with SYNTHGEN_RESULTS_URL, else the data directory."""
    if not settings.results_url:
        return LocalResults(data_dir / "results")
    return S3Results(settings.results_url, s3_client(settings), settings.results_redirect,
                     settings.results_presign_s)
