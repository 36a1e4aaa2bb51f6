"""The micro-batcher: packs the samples of concurrent requests into forward passes of at most `max_batch_size`.

It knows nothing of HTTP. A request for n samples is queued with its latents; one worker task drains the queue
into batches, taking samples from the waiting requests in turn (see `_take_batch`) so a small request is never
starved behind a big one, and waits at most `max_wait_s` for a batch to fill. The forward pass runs on the device's
worker thread.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from app.errors import ModelFailureError, ModelUnavailableError, OverloadedError, RequestTimeoutError

# (latents [n, d], labels [n], per-sample truncation [n]) → uint8 images [n, H, W, C]
BatchFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], np.ndarray]


class BatchObserver(Protocol):
    """Receives the batcher's measurements (the metrics module implements it)."""

    def batch_done(self, samples: int, requests: int, seconds: float) -> None: ...

    def queue_wait(self, seconds: float) -> None: ...

    def queued(self, samples: int) -> None: ...


class _NullObserver:
    def batch_done(self, samples: int, requests: int, seconds: float) -> None:
        pass

    def queue_wait(self, seconds: float) -> None:
        pass

    def queued(self, samples: int) -> None:
        pass


@dataclass(eq=False)
class _Pending:
    z: torch.Tensor
    labels: torch.Tensor
    truncation: float
    future: asyncio.Future[np.ndarray]
    enqueued: float
    n: int  # len(z), kept: Tensor.__len__ costs a microsecond, and it is asked for many times a batch
    images: np.ndarray | None = None
    dispatched: int = 0  # samples handed to a batch so far
    finished: int = 0  # samples whose pixels came back
    started: bool = False

    @property
    def remaining(self) -> int:
        return self.n - self.dispatched


@dataclass
class _Slice:
    pending: _Pending
    start: int
    stop: int

    @property
    def whole(self) -> bool:
        """The whole request in one pass: its tensors go in unsliced and its rows of the pass come back uncopied."""
        return self.start == 0 and self.stop == self.pending.n


@dataclass
class BatcherStats:
    """Counters (the histograms live in the metrics observer)."""

    forward_passes: int = 0
    samples: int = 0


