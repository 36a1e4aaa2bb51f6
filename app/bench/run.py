"""`synthgen bench`: synthgen against the raw model, LitServe, a plain FastAPI app and the HTTP stack's ceiling (a
FastAPI app answering canned bytes), on one machine, in one run.

Every contender serves the same model with the same output (npz bytes) on 127.0.0.1 and is driven by the same load
generator: wrk (C, one thread, keep-alive; it costs the server's cores little) where installed, else an asyncio client
that also decodes and counts every answer. Contenders alternate point by point so machine noise hits all alike, and each
runs alone: the others are frozen (SIGSTOP) meanwhile, so no idle server's polling takes cores from the one being
measured; a second of the same load, not counted, wakes it up first, and the requests a run leaves in flight are
finished before the next starts. The raw model is measured in a fresh process, after each point, at the batch size the
point allows (concurrency × n, capped at the max batch). Every process gets the same glibc allocator settings (synthgen
sets them itself; see app/core/allocator.py). Rounds repeat every point; the table gives medians. Prints one markdown
table with synthgen's ratios and writes JSON (with the device). `--quick` (CI) only checks that every contender answered
correctly with the same number of samples; it never asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from app.core.allocator import ALLOCATOR_ENV, tune_allocator
from app.core.model import load_model
from app.core.png import encode_pngs
from app.core.sampling import draw_latents, render


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tree(pid: int) -> list[int]:
    """A process and all its descendants (LitServe runs workers in child processes)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.append(current)
    return found


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants."""
    total = 0
    for current in _tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            total += next((int(line.split()[1]) for line in Path(f"/proc/{current}/status").read_text().splitlines()
                           if line.startswith("VmRSS:")), 0)  # a zombie has no VmRSS line
    return total / 1024


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process and all its descendants have used."""
    ticks = 0
    for current in _tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            ticks += sum(int(v) for v in Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()[11:13])
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, timeout_s: float = 30.0) -> None:
    """Until the process tree has used under 20 % of a core for half a second (an idle LitServe polls at about 6 %):
    a load generator that stops leaves requests in flight, and a server that goes on computing them must not do so
    inside the next measurement."""
    deadline, last = time.monotonic() + timeout_s, tree_cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = tree_cpu_s(pid)
        if now - last < 0.1:
            return
        last = now


@dataclass
class Contender:
    name: str
    command: list[str]
    path: str  # the generate route
    ready_path: str
    env: dict[str, str]
    process: subprocess.Popen | None = None
    url: str = ""
    cold_start_s: float = 0.0

    def start(self) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        self.process = subprocess.Popen([*self.command, "--port", str(port)], env={**os.environ, **ALLOCATOR_ENV,
                                                                                  **self.env},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)  # its own process group: workers go with it
        deadline = started + 180
        while time.perf_counter() < deadline:
            try:
                if httpx.get(self.url + self.ready_path, timeout=1).status_code == 200:
                    self.cold_start_s = time.perf_counter() - started
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} while starting")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not become ready in 180 s")

    def pause(self) -> None:
        """Freeze every process of the contender while others are measured: an idle LitServe polls its queues and
        took about 8 % of the cores from whoever was being measured (c=1, n=64: 97 → 90 requests/s)."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the contender and every process it started (LitServe leaves its workers behind otherwise)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.resume()
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers in the group


class Connection:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams. httpx costs several ms of CPU per request at
    64 connections, which on a small machine makes the load generator, not the server, the bottleneck."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in headers:
            payload = await self.reader.readexactly(int(headers["content-length"]))
        else:  # chunked
            payload = b""
            while size := int((await self.reader.readline()).strip(), 16):
                payload += await self.reader.readexactly(size + 2)
                payload = payload[:-2]
            await self.reader.readline()
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = None


async def drive(contender: Contender, concurrency: int, n: int, seconds: float) -> dict[str, Any]:
    """Closed-loop load: `concurrency` users, each on its own connection, send the next request when the last
    one answered; every answer is decoded and its sample count checked."""
    latencies: list[float] = []
    errors, samples, peak = 0, 0, 0.0
    stop = time.perf_counter() + seconds
    host, port = contender.url.removeprefix("http://").split(":")

    async def user(offset: int) -> None:
        nonlocal errors, samples
        connection, seed = Connection(host, int(port)), offset
        try:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                try:
                    status, payload = await connection.post(
                        contender.path, json.dumps({"n": n, "seed": seed, "format": "npz"}).encode())
                    with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
                        got = len(arrays["images"]) if status == 200 else 0
                except (OSError, ValueError, asyncio.IncompleteReadError):
                    got = 0
                    await connection.close()
                latencies.append(time.perf_counter() - started)
                errors += got != n
                samples += got
                seed += concurrency
        finally:
            await connection.close()

    async def watch() -> None:
        nonlocal peak
        while time.perf_counter() < stop:
            peak = max(peak, tree_rss_mb(contender.process.pid))
            await asyncio.sleep(0.25)

    began = time.perf_counter()
    await asyncio.gather(watch(), *(user(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    lat = np.array(latencies or [0.0]) * 1000
    return {"contender": contender.name, "concurrency": concurrency, "n": n, "requests": len(latencies),
            "errors": errors, "samples": samples, "seconds": round(elapsed, 2),
            "samples_per_s": samples / elapsed, "requests_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "peak_rss_mb": round(peak, 1)}


_WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"n": %d, "format": "npz"}'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%f %%f %%f %%f\\n", summary.requests,
    e.status + e.connect + e.read + e.write + e.timeout, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
"""


