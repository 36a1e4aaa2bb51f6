"""The attacks of issue 11, one after another against one real server with default limits, while a probe checks
that /healthz answers within a second and the server's memory stays under 1 GB throughout."""

from __future__ import annotations

import concurrent.futures
import io
import resource
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

from tests.conftest import ROOT, launch_server, rss_mb, stop_server
from tests.helpers import png_bytes, zip_bytes

A, B, ADMIN = "a" * 24, "b" * 24, "c" * 24


class Probe(threading.Thread):
    """Asks /healthz every 50 ms and samples the server's resident memory."""

    def __init__(self, url: str, pid: int) -> None:
        super().__init__(daemon=True)
        self.url, self.pid = url, pid
        self.worst_s, self.peak_mb, self.failures = 0.0, 0.0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    ok = client.get(f"{self.url}/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.failures += not ok
                self.worst_s = max(self.worst_s, time.monotonic() - started)
                self.peak_mb = max(self.peak_mb, rss_mb(self.pid))
                time.sleep(0.05)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_attack_gets_a_4xx_or_the_documented_behaviour(tmp_path: Path, tiny_gan: Path, tiny_vae: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_gan, models / "digits-gan")
    shutil.copytree(tiny_vae, models / "digits-vae")
    shutil.copytree(ROOT / "models" / "mnist-cvae", models / "mnist-cvae",
                    ignore=shutil.ignore_patterns("training_state*", "samples"))
    env = {"SYNTHGEN_API_KEYS": f"{A},{B}", "SYNTHGEN_ADMIN_API_KEYS": ADMIN, "SYNTHGEN_LOG_LEVEL": "warning",
           "SYNTHGEN_JOBS_QUOTA_BYTES": str(2 * 1024**2)}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this test opens over a thousand sockets
    process, url = launch_server(models, tmp_path / "data", env)
    probe = Probe(url, process.pid)
    probe.start()
    a, b, admin = ({"Authorization": f"Bearer {key}"} for key in (A, B, ADMIN))
    results: dict[str, str] = {}
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            # sizes checked before allocating
            answer = client.post("/v1/jobs", json={"model": "digits-gan", "per_class": 613423234}, headers=a)
            assert answer.status_code == 422, answer.text
            for n in (10**10, 10**19):
                answer = client.post("/v1/models/digits-gan/generate", json={"n": n}, headers=a)
                assert answer.status_code == 422 and "SYNTHGEN_MAX_SAMPLES_PER_REQUEST" in answer.text
            started = time.monotonic()
            answer = client.post("/v1/models/mnist-cvae/generate", headers=a,
                                 json={"n": 10_000, "min_confidence": 1.0, "max_similarity": True})
            results["extreme filters"] = f"{answer.status_code} in {time.monotonic() - started:.1f} s"
            assert answer.status_code in (200, 422), answer.text

            # strict inputs
            for body in ({"n": True}, {"n": 2, "label": True}, {"n": 2, "label": " 7"}, {"n": 2, "label": "٧"}):
                assert client.post("/v1/models/digits-gan/generate", json=body, headers=a).status_code == 422

            # tenancy
            job = client.post("/v1/jobs", json={"model": "digits-gan", "n": 50}, headers=a).json()
            for _ in range(200):
                if client.get(f"/v1/jobs/{job['id']}", headers=a).json()["state"] == "succeeded":
                    break
                time.sleep(0.05)
            for method, path in (("GET", f"/v1/jobs/{job['id']}"), ("GET", f"/v1/jobs/{job['id']}/result"),
                                 ("DELETE", f"/v1/jobs/{job['id']}")):
                assert client.request(method, path, headers=b).status_code == 404
            assert client.delete("/v1/models/digits-gan", headers=b).status_code == 403
            assert client.post("/v1/models/digits-gan/load", headers=b).status_code == 403

            # the job queue and the quota at submission: 150 jobs of a million samples, then 20 at once
            statuses = [client.post("/v1/jobs", json={"model": "digits-gan", "n": 1_000_000}, headers=b).status_code
                        for _ in range(150)]
            results["150 jobs of 1M"] = str({s: statuses.count(s) for s in sorted(set(statuses))})
            assert set(statuses) <= {202, 429, 507} and statuses.count(202) <= 8
            for listed in client.get("/v1/jobs", headers=b).json()["jobs"]:
                client.delete(f"/v1/jobs/{listed['id']}", headers=b)
            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                answers = list(pool.map(lambda i: client.post("/v1/jobs", headers=b, json={
                    "model": "digits-gan", "n": 1500, "seed": i}), range(20)))
            admitted = [x.json()["id"] for x in answers if x.status_code == 202]
            results["20 concurrent with a 2 MB quota"] = f"{len(admitted)} admitted, the rest " + str(
                sorted({x.status_code for x in answers if x.status_code != 202}))
            for job_id in admitted:
                for _ in range(600):
                    state = client.get(f"/v1/jobs/{job_id}", headers=b).json()
                    if state["state"] in ("succeeded", "failed"):
                        break
                    time.sleep(0.05)
                assert state["state"] == "succeeded", state  # none admitted fails later

            # heavy uploads from six clients at once, and a small generate beside them
            noise = _png(np.random.default_rng(0).integers(0, 256, (2048, 2048), dtype=np.uint8))
            with concurrent.futures.ThreadPoolExecutor(7) as pool:
                uploads = [pool.submit(client.post, "/v1/models/digits-vae/reconstruct", headers=a,
                                       data={"convert": "true", "labels": "1"},
                                       files=[("files", (f"{i}.png", noise)) for i in range(3)]) for _ in range(6)]
                time.sleep(0.5)
                started = time.monotonic()
                small = client.post("/v1/models/digits-gan/generate", json={"n": 100}, headers=b)
                results["generate n=100 beside 6 heavy uploads"] = f"{time.monotonic() - started:.2f} s"
                assert small.status_code == 200
                upload_statuses = sorted(f.result().status_code for f in uploads)
            results["6 heavy uploads from one key"] = str(upload_statuses)
            assert set(upload_statuses) <= {200, 429}

            # a reload while an export streams: the export finishes whole on the version it began with
            with client.stream("POST", "/v1/models/digits-gan/datasets", headers=a,
                               json={"n": 5000, "format": "tar"}) as export:
                chunks = export.iter_bytes()
                received = len(next(chunks))
                assert client.post("/v1/models/digits-gan/load", headers=admin).status_code == 200
                received += sum(len(chunk) for chunk in chunks)
            results["export across a reload"] = f"{received} bytes, complete"
            assert received > 5000 * 3 * 512

            # many small zip bombs
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for i in range(1000):
                    archive.writestr(f"0/{i}.png", bytes(1 << 20))
            answer = client.post("/v1/augment", headers=a, data={"model": "digits-gan"},
                                 files={"dataset": ("bomb.zip", buffer.getvalue())})
            assert answer.status_code == 422 and "zip bombs" in answer.text
            # hostile class names
            upload = zip_bytes({"x.png": png_bytes(np.zeros((8, 8), np.uint8)),
                                "labels.csv": b"file_name,class_name\nx.png,../../../tmp/evil\n"})
            answer = client.post("/v1/augment", headers=a, data={"model": "digits-gan"},
                                 files={"dataset": ("d.zip", upload)})
            assert answer.status_code == 422 and "class name" in answer.text

        # slow clients: 1,100 sockets sending half a request
        parts = urlsplit(url)
        sockets = []
        for _ in range(1100):
            sock = socket.create_connection((parts.hostname, parts.port))
            sock.sendall(b"POST /v1/models/digits-gan/generate HTTP/1.1\r\nHost: x\r\n")
            sockets.append(sock)
        started = time.monotonic()
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        results["/healthz with 1,100 half-open sockets"] = f"{time.monotonic() - started:.3f} s"
        for sock in sockets:
            sock.close()
    finally:
        probe.stop.set()
        probe.join()
        stop_server(process)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    results["worst /healthz"] = f"{probe.worst_s:.3f} s ({probe.failures} failed)"
    results["peak server RSS"] = f"{probe.peak_mb:.0f} MB"
    print("\n" + "\n".join(f"{name}: {value}" for name, value in results.items()))
    assert probe.worst_s < 1.0 and probe.failures == 0, results
    assert probe.peak_mb < 1024, results
