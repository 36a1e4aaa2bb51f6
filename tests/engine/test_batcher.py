"""The micro-batcher alone, with a fake forward pass: packing, fairness, overload, timeout, cancellation."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from app.engine.batcher import MicroBatcher
from app.errors import ModelFailureError, ModelUnavailableError, OverloadedError, RequestTimeoutError

pytestmark = pytest.mark.anyio


def fake_forward(delay_s: float = 0.002, calls: list[int] | None = None):
    """Images whose single pixel is the latent's first value: each output can be traced to its input."""

    def run(z: torch.Tensor, labels: torch.Tensor, truncation: torch.Tensor) -> np.ndarray:
        time.sleep(delay_s)
        if calls is not None:
            calls.append(len(z))
        return (z[:, :1] * truncation[:, None]).numpy().reshape(-1, 1, 1, 1)

    return run


def latents(n: int, start: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(start, start + n, dtype=torch.float32)[:, None], torch.zeros(n, dtype=torch.int64)


@pytest.fixture
async def make_batcher():
    executor = ThreadPoolExecutor(max_workers=1)
    made: list[MicroBatcher] = []

    def make(**kwargs) -> MicroBatcher:
        batcher = MicroBatcher(kwargs.pop("run", fake_forward()), executor, **kwargs)
        batcher.start()
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        await batcher.stop()
    executor.shutdown()


async def test_packs_concurrent_requests_and_returns_each_its_own(make_batcher) -> None:
    calls: list[int] = []
    batcher = make_batcher(run=fake_forward(calls=calls), max_batch_size=32, max_wait_s=0.05)
    results = await asyncio.gather(*(batcher.submit(*latents(3, 100 * i)) for i in range(10)))
    assert sum(calls) == 30 and len(calls) == 1  # one forward pass for all ten
    for i, images in enumerate(results):
        assert images.ravel().tolist() == [100 * i, 100 * i + 1, 100 * i + 2]


async def test_each_request_keeps_its_truncation_in_a_shared_pass(make_batcher) -> None:
    calls: list[int] = []
    batcher = make_batcher(run=fake_forward(calls=calls), max_batch_size=8, max_wait_s=0.05)
    results = await asyncio.gather(batcher.submit(*latents(2, 1), truncation=0.5),
                                   batcher.submit(*latents(12, 10), truncation=2.0),  # split over passes
                                   batcher.submit(*latents(1, 7), truncation=1.0))
    assert len(calls) > 1
    assert results[0].ravel().tolist() == [0.5, 1.0]
    assert results[1].ravel().tolist() == [2.0 * v for v in range(10, 22)]
    assert results[2].ravel().tolist() == [7.0]


async def test_big_request_is_split_and_small_one_is_not_starved(make_batcher) -> None:
    calls: list[int] = []
    batcher = make_batcher(run=fake_forward(calls=calls), max_batch_size=64, max_wait_s=0)
    big = asyncio.create_task(batcher.submit(*latents(10_000)))
    while not calls:
        await asyncio.sleep(0.0005)
    before = len(calls)
    small = await batcher.submit(*latents(1, -5))
    assert small.ravel().tolist() == [-5]
    assert len(calls) - before <= 2  # served in the next batch (or the one after, if one was being filled)
    assert not big.done()
    assert (await big).ravel().tolist() == list(range(10_000))
    assert max(calls) == 64


async def test_a_request_of_a_quarter_pass_finishes_in_one_pass(make_batcher) -> None:
    passes: list[set[int]] = []
    forward = fake_forward()

    def run(z, labels, truncation):
        passes.append({int(v) // 100 for v in z[:, 0]})  # which requests this pass served
        return forward(z, labels, truncation)

    batcher = make_batcher(run=run, max_batch_size=64, max_wait_s=0.05)
    results = await asyncio.gather(*(batcher.submit(*latents(16, 100 * i)) for i in range(16)))
    assert [len(served) for served in passes] == [4, 4, 4, 4]  # not 16 passes that each served all 16
    assert [images.ravel().tolist() for images in results] == [list(range(100 * i, 100 * i + 16)) for i in range(16)]


async def test_big_requests_take_turns_and_a_late_small_one_is_served_soon(make_batcher) -> None:
    calls: list[int] = []
    batcher = make_batcher(run=fake_forward(calls=calls), max_batch_size=64, max_wait_s=0)
    bigs = [asyncio.create_task(batcher.submit(*latents(1_000, 10_000 * i))) for i in range(8)]
    while not calls:
        await asyncio.sleep(0.0005)
    before = len(calls)
    assert (await batcher.submit(*latents(1, -5))).ravel().tolist() == [-5]
    assert len(calls) - before <= 4  # behind at most two turns of the eight big requests (four a pass)
    assert not any(big.done() for big in bigs)
    for i, big in enumerate(bigs):
        assert (await big).ravel().tolist() == list(range(10_000 * i, 10_000 * i + 1_000))


async def test_overload_is_refused_at_once(make_batcher) -> None:
    batcher = make_batcher(max_queued_samples=10, run=fake_forward(delay_s=0.05))
    first = asyncio.create_task(batcher.submit(*latents(8)))
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError, match="limit of 10"):
        await batcher.submit(*latents(20))
    assert len(await first) == 8


async def test_timeout_takes_the_samples_off_the_queue(make_batcher) -> None:
    calls: list[int] = []
    batcher = make_batcher(run=fake_forward(delay_s=0.01, calls=calls), max_batch_size=4, max_wait_s=0)
    with pytest.raises(RequestTimeoutError):
        await batcher.submit(*latents(1000), timeout_s=0.05)
    assert batcher.queued_samples == 0
    await asyncio.sleep(0.05)
    assert sum(calls) < 1000  # the rest was never computed


async def test_cancelled_request_leaves_the_queue(make_batcher) -> None:
    batcher = make_batcher(run=fake_forward(delay_s=0.01), max_batch_size=4, max_wait_s=0)
    task = asyncio.create_task(batcher.submit(*latents(1000)))
    await asyncio.sleep(0.03)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert batcher.queued_samples == 0
    assert (await batcher.submit(*latents(2))).ravel().tolist() == [0, 1]


async def test_failure_fails_only_that_batch(make_batcher) -> None:
    healthy = fake_forward()

    def flaky(z, labels, truncation):
        if (z < 0).any():
            raise RuntimeError("boom")
        return healthy(z, labels, truncation)

    batcher = make_batcher(run=flaky, max_wait_s=0)
    with pytest.raises(ModelFailureError, match="boom"):
        await batcher.submit(*latents(2, -10))
    assert (await batcher.submit(*latents(2))).ravel().tolist() == [0, 1]
    assert batcher.running


async def test_stopping_fails_the_running_batch_as_unavailable(make_batcher) -> None:
    batcher = make_batcher(run=fake_forward(delay_s=0.3), max_batch_size=4)
    running = asyncio.ensure_future(batcher.submit(*latents(4)))
    await asyncio.sleep(0.05)
    assert batcher.queued_samples == 0 and not running.done()  # the batch is in its 0.3 s forward pass
    await batcher.stop("the model was unloaded")
    with pytest.raises(ModelUnavailableError, match="the model was unloaded while the request ran"):
        await running