def drive_wrk(contender: Contender, concurrency: int, n: int, seconds: float) -> dict[str, Any]:
    """The same point with wrk as the load generator (answers counted by status, not decoded)."""
    import tempfile
    import threading

    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % n)
    peak, running = [0.0], threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            peak[0] = max(peak[0], tree_rss_mb(contender.process.pid))
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        output = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "30s", "-s",
                                 script.name, contender.url + contender.path], capture_output=True, text=True,
                                timeout=seconds + 60).stdout
    finally:
        running.clear()
        watcher.join()
        os.unlink(script.name)
    fields = next(line.split()[1:] for line in output.splitlines() if line.startswith("RESULT"))
    requests, errors = int(fields[0]), int(fields[1])
    elapsed, p50, p95, p99 = (float(value) for value in fields[2:])
    samples = (requests - errors) * n
    return {"contender": contender.name, "concurrency": concurrency, "n": n, "requests": requests,
            "errors": errors, "samples": samples, "seconds": round(elapsed, 2), "samples_per_s": samples / elapsed,
            "requests_per_s": requests / elapsed, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
            "peak_rss_mb": round(peak[0], 1), "driver": "wrk"}


def raw_rate(folder: Path, batch_size: int, seconds: float, device: str) -> float:
    """The raw model (latents, forward, npz; no HTTP) in a fresh process, as the servers run: samples/s."""
    output = subprocess.run([sys.executable, "-m", "app.bench.peers", "raw", "--model", str(folder), "--device", device,
                             "--batch-size", str(batch_size), "--seconds", f"{seconds:g}"], capture_output=True,
                            text=True, check=True, timeout=seconds + 120, env={**os.environ, **ALLOCATOR_ENV}).stdout
    return json.loads(output.splitlines()[-1])["samples_per_s"]


def raw_png_rate(folder: Path, batch_size: int, seconds: float, device: str) -> float:
    """The raw model's forward passes with each batch's PNGs encoded in a piece per core while the next batch runs,
    on threads on a CPU and on processes on a GPU (as the server does by default): what a zip export could reach."""
    model, cores = load_model(folder, device), len(os.sched_getaffinity(0))
    done, running = 0, deque()
    pool: Executor = (ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("forkserver"))
                      if device == "cuda" else ThreadPoolExecutor(cores))
    with pool:
        pool.submit(encode_pngs, np.zeros((1, 1, 1, 1), np.uint8)).result()  # processes started before the clock
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            z, labels = draw_latents(done, range(batch_size), model.latent_dim, model.num_classes)
            images = render(model, z, labels, batch_size=batch_size)
            running.extend(pool.submit(encode_pngs, piece) for piece in np.array_split(images, cores))
            done += batch_size
            while len(running) > cores:  # one batch encoding while the next one is generated
                running.popleft().result()
        for future in running:
            future.result()
    return done / (time.perf_counter() - started)


