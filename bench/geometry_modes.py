"""Image geometry modes on MTD (model.image.mode): center_crop vs full_frame vs tiled, with a real
ImageNet backbone (MobileNetV2, ../shared/weights), metrics on full-frame masks.

Every candidate is fitted in its own process (so its peak RSS is its own) on the MTD training
images (`--train-every 4`: every 4th, to keep the sweep affordable on a 2-core CPU), scores the
whole test list once, and reports the validation half and the test half (bench/mtd.py `halves`)
separately. The best candidate of each mode is picked on the VALIDATION half (image AUROC, then
PRO) and its TEST-half figures are the ones the table states. Per mode it also reports the share of
the defect pixels (and of the defect regions) the mode can see at all.

    python bench/geometry_modes.py --weights ../shared/weights/mobilenet_v2_imagenet_tflite_quant.pth
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from bench.mtd import DEFAULT_ROOT, halves, load_split  # noqa: E402

# (label, model.image settings). center_crop at the size bench/select_settings.py chose for this
# backbone (288/256); the full-image modes at that scale and above.
CANDIDATES = [
    ("center_crop 288/256", {"mode": "center_crop", "resize": 288, "crop": 256}),
    ("full_frame 288", {"mode": "full_frame", "resize": 288}),
    ("full_frame 384", {"mode": "full_frame", "resize": 384}),
    ("tiled 288, tile 224", {"mode": "tiled", "resize": 288, "tile_size": 224, "tile_overlap": 0.25}),
    ("tiled 384, tile 256", {"mode": "tiled", "resize": 384, "tile_size": 256, "tile_overlap": 0.25}),
]
LAYERS = "features.6,features.10,features.13"


def run_one(args: argparse.Namespace, image: dict) -> dict:
    """Fit, score every test image, compute both halves' figures; in this process."""
    from patchcore import PatchCore, PatchCoreConfig  # noqa: PLC0415
    from patchcore.evaluation import labelled_metrics  # noqa: PLC0415
    from patchcore.geometry import visible_mask  # noqa: PLC0415

    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
    train, test = load_split(Path(args.data))
    train, test = train[:: args.train_every], test[:: args.test_every]
    cfg = PatchCoreConfig.from_dict(
        {
            "backbone": {"name": "mobilenet_v2", "layers": LAYERS.split(","), "weights": args.weights},
            "image": image,
            "coreset": {"fraction": args.fraction},
            "runtime": {"num_workers": 1},
        }
    )
    start = time.perf_counter()
    model = PatchCore(cfg).fit(train, progress=False)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    predictions = model.predict([s.path for s in test], maps=True, progress=False)
    score_seconds = time.perf_counter() - start
    position = {s.path: i for i, s in enumerate(test)}
    out = {
        "fit_seconds": round(fit_seconds, 1),
        "extract_seconds": round(model.timings_["extract_seconds"], 1),
        "coreset_seconds": round(model.timings_["coreset_seconds"], 1),
        "score_ms_per_image": round(1000 * score_seconds / len(test), 1),
        "bank_size": int(len(model.memory_bank_)),
        "train_patches": int(model.n_train_patches_),
    }
    for name, half in zip(("validation", "test"), halves(test)):
        idx = [position[s.path] for s in half]
        maps = [predictions.anomaly_maps[i] for i in idx]
        figures, _, masks = labelled_metrics(half, predictions.scores[idx], maps)
        seen = defect = regions = regions_seen = 0
        for sample, mask in zip(half, masks):
            if not sample.label or not mask.any():  # (a few MTD defect masks are empty)
                continue
            visible = visible_mask(image["mode"], image["resize"], image.get("crop", 224), mask.shape)
            seen += int((mask & visible).sum())
            defect += int(mask.sum())
            regions += 1
            regions_seen += bool((mask & visible).any())
        out[name] = {
            "n_images": len(half),
            "image_auroc": round(figures["image_auroc"], 4),
            "pixel_auroc": round(figures["pixel_auroc"], 4),
            "pro": round(figures["pro"], 4),
            "f1_errors": figures["f1_max_confusion"]["errors"],
            "defect_pixels_visible": round(seen / max(defect, 1), 4),
            "defect_images_with_a_mask": regions,
            "defect_images_fully_outside": regions - regions_seen,
        }
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_ROOT))
    p.add_argument("--weights", required=True)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--train-every", type=int, default=4, help="use every N-th training image (default 4)")
    p.add_argument("--test-every", type=int, default=1, help="score every N-th test image (default 1: all)")
    p.add_argument("--only", help="';'-separated candidate labels (default: all)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "geometry_modes_mtd.json"))
    p.add_argument(
        "--update",
        action="store_true",
        help="re-measure the --only candidates into the existing --out file, keep the rest",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one candidate's image settings as JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args, json.loads(args.one))))
        return 0

    from bench.run_mtd import machine  # noqa: PLC0415

    chosen = [c for c in CANDIDATES if not args.only or c[0] in args.only.split(";")]
    rows = []
    for label, image in chosen:
        command = [sys.executable, __file__, "--data", args.data, "--weights", args.weights]
        command += ["--fraction", str(args.fraction), "--train-every", str(args.train_every)]
        command += ["--test-every", str(args.test_every), "--one", json.dumps(image)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        row = {"label": label, "mode": image["mode"], "image": image, **json.loads(done.stdout.splitlines()[-1])}
        row["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.update and Path(args.out).is_file():
        fresh = {row["label"] for row in rows}
        kept = [r for r in json.loads(Path(args.out).read_text())["candidates"] if r["label"] not in fresh]
        order = [label for label, _ in CANDIDATES]
        rows = sorted(kept + rows, key=lambda r: order.index(r["label"]) if r["label"] in order else len(order))
    best = {}
    for row in rows:  # per mode: the best on the validation half
        key = (row["validation"]["image_auroc"], row["validation"]["pro"])
        if row["mode"] not in best or key > (
            best[row["mode"]]["validation"]["image_auroc"],
            best[row["mode"]]["validation"]["pro"],
        ):
            best[row["mode"]] = row
    train, test = load_split(Path(args.data))
    report = {
        "benchmark": "image geometry modes on MTD (bench/geometry_modes.py)",
        "backbone": "mobilenet_v2 (ImageNet, ../shared/weights)",
        "layers": LAYERS,
        "weights": args.weights,
        "coreset_fraction": args.fraction,
        "n_train": len(train[:: args.train_every]),
        "n_validation": len(halves(test[:: args.test_every])[0]),
        "n_test": len(halves(test[:: args.test_every])[1]),
        "metrics_on": "full-frame masks at each image's own resolution",
        "machine": machine(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "chosen_on_validation": {mode: row["label"] for mode, row in best.items()},
        "candidates": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"chosen on validation: {report['chosen_on_validation']}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
