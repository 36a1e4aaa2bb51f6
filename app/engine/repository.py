"""The model repository: discovers `models/<name>/` and versioned models `<name>/<version>/` (trained through the
API, in the data directory), loads each onto the device with its own micro-batcher, and loads, unloads and reloads
models at run time. A model that fails to load is reported and stops no other. `name` means a versioned model's
newest version, `name@version` pins one.

Work holds a lease on the version it started with (`acquire`/`release`, or `serving`): a reload swaps in the new
version for new work while the old one keeps its worker until its last lease is released, so running exports and
jobs finish on the version they began with; an unload stops the worker at once and its work fails with 409.

A version trained through the API belongs to the key that trained it (`trained_by` in its config): with `owner`,
lookups treat another key's version as absent (404), as jobs do; the repository's own models are everyone's."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from app.core.checkpoint import read_json
from app.core.model import SyntheticModel, load_model
from app.core.png import encode_pngs
from app.engine.batcher import MicroBatcher
from app.engine.filters import Judge, load_judge
from app.engine.forward import DTYPES, forward_pass
from app.engine.metrics import Metrics
from app.engine.states import ModelStatus
from app.errors import CheckpointError, ConflictError, InvalidInputError, NotFoundError, SynthgenError
from app.settings import Settings

log = logging.getLogger("synthgen.repository")
T = TypeVar("T")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a folder name
MODEL_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@[1-9][0-9]{0,5})?$")  # a name, maybe pinned: name@3


def validate_model_name(name: str) -> str:
    """Model names are folder names: letters, digits, '.', '_' and '-', no path tricks; `@<version>` pins a
    version."""
    if not MODEL_REF.fullmatch(name) or ".." in name:
        raise InvalidInputError(f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit, and optionally @<version>")
    return name


def trained_models_dir(settings: Settings) -> Path:
    """Where models trained through the API are written, one folder per version: `<name>/<version>/`."""
    return settings.data_dir / "models"


def _trained_by(folder: Path) -> str | None:
    """Who trained a version through the API (None: no one in particular, everyone may use it)."""
    try:
        owner = read_json(folder / "config.json").get("trained_by")
    except CheckpointError:
        return "?"  # unreadable: no key's, so only admins see it (it cannot load anyway)
    return owner if isinstance(owner, str) and owner else None


def visible(entry: ModelEntry, owner: str | None) -> bool:
    """Whether the key `owner` (None: an admin, who sees everything) may see and use the model."""
    return owner is None or entry.owner is None or entry.owner == owner


@dataclass(eq=False)
class ServedModel:
    """One loaded version of a model: the model, its batcher, its filter judge, the device thread, and how many
    pieces of work hold it."""

    model: SyntheticModel
    batcher: MicroBatcher
    judge: Judge | None
    executor: Executor  # the device's one thread
    cpu: Executor  # a few threads for decoding and encoding (bounded, so is their memory)
    png: Executor  # what encodes PNGs: those threads, or processes (SYNTHGEN_PNG_PROCESSES)
    png_parts: int  # the pieces a batch's PNGs are split in, one per thread or process
    leases: int = 0
    retired: bool = False  # replaced by a reload: its worker stops with its last lease

    async def on_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy work (decoding, encoding) on the bounded CPU pool."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    async def encode_pngs(self, images: np.ndarray) -> list[bytes]:
        """PNGs of a uint8 `[N, H, W, C]` batch, encoded in pieces at once on every thread or process of the PNG pool
        (one core encodes far slower than a GPU generates)."""
        loop = asyncio.get_running_loop()
        pieces = np.array_split(images, min(self.png_parts, max(len(images), 1)))
        try:
            encoded = await asyncio.gather(*(loop.run_in_executor(self.png, encode_pngs, piece) for piece in pieces))
        except BrokenProcessPool:  # a process died (killed, out of memory): this model encodes on threads from now on
            log.error("a PNG encoding process died; model %s encodes PNGs on the CPU threads from now on",
                      self.model.name)
            self.png = self.cpu
            return await self.encode_pngs(images)
        return [png for piece in encoded for png in piece]


@dataclass
class ModelEntry:
    """A model's place in the repository: its status and, when ready, the model and its batcher."""

    name: str  # name, or name@version for a versioned model
    folder: Path
    status: ModelStatus = ModelStatus.UNLOADED
    error: str | None = None
    served: ServedModel | None = None
    owner: str | None = None  # the key fingerprint that trained it through the API; None: everyone's

    @property
    def metrics_label(self) -> str:
        """Its name in /metrics (which needs no key): a version trained through the API by an opaque digest."""
        if self.owner is None:
            return self.name
        return "trained-" + hashlib.sha256(self.name.encode()).hexdigest()[:12]

    @property
    def base_name(self) -> str:
        return self.name.split("@")[0]

    @property
    def version(self) -> int | None:
        return int(self.name.split("@")[1]) if "@" in self.name else None

    @property
    def model(self) -> SyntheticModel | None:
        return self.served.model if self.served else None

    @property
    def batcher(self) -> MicroBatcher | None:
        return self.served.batcher if self.served else None

    @property
    def judge(self) -> Judge | None:
        return self.served.judge if self.served else None


