"""Model jobs (`/v1/trainings`): a user's images in, a versioned model with its quality card out.

The server never imports training code: a worker runs `synthgen train`, `synthgen tune` (when asked) and
`synthgen evaluate` as child processes (fewer CPU threads, a lower priority and a share of the GPU's memory, so
interactive generation keeps its share), reads the child's `progress.json` into the job, and promotes the result
to `<name>/<version>/` in the trained models' folder once it passed the quality gates it was given. A worker that
dies takes its child with it; the worker that takes the job over resumes the training from its last complete epoch
(same final weights).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.core.checkpoint import read_json, write_json
from app.core.imagefolder import DecodedFolder
from app.core.images import shared_images
from app.core.recipes import check_hyperparameters, choose_recipe, validation_warnings
from app.engine.jobstore import TRAININGS_DIR, Job, JobStore
from app.engine.repository import trained_models_dir
from app.errors import CheckpointError, ConflictError, DataError, InvalidInputError, NotFoundError, QuotaExceededError
from app.settings import Settings

log = logging.getLogger("synthgen.trainings")
TRAINING_RESERVED_BYTES = 64 * 1024**2  # a model folder (at most 20 MB) and its checkpoint, against the quotas
STATE_FILE = "training_state.safetensors"  # written by `synthgen train`
EVALUATED = "evaluated"  # a stage's marker once its card is written
DATASET_ID_LENGTH = 32
POLL_S = 1.0


def trainings_dir(settings: Settings) -> Path:
    """Working folders of training jobs (checkpoints, logs, TensorBoard event files), one per job."""
    return settings.data_dir / TRAININGS_DIR


def _datasets_dir(settings: Settings, owner: str) -> Path:
    return settings.data_dir / "datasets" / (owner or "open")


def save_dataset(settings: Settings, owner: str, folder: DecodedFolder) -> tuple[str, Path, bool]:
    """Keep a decoded upload for this API key as `.npz` (no pickle); its id is a hash of its content, so the same
    images uploaded twice are kept once. Returns the id, the file and whether this call wrote it. Refused (507)
    where the key's stored datasets would pass SYNTHGEN_DATASETS_QUOTA_BYTES_PER_KEY."""
    digest = hashlib.sha256()
    digest.update(repr((folder.images.shape, folder.class_names)).encode())
    digest.update(np.ascontiguousarray(folder.images).data)  # hashed and written in place: no copy of the images
    digest.update(folder.labels.astype("<i8").tobytes())
    dataset_id = digest.hexdigest()[:DATASET_ID_LENGTH]
    path = _datasets_dir(settings, owner) / f"{dataset_id}.npz"
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)  # kept already, and in use again: kept for another TTL (see `remove_unused_datasets`)
        return dataset_id, path, False
    used = sum(stored.stat().st_size for stored in path.parent.glob("*.npz"))
    size = folder.images.nbytes + folder.labels.nbytes
    if used + size > settings.datasets_quota_bytes_per_key:
        raise QuotaExceededError(f"this API key's stored datasets would pass {settings.datasets_quota_bytes_per_key} "
                                 f"bytes (SYNTHGEN_DATASETS_QUOTA_BYTES_PER_KEY): {used} stored, {size} more needed; "
                                 "delete trainings you no longer need (their datasets go with them) or reuse a "
                                 "dataset by its dataset_id")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    with tmp.open("wb") as file:
        np.savez(file, images=folder.images, labels=folder.labels, class_names=np.array(folder.class_names))
    tmp.replace(path)
    return dataset_id, path, True


def remove_unused_datasets(settings: Settings, store: JobStore, older_than_s: float,
                           files: list[str] | None = None) -> int:
    """Delete stored datasets no training refers to and unused for `older_than_s` (only `files`, relative to the
    data directory, where given), and files left half-written; returns how many."""
    root, cutoff, removed = settings.data_dir, time.time() - older_than_s, 0
    candidates = [root / name for name in files] if files is not None else \
        [*(root / "datasets").glob("*/*.npz"), *(root / "datasets").glob("*/*.tmp")]
    if not candidates:  # the usual case of the housekeeping loop: no need to read every training's request
        return 0
    in_use = {request.get(key) for request in store.requests("training")
              for key in ("dataset_file", "val_dataset_file")}
    for path in candidates:
        with contextlib.suppress(FileNotFoundError):
            if str(path.relative_to(root)) not in in_use and path.stat().st_mtime <= cutoff:
                path.unlink()
                removed += 1
    return removed


