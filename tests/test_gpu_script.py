"""bench/gpu.py, the one prepared GPU check, runs here on the CPU at tiny sizes (the same code
path it takes on a GPU), so it is known to work when a GPU machine is lent."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_the_gpu_script_runs_on_the_cpu_with_tiny_sizes_and_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sizes"] == "tiny" and report["peak_gpu_memory_mib"] is None
    assert report["extraction"]["fp32"]["images_per_second"] > 0
    parity = report["extraction"]["bf16"]  # CPU: falls back to fp32, so the scores agree exactly
    assert parity["max_relative_score_difference"] == 0.0 and parity["same_ranking"]
    assert report["coreset_synthetic"]["picks"] == 300 and report["coreset_synthetic"]["seconds"] > 0
    assert report["knn"]["queries_per_second"] > 0
    assert set(report["end_to_end"]) == {"batch_1", "batch_32"}
    assert report["coreset_mtd"].startswith("skipped")
