"""`synthgen bench --quick`: every contender (synthgen, LitServe, plain FastAPI) answers correctly with the same
number of samples. It asserts no time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "app", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads(out.read_text())
    points = results["points"]
    assert {p["contender"] for p in points} == {"synthgen", "litserve", "fastapi"}
    for point in points:
        assert point["errors"] == 0 and point["samples"] == point["requests"] * point["n"] > 0, point
    assert results["exports"]["1,000"]["samples"] == 1000
    assert set(results["cold_start_s"]) == {"synthgen", "litserve", "fastapi"}
    assert out.with_suffix(".md").read_text().count("| synthgen |") == 2
    leftovers = subprocess.run(["pgrep", "-f", "app.bench.peers"], capture_output=True, text=True).stdout
    assert not leftovers.strip()  # every contender and its workers were stopped
