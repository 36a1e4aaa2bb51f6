"""Request and response schemas, named by family: `*Request` in, `*Public` out."""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from app.core.sampling import MAX_SEED
from app.engine.filters import FilterSpec
from app.engine.repository import MODEL_REF
from app.engine.states import JobState, ModelStatus


def _decimal(value: object) -> object:
    if isinstance(value, str) and not re.fullmatch(r"0|[1-9][0-9]{0,18}", value):
        raise ValueError("must be a plain decimal integer such as 7 (no sign, spaces, leading zeros or fractions)")
    return value


def _number(value: object) -> object:
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError("must be a number") from None
        if not math.isfinite(number):
            raise ValueError("must be a finite number")
        return number
    return value


def _boolean(value: object) -> object:
    if isinstance(value, str):
        if value not in ("true", "false"):
            raise ValueError("must be true or false")
        return value == "true"
    return value


# Multipart form fields arrive as text: parsed as strictly as JSON numbers and booleans.
FormInt = Annotated[int, BeforeValidator(_decimal)]
FormBool = Annotated[bool, BeforeValidator(_boolean)]
FormFloat = Annotated[float, BeforeValidator(_number)]
OutputFormat = Literal["json", "npz", "png"]
ArchiveFormat = Literal["zip", "tar", "parquet", "npz"]


class _Strict(BaseModel):
    # strict: `true` is not 1, "1" is not a number; unknown fields are refused
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Filters(_Strict):
    min_confidence: float | None = Field(None, gt=0, le=1, description="keep a sample only if the model's "
                                         "evaluator gives its label at least this probability (rejection sampling)")
    max_similarity: bool = Field(False, description="drop samples closer to a training image than the model's "
                                 "memorisation threshold")

    def filters(self) -> FilterSpec:
        return FilterSpec(self.min_confidence, self.max_similarity)


class GenerateRequest(_Filters):
    """What to generate. Omit `label` for classes drawn uniformly; omit `seed` for a random one (returned)."""

    n: int = Field(16, ge=1, description="number of samples (at most the server's max_samples_per_request)")
    label: str | int | None = Field(None, description="class name or index; omitted → drawn uniformly per sample")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="omitted → a random seed, returned")
    truncation: float = Field(1.0, gt=0, le=4, description="latent scale (GAN truncation ψ, VAE prior "
                              "temperature) times the model's latent_scale: 1 is the spread its card was measured at")
    format: OutputFormat = Field("json", description="json (PNG base64 per sample), npz, or png (one grid)")


class InterpolateRequest(_Strict):
    """Decode `steps` latents on the straight line from (seed_a, label_a) to (seed_b, label_b)."""

    seed_a: int = Field(0, ge=0, le=MAX_SEED)
    seed_b: int = Field(1, ge=0, le=MAX_SEED)
    label_a: str | int | None = Field(None, description="class at the start; omitted → drawn from seed_a")
    label_b: str | int | None = Field(None, description="class at the end; omitted → label_a")
    steps: int = Field(8, ge=2, le=256)
    format: OutputFormat = "png"


class DatasetRequest(_Filters):
    """A dataset export: `per_class` (one count for every class, or counts by class name) or `n` samples."""

    per_class: Annotated[int, Field(ge=1)] | dict[str, Annotated[int, Field(ge=0)]] | None = Field(
        None, description="samples of every class, or {class_name: count}")
    n: int | None = Field(None, ge=1, description="samples in all (with `label`: all of that class)")
    label: str | int | None = Field(None, description="with n: the class of every sample; omitted → drawn")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="omitted → a random seed (see X-Seed)")
    truncation: float = Field(1.0, gt=0, le=4, description="latent scale (GAN truncation ψ, VAE prior "
                              "temperature) times the model's latent_scale: 1 is the spread its card was measured at")
    format: ArchiveFormat = Field("zip", description="zip (ImageFolder with metadata.parquet and a dataset card for "
                                  "Hugging Face datasets), tar (WebDataset), parquet (the Hub's format) or npz "
                                  "(size-limited)")


class JobRequest(DatasetRequest):
    """A dataset export run in the background: the same fields as a streamed export, plus the model, the shard size
    of a tar result and a URL to call when the job ends."""

    model: str = Field(description="model name", examples=["mnist-cgan"], pattern=MODEL_REF.pattern)
    shard_size: int = Field(10_000, ge=1, le=1_000_000, description="with format tar: samples per WebDataset shard "
                            "(at most 10,000 shards a job)")
    callback_url: str | None = Field(None, max_length=2048, description="an http(s) URL the server POSTs the job to "
                                     "when it succeeds or fails, signed with your webhook secret (see GET "
                                     "/v1/webhooks/secret)", examples=["https://example.com/hooks/synthgen"])


class JobFilePublic(BaseModel):
    name: str
    bytes: int
    media_type: str
    url: str = Field(description="where to download it (supports Range)")


class JobPublic(BaseModel):
    id: str
    model: str
    state: JobState
    done: int = Field(description="samples generated so far")
    total: int
    eta_s: float | None = Field(None, description="estimated seconds left while running")
    error: str | None = None
    format: ArchiveFormat
    created_at: datetime = Field(description="ISO 8601, UTC")
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result_bytes: int | None = None
    result_url: str | None = Field(None, description="where to download the archive once succeeded (a tar result "
                                   "is several shards: see `files`)")
    files: list[JobFilePublic] = Field(default_factory=list, description="the result's files once succeeded: the "
                                       "archive, or the WebDataset shards and their manifest.json")
    request: dict[str, Any]