def use_dataset(settings: Settings, owner: str, dataset_id: str) -> Path:
    """The file of a dataset this API key uploaded (another key's is as absent as a missing one), kept for another
    TTL from now."""
    if len(dataset_id) != DATASET_ID_LENGTH or any(c not in "0123456789abcdef" for c in dataset_id):
        raise InvalidInputError(f"invalid dataset id {dataset_id!r}: the `dataset_id` of an earlier training")
    path = _datasets_dir(settings, owner) / f"{dataset_id}.npz"
    with contextlib.suppress(FileNotFoundError):  # removed in between
        if path.is_file():
            os.utime(path)
            return path
    raise NotFoundError(f"no dataset {dataset_id} uploaded with this API key; upload the zip again")


def load_dataset_file(path: Path) -> DecodedFolder:
    with np.load(path, allow_pickle=False) as archive:
        return DecodedFolder(archive["images"], archive["labels"], [str(n) for n in archive["class_names"]])


def check_validation_set(folder: DecodedFolder, val: DecodedFolder) -> None:
    """Refuse validation images that cannot judge a model of `folder`: other classes, another size, or images it
    trains on (a few duplicates happen in real data; more mean the sets overlap)."""
    if val.class_names != folder.class_names:
        raise InvalidInputError(f"the validation set's classes {val.class_names} are not the dataset's "
                                f"{folder.class_names}; give it a folder for each class of the dataset, and no other")
    if val.images.shape[1:] != folder.images.shape[1:]:
        raise InvalidInputError("the validation images are {}x{}x{}, the dataset's {}x{}x{} (height, width, channels): "
                                "send them at the dataset's size".format(*val.images.shape[1:],
                                                                         *folder.images.shape[1:]))
    overlap = shared_images(folder.images, val.images)
    if overlap > len(val.images) // 100:
        raise InvalidInputError(f"{overlap} of the {len(val.images)} validation images are also in the dataset; "
                                "validate on images the model does not train on")


