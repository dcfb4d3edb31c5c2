"""Incremental retraining: what a retrain costs when 10% new nominal images land, against
training the grown set from scratch.

A synthetic product with N nominal images is trained (feature extraction + coreset) once with a
cold feature cache; then N/10 new images are added and the retrain runs incrementally (only the
new images go through the backbone, and the coreset continues the first bank's selection:
pipeline.incremental_coreset), and, for comparison, from scratch (empty cache, coreset from
scratch). The covering radius of both selections (max distance of any bank patch to its nearest
selected patch, in the coreset's projected space) shows what the continued selection costs in
quality. The step functions are the ones the Prefect `train` flow runs (pipeline/steps/):
fingerprint -> split -> extract -> coreset. Validation, evaluation and registration are left out
(they do not depend on the feature cache).

    python bench/incremental_retrain.py [--n 200] [--backbone resnet18] [--out bench/results/incremental_retrain.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_training(data: Path, params, warm_start: bool) -> dict:
    from pipeline import steps
    from pipeline.store import Store

    start = time.perf_counter()
    store = Store.from_settings(params)
    fp = steps.fingerprint_dataset(store, data, "bench")
    split = steps.split_dataset(store, fp, params.pipeline)
    features = steps.extract_features(store, fp, split, params.model)
    bank = steps.build_memory_bank(store, fp, split, features, params.model, warm_start=warm_start)
    return {
        "bank_dir": bank.bank_dir,
        "feature_dir": features.feature_dir,
        "continued": bank.coreset_continued,
        "seconds_coreset_selection": round(bank.coreset_seconds, 2),
        "n_train": fp.n_train,
        "n_bank_images": split.n_bank,
        "n_extracted": features.n_extracted,
        "n_reused": features.n_cached,
        "seconds_fingerprint": round(fp.seconds, 2),
        "seconds_extract": round(features.seconds, 2),
        "seconds_bank": round(bank.seconds, 2),
        "seconds_total": round(time.perf_counter() - start, 2),
        "bank_size": bank.bank_size,
    }


def covering_radius(run: dict, config) -> float:
    """Covering radius of the bank's coreset over all its training patches (projected space)."""
    import numpy as np

    from patchcore import coreset
    from patchcore.model import read_coreset_state, read_model_json

    keys = read_model_json(Path(run["bank_dir"]))["provenance"]["train_image_keys"]
    rows = np.concatenate([np.load(Path(run["feature_dir"]) / f"{k}.npy") for k in keys])
    projected = coreset.project(rows, config.coreset.projection_dim, seed=config.runtime.seed)
    return coreset.covering_radius(projected, read_coreset_state(run["bank_dir"]).indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="nominal images before the new ones land")
    parser.add_argument("--new-fraction", type=float, default=0.1)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=256, help="image side in px (resize 256, crop 224)")
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "incremental_retrain.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")

    import torch

    from patchcore.synthetic import generate_product
    from pipeline.config import load_settings

    n_new = max(1, round(args.n * args.new_fraction))
    params = load_settings(
        ROOT / "params.yaml",
        {
            "model.backbone.name": args.backbone,
            "model.backbone.weights": "random",
            "model.coreset.fraction": args.coreset,
            "model.runtime.device": "cpu",
            "model.runtime.num_workers": 0,
        },
    )
    with tempfile.TemporaryDirectory(prefix="incremental-bench-") as tmp:
        tmp = Path(tmp)
        # One generated set; the last n_new train images are held back as the "new" ones (same distribution).
        full = generate_product(
            tmp / "gen", "bench", n_train=args.n + n_new, n_test_good=2, n_test_defect=2, size_px=args.size, seed=0
        )
        data = tmp / "data" / "bench"
        shutil.copytree(full, data)
        new_files = sorted((data / "train" / "good").iterdir())[-n_new:]
        held = tmp / "held"
        held.mkdir()
        for f in new_files:
            shutil.move(f, held / f.name)

        # Warm-up (backbone build, pooling matrices, thread pools) so the first timed run pays no one-off cost.
        from patchcore import PatchCore

        list(PatchCore(params.model).embed(sorted((data / "train" / "good").iterdir())[:4], progress=False))
        os.environ["PATCHCORE_HOME"] = str(tmp / "home-warm")
        initial = run_training(data, params, warm_start=True)
        for f in sorted(held.iterdir()):
            shutil.copy(f, data / "train" / "good" / f.name)
        incremental = run_training(data, params, warm_start=True)
        os.environ["PATCHCORE_HOME"] = str(tmp / "home-cold")
        scratch = run_training(data, params, warm_start=False)
        assert incremental["continued"] and not scratch["continued"]
        for run in (incremental, scratch):
            run["covering_radius"] = round(covering_radius(run, params.model), 4)
        for run in (initial, incremental, scratch):
            del run["bank_dir"], run["feature_dir"]

    result = {
        "what": f"retrain after +{args.new_fraction:.0%} nominal images: warm per-image feature cache vs from scratch",
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "backbone": f"{args.backbone} (random weights: timing only)",
            "image_px": args.size,
            "resize": params.model.image.resize,
            "crop": params.model.image.crop,
            "coreset_fraction": args.coreset,
            "holdout_fraction": params.pipeline.holdout_fraction,
            "n_initial": args.n,
            "n_new": n_new,
            "device": "cpu",
            "batch_size": params.model.runtime.batch_size,
        },
        "initial_training": initial,
        "incremental_retrain": incremental,
        "retrain_from_scratch": scratch,
        "extract_speedup": round(scratch["seconds_extract"] / max(incremental["seconds_extract"], 1e-9), 1),
        "coreset_speedup": round(
            scratch["seconds_coreset_selection"] / max(incremental["seconds_coreset_selection"], 1e-9), 1
        ),
        "total_speedup": round(scratch["seconds_total"] / max(incremental["seconds_total"], 1e-9), 2),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("initial training", initial),
        ("retrain +new, warm cache", incremental),
        ("retrain +new, from scratch", scratch),
    ]
    md = [
        f"# Incremental retrain ({args.backbone}, {args.n} + {n_new} images, {os.cpu_count()} CPU cores)",
        "",
        "| run | train images | bank images | extracted | reused | extract s | coreset selection s | bank step s "
        "| total s | bank size | covering radius |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {name} | {r['n_train']} | {r['n_bank_images']} | {r['n_extracted']} | {r['n_reused']} | "
        f"{r['seconds_extract']} | {r['seconds_coreset_selection']} | {r['seconds_bank']} | {r['seconds_total']} | "
        f"{r['bank_size']} | {r.get('covering_radius', '-')} |"
        for name, r in rows
    ]
    md += [
        "",
        f"Coreset {args.coreset:.0%}. With new images, extraction is {result['extract_speedup']}x faster with the "
        f"feature cache and the coreset selection {result['coreset_speedup']}x faster continuing the previous bank's "
        f"selection; whole retrain (fingerprint + split + extract + coreset) {result['total_speedup']}x. The bank "
        "step also reads every cached feature file and projects it (time that grows with the whole set, "
        "but small); the continued selection's covering radius is within "
        f"{incremental['covering_radius'] / scratch['covering_radius'] - 1:+.1%} of the from-scratch one.",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