def _stack(slices: list[_Slice]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass's latents, labels and per-sample truncation; a request that fits whole is not sliced."""
    zs, labels, truncation = [], [], []
    for s in slices:
        pending = s.pending
        zs.append(pending.z if s.whole else pending.z[s.start : s.stop])
        labels.append(pending.labels if s.whole else pending.labels[s.start : s.stop])
        truncation += [pending.truncation] * (s.stop - s.start)
    return torch.cat(zs), torch.cat(labels), torch.tensor(truncation, dtype=torch.float32)


class MicroBatcher:
    """One per loaded model. `submit` returns the request's uint8 images once all its samples have run."""

    def __init__(self, run_batch: BatchFunction, executor: Executor, max_batch_size: int = 256,
                 max_wait_s: float = 0.005, max_queued_samples: int = 100_000,
                 observer: BatchObserver | None = None) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queued_samples = max_queued_samples
        self._observer = observer or _NullObserver()
        self._pending: deque[_Pending] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_batch_requests = 0
        self._closed: str | None = None
        self.stats = BatcherStats()

    @property
    def queued_samples(self) -> int:
        """Samples submitted and not yet handed to a forward pass."""
        return self._queued

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.running and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._work(), name="micro-batcher")
            self._wakeup.set()  # a restarted worker picks up what is already queued

    async def stop(self, reason: str = "the model was unloaded") -> None:
        """Stop the worker for good; waiting and later requests fail at once with `reason` (409)."""
        self._closed = reason
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(ModelUnavailableError(f"{reason} while the request waited"))
        self._pending.clear()
        self._set_queued(0)

    async def submit(self, z: torch.Tensor, labels: torch.Tensor, truncation: float = 1.0,
                     timeout_s: float | None = None) -> np.ndarray:
        """Queue n samples; raises OverloadedError at once when the queue is full, RequestTimeoutError after
        `timeout_s`. Cancelling the awaiting task (a client that went away) takes its samples off the queue."""
        n = len(z)
        if self._closed:
            raise ModelUnavailableError(f"{self._closed}; an admin can load it again")
        if self._queued + n > self.max_queued_samples:
            raise OverloadedError(f"the queue holds {self._queued} samples; {n} more would pass its limit of "
                                  f"{self.max_queued_samples}; retry shortly", retry_after_s=1)
        if not self.running:
            raise OverloadedError("the model's worker is not running; retry shortly", retry_after_s=1)
        loop = asyncio.get_running_loop()
        pending = _Pending(z, labels, truncation, loop.create_future(), time.perf_counter(), n)
        self._pending.append(pending)
        self._set_queued(self._queued + n)
        self._wakeup.set()
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that arrives as the
            # future completes, and a cancelled job would then run on to its end
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(pending.future)
        except TimeoutError:
            self._withdraw(pending)
            raise RequestTimeoutError(f"the request waited over {timeout_s:g} s for the model; ask for fewer "
                                      "samples or retry later") from None
        except asyncio.CancelledError:
            self._withdraw(pending)
            raise

    def _withdraw(self, pending: _Pending) -> None:
        """Drop the samples of a request that no longer waits; a batch already running finishes for nothing."""
        if pending in self._pending:
            self._pending.remove(pending)
            self._set_queued(self._queued - pending.remaining)
        pending.dispatched = pending.n
        if not pending.future.done():
            pending.future.cancel()

    def _fail(self, slices: list[_Slice], error: Exception) -> None:
        for pending in {id(s.pending): s.pending for s in slices}.values():
            if not pending.future.done():
                pending.future.set_exception(error)
            self._withdraw(pending)

    def _set_queued(self, value: int) -> None:
        self._queued = value
        self._observer.queued(value)

    def _take_batch(self) -> list[_Slice]:
        """Waiting requests in arrival order, each taking an equal share of the pass but at least a quarter of it, so
        a request of up to a quarter pass finishes in one pass and is answered while the next runs (spread thinly
        over every pass, all requests finished together and were answered while the device stood idle); one left
        unfinished goes to the back of the queue, so a small request is never starved behind big ones."""
        slices: list[_Slice] = []
        room = self.max_batch_size
        while room and self._pending:
            share = max(room // len(self._pending), self.max_batch_size // 4, 1)
            for _ in range(len(self._pending)):
                pending = self._pending.popleft()
                take = min(share, pending.remaining, room)
                if not pending.started:
                    pending.started = True
                    self._observer.queue_wait(time.perf_counter() - pending.enqueued)
                slices.append(_Slice(pending, pending.dispatched, pending.dispatched + take))
                pending.dispatched += take
                room -= take
                if pending.remaining:
                    self._pending.append(pending)
                if room == 0:
                    break
        self._set_queued(self._queued - (self.max_batch_size - room))
        return slices

    async def _fill_window(self) -> None:
        """Wait up to max_wait_s (from the oldest request's arrival) for the batch to fill; a lone request after
        a lone request (no load) goes at once, so waiting costs latency only when there is traffic to pack."""
        if len(self._pending) == 1 and self._last_batch_requests <= 1:
            return
        deadline = self._pending[0].enqueued + self.max_wait_s
        while self._queued < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill_window()
            slices = self._take_batch()
            if not slices:
                continue
            z, labels, truncation = _stack(slices)
            started = time.perf_counter()
            try:
                images = await loop.run_in_executor(self._executor, self._run_batch, z, labels, truncation)
            except Exception as exc:  # the forward pass failed: only this batch's requests fail
                self._fail(slices, ModelFailureError(f"the model's forward pass failed ({type(exc).__name__}: {exc}); "
                                                     "other requests are not affected, retrying may succeed"))
                continue
            except BaseException:  # stopped, or the worker itself died: its batch must not wait forever
                if self._closed:  # unloaded: retrying will not help (409, like the requests that still waited)
                    self._fail(slices, ModelUnavailableError(f"{self._closed} while the request ran"))
                else:
                    self._fail(slices, OverloadedError("the model's worker stopped while the request ran; retry",
                                                       retry_after_s=1))
                raise
            self._last_batch_requests = len({id(s.pending) for s in slices})
            self.stats.forward_passes += 1
            self.stats.samples += len(z)
            self._observer.batch_done(len(z), self._last_batch_requests, time.perf_counter() - started)
            offsets = itertools.accumulate((s.stop - s.start for s in slices), initial=0)
            for s, offset in zip(slices, offsets):
                pending = s.pending
                if pending.future.done():
                    continue
                if s.whole:
                    pending.future.set_result(images[offset : offset + pending.n])
                    continue
                if pending.images is None:
                    pending.images = np.empty((pending.n, *images.shape[1:]), dtype=images.dtype)
                pending.images[s.start : s.stop] = images[offset : offset + s.stop - s.start]
                pending.finished += s.stop - s.start
                if pending.finished == pending.n:
                    pending.future.set_result(pending.images)