ARCHS = ("gan", "vae")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def plan_training(folder: DecodedFolder, arch: str, overrides: dict[str, Any],
                  val: DecodedFolder | None = None) -> tuple[dict[str, Any], list[str]]:
    """Per architecture (both for `auto`) the settings a training runs with: the recipe for the data's size, then
    the user's `overrides` (epochs, batch_size, val_fraction, hyperparameters: one set, or one per architecture as
    {"gan": {...}, "vae": {...}}), checked against the networks' configs and the size limit; and the warnings the
    user should read. With a validation set `val`, all of `folder` trains and no val_fraction applies."""
    if val is not None and overrides.get("val_fraction") is not None:
        raise InvalidInputError("val_fraction splits the dataset, but a validation set was given: all of the dataset "
                                "trains; send one of the two")
    n, (height, width, channels) = len(folder.images), folder.images.shape[1:]
    recipes = {}
    for name in ARCHS if arch == "auto" else (arch,):
        recipe = choose_recipe(name, n)
        settings = {"epochs": recipe.epochs, "batch_size": recipe.batch_size, "val_fraction": recipe.val_fraction,
                    "lr": recipe.lr, "hyperparameters": dict(recipe.hyperparameters), "notes": recipe.notes}
        for key in ("epochs", "batch_size", "val_fraction"):
            if overrides.get(key) is not None:
                settings[key] = overrides[key]
        given = overrides.get("hyperparameters") or {}
        if set(given) <= set(ARCHS):  # per architecture: {"gan": {...}, "vae": {...}}
            given = given.get(name) or {}
        if not isinstance(given, dict):
            raise InvalidInputError(f"hyperparameters.{name}: a JSON object of {name} hyper-parameters")
        settings["hyperparameters"].update(given)
        check_hyperparameters(name, settings["hyperparameters"], height, width, channels, len(folder.class_names))
        if val is not None:
            settings["val_fraction"] = None
        n_val = held_out(n, settings["val_fraction"])
        if val is None and not 0 < n_val < n:
            raise InvalidInputError(f"a validation fraction of {settings['val_fraction']} leaves no training or no "
                                    f"validation images of {n}")
        steps = max(1, (n - n_val) // settings["batch_size"])
        validation = f"the {len(val.images)} validation set images" if val is not None else f"{n_val} validation images"
        settings["notes"] = [f"{n - n_val} training images and {validation}; {_count(settings['epochs'], 'epoch')} "
                             f"of {_count(steps, 'step')} (batch {settings['batch_size']})", *recipe.notes]
        recipes[name] = settings
    any_recipe = next(iter(recipes.values()))
    n_val = len(val.images) if val is not None else held_out(n, any_recipe["val_fraction"])
    warnings = validation_warnings(n_val, len(folder.class_names))
    return recipes, warnings + folder.conversions + (val.conversions if val is not None else [])


def held_out(n: int, val_fraction: float | None) -> int:
    """How many of a dataset's `n` images a training holds out to validate on (none with a validation set)."""
    return 0 if val_fraction is None else round(n * val_fraction)


def check_model_name(settings: Settings, models_dir: Path, name: str, owner: str) -> None:
    """A training may add a version to a model its API key trained, or start a new one; never replace a model of
    the repository or another key's."""
    if (models_dir / name / "config.json").is_file():
        raise ConflictError(f"{name!r} is a model of the repository, not one trained through the API; choose "
                            "another name")
    versions = trained_models_dir(settings) / name
    latest = _latest_version(versions)
    trained_by = read_json(versions / str(latest) / "config.json").get("trained_by", "") if latest else owner
    if trained_by != owner:
        whose = "another API key" if trained_by else "no key (it was trained while the server had no API keys)"
        raise ConflictError(f"the model {name!r} belongs to {whose}; choose another name")


@dataclass
class Stage:
    """One architecture's run in a training job: train, then evaluate."""

    arch: str
    folder: Path
    epochs: int
    steps: int  # optimizer steps in all


class TrainingRun:
    """Runs one training job's stages as child processes, reporting progress through `report`."""

    def __init__(self, job: Job, settings: Settings, device: str,
                 report: Callable[..., Awaitable[Any]]) -> None:
        self.job, self.settings, self.device, self.report = job, settings, device, report
        self.request = job.request
        self.work = trainings_dir(settings) / job.id
        self.progress: dict[str, Any] = dict(job.progress or {})

    def stages(self) -> list[Stage]:
        images = self.request["dataset"]["images"]
        return [Stage(arch, self.work / arch, recipe["epochs"], recipe["epochs"] * max(
            1, (images - held_out(images, recipe["val_fraction"])) // recipe["batch_size"]))
            for arch, recipe in self.request["recipes"].items()]

    async def run(self) -> dict[str, Any]:
        """Train and evaluate every stage (resuming what a previous worker left); returns the chosen stage's card
        figures."""
        # the children run in the data directory, on paths relative to it: the cards and configs they write name
        # no server path
        data, val_file = self.request["dataset_file"], self.request.get("val_dataset_file")
        validation = ["--val-data", val_file] if val_file else []
        candidates: dict[str, dict[str, Any]] = {}
        done_epochs, stages = 0, self.stages()
        for index, stage in enumerate(stages):
            if not (stage.folder / EVALUATED).exists():
                model = ["--model", self._relative(stage.folder)]
                await self._train(stage, data, validation, done_epochs,
                                  sum(later.steps for later in stages[index + 1 :]))
                if self.request.get("tune"):
                    self.progress.update(stage="tuning", arch=stage.arch, eta_seconds=None)
                    await self.report(progress=self.progress)
                    await self._child("tune", stage, [*model, "--data", data, *validation,
                                                      "--per-class", str(self.request["eval_per_class"])])
                self.progress.update(stage="evaluating", arch=stage.arch, eta_seconds=None)
                await self.report(progress=self.progress)
                await self._child("evaluate", stage, [*model, "--data", data, *validation,
                                                      "--per-class", str(self.request["eval_per_class"]), "--quiet"])
                (stage.folder / EVALUATED).touch()
                (stage.folder / STATE_FILE).unlink(missing_ok=True)  # the checkpoint is not needed any more
            done_epochs += stage.epochs
            metrics = read_json(stage.folder / "card.json").get("metrics", {})
            candidates[stage.arch] = {key: metrics.get(key) for key in ("tstr_accuracy", "real_accuracy",
                                                                         "precision", "recall", "coverage")}
        self.progress["candidates"] = candidates
        return candidates

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.settings.data_dir))

    async def _train(self, stage: Stage, data: str, validation: list[str], done_epochs: int, later_steps: int) -> None:
        recipe = self.request["recipes"][stage.arch]
        resume = (stage.folder / STATE_FILE).is_file()
        if not resume and stage.folder.exists():  # killed before its first checkpoint: start again
            shutil.rmtree(stage.folder)
        arguments = ["--arch", stage.arch, "--data", data, "--out", self._relative(stage.folder), "--epochs",
                     str(recipe["epochs"]), "--seed", str(self.request["seed"]), "--batch-size",
                     str(recipe["batch_size"]), *(validation or ["--val-fraction", str(recipe["val_fraction"])]),
                     "--lr", str(recipe["lr"]), "--hparams", json.dumps(recipe["hyperparameters"]), "--quiet",
                     "--tensorboard", self._relative(self.work / "tensorboard" / stage.arch)]
        self.progress.update(stage="training", arch=stage.arch)
        await self._child("train", stage, arguments + (["--resume"] if resume else []), done_epochs, later_steps)

    async def _child(self, command: str, stage: Stage, arguments: list[str], done_epochs: int = 0,
                     later_steps: int = 0) -> None:
        """Run `synthgen COMMAND ARGUMENTS` and wait for it, reporting its progress; stop it if cancelled."""
        self.work.mkdir(parents=True, exist_ok=True)
        options = ["--threads", str(self.settings.training_threads), "--nice", str(self.settings.training_nice),
                   "--exit-with-parent"]
        if command != "tune":  # tune runs on the CPU
            options += ["--device", self.device]
            if self.device != "cpu":
                options += ["--gpu-memory-fraction", str(self.settings.training_gpu_memory_fraction)]
        log_file = self.work / f"{stage.arch}-{command}.log"
        with open(log_file, "ab") as log_handle:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "app", command, *arguments, *options, stdin=asyncio.subprocess.DEVNULL,
                stdout=log_handle, stderr=asyncio.subprocess.STDOUT, cwd=self.settings.data_dir)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_S):
                        await process.wait()
                if command == "train":
                    await self._report_training(stage, done_epochs, later_steps)
                if process.returncode is not None:
                    break
        except asyncio.CancelledError:
            await asyncio.shield(_stop(process))
            raise
        if process.returncode != 0:
            raise DataError(f"{command} of the {stage.arch} failed: {_last_error(log_file, self.work)}")

    async def _report_training(self, stage: Stage, done_epochs: int, later_steps: int) -> None:
        """The child's progress into the job; the ETA covers the architectures still to train too (at this one's
        step rate)."""
        try:
            child = json.loads((stage.folder / "progress.json").read_text())
        except (OSError, ValueError):
            return  # not written yet, or being replaced
        fields = {key: child.get(key) for key in ("epoch", "epochs", "step", "steps_per_epoch", "losses",
                                                   "eta_seconds", "elapsed_seconds", "warnings")}
        left = (child.get("epochs", 0) - child.get("epoch", 0)) * (child.get("steps_per_epoch") or 0) - child.get(
            "step", 0)
        if fields["eta_seconds"] and left > 0 and later_steps:
            fields["eta_seconds"] = round(fields["eta_seconds"] * (1 + later_steps / left), 1)
        if fields != {key: self.progress.get(key) for key in fields}:
            self.progress.update(fields)
            await self.report(progress=self.progress, done=done_epochs + int(child.get("epoch", 0)))


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    try:
        async with asyncio.timeout(10):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()


