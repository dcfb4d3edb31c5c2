"""Scoring speed against the authors' reference implementation, on the same machine, back to back.

Both implementations score the same MTD test images with the same random-init wide_resnet50_2
state_dict against a memory bank of the same size as the 1% MTD coreset (5,974 patches; a
random subset of a smaller training set, because scoring cost depends on the bank's size, not on
how it was chosen, and the reference's own coreset would take 12 minutes). The timed part is
each side's `predict` over the test images: decode, preprocess, backbone, patch features,
nearest-neighbour search, image scores and anomaly maps (upsampled and smoothed). Ours runs
with the product's defaults (knn_backend auto: the principal-axes bounded search on the CPU;
BatchNorm folded into the convolutions) with the decode in the main process (num_workers 0, as
the reference does) and with 2 DataLoader workers, and once with plain faiss IndexFlatL2 (what
the reference searches with). `model.runtime.engine=onnxruntime` (the backbone and patch
aggregation exported to ONNX, run by ONNX Runtime; the one-off export is timed apart) runs in every
round next to the default torch engine. The bare forward pass to layer3 is timed too, with and
without the BatchNorm folding, to show where the time goes.

This machine's speed drifts (other tenants, memory bandwidth), and the reference, which moves far
more memory per image, slows down more than ours when it does. So the reference and ours (product
defaults) run `--rounds` times, alternating, and every round's ratio is reported; the variants
(2 workers, plain faiss) run in the first round only.

    python bench/scoring_speed.py        # -> bench/results/scoring_speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.faithfulness import (  # noqa: E402
    DEFAULT_DATA,
    RESULTS,
    SetupError,
    environment,
    mtd_images,
    resolve_reference,
    run_ours,
    run_reference,
    write_weights,
)

PATCHES_PER_IMAGE = 28 * 28  # wide_resnet50_2 layer2 grid at 224 px


def bare_forward(weights: Path, threads: int, batch_size: int, repeats: int = 5) -> dict:
    """ms/image of the wide_resnet50_2 forward pass to layer3 (224 px, channels-last), with the
    network's BatchNorms as they are and folded into the convolutions (what the product runs)."""
    import torch
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    from patchcore.backbone import FeatureExtractor

    torch.set_num_threads(threads)
    model = torchvision.models.wide_resnet50_2()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    variants = {
        "batchnorm_as_is": create_feature_extractor(model, return_nodes=["layer2", "layer3"]).eval(),
        "batchnorm_folded": FeatureExtractor(model, ["layer2", "layer3"]).eval(),
    }
    x = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for net in variants.values():
            net.to(memory_format=torch.channels_last)(x)  # warm-up
        for _ in range(repeats):  # interleaved, so drifting load hits both alike
            for name, net in variants.items():
                start = time.perf_counter()
                net(x)
                times[name].append((time.perf_counter() - start) / batch_size * 1000)
    return {name: round(min(v), 1) for name, v in times.items()} | {
        "batch_size": batch_size,
        "statistic": f"min of {repeats}",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--reference-src", help="the reference's src folder (default: the local mirror)")
    p.add_argument("--n-train", type=int, default=80)
    p.add_argument("--n-test", type=int, default=120)
    p.add_argument("--bank-size", type=int, default=5974, help="memory bank patches (MTD 1%% coreset: 5,974)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="alternating reference / ours runs (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS / "scoring_speed_cpu.json")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
    fraction = args.bank_size / (args.n_train * PATCHES_PER_IMAGE)
    if not 0 < fraction <= 1:
        print(f"--bank-size {args.bank_size} needs more than {args.n_train} training images", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="patchcore-scoring-speed-"))
    try:
        ref_src, ref_commit = resolve_reference(args.reference_src, scratch)
        train, test, _ = mtd_images(args.data.resolve(), args.n_train, args.n_test)
        weights, weights_sha, _ = write_weights(scratch, "wide_resnet50_2", 0)
        job = {
            "backbone": "wide_resnet50_2",
            "layers": ["layer2", "layer3"],
            "weights": str(weights),
            "resize": 256,
            "crop": 224,
            "patch_size": 3,
            "pretrain_dim": 1024,
            "target_dim": 1024,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "train": [str(x) for x in train],
            "test": [str(x) for x in test],
            "sampler_percentage": fraction,
        }
        load_start = os.getloadavg()
        print(
            f"{len(train)} train / {len(test)} test MTD images, bank {args.bank_size} patches "
            f"(random subset, fraction {fraction:.4f}); reference: {ref_src}",
            flush=True,
        )
        sampler = {"method": "random", "fraction": fraction}
        rounds = []
        for r in range(args.rounds):
            ref = run_reference(ref_src, job, scratch)
            ours0 = run_ours(job, coreset=sampler, num_workers=0)
            onnx = run_ours(job, coreset=sampler, num_workers=0, engine="onnxruntime")
            rounds.append(
                {
                    "reference": ref["predict_seconds"] / len(test),
                    "ours": ours0["predict_seconds"] / len(test),
                    "onnxruntime": onnx["predict_seconds"] / len(test),
                }
            )
            x = rounds[-1]
            print(
                f"round {r + 1}: reference {x['reference'] * 1000:.1f} ms/image, ours {x['ours'] * 1000:.1f} "
                f"({x['reference'] / x['ours']:.2f}x), onnxruntime {x['onnxruntime'] * 1000:.1f} ms/image "
                f"({x['reference'] / x['onnxruntime']:.2f}x)",
                flush=True,
            )
            if r == 0:
                first_ref, first_ours, first_onnx = ref, ours0, onnx
                ours2 = run_ours(job, coreset=sampler, num_workers=2)
                ours_faiss = run_ours(job, coreset=sampler, num_workers=0, knn_backend="faiss")
        ref, ours0, onnx = first_ref, first_ours, first_onnx
        forward = bare_forward(weights, args.threads, args.batch_size)
    except SetupError as exc:
        print(exc, file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    n = len(test)
    runs = {
        "reference": ref,
        "ours_num_workers_0": ours0,
        "ours_num_workers_2": ours2,
        "ours_faiss_num_workers_0": ours_faiss,
        "ours_onnxruntime_num_workers_0": onnx,
    }
    per_image = {name: round(r["predict_seconds"] / n, 4) for name, r in runs.items()}
    report = {
        "benchmark": "scoring speed vs the reference implementation (bench/scoring_speed.py)",
        "what_is_timed": "predict over the test images: decode, preprocess, backbone, patch features, kNN, "
        "image scores, anomaly maps",
        "settings": {k: v for k, v in job.items() if k not in ("train", "test", "weights")}
        | {"n_train": len(train), "n_test": n, "weights": f"random init, sha256 {weights_sha}"},
        "reference_commit": ref_commit,
        "bank_shapes": {name: r["bank_shape"] for name, r in runs.items()},
        "seconds_per_image": per_image,
        "seconds_per_image_is": "the first round; the reference and ours again in the later rounds below",
        "speedup_vs_reference": {name: round(per_image["reference"] / v, 2) for name, v in per_image.items()},
        "rounds": [
            {
                "reference_s_per_image": round(x["reference"], 4),
                "ours_s_per_image": round(x["ours"], 4),
                "speedup": round(x["reference"] / x["ours"], 2),
                "onnxruntime_s_per_image": round(x["onnxruntime"], 4),
                "onnxruntime_speedup": round(x["reference"] / x["onnxruntime"], 2),
            }
            for x in rounds
        ],
        "speedup_min_over_rounds": round(min(x["reference"] / x["ours"] for x in rounds), 2),
        "onnxruntime_speedup_min_over_rounds": round(min(x["reference"] / x["onnxruntime"] for x in rounds), 2),
        "onnx_export_seconds": round(onnx["export_seconds"], 1),
        "onnxruntime_max_relative_score_difference_vs_torch": float(
            np.max(np.abs(onnx["scores"] - ours0["scores"]) / np.abs(ours0["scores"]))
        ),
        "knn_backend": {name: r.get("knn_backend", "faiss (reference)") for name, r in runs.items()},
        "knn_settled_by_bound": {
            name: r.get("knn_settled_by_bound") for name, r in runs.items() if name != "reference"
        },
        "bare_forward_ms_per_image": forward,
        "machine": environment(args.threads),
        "load_average_at_start": [round(x, 2) for x in load_start],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, v in per_image.items():
        print(
            f"{name:<26} {v * 1000:8.1f} ms/image  ({report['speedup_vs_reference'][name]}x the reference; "
            f"kNN {report['knn_backend'][name]})"
        )
    print(
        f"speedup of the product defaults per round: {[r['speedup'] for r in report['rounds']]} "
        f"(min {report['speedup_min_over_rounds']}x); onnxruntime: "
        f"{[r['onnxruntime_speedup'] for r in report['rounds']]} (min {report['onnxruntime_speedup_min_over_rounds']}x)"
    )
    print(f"bare forward to layer3: {forward}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
