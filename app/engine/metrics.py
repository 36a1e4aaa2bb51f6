"""Prometheus metrics, one registry per app (so several apps can live in one process, as in the tests)."""

from __future__ import annotations

from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app.engine.states import ModelStatus

_BATCH_BUCKETS = tuple(float(2**i) for i in range(0, 17))


class ModelObserver:
    """The micro-batcher's measurements for one model (implements `app.engine.batcher.BatchObserver`)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        # the labelled series, looked up once (a lookup costs more than the update, several times a request)
        self._batch_samples = metrics.batch_samples.labels(model)
        self._forward_passes = metrics.forward_passes.labels(model)
        self._compute_seconds = metrics.compute_seconds.labels(model)
        self._samples_generated = metrics.samples_generated.labels(model)
        self._queue_wait_seconds = metrics.queue_wait_seconds.labels(model)
        self._queued_samples = metrics.queued_samples.labels(model)

    def batch_done(self, samples: int, requests: int, seconds: float) -> None:
        self._batch_samples.observe(samples)
        self._forward_passes.inc()
        self._compute_seconds.observe(seconds)
        self._samples_generated.inc(samples)

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait_seconds.observe(seconds)

    def queued(self, samples: int) -> None:
        self._queued_samples.set(samples)


class Metrics:
    """Requests, latency, queue wait, compute time, batch sizes, forward passes, queue depth, samples, model
    status, CUDA memory, and the jobs queue with each worker's job throughput."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._request_series: dict[tuple[str, int], tuple[Any, Any]] = {}
        r = self.registry
        self.requests = Counter("synthgen_requests_total", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.request_seconds = Histogram("synthgen_request_seconds", "HTTP request latency", ["route"], registry=r)
        self.queue_wait_seconds = Histogram("synthgen_queue_wait_seconds", "time from submit to first batch",
                                            ["model"], registry=r)
        self.compute_seconds = Histogram("synthgen_compute_seconds", "forward pass + encoding per batch", ["model"],
                                         registry=r)
        self.batch_samples = Histogram("synthgen_batch_samples", "samples per forward pass", ["model"],
                                       buckets=_BATCH_BUCKETS, registry=r)
        self.forward_passes = Counter("synthgen_forward_passes_total", "forward passes", ["model"], registry=r)
        self.queued_samples = Gauge("synthgen_queued_samples", "samples waiting for a batch", ["model"], registry=r)
        self.samples_generated = Counter("synthgen_samples_generated_total", "samples generated", ["model"],
                                         registry=r)
        self.model_status = Gauge("synthgen_model_status", "1 for the model's current status", ["model", "status"],
                                  registry=r)
        self.device_memory = Gauge("synthgen_device_memory_bytes", "CUDA memory allocated", ["device"], registry=r)
        self.jobs = Gauge("synthgen_jobs", "jobs in the shared store by state", ["state"], registry=r)
        self.oldest_queued_job = Gauge("synthgen_oldest_queued_job_seconds", "age of the oldest queued job",
                                       registry=r)
        self.job_samples = Counter("synthgen_job_samples_total", "samples written by jobs, per worker", ["worker"],
                                   registry=r)
        self.job_seconds = Counter("synthgen_job_seconds_total", "seconds spent running jobs, per worker (samples / "
                                   "seconds is its throughput)", ["worker"], registry=r)

    def request_done(self, route: str, status: int, seconds: float) -> None:
        """Count a finished request. Its labelled series are looked up once per (route, status): route templates
        and status codes are few, and a lookup costs more than the update."""
        series = self._request_series.get((route, status))
        if series is None:
            series = self._request_series[route, status] = (self.requests.labels(route, str(status)),
                                                            self.request_seconds.labels(route))
        series[0].inc()
        series[1].observe(seconds)

    def observer(self, model: str) -> ModelObserver:
        return ModelObserver(self, model)

    def set_status(self, model: str, status: ModelStatus) -> None:
        for name in ModelStatus:
            self.model_status.labels(model, name).set(1 if name == status else 0)

    def set_queue(self, stats: dict[str, float]) -> None:
        """The job store's queue, for an autoscaler: jobs queued and running, the oldest queued job's age."""
        self.jobs.labels("queued").set(stats["queued"])
        self.jobs.labels("running").set(stats["running"])
        self.oldest_queued_job.set(stats["oldest_queued_s"])

    def render(self) -> bytes:
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                self.device_memory.labels(f"cuda:{index}").set(torch.cuda.memory_allocated(index))
        return generate_latest(self.registry)
