"""Augmenting an uploaded dataset: classical image augmentations plus conditional samples that fill every class
up to a target count. Uploads are read with `app.core.safezip` (bounded, no file written) and streamed back
as an ImageFolder zip whose labels.csv has a `source` column (original, augmented, synthetic)."""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import math
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageEnhance

from app.core.images import decode_to_shape
from app.core.model import CLASS_NAME, SyntheticModel
from app.core.safezip import ZipLimits, read_zip
from app.engine.archives import ImageFolderZip
from app.engine.generation import sampler
from app.engine.plans import build_manifest, plan_samples
from app.engine.repository import ServedModel
from app.errors import DataError, InvalidInputError
from app.settings import Settings


@dataclass
class AugmentSpec:
    """Each op's strength; 0 turns it off. Every augmented copy draws its parameters from (seed, image, copy)."""

    flip: float = 0.0  # probability of a horizontal flip
    rotation: float = 0.0  # degrees, drawn from [-rotation, rotation]
    translate: float = 0.0  # fraction of the size, drawn per axis from [-translate, translate]
    scale: float = 0.0  # relative, drawn from [1 - scale, 1 + scale]
    brightness: float = 0.0  # relative, drawn from [1 - brightness, 1 + brightness]
    contrast: float = 0.0  # relative, drawn from [1 - contrast, 1 + contrast]
    noise: float = 0.0  # standard deviation of gaussian noise, in units of the pixel range


@dataclass(frozen=True)
class AugmentRequest:
    """What to make of an upload: augmented copies of each image, classes filled with samples up to a target."""

    spec: AugmentSpec
    copies_per_image: int = 0
    target_per_class: int = 0
    seed: int = 0
    include_originals: bool = True
    convert: bool = False


def augment_image(image: np.ndarray, rng: np.random.Generator, spec: AugmentSpec) -> np.ndarray:
    """One augmented copy of a uint8 `[H, W, C]` image."""
    height, width, channels = image.shape
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    if spec.flip and rng.random() < spec.flip:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = math.radians(rng.uniform(-spec.rotation, spec.rotation)) if spec.rotation else 0.0
    zoom = rng.uniform(1 - spec.scale, 1 + spec.scale) if spec.scale else 1.0
    dx, dy = (rng.uniform(-spec.translate, spec.translate, 2) * (width, height)) if spec.translate else (0.0, 0.0)
    if angle or zoom != 1.0 or dx or dy:
        # the inverse map (output pixel → input pixel) about the centre, as Image.transform wants
        cx, cy = width / 2, height / 2
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        a, b, d, e = cos, sin, -sin, cos
        c = cx - a * (cx + dx) - b * (cy + dy)
        f = cy - d * (cx + dx) - e * (cy + dy)
        pil = pil.transform((width, height), Image.Transform.AFFINE, (a, b, c, d, e, f),
                            resample=Image.Resampling.BILINEAR)
    if spec.brightness:
        pil = ImageEnhance.Brightness(pil).enhance(rng.uniform(1 - spec.brightness, 1 + spec.brightness))
    if spec.contrast:
        pil = ImageEnhance.Contrast(pil).enhance(rng.uniform(1 - spec.contrast, 1 + spec.contrast))
    out = np.asarray(pil, dtype=np.float32).reshape(height, width, channels)
    if spec.noise:
        out = out + rng.normal(0.0, spec.noise * 255.0, out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass
class Upload:
    """The uploaded images in the model's shape, with their class folder names."""

    images: np.ndarray
    classes: list[str]  # per image
    class_names: list[str] = field(default_factory=list)  # sorted, distinct

    def __post_init__(self) -> None:
        self.class_names = sorted(set(self.classes))


def _base(member: str) -> str:
    """'upload:folder/x.png' → 'x.png'."""
    return member.split(":", 1)[-1].rsplit("/", 1)[-1]


def _flat_labels(extras: dict[str, bytes], files: list[tuple[str, bytes]]) -> dict[str, str]:
    """file name → class name from a flat upload's labels.csv (columns file_name and class_name or label)."""
    if "labels.csv" not in extras:
        raise DataError("the upload has images at its top level but no labels.csv; use class folders "
                        "<class>/<image>.png or add labels.csv with file_name and class_name columns")
    mapping: dict[str, str] = {}
    rows: dict[str, int] = {}  # file name → the row that labelled it
    try:
        reader = csv.DictReader(io.StringIO(extras["labels.csv"].decode("utf-8")))
        header = reader.fieldnames or []
        column = "class_name" if "class_name" in header else "label"
        if "file_name" not in header or column not in header:
            raise DataError("labels.csv needs a header with file_name and class_name (or label) columns")
        for row in reader:
            file_name, class_name = row["file_name"], row[column]  # None when the row is short
            if not file_name or not class_name:
                raise DataError(f"labels.csv row {reader.line_num}: no {'file_name' if not file_name else column}; "
                                f"every row needs a file_name and a {column}")
            base = file_name.split("/")[-1]
            if mapping.get(base, class_name) != class_name:
                raise DataError(f"labels.csv rows {rows[base]} and {reader.line_num} give {base!r} two labels "
                                f"({mapping[base]!r} and {class_name!r}); keep one row per image")
            mapping[base], rows[base] = class_name, reader.line_num
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"labels.csv is not readable UTF-8 CSV ({exc})") from exc
    if not mapping:
        raise DataError(f"labels.csv has a header but no rows; add a row with each image's file_name and {column}")
    missing = [name for name, _ in files if _base(name) not in mapping]
    if missing:
        raise DataError(f"labels.csv does not label {len(missing)} image(s), e.g. {missing[0]!r}")
    stray = sorted(set(mapping) - {_base(name) for name, _ in files}, key=rows.__getitem__)
    if stray:
        raise DataError(f"labels.csv row {rows[stray[0]]} names {stray[0]!r}, which is not an image of the upload "
                        f"({len(stray)} such row(s)); remove those rows or add the images")
    return mapping