class JobsPublic(BaseModel):
    jobs: list[JobPublic]


class TrainingPublic(BaseModel):
    """A training job: its settings, where it is, and (once done) the model it made."""

    id: str
    name: str = Field(description="the model it trains; each training adds a version")
    state: JobState
    stage: str = Field(description="queued, training, tuning (with tune=true), evaluating, checked (the quality "
                       "gates), done")
    arch: str | None = Field(None, description="the architecture in work (`auto` trains gan, then vae)")
    epoch: int = Field(0, description="epochs done of the architecture in work")
    epochs: int = Field(0, description="epochs it trains")
    step: int = Field(0, description="steps done in the epoch in work")
    steps_per_epoch: int | None = None
    epochs_done: int = Field(description="epochs done over all architectures")
    epochs_total: int
    losses: dict[str, float] = Field(default_factory=dict, description="the latest losses")
    eta_s: float | None = Field(None, description="seconds of training left, of every architecture (evaluation adds "
                                "a little)")
    elapsed_s: float | None = None
    warnings: list[str] = Field(default_factory=list, description="what to read before trusting the result")
    dataset_id: str = Field(description="send it as `dataset_id` to train again on the same images without uploading")
    dataset: dict[str, Any] = Field(default_factory=dict, description="images, classes, shape and images per class")
    val_dataset_id: str | None = Field(default=None, description="the validation set's id, when one was given "
                                       "apart from the dataset (send it as `val_dataset_id` to validate on it again)")
    val_dataset: dict[str, Any] | None = Field(default=None, description="the validation set: images and images per "
                                               "class (none: a random `val_fraction` of the dataset validates)")
    recipes: dict[str, Any] = Field(default_factory=dict, description="per architecture: the settings it trains with "
                                    "and why")
    gates: dict[str, float | None] = Field(default_factory=dict)
    candidates: dict[str, Any] = Field(default_factory=dict, description="per architecture: the card's figures on "
                                       "the validation split (TSTR and real-data accuracy, precision, recall, "
                                       "coverage)")
    chosen: str | None = Field(None, description="the architecture kept (best validation TSTR)")
    gate_failures: list[str] = Field(default_factory=list)
    model: str | None = Field(None, description="name@version once promoted: use it (or just the name, for the "
                              "newest version) in any model route")
    error: str | None = None
    samples_url: str = Field(description="the latest sample grid (PNG, a row per class)")
    card_url: str = Field(description="the candidate's or the promoted model's card")
    tensorboard_logdir: str = Field(description="its TensorBoard event files, relative to the server's data "
                                    "directory (`tensorboard --logdir <data dir>` shows every training)")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class TrainingsPublic(BaseModel):
    trainings: list[TrainingPublic]


class WebhookSecretPublic(BaseModel):
    secret: str = Field(description="HMAC-SHA256 key of your jobs' webhook signatures")
    signature_header: str = "X-Synthgen-Signature"
    events: list[str] = ["job.succeeded", "job.failed", "training.succeeded", "training.failed"]


class AugmentationsRequest(_Strict):
    """Classical augmentations; each value is the op's strength and 0 turns it off."""

    flip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip")
    rotation: float = Field(0.0, ge=0, le=180, description="degrees, drawn from [-rotation, rotation]")
    translate: float = Field(0.0, ge=0, le=0.5, description="fraction of the size, per axis")
    scale: float = Field(0.0, ge=0, le=0.9, description="relative, drawn from [1 - scale, 1 + scale]")
    brightness: float = Field(0.0, ge=0, le=1, description="relative change")
    contrast: float = Field(0.0, ge=0, le=1, description="relative change")
    noise: float = Field(0.0, ge=0, le=1, description="gaussian noise std in units of the pixel range")


class SamplePublic(BaseModel):
    index: int
    label: int | None
    class_name: str | None
    png_base64: str


class SamplesPublic(BaseModel):
    model: str
    seed: int | None = None
    samples: list[SamplePublic]
    rejected: dict[str, int] | None = Field(None, description="candidates each filter rejected (with filters)")


class ModelPublic(BaseModel):
    name: str
    version: int | None = Field(None, description="this version of a versioned model (trained through the API); "
                                "`name@version` pins it in any request")
    versions: list[int] = Field(default_factory=list, description="every version of a versioned model; `name` "
                                "alone means the newest")
    kind: Literal["gan", "vae"] | None
    status: ModelStatus
    error: str | None = None
    height: int | None = None
    width: int | None = None
    channels: int | None = None
    class_names: list[str] = []
    device: str | None = None
    dtype: str | None = None
    quality: dict[str, Any] = Field(default_factory=dict, description="the metrics of the model's card.json")


class ModelsPublic(BaseModel):
    models: list[ModelPublic]


class ModelDetailPublic(ModelPublic):
    config: dict[str, Any] = Field(default_factory=dict)
    card: dict[str, Any] = Field(default_factory=dict)


class ErrorPublic(BaseModel):
    """Every error answer: what went wrong and how to fix it."""

    detail: str
    request_id: str | None = None


class LivePublic(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyPublic(BaseModel):
    ready: bool
    models: dict[str, ModelStatus]
    problems: list[str] = []
