"""`synthgen worker`: a process that runs jobs and nothing else, on its own device, beside API servers started with
`--no-jobs` (or SYNTHGEN_RUN_JOBS=false) that share its jobs database and data directory."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import start_http_server

from app.core.device import resolve_device
from app.engine.jobs import JobWorker, worker_name
from app.engine.jobstore import JobStore
from app.engine.metrics import Metrics
from app.engine.remote_models import model_settings
from app.engine.repository import ModelRepository
from app.engine.results import result_storage
from app.settings import Settings

log = logging.getLogger("synthgen.worker")


async def _queue_metrics(store: JobStore, metrics: Metrics, every_s: float = 5.0) -> None:
    while True:
        metrics.set_queue(await asyncio.to_thread(store.queue_stats))
        await asyncio.sleep(every_s)


async def run_worker(settings: Settings, metrics_port: int | None = None) -> None:
    """Load the models, then claim and run jobs until SIGTERM or SIGINT; running jobs then go back to the queue."""
    metrics = Metrics()
    device = resolve_device(settings.device)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"synthgen-{device.type}")
    cpu = ThreadPoolExecutor(max_workers=settings.cpu_workers, thread_name_prefix="synthgen-codec")
    repository = ModelRepository(await asyncio.to_thread(model_settings, settings), device, executor, cpu, metrics)
    store = await asyncio.to_thread(JobStore, settings.data_dir, settings.database_url,
                                    result_storage(settings, settings.data_dir))
    worker = JobWorker(store, repository, settings, worker_name(settings), metrics)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await repository.load_all()
    if metrics_port is not None:  # once the models are loaded: an answering port means a worker ready for jobs
        start_http_server(metrics_port, registry=metrics.registry)
    tasks = [asyncio.create_task(worker.run()), asyncio.create_task(repository.supervise()),
             asyncio.create_task(_queue_metrics(store, metrics))]
    log.info("worker %s runs jobs on %s", worker.id, device)
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await worker.close()
        await repository.close()
        await asyncio.to_thread(store.close)
        executor.shutdown(wait=True, cancel_futures=True)
        cpu.shutdown(wait=True, cancel_futures=True)