class ModelRepository:
    """All models of `settings.models_dir` and of the trained models' folder, by name (name@version for versions)."""

    def __init__(self, settings: Settings, device: torch.device, executor: Executor, cpu: Executor,
                 metrics: Metrics) -> None:
        self.settings, self.device, self.executor, self.cpu, self.metrics = settings, device, executor, cpu, metrics
        processes = settings.png_processes
        if processes is None:
            processes = settings.cpu_workers if device.type == "cuda" else 0
        self.png: Executor = cpu  # forkserver: a fork of this process (torch's threads, held locks) would not be safe
        if processes:
            self.png = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("forkserver"))
        self.png_parts = processes or settings.cpu_workers
        self.roots = [settings.models_dir, trained_models_dir(settings)]
        self.entries: dict[str, ModelEntry] = {}
        self.latest: dict[str, str] = {}  # a versioned model's name → name@newest version
        self._locks: dict[str, asyncio.Lock] = {}
        self._seen: set[str] = set()  # models found so far (a trained version found later is loaded once)

    def discover(self) -> list[str]:
        """Names of the model folders (those with a config.json) and of versions (`<name>/<N>/config.json`, as
        name@N), sorted."""
        found = []
        for root in self.roots:
            folders = sorted(root.iterdir()) if root.is_dir() else []
            for folder in (f for f in folders if MODEL_NAME.fullmatch(f.name) and f.is_dir()):
                if (folder / "config.json").is_file():
                    found.append((folder.name, folder))
                    continue
                versions = sorted(int(v.name) for v in folder.iterdir()
                                  if v.name.isdigit() and not v.name.startswith("0") and (v / "config.json").is_file())
                found += [(f"{folder.name}@{version}", folder / str(version)) for version in versions]
                if versions:
                    self.latest[folder.name] = f"{folder.name}@{versions[-1]}"
        for name, folder in found:
            if name not in self.entries:
                self.entries[name] = ModelEntry(name, folder, owner=_trained_by(folder) if "@" in name else None)
        return sorted(name for name, _ in found)

    def get(self, name: str, owner: str | None = None) -> ModelEntry:
        """The model; with `owner`, only if that key may see it (another key's trained model is as absent as a
        missing one)."""
        validate_model_name(name)
        entry = self.entries.get(self.latest.get(name, name))
        if entry is None:
            self.discover()
            entry = self.entries.get(self.latest.get(name, name))
        if entry is None or not visible(entry, owner):
            raise NotFoundError(f"no model named {name!r}; GET /v1/models lists them")
        return entry

    def versions(self, name: str) -> list[int]:
        """The versions of a versioned model, oldest first ([] for a model without versions)."""
        base = name.split("@")[0]
        return sorted(entry.version for entry in self.entries.values()
                      if entry.version is not None and entry.base_name == base)

    def ready_model(self, name: str, owner: str | None = None) -> ServedModel:
        """The model's current version if it serves, else 409 saying how to load it."""
        entry = self.get(name, owner)
        if entry.status != ModelStatus.READY or entry.served is None:
            detail = f": {entry.error}" if entry.error else ""
            raise ConflictError(f"model {name!r} is {entry.status}{detail}; load it with POST /v1/models/{name}/load")
        return entry.served

    def acquire(self, name: str, owner: str | None = None) -> ServedModel:
        """The current version, leased until `release`: a reload meanwhile does not take it away."""
        served = self.ready_model(name, owner)
        served.leases += 1
        return served

    async def release(self, served: ServedModel) -> None:
        served.leases -= 1
        if served.retired and served.leases == 0:
            await served.batcher.stop()

    @asynccontextmanager
    async def serving(self, name: str, owner: str | None = None) -> AsyncIterator[ServedModel]:
        served = self.acquire(name, owner)
        try:
            yield served
        finally:
            await self.release(served)

    async def load_all(self) -> None:
        for name in self.discover():
            self._seen.add(name)
            await self.load(name)

    async def ensure_loaded(self, name: str) -> ModelEntry:
        """The model, loaded unless it is ready (or being loaded: then once that load is done)."""
        entry = self.get(name)
        async with self._locks.setdefault(entry.name, asyncio.Lock()):
            ready = entry.status == ModelStatus.READY
        return entry if ready else await self.load(entry.name)

    async def load_new_versions(self) -> None:
        """Load trained versions that appeared since (promoted by a worker in another process)."""
        for name in await asyncio.to_thread(self.discover):
            if name not in self._seen:
                self._seen.add(name)
                if "@" in name and self.entries[name].status == ModelStatus.UNLOADED:
                    log.info("new version %s found; loading it", name)
                    await self.load(name)

    async def load(self, name: str) -> ModelEntry:
        """(Re)load a model: the new version replaces the old only once it loaded; a failure is kept in `error`
        (and a model that was serving keeps serving its old version)."""
        entry = self.get(name)
        name = entry.name  # a versioned model's newest version when not pinned
        async with self._locks.setdefault(name, asyncio.Lock()):
            if entry.status != ModelStatus.READY:  # a reload serves the old version until the new one is in
                self._set_status(entry, ModelStatus.LOADING)
            try:
                loop = asyncio.get_running_loop()
                model = await loop.run_in_executor(self.executor, load_model, entry.folder, self.device, name)
                judge = await loop.run_in_executor(self.executor, load_judge, entry.folder, self.device)
            except Exception as exc:  # any problem in any file of the folder is this model's problem only
                log.error("model %s failed to load: %s", name, exc)
                reason = self._public_reason(entry, exc)
                if entry.status == ModelStatus.READY:
                    entry.error = f"{reason}; still serving the version loaded before"
                else:
                    entry.error = reason
                    self._set_status(entry, ModelStatus.FAILED)
                return entry
            dtype = DTYPES[self.settings.dtype] if self.device.type == "cuda" else torch.float32
            batcher = MicroBatcher(forward_pass(model, dtype), self.executor,
                                   max_batch_size=self.settings.max_batch_size,
                                   max_wait_s=self.settings.max_batch_wait_ms / 1000,
                                   max_queued_samples=self.settings.max_queued_samples,
                                   observer=self.metrics.observer(entry.metrics_label))
            batcher.start()
            old, entry.error = entry.served, None
            entry.served = ServedModel(model, batcher, judge, self.executor, self.cpu, self.png, self.png_parts)
            if old is not None:
                old.retired = True
                if old.leases == 0:
                    await old.batcher.stop()
            self._set_status(entry, ModelStatus.READY)
            log.info("model %s ready on %s", name, self.device)
            return entry

    def _public_reason(self, entry: ModelEntry, exc: Exception) -> str:
        """Why a load failed, naming files relative to the model folder (answers never show server paths)."""
        reason = str(exc) if isinstance(exc, SynthgenError) else f"{type(exc).__name__}: {exc}"
        for folder in {str(entry.folder.resolve()), str(entry.folder)}:
            reason = reason.replace(folder + "/", "").replace(folder, entry.name)
        return reason

    async def unload(self, name: str) -> ModelEntry:
        entry = self.get(name)
        async with self._locks.setdefault(entry.name, asyncio.Lock()):
            await self._stop(entry)
            entry.error = None
            self._set_status(entry, ModelStatus.UNLOADED)
        return entry

    async def close(self) -> None:
        for entry in self.entries.values():
            await self._stop(entry)
        if self.png is not self.cpu:
            await asyncio.to_thread(self.png.shutdown, wait=True, cancel_futures=True)

    async def supervise(self, every_s: float = 1.0, discover_every: int = 10) -> None:
        """Restart a ready model's worker that died (its queue is kept, so waiting requests carry on); until it
        is back, /readyz reports it. Every `discover_every` rounds, load trained versions that appeared."""
        rounds = 0
        while True:
            await asyncio.sleep(every_s)
            rounds += 1
            if rounds % discover_every == 0:
                await self.load_new_versions()
            for entry in list(self.entries.values()):
                if entry.status == ModelStatus.READY and entry.batcher is not None and not entry.batcher.running:
                    log.error("the worker of model %s died; restarting it", entry.name)
                    entry.batcher.start()

    async def _stop(self, entry: ModelEntry) -> None:
        if entry.served is not None:
            await entry.served.batcher.stop(f"model {entry.name!r} was unloaded")
        entry.served = None

    def _set_status(self, entry: ModelEntry, status: ModelStatus) -> None:
        entry.status = status
        self.metrics.set_status(entry.metrics_label, status)

    def not_ready(self, public: bool = False) -> list[str]:
        """What keeps the server from being ready: models not ready, workers not running. With `public` (anyone
        may ask), models trained through the API are counted, not named."""
        problems, private = [], 0
        for entry in self.entries.values():
            if entry.status == ModelStatus.UNLOADED:
                continue
            if entry.status != ModelStatus.READY:
                problem = f"model {entry.name} is {entry.status}" + (f": {entry.error}" if entry.error else "")
            elif entry.batcher is None or not entry.batcher.running:
                problem = f"model {entry.name}: worker not running"
            else:
                continue
            if public and entry.owner is not None:
                private += 1
            else:
                problems.append(problem)
        if private:
            problems.append(f"{private} model version(s) trained through the API are not ready")
        if not any(entry.status == ModelStatus.READY for entry in self.entries.values()):
            problems.append("no model is loaded: SYNTHGEN_MODELS_DIR holds no model folder, or none could load (the "
                            "server's log says why)")
        return problems
