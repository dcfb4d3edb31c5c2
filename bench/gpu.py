"""The GPU path, measured in one run: extraction fp32 vs mixed precision (with score parity),
greedy coreset, exact kNN, end-to-end scoring, peak GPU memory. Writes one JSON.

    bench/gpu.sh                       # on a CUDA machine: full sizes (WideResNet-50, 224 px)
    python bench/gpu.py --tiny --out /tmp/gpu.json   # anywhere (CPU): tiny sizes, same code path

Everything is generated here (random-init backbone, explicit and recorded; synthetic images and
features), so the script needs nothing the GPU machine cannot reach. `--mtd-bank FILE.npy` adds the
coreset timing on a saved MTD feature bank when one is available there. Budget: a few minutes on an
H100/H200 (each section prints its time as it ends).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from patchcore import PatchCore, PatchCoreConfig  # noqa: E402
from patchcore import coreset as coreset_lib  # noqa: E402
from patchcore.knn import make_index  # noqa: E402
from patchcore.model import resolve_device  # noqa: E402
from patchcore.synthetic import render_sample  # noqa: E402

FULL = {
    "backbone": "wide_resnet50_2",
    "side": 224,
    "images": 256,
    "bank_rows": 200_000,
    "dim": 1024,
    "knn_bank": 20_000,
    "knn_queries": 50_000,
    "fraction": 0.1,
}
TINY = {
    "backbone": "resnet18",
    "side": 64,
    "images": 12,
    "bank_rows": 3_000,
    "dim": 64,
    "knn_bank": 500,
    "knn_queries": 2_000,
    "fraction": 0.1,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config(sizes: dict, device: str, precision: str, batch: int) -> PatchCoreConfig:
    side = sizes["side"]
    dim = 1024 if sizes is FULL else 128
    return PatchCoreConfig.from_dict(
        {
            "backbone": {"name": sizes["backbone"], "weights": "random"},
            "image": {"resize": side, "crop": side},
            "features": {"pretrain_dim": dim, "target_dim": dim},
            "coreset": {"fraction": 0.01 if sizes is FULL else 0.1},
            "runtime": {"device": device, "precision": precision, "batch_size": batch, "num_workers": 2},
        }
    )


def _images(sizes: dict, kind: str, n: int) -> list[np.ndarray]:
    return [
        render_sample(
            "gpu", split="test" if kind != "good" else "train", kind=kind, index=i, size_px=sizes["side"], seed=1
        )[0]
        for i in range(n)
    ]


def extraction(sizes: dict, device: str, train: list, test: list) -> dict:
    """img/s of the feature extraction per precision, and the scores each precision's model gives
    the same test images against the fp32 ones."""
    out: dict = {}
    reference = None
    # On a CPU bf16 falls back to fp32 (runtime.precision is CUDA only): the parity code still runs.
    precisions = ["fp32", "bf16", "fp16"] if torch.device(device).type == "cuda" else ["fp32", "bf16"]
    for precision in precisions:
        model = PatchCore(_config(sizes, device, precision, 32))
        dev = model._setup().device
        list(model.embed(train[:8], progress=False))  # warm-up (cuDNN autotune, allocator)
        _sync(dev)
        start = time.perf_counter()
        for _ in model.embed(train, progress=False):
            pass
        _sync(dev)
        seconds = time.perf_counter() - start
        model.fit(train, progress=False)
        scores = model.predict(test, maps=False, progress=False).scores
        row = {"images_per_second": round(len(train) / seconds, 1)}
        if reference is None:
            reference = scores
        else:
            rel = np.abs(scores - reference) / np.maximum(np.abs(reference), 1e-12)
            row |= {
                "max_relative_score_difference": float(rel.max()),
                "same_ranking": bool(np.array_equal(np.argsort(scores), np.argsort(reference))),
            }
        out[precision] = row
    return out


def coreset_seconds(features: np.ndarray, fraction: float, device: str) -> dict:
    start = time.perf_counter()
    dev = resolve_device(device)
    projected = coreset_lib.project(features, 128, seed=0, device=dev)
    selection = coreset_lib.greedy_selection(projected, fraction, seed=0, device=dev, progress=False)
    _sync(dev)
    seconds = time.perf_counter() - start
    return {
        "rows": int(len(features)),
        "dim": int(features.shape[1]),
        "fraction": fraction,
        "picks": int(len(selection.indices)),
        "seconds": round(seconds, 2),
        "picks_per_second": round(len(selection.indices) / seconds, 1),
    }


def knn(sizes: dict, device: str) -> dict:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((sizes["knn_bank"], sizes["dim"]), dtype=np.float32)
    queries = rng.standard_normal((sizes["knn_queries"], sizes["dim"]), dtype=np.float32)
    index = make_index(bank, "auto", resolve_device(device))
    index.search(queries[:256], 1)  # warm-up
    _sync(resolve_device(device))
    start = time.perf_counter()
    index.search(queries, 1)
    _sync(resolve_device(device))
    seconds = time.perf_counter() - start
    return {
        "backend": type(index).__name__,
        "bank": list(bank.shape),
        "queries": len(queries),
        "queries_per_second": round(len(queries) / seconds, 1),
    }


def end_to_end(sizes: dict, device: str, train: list, test: list) -> dict:
    out = {}
    for batch in (1, 32):
        model = PatchCore(_config(sizes, device, "fp32", batch)).fit(train, progress=False)
        model.predict(test[:4], maps=True, progress=False)  # warm-up
        _sync(model._runtime.device)
        start = time.perf_counter()
        model.predict(test, maps=True, progress=False)
        _sync(model._runtime.device)
        out[f"batch_{batch}"] = {"images_per_second": round(len(test) / (time.perf_counter() - start), 1)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes (CPU check of the same code)")
    p.add_argument("--device", default="auto")
    p.add_argument("--mtd-bank", help="an (N, D) float32 .npy MTD feature bank, when one is available")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu.json"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
    sizes = TINY if args.tiny else FULL
    device = str(resolve_device(args.device))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    report: dict = {
        "benchmark": "GPU path (bench/gpu.py)",
        "sizes": "tiny" if args.tiny else "full",
        "settings": sizes,
        "weights": "RANDOM (generated here; timings and parity only, not quality)",
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "sections_seconds": {},
    }
    n = sizes["images"]
    train = _images(sizes, "good", n)
    test = _images(sizes, "good", max(4, n // 4)) + _images(sizes, "scratch", max(4, n // 4))

    def section(name, fn, *a):
        start = time.perf_counter()
        report[name] = fn(*a)
        report["sections_seconds"][name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {json.dumps(report[name])}", flush=True)

    section("extraction", extraction, sizes, device, train, test)
    rows = np.random.default_rng(0).standard_normal((sizes["bank_rows"], sizes["dim"]), dtype=np.float32)
    section("coreset_synthetic", coreset_seconds, rows, sizes["fraction"], device)
    del rows
    if args.mtd_bank:
        section("coreset_mtd", coreset_seconds, np.load(args.mtd_bank, mmap_mode="r"), sizes["fraction"], device)
    else:
        report["coreset_mtd"] = "skipped: no --mtd-bank file on this machine"
    section("knn", knn, sizes, device)
    section("end_to_end", end_to_end, sizes, device, train, test)
    report["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
