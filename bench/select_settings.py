"""Choose a backbone's default layer pair, patch size and image size by measurement on the MTD
VALIDATION half (bench/mtd.py `halves`), never on the half that bench/run_mtd.py reports.

Each candidate is fitted on MTD `train` (coreset 1% to keep the sweep affordable on a CPU) and
scored on the validation half; the table is sorted by image AUROC, then PRO.

    python bench/select_settings.py --backbone mobilenet_v2 \
        --weights ../shared/weights/mobilenet_v2_imagenet_tflite_quant.pth
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mtd import DEFAULT_ROOT, halves, load_split  # noqa: E402
from bench.run_mtd import machine  # noqa: E402
from patchcore import PatchCore, PatchCoreConfig  # noqa: E402
from patchcore.evaluation import evaluate  # noqa: E402

MNV2_LAYER_PAIRS = [
    "features.6,features.10",
    "features.6,features.13",
    "features.7,features.13",
    "features.10,features.13",
    "features.13,features.16",
    "features.6,features.10,features.13",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_ROOT))
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", required=True)
    p.add_argument("--layer-sets", default=";".join(MNV2_LAYER_PAIRS), help="';'-separated comma lists")
    p.add_argument("--patch-sizes", default="3")
    p.add_argument("--sizes", default="256/224", help="comma-separated resize/crop pairs")
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "select_mobilenet_v2.json"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")

    train, test = load_split(Path(args.data))
    validation, _ = halves(test)
    rows = []
    grid = itertools.product(
        args.layer_sets.split(";"), [int(x) for x in args.patch_sizes.split(",")], args.sizes.split(",")
    )
    for layers, patch, size in grid:
        resize, crop = (int(v) for v in size.split("/"))
        cfg = PatchCoreConfig.from_dict(
            {
                "backbone": {"name": args.backbone, "layers": layers.split(","), "weights": args.weights},
                "image": {"resize": resize, "crop": crop},
                "features": {"patch_size": patch},
                "coreset": {"fraction": args.fraction},
                "runtime": {"num_workers": 1},
            }
        )
        start = time.perf_counter()
        model = PatchCore(cfg).fit(train, progress=False)
        m = evaluate(model, validation, progress=False).metrics
        row = {
            "layers": layers,
            "patch_size": patch,
            "resize": resize,
            "crop": crop,
            "image_auroc": round(m["image_auroc"], 4),
            "pixel_auroc": round(m["pixel_auroc"], 4),
            "pro": round(m["pro"], 4),
            "f1_errors": m["f1_max_confusion"]["errors"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows.sort(key=lambda r: (r["image_auroc"], r["pro"]), reverse=True)
    report = {
        "benchmark": "settings selection on the MTD validation half (bench/select_settings.py)",
        "backbone": args.backbone,
        "weights": args.weights,
        "coreset_fraction": args.fraction,
        "n_train": len(train),
        "n_validation": len(validation),
        "machine": machine(),
        "best": rows[0],
        "candidates": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"best on validation: {rows[0]}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
