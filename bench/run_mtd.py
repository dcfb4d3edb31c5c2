"""Benchmark the library on Magnetic Tile Defects (../shared/datasets/mtd, its split.json).

For each coreset fraction: fit on `train` in a child process (so its peak RSS is the fit's own),
score `test_good` + `test_defect`, and record quality (image AUROC, pixel AUROC, PRO, F1-optimal
errors), bank size, extraction images/s against the bare backbone forward pass, coreset seconds
and picks/s, kNN images/s, end-to-end images/s and single-image latency, peak RSS, the machine,
the settings and the weights identity. Random weights make the quality figures meaningless
(chance level on MTD); the output says so.

    python bench/run_mtd.py                                  # WRN50, random weights, 1% and 10%
    python bench/run_mtd.py --weights ../shared/weights/mobilenet_v2_imagenet_tflite_quant.pth \
        --backbone mobilenet_v2 --label mnv2-real
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mtd import DEFAULT_ROOT, halves, load_split  # noqa: E402
from patchcore import PatchCore, PatchCoreConfig  # noqa: E402
from patchcore.backbone import FeatureExtractor, build_backbone, default_layers  # noqa: E402
from patchcore.evaluation import evaluate  # noqa: E402

# Measured for the authors' reference code on this machine kind (shared/ENVIRONMENT.md):
REFERENCE = {
    "fit_seconds_random_wrn50_1pct": 1022,
    "coreset_picks_per_second": 8,
    "scoring_seconds_per_image_1pct": 0.22,
    "bare_wrn50_forward_ms_per_image": 106,
}


def machine() -> dict:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config_from(args, fraction: float) -> PatchCoreConfig:
    return PatchCoreConfig.from_dict(
        {
            "backbone": {
                "name": args.backbone,
                "layers": args.layers.split(",") if args.layers else None,
                "weights": args.weights,
            },
            "image": {"resize": args.resize, "crop": args.crop},
            "features": {"patch_size": args.patch_size},
            "coreset": {"fraction": fraction},
            "runtime": {"device": args.device, "batch_size": args.batch_size, "num_workers": args.num_workers},
        }
    )


def bare_forward_ms(args) -> float:
    """The backbone alone up to its last used layer, batch of random 224 px images, channels_last."""
    cfg = config_from(args, 0.1)
    model, _ = build_backbone(cfg.backbone)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    extractor = FeatureExtractor(
        model,
        cfg.backbone.layers or default_layers(cfg.backbone.name),
        timm_model=cfg.backbone.name.startswith("timm/"),
    )
    extractor = extractor.to(device=device, memory_format=torch.channels_last).eval()
    x = torch.randn(args.batch_size, 3, args.crop, args.crop, device=device).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            extractor(x)
        _sync()
        start, reps = time.perf_counter(), 6
        for _ in range(reps):
            extractor(x)
        _sync()
    return (time.perf_counter() - start) / (reps * args.batch_size) * 1000


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child(args) -> None:
    """Fit + evaluate one fraction; writes a JSON result to args.result."""
    train, test = load_split(Path(args.data))
    if args.n_train:
        train = train[: args.n_train]
    if args.subset == "test-half":
        test = halves(test)[1]
    elif args.subset == "val-half":
        test = halves(test)[0]
    cfg = config_from(args, args.fraction)
    model = PatchCore(cfg)
    start = time.perf_counter()
    model.fit(train, progress=not args.quiet)
    fit_seconds = time.perf_counter() - start
    fit_rss = rss_mib()
    picks = len(model.memory_bank_)
    out = {
        "fraction": args.fraction,
        "n_train_images": len(train),
        "n_test_images": len(test),
        "bank_size": picks,
        "train_patches": model.n_train_patches_,
        "patch_grid": list(model.grid_),
        "fit_seconds": round(fit_seconds, 2),
        "extract_seconds": round(model.timings_["extract_seconds"], 2),
        "extraction_images_per_second": round(len(train) / model.timings_["extract_seconds"], 2),
        "coreset_seconds": round(model.timings_["coreset_seconds"], 2),
        "coreset_picks_per_second": round(picks / max(model.timings_["coreset_seconds"], 1e-9), 1)
        if args.fraction < 1
        else None,
        "fit_peak_rss_mib": round(fit_rss, 1),
        "weights": model.weights_.to_dict(),
        "layers": model.layers_,
    }
    # End to end (decode, preprocess, forward, features, kNN, scores, maps: the predict call that
    # evaluate makes), the kNN part of it (patch_scores: faiss search + exact distances), then the
    # metrics on top (pixel AUROC and PRO over full-size maps are not cheap).
    timed = {"predict": 0.0, "knn": 0.0}

    def timing(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timed[name] += time.perf_counter() - t

        return wrapper

    model.predict, model.patch_scores = timing("predict", model.predict), timing("knn", model.patch_scores)
    start = time.perf_counter()
    result = evaluate(model, test, progress=not args.quiet)
    evaluate_seconds = time.perf_counter() - start
    del model.predict, model.patch_scores  # back to the class methods
    out["knn_images_per_second"] = round(len(test) / timed["knn"], 2)
    out["end_to_end_images_per_second"] = round(len(test) / timed["predict"], 2)
    out["end_to_end_ms_per_image"] = round(1000 * timed["predict"] / len(test), 1)
    out["metrics_seconds"] = round(evaluate_seconds - timed["predict"], 1)
    # Latency: one image at a time, as an inspection station would call it.
    model.config.runtime.batch_size, model.config.runtime.num_workers = 1, 0
    lat = []
    for s in test[: args.latency_images]:
        t = time.perf_counter()
        model.predict([s.path], progress=False)
        lat.append(time.perf_counter() - t)
    out["latency_ms_per_image"] = round(1000 * float(np.median(lat[1:] or lat)), 1)
    m = result.metrics
    out["quality"] = {k: m.get(k) for k in ("image_auroc", "pixel_auroc", "pro", "f1_max", "f1_max_threshold")}
    out["quality"]["f1_errors"] = m["f1_max_confusion"]["errors"]
    out["per_defect_type"] = result.per_defect_type
    out["peak_rss_mib"] = round(rss_mib(), 1)
    Path(args.result).write_text(json.dumps(out, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_ROOT))
    p.add_argument("--backbone", default="wide_resnet50_2")
    p.add_argument("--layers", help="comma-separated; default: the architecture's pair")
    p.add_argument("--weights", default="random", help="random | imagenet | PATH")
    p.add_argument("--fractions", default="0.01,0.1")
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument(
        "--subset",
        choices=["all", "test-half", "val-half"],
        default="all",
        help="which test images to report on (halves: bench/mtd.py)",
    )
    p.add_argument("--n-train", type=int, help="use only the first N training images (quick runs)")
    p.add_argument("--latency-images", type=int, default=21)
    p.add_argument("--label", help="name of this run (default: backbone-weights kind)")
    p.add_argument("--out", help="JSON path (default bench/results/mtd_<label>_<device>.json)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
    if not (Path(args.data) / "split.json").is_file():
        print(f"MTD not found at {args.data} (expected split.json there); pass --data", file=sys.stderr)
        return 2
    if args.child:
        child(args)
        return 0
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    weights_kind = "random" if args.weights == "random" else ("imagenet" if args.weights == "imagenet" else "file")
    label = args.label or f"{args.backbone}-{weights_kind}"
    out_path = Path(args.out or REPO / "bench" / "results" / f"mtd_{label}_{device}.json")
    report = {
        "benchmark": "MTD fit + score (bench/run_mtd.py)",
        "label": label,
        "machine": machine(),
        "device": device,
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "fraction", "result")},
        "reference_figures_this_machine_kind": REFERENCE,
        "runs": [],
        # other processes on a 2-core machine distort timings: record how busy it was
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if weights_kind == "random":
        report["note"] = (
            "RANDOM backbone weights: image/pixel AUROC and PRO are at chance level and say nothing "
            "about detection quality; speed and memory figures are valid."
        )
    report["bare_forward_ms_per_image"] = round(bare_forward_ms(args), 1)
    print(f"bare forward: {report['bare_forward_ms_per_image']} ms/image ({device})", flush=True)
    for fraction in [float(f) for f in args.fractions.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            result_file = Path(tmp) / "r.json"
            cmd = [sys.executable, __file__, "--child", "--fraction", str(fraction), "--result", str(result_file)]
            for key in (
                "data",
                "backbone",
                "layers",
                "weights",
                "resize",
                "crop",
                "patch_size",
                "device",
                "batch_size",
                "num_workers",
                "subset",
                "n_train",
                "latency_images",
            ):
                value = getattr(args, key)
                if value is not None:
                    cmd += [f"--{key.replace('_', '-')}", str(value)]
            if args.quiet:
                cmd.append("--quiet")
            subprocess.run(cmd, check=True)
            run = json.loads(result_file.read_text())
        run["extraction_vs_bare_forward"] = round(
            (1000 / run["extraction_images_per_second"]) / report["bare_forward_ms_per_image"], 2
        )
        report["runs"].append(run)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2))  # after every fraction: a stopped run keeps what it measured
        q = run["quality"]
        print(
            f"fraction {fraction}: bank {run['bank_size']}, extraction {run['extraction_images_per_second']} img/s "
            f"({run['extraction_vs_bare_forward']}x bare forward), coreset {run['coreset_seconds']} s, "
            f"kNN {run['knn_images_per_second']} img/s, end-to-end {run['end_to_end_images_per_second']} img/s, "
            f"latency {run['latency_ms_per_image']} ms, fit RSS {run['fit_peak_rss_mib']} MiB | image AUROC "
            f"{q['image_auroc']:.4f} pixel AUROC {q['pixel_auroc']:.4f} PRO {q['pro']:.4f} F1 errors {q['f1_errors']}",
            flush=True,
        )
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {out_path}")
    if "note" in report:
        print("NOTE:", report["note"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
