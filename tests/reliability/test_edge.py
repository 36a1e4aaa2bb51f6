"""Issue 11 against real server processes: slow and idle clients, proxy headers, a crash, a stop with work running,
and heavy uploads beside small requests. Each test failed on the code before."""

from __future__ import annotations

import concurrent.futures
import io
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import launch_server, rss_mb, stop_server

EDGE = {"SYNTHGEN_HEADER_TIMEOUT_S": "1", "SYNTHGEN_BODY_TIMEOUT_S": "1", "SYNTHGEN_MAX_CONNECTIONS": "40",
        "SYNTHGEN_RATE_LIMIT_PER_S": "0.5", "SYNTHGEN_RATE_LIMIT_BURST": "3", "SYNTHGEN_LOG_LEVEL": "warning"}


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed the socket (fails if it answered or kept it open)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    assert sock.recv(1024) == b""
    return time.monotonic() - started


def _healthz_on(sock: socket.socket) -> bytes:
    """One keep-alive GET /healthz on an open socket: the whole answer, or what came before the server hung up."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(5)
    answer = b""
    while (chunk := sock.recv(4096)) and not re.search(rb"\r\n\r\n.*\}", answer + chunk, re.S):
        answer += chunk
    return answer + chunk


@pytest.mark.parametrize("server_env", [EDGE])
def test_slow_and_idle_clients_cannot_lock_anyone_out(server: tuple[str, int]) -> None:
    url, _ = server
    half = _connect(url)
    half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # half a request, never finished
    assert _closed_within(half, 5) < 3  # closed after the 1 s header timeout, not held forever

    served = _connect(url)  # a keep-alive client, served once before the flood
    assert _healthz_on(served).startswith(b"HTTP/1.1 200")
    idle = [_connect(url) for _ in range(200)]  # five times the connection bound
    try:
        started = time.monotonic()
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        assert time.monotonic() - started < 1
        assert _healthz_on(served).startswith(b"HTTP/1.1 200")  # never-served sockets were closed, not this one
    finally:
        for sock in [served, *idle]:
            sock.close()

    slow = _connect(url)
    slow.sendall(b"POST /v1/models/digits-gan/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"n\"")  # a body that never completes
    slow.settimeout(5)
    answer = b""
    while b"SYNTHGEN_BODY_TIMEOUT_S" not in answer and (chunk := slow.recv(4096)):  # head and body may come apart
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"SYNTHGEN_BODY_TIMEOUT_S" in answer
    slow.close()

    gone = _connect(url)
    gone.sendall(b"POST /v1/models/digits-gan/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"n\"")
    gone.close()  # hangs up before its body: the client's doing, not a server error
    time.sleep(0.5)
    metrics = httpx.get(f"{url}/metrics").text
    assert re.search(r'synthgen_requests_total\{route="unmatched",status="499"\} [1-9]', metrics)
    assert not re.search(r'status="500"\} [1-9]', metrics)


@pytest.mark.parametrize("server_env", [EDGE])
def test_forwarded_for_is_not_trusted_without_a_configured_proxy(server: tuple[str, int]) -> None:
    url, _ = server
    statuses = [httpx.get(f"{url}/v1/models", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code
                for i in range(5)]
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]  # every spoofed address shares one bucket


def test_after_kill_9_interrupted_jobs_resume_as_soon_as_the_server_restarts(tmp_path: Path, tiny_gan: Path) -> None:
    models, data = tmp_path / "models", tmp_path / "data"
    shutil.copytree(tiny_gan, models / "digits-gan")
    env = {"SYNTHGEN_MAX_BATCH_SIZE": "8", "SYNTHGEN_REPLICA_ID": "replica-1"}
    process, url = launch_server(models, data, env)
    try:
        job = httpx.post(f"{url}/v1/jobs", json={"model": "digits-gan", "n": 500_000}).json()
        for _ in range(100):
            if httpx.get(f"{url}/v1/jobs/{job['id']}").json()["state"] == "running":
                break
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    process, url = launch_server(models, data, env)  # the same replica comes back at once
    try:
        from app.engine.jobstore import JobStore

        store = JobStore(data)
        for _ in range(100):  # claimed again at once, not after its dead worker's 30 s lease
            record = store.get(job["id"])
            if record.attempts == 2:
                break
            time.sleep(0.05)
        assert record.state == "running" and record.attempts == 2 and record.error is None, record
        assert record.replica == f"replica-1:{process.pid}"
        store.close()
    finally:
        stop_server(process)


def test_a_stop_has_a_deadline_even_with_an_export_running(tmp_path: Path, tiny_gan: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_gan, models / "digits-gan")
    process, url = launch_server(models, tmp_path / "data", {"SYNTHGEN_SHUTDOWN_TIMEOUT_S": "2",
                                                             "SYNTHGEN_MAX_BATCH_SIZE": "8"})
    job = httpx.post(f"{url}/v1/jobs", json={"model": "digits-gan", "n": 500_000}).json()
    with httpx.stream("POST", f"{url}/v1/models/digits-gan/datasets", json={"n": 1_000_000}, timeout=30) as export:
        next(export.iter_bytes())  # an export that would take many minutes is streaming
        started = time.monotonic()
        process.terminate()
        output = stop_server(process)
    assert time.monotonic() - started < 10, output
    from app.engine.jobstore import JobStore

    store = JobStore(tmp_path / "data")
    assert store.get(job["id"]).state == "queued"  # handed back at the stop for the next worker, not left running
    store.close()


@pytest.mark.parametrize("server_env", [{"SYNTHGEN_MAX_UPLOADS_PER_CLIENT": "1000", "SYNTHGEN_LOG_LEVEL": "warning"}])
def test_a_hundred_heavy_uploads_stay_bounded_beside_small_requests(server: tuple[str, int]) -> None:
    """100 clients (the per-client bound lifted) each upload an 8 MB noise PNG to resize at once: the uploads in
    work are bounded, so memory stays under 1 GB (it passed 1.5 GB before), /healthz stays under a second (95 % of
    probes) and a small generate is served beside them."""
    url, pid = server
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (2900, 2900), dtype=np.uint8)).save(buffer, format="PNG")
    big = buffer.getvalue()
    stop, latencies, peak_rss = threading.Event(), [], [0.0]

    def probe() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                started = time.monotonic()
                assert client.get(f"{url}/healthz").status_code == 200
                latencies.append(time.monotonic() - started)
                peak_rss[0] = max(peak_rss[0], rss_mb(pid))
                time.sleep(0.05)

    def upload(i: int) -> int:
        with httpx.Client(timeout=300) as client:
            return client.post(f"{url}/v1/models/digits-vae/reconstruct", data={"convert": "true", "labels": "1"},
                               files=[("files", (f"{i}.png", big))]).status_code

    watcher = threading.Thread(target=probe)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            uploads = list(pool.map(lambda i: pool.submit(upload, i), range(100)))
            time.sleep(1.0)
            small = httpx.post(f"{url}/v1/models/digits-gan/generate", json={"n": 100, "seed": 1}, timeout=30)
            statuses = [future.result() for future in uploads]
    finally:
        stop.set()
        watcher.join()
    assert small.status_code == 200 and statuses == [200] * 100
    # the probe shares this process's GIL with 100 uploading client threads, so one probe can stall client-side:
    # the bound is on the 95th percentile, and a blocked server (seconds) still fails the maximum
    assert np.percentile(latencies, 95) < 1.0 and max(latencies) < 3.0, sorted(latencies)[-5:]
    assert peak_rss[0] < 1024, peak_rss