def zip_limits(settings: Settings) -> ZipLimits:
    return ZipLimits(max_bytes=settings.max_decompressed_bytes, max_files=settings.max_archive_files,
                     max_pixels=settings.max_image_pixels, max_member_bytes=settings.max_member_bytes)


def check_class_name(name: str) -> str:
    """Class names become folder names in the answer: letters, digits and ' _.+()-', at most 100 characters,
    starting with a letter or digit and not ending with a space or dot."""
    if not CLASS_NAME.fullmatch(name):
        raise DataError(f"class name {name!r} is not allowed: use 1-100 letters, digits, spaces and '_.+()-', "
                        "starting with a letter or digit and not ending with a space or '.'; no '/', '\\', ':' or "
                        "control characters")
    return name


def parse_upload(data: bytes, model: SyntheticModel, convert: bool, limits: ZipLimits) -> Upload:
    """A dataset zip (ImageFolder layout, or a flat folder + labels.csv) → images in the model's shape."""
    entries, extras = read_zip(io.BytesIO(data), limits, name="upload")
    flat = entries.pop("", [])
    if flat:
        mapping = _flat_labels(extras, flat)
        for name, payload in flat:
            entries.setdefault(mapping[_base(name)], []).append((name, payload))
    if not entries:
        raise DataError("the upload holds no images; expected <class>/<image>.png")
    for class_name in entries:
        check_class_name(class_name)
    empty = sorted(name for name, files in entries.items() if not files)
    if empty:
        raise DataError(f"class folder(s) {empty} hold no images")
    images, classes = [], []
    for class_name in sorted(entries):
        for name, payload in sorted(entries[class_name]):
            images.append(decode_to_shape(payload, name.split(":", 1)[-1], model.image_shape, model.name, convert,
                                          limits.max_pixels))
            classes.append(class_name)
    return Upload(np.stack(images), classes)


async def stream_augmented(served: ServedModel, upload: Upload, request: AugmentRequest, settings: Settings
                           ) -> AsyncIterator[bytes]:
    """Originals, augmented copies, then synthetic samples filling each known class up to the target. The samples are
    generated one chunk ahead: the first while the originals and copies are encoded, each next one while the last is."""
    model, seed, copies, chunk = served.model, request.seed, request.copies_per_image, settings.max_batch_size
    writer = ImageFolderZip(upload.class_names, seed, sources=True)
    labels = np.array([upload.class_names.index(c) for c in upload.classes], dtype=np.int64)
    have = {name: upload.classes.count(name) * (int(request.include_originals) + copies)
            for name in upload.class_names}
    missing = {name: max(0, request.target_per_class - have[name])
               for name in upload.class_names if name in model.class_names}
    plan = plan_samples(model, per_class=missing, seed=seed, max_samples=settings.max_augment_outputs,
                        scope="one augment answer (SYNTHGEN_MAX_AUGMENT_OUTPUTS)", allow_empty=True)
    # model label → the upload's label for the same class name
    to_upload = {label: upload.class_names.index(model.class_names[label]) for label, count in plan.runs if count}
    generate = sampler(served, seed, 1.0, settings.request_timeout_s, wait_when_full=True)

    def produce(start: int) -> asyncio.Future[tuple[np.ndarray, np.ndarray]]:
        stop = min(start + chunk, len(plan))
        return asyncio.ensure_future(generate(range(start, stop), plan.labels(start, stop)))

    async def add(images: np.ndarray, image_labels: np.ndarray, indices: range, source: str) -> bytes:
        pngs = await served.encode_pngs(images)
        return await served.on_cpu(functools.partial(writer.add, images, image_labels, indices, source, pngs=pngs))

    starts = list(range(0, len(plan), chunk))
    pending = produce(starts[0]) if starts else None
    try:
        if request.include_originals:
            yield await add(upload.images, labels, range(len(labels)), "original")
        if copies:
            def augmented() -> np.ndarray:
                return np.stack([augment_image(image, np.random.default_rng([seed, i, c]), request.spec)
                                 for i, image in enumerate(upload.images) for c in range(copies)])

            copies_made = await served.on_cpu(augmented)
            yield await add(copies_made, np.repeat(labels, copies), range(len(copies_made)), "augmented")
        for position, start in enumerate(starts):
            images, drawn = await pending  # type: ignore[misc]
            pending = produce(starts[position + 1]) if position + 1 < len(starts) else None
            out_labels = np.array([to_upload[label] for label in drawn], dtype=np.int64)
            yield await add(images, out_labels, range(start, start + len(drawn)), "synthetic")
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
    manifest = build_manifest(
        model, plan, "zip", augmentations=asdict(request.spec), copies_per_image=copies,
        target_per_class=request.target_per_class, include_originals=request.include_originals,
        uploaded={name: upload.classes.count(name) for name in upload.class_names}, synthetic=missing,
        unknown_classes=[name for name in upload.class_names if name not in model.class_names])
    yield await served.on_cpu(writer.finish, manifest)


def check_request(upload: Upload, request: AugmentRequest, max_outputs: int) -> None:
    """Refuse before any work what would pass the output limit."""
    total = len(upload.classes) * (1 + request.copies_per_image) + request.target_per_class * len(upload.class_names)
    if total > max_outputs:
        raise InvalidInputError(f"the output would hold up to {total} images, over the limit of {max_outputs}; "
                                "lower copies_per_image or target_per_class")
