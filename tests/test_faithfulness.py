"""Our image scores equal the reference implementation's (amazon-science/patchcore-inspection).

The slow test runs bench/faithfulness.py on a tiny synthetic set in a subprocess (the reference
package is also called `patchcore`, so it must never share a process with ours). It needs the
reference source: $PATCHCORE_REFERENCE_SRC (an exported `src` folder) or the bare mirror at
/work/.mirror/amazon-science+patchcore-inspection/repo; otherwise it is skipped.

The backbone is resnet18 with seeded random weights, 64 px images: ~20 s on 2 CPU cores. (With a
random-init wide_resnet50_2 at 64 px the pipelines still agree to ~1e-6, but its feature norms are
so large relative to the nearest-neighbour distances of these near-identical synthetic images that
the reference's float32 faiss distances (|q|²+|b|²-2q·b) are themselves ~1e-3 off the exact
values, which this library recomputes; that sits on the 1e-3 criterion. See
bench/results/faithfulness*.json for wide_resnet50_2 at 224 px.) Besides the acceptance criterion
the test checks the noise-free diagnostic: embeddings, bank and exact float64 scores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "faithfulness.py"
MIRROR = Path("/work/.mirror/amazon-science+patchcore-inspection/repo")
MIN_SPEARMAN, MAX_REL_DIFF = 0.9999, 1e-3


def _bench():
    spec = importlib.util.spec_from_file_location("bench_faithfulness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference_args() -> list[str]:
    src = os.environ.get("PATCHCORE_REFERENCE_SRC")
    if src:
        if not (Path(src) / "patchcore" / "patchcore.py").is_file():
            pytest.skip(
                f"PATCHCORE_REFERENCE_SRC={src} is not the reference's exported src folder "
                "(no patchcore/patchcore.py in it)"
            )
        return ["--reference-src", src]
    if MIRROR.is_dir():
        return []  # the script exports it from the mirror itself
    pytest.skip(
        "reference implementation not available: set PATCHCORE_REFERENCE_SRC to the src folder of "
        "a clone of https://github.com/amazon-science/patchcore-inspection"
    )


def test_comparison_detects_differences():
    """The pass/fail logic is not vacuous: a 0.2 % score change or one swapped pair fails it."""
    compare = _bench().compare_scores
    ref = np.array([3.0, 5.0, 8.0, 13.0, 21.0])
    assert compare(ref * (1 + 1e-5), ref)["passed"]
    bumped = ref.copy()
    bumped[2] *= 1.002
    result = compare(bumped, ref)
    assert not result["passed"] and not result["checks"]["max_rel_diff_ok"] and result["same_ranking"]
    swapped = ref[[0, 2, 1, 3, 4]]
    result = compare(swapped, ref)
    assert not result["passed"] and not result["same_ranking"] and not result["checks"]["spearman_ok"]


@pytest.mark.slow
def test_image_scores_match_reference(tmp_path):
    reference = _reference_args()
    out = tmp_path / "faithfulness.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--synthetic",
        "--synthetic-size",
        "64",
        "--resize",
        "64",
        "--crop",
        "64",
        "--backbone",
        "resnet18",
        "--n-train",
        "4",
        "--n-test",
        "6",
        "--out",
        str(out),
        *reference,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    log = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode in (0, 1), f"comparison could not run:\n{log}"
    result = json.loads(out.read_text())

    # Recompute from the per-image scores instead of trusting the script's verdict.
    ours = np.array([r["ours"] for r in result["per_image"]])
    ref = np.array([r["reference"] for r in result["per_image"]])
    assert len(ours) == 6 and np.isfinite(ours).all() and np.isfinite(ref).all()
    assert result["memory_bank_shape"]["ours"] == result["memory_bank_shape"]["reference"]
    rho = spearmanr(ours, ref).statistic
    max_rel = float(np.max(np.abs(ours - ref) / np.abs(ref)))
    assert np.array_equal(np.argsort(ours), np.argsort(ref)), f"image ranking differs:\n{log}"
    assert rho >= MIN_SPEARMAN, f"Spearman {rho} < {MIN_SPEARMAN}:\n{log}"
    assert max_rel <= MAX_REL_DIFF, f"max relative score difference {max_rel:.3e} > {MAX_REL_DIFF}:\n{log}"
    # Defects must score above nominal images here, else the check compares near-constant noise.
    labels = np.array([r["label"] for r in result["per_image"]])
    assert ours[labels == 1].min() > ours[labels == 0].max()
    assert result["passed"] and proc.returncode == 0, log
    # Independent of faiss' float32 rounding: exact scores from each side's own embeddings and bank.
    diagnostic = result["diagnostic"]
    assert diagnostic["test_features"]["max_row_rel_l2_diff"] <= 1e-5, diagnostic["test_features"]
    assert diagnostic["bank"]["max_row_rel_l2_diff"] <= 1e-5, diagnostic["bank"]
    assert diagnostic["exact_float64_scores"]["max_rel_diff_ours_vs_reference"] <= 1e-4, diagnostic[
        "exact_float64_scores"
    ]
