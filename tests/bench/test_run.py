"""`synthgen bench --quick`: every contender (synthgen, LitServe, plain FastAPI, the HTTP ceiling) answers correctly
with the same number of samples. It asserts no time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _session_members(session: int) -> list[int]:
    """Processes still in this session (the bench and every contender it started, however they were reparented)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[3]) == session:
            members.append(int(stat.parent.name))
    return members


def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    bench = subprocess.Popen([sys.executable, "-m", "app", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, _ = bench.communicate(timeout=300)
    assert bench.returncode == 0, output[-4000:]
    results = json.loads(out.read_text())
    raw = [p for p in results["points"] if p["contender"] == "raw"]
    points = [p for p in results["points"] if p["contender"] != "raw"]
    assert {p["contender"] for p in points} == {"synthgen", "litserve", "fastapi", "http-ceiling"}
    for point in points:
        assert point["errors"] == 0 and point["samples"] == point["requests"] * point["n"] > 0, point
    assert results["exports"]["1,000"]["samples"] == 1000
    assert set(results["cold_start_s"]) == {"synthgen", "litserve", "fastapi", "http-ceiling"}
    # the raw model at the largest batch each point allows, measured between the contenders
    assert [(p["concurrency"], p["batch_size"]) for p in raw] == [(1, 1), (16, 16)]
    assert all(p["samples_per_s"] > 0 for p in raw) and results["raw_png_samples_per_s"] > 0
    report = out.with_suffix(".md").read_text()
    assert report.count("| synthgen |") == 2 and "| raw (in-process, batch 16) | 16 | 1 |" in report
    assert _session_members(bench.pid) == []  # every contender and its workers were stopped
