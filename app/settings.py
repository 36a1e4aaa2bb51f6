"""Server settings from `SYNTHGEN_*` environment variables, validated at start."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_DATABASE_URL = re.compile(r"^(sqlite|postgresql)(\+\w+)?://")


class Settings(BaseSettings):
    """Every setting has a safe default; e.g. `SYNTHGEN_MAX_BATCH_SIZE=512`."""

    model_config = SettingsConfigDict(env_prefix="SYNTHGEN_", extra="ignore")

    models_dir: Path = Field(Path("models"), description="the model repository: one folder per model")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="compute dtype on CUDA")
    max_batch_size: int = Field(256, ge=1, le=65_536, description="samples per forward pass")
    max_batch_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long a batch may wait to fill")
    max_queued_samples: int = Field(100_000, ge=1, description="per model; beyond it requests get 503")
    request_timeout_s: float = Field(120.0, gt=0, le=3600, description="a request waiting longer gets 504")
    max_samples_per_request: int = Field(10_000, ge=1, le=1_000_000)
    max_dataset_samples: int = Field(1_000_000, ge=1, description="most samples in one streamed export")
    max_npz_samples: int = Field(100_000, ge=1, description="most samples in an npz export (built in memory)")
    data_dir: Path = Field(Path("data"), description="jobs database and results")
    job_ttl_s: float = Field(24 * 3600, gt=0, description="finished job results are deleted after this")
    jobs_quota_bytes: int = Field(2 * 1024**3, ge=1024, description="disk space for job results")
    max_concurrent_jobs: int = Field(1, ge=1, le=64)
    filter_max_rounds: int = Field(20, ge=1, le=1000, description="candidates tried per sample by the filters")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="largest request body (JSON)")
    max_upload_bytes: int = Field(16 * 1_048_576, ge=1024, description="largest multipart upload")
    max_image_pixels: int = Field(4096 * 4096, ge=64, description="largest uploaded image, in pixels")
    max_upload_files: int = Field(256, ge=1, description="most images in one multipart upload")
    max_archive_files: int = Field(20_000, ge=1, description="most members in an uploaded zip")
    max_decompressed_bytes: int = Field(128 * 1_048_576, ge=1024, description="most bytes an uploaded zip may "
                                        "decompress to (counted while reading)")
    max_member_bytes: int = Field(16 * 1_048_576, ge=1024, description="most bytes one member of an uploaded zip "
                                  "may decompress to")
    max_augment_outputs: int = Field(200_000, ge=1, description="most images one /v1/augment answer may hold")
    rate_limit_per_s: float = Field(0.0, ge=0, description="requests a second per API key (per client address "
                                    "without keys) on /v1; 0 = no limit")
    rate_limit_burst: int = Field(100, ge=1, description="requests allowed at once before the rate applies")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated keys with the "
                                                     "user role; with neither these nor admin keys the API is open")
    admin_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated keys "
                                                           "with the admin role (load, unload and reload models)")
    auth_failures_per_s: float = Field(0.2, gt=0, description="failed authentications a second per client address "
                                       "(beyond the burst of 10): more get 429")
    max_queued_jobs: int = Field(64, ge=1, description="jobs queued or running on the shared store; more get 429")
    max_queued_jobs_per_key: int = Field(8, ge=1, description="jobs one API key may have queued or running")
    max_running_jobs_per_key: int = Field(1, ge=1, description="jobs of one API key that run at once")
    jobs_quota_bytes_per_key: int = Field(512 * 1024**2, ge=1024, description="result bytes (kept and reserved) "
                                          "one API key may hold")
    cpu_workers: int = Field(default_factory=lambda: min(len(os.sched_getaffinity(0)), 64), ge=1, le=64,
                             description="threads that decode uploads and encode archives (an export's PNGs are "
                             "encoded on all of them at once); bounds their memory and CPU")
    png_processes: int | None = Field(None, ge=0, le=256, description="processes that encode the PNGs of exports "
                                      "and augmented zips; 0: the cpu_workers threads (Pillow holds the GIL for a "
                                      "quarter of the work, so threads stop scaling at about four cores); default: "
                                      "cpu_workers on a GPU, which generates faster than threads encode, else 0")
    max_concurrent_uploads: int = Field(4, ge=1, description="upload requests (augment, reconstruct, inpaint, "
                                        "trainings) in work at once; more wait, then get 503")
    max_uploads_per_client: int = Field(2, ge=1, description="upload requests one API key (or address) may have in "
                                        "work at once; more get 429")
    header_timeout_s: float = Field(10.0, gt=0, le=600, description="a connection must send its request headers "
                                    "within this")
    body_timeout_s: float = Field(60.0, gt=0, le=3600, description="a request must send its whole body within this "
                                  "(408 after)")
    max_connections: int = Field(1000, ge=8, description="open connections; beyond it an idle one is closed, "
                                 "never-served ones first")
    shutdown_timeout_s: float = Field(20.0, ge=0, le=3600, description="graceful stop: running exports and jobs "
                                      "are cut and failed after this")
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated "
                                                                "proxy addresses whose X-Forwarded-For is trusted")
    replica_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=100,
                            description="names this server's job worker in the jobs store (with its process id)")
    database_url: str | None = Field(None, description="the jobs database: postgresql://user:password@host/db for "
                                     "several processes; unset: SQLite in the data directory")
    models_url: str | None = Field(None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
                                   description="s3://bucket/prefix holding one folder per model: downloaded into "
                                   "the data directory at start and served instead of models_dir")
    results_url: str | None = Field(None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
                                    description="s3://bucket/prefix: job results in an S3-compatible store; unset: "
                                    "the data directory")
    s3_endpoint_url: str | None = Field(None, description="the S3-compatible endpoint (unset: AWS)")
    s3_region: str | None = Field(None, description="the bucket's region")
    s3_access_key_id: str | None = Field(None, description="unset: the standard AWS variables and files")
    s3_secret_access_key: SecretStr | None = None
    results_redirect: bool = Field(False, description="downloads answer 307 to a presigned URL of the store instead "
                                   "of being streamed through the server")
    results_presign_s: int = Field(900, ge=60, le=7 * 24 * 3600, description="lifetime of a presigned URL")
    job_lease_s: float = Field(30.0, ge=1, le=3600, description="a worker renews its jobs' leases every third of "
                               "this; a job whose lease ran out (its worker died) is resumed by another")
    run_jobs: bool = Field(True, description="run jobs in this server process too (false: a separate "
                           "`synthgen worker` runs them)")
    webhook_secret: SecretStr | None = Field(None, description="master secret of job webhook signatures (each API "
                                             "key gets its own, derived from it); unset: a random one kept in "
                                             "data_dir/webhook.key")
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated "
                                                                "hosts, addresses or networks (10.0.0.0/8) that "
                                                                "callback URLs may reach although not public")
    webhook_max_attempts: int = Field(5, ge=1, le=20, description="tries of one webhook delivery")
    webhook_backoff_s: float = Field(2.0, gt=0, le=600, description="wait before the first retry; doubles each time")
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="one delivery attempt's timeout")
    ray_address: str | None = Field(None, description="a Ray cluster (host:port, or auto): tar jobs with a shard_size "
                                    "and no filters are generated there, sharded over its actors (Ray Data); needs "
                                    "results in the data directory that the cluster's nodes share")
    ray_actors: int = Field(2, ge=1, le=4096, description="model replicas a Ray job runs on")
    ray_gpus_per_actor: float = Field(0.0, ge=0, le=8, description="GPUs each Ray actor takes (0: CPU)")
    ray_cpus_per_actor: float = Field(1.0, ge=0, le=256, description="CPUs each Ray actor takes (the others encode)")
    max_trainings_per_key: int = Field(1, ge=1, description="trainings one API key may have queued or running")
    max_concurrent_trainings: int = Field(1, ge=1, le=16, description="trainings one worker runs at once")
    max_training_images: int = Field(60_000, ge=10, description="most images in one training upload")
    max_training_pixels: int = Field(128 * 128, ge=64, description="largest image of a training upload, in pixels")
    max_training_decoded_bytes: int = Field(512 * 1_048_576, ge=1024, description="most bytes a training upload's "
                                            "images may decode to (width × height × channels, summed from their "
                                            "headers before decoding)")
    datasets_quota_bytes_per_key: int = Field(2 * 1024**3, ge=1024, description="bytes of training datasets one "
                                              "API key may keep stored (decoded; kept while a training uses them, "
                                              "then for SYNTHGEN_JOB_TTL_S)")
    min_images_per_class: int = Field(10, ge=1, description="fewer images in a class refuse the training upload")
    max_training_epochs: int = Field(1000, ge=1, description="most epochs a training may ask for")
    training_threads: int = Field(1, ge=1, le=256, description="CPU threads of a training process (the rest stay "
                                  "with interactive generation)")
    training_gpu_memory_fraction: float = Field(0.5, gt=0, le=1, description="share of the GPU's memory a training "
                                                "process may take")
    training_nice: int = Field(10, ge=0, le=19, description="scheduling priority of training processes below the "
                               "server's (0: the same)")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is not None and not _DATABASE_URL.match(value):  # the value may hold a password: show its scheme
            raise ValueError("SYNTHGEN_DATABASE_URL must be sqlite:///PATH or postgresql://user:password@host/db "
                             f"(a +driver may follow the scheme), not a URL starting {value.split(':', 1)[0]!r}")
        return value

    @field_validator("api_keys", "admin_api_keys", "cors_origins", "forwarded_allow_ips", "webhook_allow_hosts",
                     mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        if any(len(key) < 16 for key in value):
            raise ValueError("each API key must be at least 16 characters long")
        return value

    @field_validator("webhook_allow_hosts")
    @classmethod
    def _allow_hosts(cls, value: list[str]) -> list[str]:
        for entry in value:  # a network with a typo would otherwise be read as a host name and allow nothing
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"{entry!r} is not a network such as 10.0.0.0/8") from None
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        # uvicorn reads an entry that is not "*", an address or a network as a host name: a typo would trust no proxy
        for entry in (entry for entry in value if entry != "*"):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an address, a network such as 172.16.0.0/12, or *") from None
        return value

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        if self.max_queued_samples < self.max_samples_per_request:  # such a request would get 503 forever
            raise ValueError(f"SYNTHGEN_MAX_QUEUED_SAMPLES ({self.max_queued_samples}) must be at least "
                             f"SYNTHGEN_MAX_SAMPLES_PER_REQUEST ({self.max_samples_per_request})")
        return self

    @property
    def open_access(self) -> bool:
        """No API keys configured: every caller may do everything (the local default)."""
        return not self.api_keys and not self.admin_api_keys