def export(contender: Contender, model: str, per_class: int) -> dict[str, Any]:
    """A streamed zip export from synthgen: samples/s and the server's peak RSS while it ran."""
    peak, size, started = 0.0, 0, time.perf_counter()
    with httpx.stream("POST", f"{contender.url}/v1/models/{model}/datasets", timeout=3600,
                      json={"per_class": per_class, "seed": 0}) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            size += len(chunk)
            peak = max(peak, tree_rss_mb(contender.process.pid))
    elapsed = time.perf_counter() - started
    samples = per_class * len(load_model(Path(contender.env["SYNTHGEN_MODELS_DIR"]) / model).class_names)
    return {"samples": samples, "seconds": round(elapsed, 2), "samples_per_s": samples / elapsed,
            "bytes": size, "peak_rss_mb": round(peak, 1)}


def device_info() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}


def table(results: dict[str, Any]) -> str:
    """The markdown report: one row per (contender, point), the raw model at the batch size the point allows among
    them, with synthgen's ratios to LitServe, the plain app and the raw model; then cold starts and exports."""
    header = ("| contender | concurrency | n | samples/s | requests/s | p50 ms | p95 ms | p99 ms | errors | RSS MB | "
              "× LitServe | × plain | × raw |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_point = {(r["contender"], r["concurrency"], r["n"]): r for r in results["points"]}
    for row in results["points"]:
        point = (row["concurrency"], row["n"])
        if row["contender"] == "raw":
            lines.append(f"| raw (in-process, batch {row['batch_size']}) | {point[0]} | {point[1]} | "
                         f"{row['samples_per_s']:.0f} | – | – | – | – | – | – | | | |")
            continue
        ratios = ["", "", ""]
        if row["contender"] == "synthgen":
            ratios = [f"{row['samples_per_s'] / max(by_point[(peer, *point)]['samples_per_s'], 1e-9):.2f}"
                      if (peer, *point) in by_point else "" for peer in ("litserve", "fastapi", "raw")]
        cells = [row["contender"], row["concurrency"], row["n"], f"{row['samples_per_s']:.0f}",
                 f"{row['requests_per_s']:.1f}", f"{row['p50_ms']:.1f}", f"{row['p95_ms']:.1f}",
                 f"{row['p99_ms']:.1f}", row["errors"], f"{row['peak_rss_mb']:.0f}", *ratios]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    starts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in results["cold_start_s"].items())
    lines += ["", f"Cold start to the first 200 from the readiness route: {starts}.", ""]
    png = results.get("raw_png_samples_per_s", 0.0)
    for name, row in results.get("exports", {}).items():
        lines.append(f"- zip export of {name} samples: {row['samples_per_s']:.0f} samples/s "
                     f"({row['samples_per_s'] / max(png, 1e-9):.2f}× the raw forward + PNG encode on every core: "
                     f"{png:.0f} samples/s), server peak RSS {row['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def median_rows(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One point's rows from several rounds → one row: the median of every measured figure."""
    row = dict(rounds[0])
    for key, value in row.items():
        if isinstance(value, float) or key in ("requests", "errors", "samples"):
            row[key] = statistics.median(r[key] for r in rounds)
    return {**row, "rounds": len(rounds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synthgen bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--model", default="mnist-cgan")
    parser.add_argument("--quick", action="store_true", help="a < 2 minute correctness run (CI)")
    parser.add_argument("--gpu", action="store_true", help="every contender and the raw model on the GPU (CUDA)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="per point (default 10; 3 with --gpu, so that the whole run takes under 10 minutes)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over every point; the table gives medians")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--n", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--exports", type=int, nargs="*", default=[100_000], help="zip export sizes")
    parser.add_argument("--out", default=None, help="write the results as JSON here (and the table beside it, .md)")
    parser.add_argument("--driver", choices=["auto", "wrk", "python"], default="auto",
                        help="load generator: wrk where installed (auto), or the asyncio client that decodes answers")
    args = parser.parse_args(argv)
    tune_allocator()  # this process measures the raw forward + PNG rate (as `python -m app.bench.run` too)
    if args.seconds is None:
        args.seconds = 3.0 if args.gpu else 10.0
    if args.quick:
        args.seconds, args.rounds, args.concurrency, args.n, args.exports, args.driver = \
            2.0, 1, [1, 16], [1], [1000], "python"
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device, and torch sees none")
    folder = Path(args.models_dir) / args.model
    bench = [sys.executable, "-m", "app.bench.peers"]
    common = ["--model", str(folder), "--device", device, "--max-batch-size", str(args.max_batch_size), "--wait-ms",
              str(args.wait_ms)]
    contenders = [
        Contender("synthgen", [sys.executable, "-m", "app", "serve", "--models-dir", args.models_dir, "--device",
                               device], f"/v1/models/{args.model}/generate", "/readyz",
                  {"SYNTHGEN_MAX_BATCH_SIZE": str(args.max_batch_size), "SYNTHGEN_MAX_BATCH_WAIT_MS":
                   str(args.wait_ms), "SYNTHGEN_LOG_LEVEL": "warning", "SYNTHGEN_MODELS_DIR": args.models_dir,
                   "SYNTHGEN_DATA_DIR": str(Path(os.environ.get("TMPDIR", "/tmp")) / "synthgen-bench-data"),
                   "SYNTHGEN_MAX_DATASET_SAMPLES": str(max(args.exports or [0]) + 1)}),
        Contender("litserve", [*bench, "litserve", *common], "/predict", "/health", {}),
        Contender("fastapi", [*bench, "plain", *common], "/generate", "/health", {}),
        Contender("http-ceiling", [*bench, "canned", *common], "/generate", "/health", {}),
    ]
    use_wrk = args.driver == "wrk" or (args.driver == "auto" and shutil.which("wrk") is not None)
    results: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                               "device": device_info(), "quick": args.quick,
                               "config": {k: v for k, v in vars(args).items() if k != "out"}, "points": []}
    rows: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    try:
        for contender in contenders:
            contender.start()
            contender.pause()
        results["cold_start_s"] = {c.name: round(c.cold_start_s, 2) for c in contenders}
        for _ in range(args.rounds):
            for n in args.n:
                for concurrency in args.concurrency:
                    for contender in contenders:  # alternate: every point runs each contender in turn, alone
                        contender.resume()
                        try:
                            for seconds in (min(1.0, args.seconds), args.seconds):  # a warm-up, then the point
                                row = drive_wrk(contender, concurrency, n, seconds) if use_wrk else \
                                    asyncio.run(drive(contender, concurrency, n, seconds))
                                wait_idle(contender.process.pid)
                        finally:
                            contender.pause()
                        rows.setdefault((contender.name, concurrency, n), []).append(row)
                        print(f"{contender.name:12s} c={concurrency:<4d} n={n:<3d} {row['samples_per_s']:8.0f} "
                              f"samples/s p99 {row['p99_ms']:8.1f} ms errors {row['errors']}", flush=True)
                    batch = min(concurrency * n, args.max_batch_size)  # the largest batch this point can form
                    rate = raw_rate(folder, batch, args.seconds, device)
                    rows.setdefault(("raw", concurrency, n), []).append(
                        {"contender": "raw", "concurrency": concurrency, "n": n, "batch_size": batch,
                         "samples_per_s": rate})
                    print(f"{'raw':12s} c={concurrency:<4d} n={n:<3d} {rate:8.0f} samples/s (batch {batch})",
                          flush=True)
        contenders[0].resume()
        results["exports"] = {f"{size:,}": export(contenders[0], args.model, size // 10) for size in args.exports}
    finally:
        for contender in contenders:
            contender.stop()
    results["points"] = [median_rows(rounds) for rounds in rows.values()]
    results["raw_png_samples_per_s"] = raw_png_rate(folder, args.max_batch_size, args.seconds, device)
    print(table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        info = results["device"]
        Path(args.out).with_suffix(".md").write_text(
            f"# synthgen benchmark, {results['date']}\n\nDevice: {info['cpu']}, {info['cores']} cores, GPU: "
            f"{info['gpu'] or 'none'}; torch {info['torch']}. Command: `synthgen bench "
            f"{' '.join(argv if argv is not None else sys.argv[2:])}`; figures are medians of {args.rounds} "
            f"round(s).\n\n{table(results)}\n")
    bad = [row for row in results["points"] if row["contender"] != "raw" and (row["errors"] or row["samples"] == 0)]
    if bad:
        print(f"contenders with errors or no samples: {[(r['contender'], r['concurrency'], r['n']) for r in bad]}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