def _last_error(log_file: Path, work: Path) -> str:
    """The child's last error line, without server paths."""
    lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    message = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "no output")
    for folder in (str(work.resolve()), str(work)):
        message = message.replace(folder + "/", "")
    return message.strip()[-500:]


def gate_failures(figures: dict[str, Any], gates: dict[str, float | None]) -> list[str]:
    """The quality gates a candidate's card figures fail, in words."""
    failures = []
    tstr, real = figures.get("tstr_accuracy"), figures.get("real_accuracy")
    if gates.get("min_tstr") is not None and (tstr is None or tstr < gates["min_tstr"]):
        failures.append(f"TSTR {tstr} is below min_tstr {gates['min_tstr']}")
    if gates.get("min_tstr_ratio") is not None:
        ratio = tstr / real if tstr is not None and real else None
        if ratio is None or ratio < gates["min_tstr_ratio"]:
            failures.append(f"TSTR / real accuracy {ratio and round(ratio, 4)} is below min_tstr_ratio "
                            f"{gates['min_tstr_ratio']}")
    return failures


def _latest_version(root: Path) -> int:
    """The highest version folder of a trained model (0: none yet)."""
    return max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0) if root.is_dir() else 0


def promote(settings: Settings, job: Job, folder: Path) -> int:
    """Copy a trained model folder to `<name>/<next version>/` of the trained models (renamed into place whole);
    returns the version. Idempotent: a version this job promoted already (its worker died before recording it) is
    returned as it is."""
    root = trained_models_dir(settings) / job.model
    root.mkdir(parents=True, exist_ok=True)
    for version in (p for p in root.iterdir() if p.name.isdigit()):
        with contextlib.suppress(CheckpointError):  # a version folder without a readable config is not this job's
            if read_json(version / "config.json").get("training_job") == job.id:
                return int(version.name)
    staging = root / f".staging-{job.id}"
    shutil.rmtree(staging, ignore_errors=True)
    grids = sorted((folder / "samples").glob("epoch_*.png"))

    def left_out(directory: str, names: list[str]) -> set[str]:
        if Path(directory) == folder / "samples":  # the last epoch's grid only
            return {name for name in names if grids and name != grids[-1].name}
        return {name for name in names if name in (STATE_FILE, EVALUATED) or name.startswith("progress.json")}

    shutil.copytree(folder, staging, ignore=left_out)
    config = read_json(staging / "config.json")
    write_json(staging / "config.json", {**config, "trained_by": job.owner, "training_job": job.id})
    for _ in range(100):
        version = _latest_version(root) + 1
        try:
            staging.rename(root / str(version))
            return version
        except OSError:  # another training of this name took the version first
            continue
    raise ConflictError(f"no free version folder for {job.model!r}")
