"""The bounded exact kNN (`scoring.knn_backend: bounded`, the CPU default) against plain faiss
IndexFlatL2, on real MTD patch features of several backbones.

For each backbone: patch features of the first `--n-train` MTD train images, a random bank of
`--bank-size` rows of them (the MTD 1% coreset size), and as queries the patches of the first
`--n-query` good and defect images of the test half. Records the bank's spectrum (share of the
variance on its leading principal axes, which decides how well the bound works), the number of
leading axes `BoundedIndex` picked, the share of queries its bound settled, search time per image
for both (interleaved repeats, best of), and whether both found the same neighbours.

    python bench/knn_bound.py        # -> bench/results/knn_bound_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mtd import DEFAULT_ROOT, halves, load_split  # noqa: E402
from bench.run_mtd import machine  # noqa: E402
from patchcore import PatchCore, PatchCoreConfig  # noqa: E402
from patchcore.knn import BoundedIndex, FaissIndex  # noqa: E402

MNV2 = str(REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet_tflite_quant.pth")
SETTINGS = {
    "wrn50-random": {"backbone": {"name": "wide_resnet50_2", "weights": "random"}},
    "mnv2-imagenet": {"backbone": {"name": "mobilenet_v2", "weights": MNV2}, "image": {"resize": 288, "crop": 256}},
    "mnv2-random": {"backbone": {"name": "mobilenet_v2", "weights": "random"}, "image": {"resize": 288, "crop": 256}},
}


def spectrum(bank: np.ndarray) -> dict[str, float]:
    centred = bank.astype(np.float64) - bank.mean(axis=0)
    values = np.linalg.eigvalsh(centred.T @ centred)[::-1]
    share = np.cumsum(values) / values.sum()
    return {str(d): round(float(share[d - 1]), 4) for d in (32, 64, 128, 256, 384) if d <= len(share)}


def measure(name: str, overrides: dict, train: list, queries: list, bank_size: int, repeats: int) -> dict:
    model = PatchCore(PatchCoreConfig.from_dict(overrides | {"runtime": {"num_workers": 1}}))
    feats = np.concatenate([f for _, f in model.embed(train, progress=False)])
    bank = feats[np.sort(np.random.default_rng(0).choice(len(feats), bank_size, replace=False))]
    q = np.concatenate([f for _, f in model.embed(queries, progress=False)])
    per_image = len(q) / len(queries)
    plain = FaissIndex.from_bank(bank)
    start = time.perf_counter()
    auto = BoundedIndex.build(bank, plain)  # what knn_backend auto builds; None when it declines
    build_s = time.perf_counter() - start
    bounded = auto or BoundedIndex.build(bank, plain, max_lead_share=1.0)  # measured either way
    times, found = {"faiss": [], "bounded": []}, {}
    for _ in range(repeats):
        for label, index in (("faiss", plain), ("bounded", bounded)):
            start = time.perf_counter()
            _, found[label] = index.search(q, 1)
            times[label].append((time.perf_counter() - start) / len(queries) * 1000)
    i_plain, i_bounded = found["faiss"], found["bounded"]
    exact = lambda idx: ((q.astype(np.float64) - bank[idx[:, 0]]) ** 2).sum(axis=1)  # noqa: E731
    e_plain, e_bounded = exact(i_plain), exact(i_bounded)
    ms = {label: round(min(v), 1) for label, v in times.items()}
    result = {
        "settings": overrides,
        "bank": list(bank.shape),
        "queries": len(q),
        "patches_per_image": int(per_image),
        "variance_share_on_leading_axes": spectrum(bank),
        "lead_axes": bounded.lead,
        "auto_would_pick": "bounded" if auto else "faiss",
        "settled_by_bound": round(bounded.stats["settled"] / bounded.stats["queries"], 4),
        "build_seconds": round(build_s, 2),
        "ms_per_image": ms,
        "speedup": round(ms["faiss"] / ms["bounded"], 2),
        "same_neighbour_share": float(np.mean(i_plain[:, 0] == i_bounded[:, 0])),
        # where the neighbours differ: ties, or faiss' float32 |q|^2+|b|^2-2q.b picking a farther row
        "bounded_never_farther": bool(np.all(e_bounded <= e_plain * (1 + 1e-6))),
        "max_rel_distance_diff": float(np.max(np.abs(e_bounded - e_plain) / np.maximum(e_plain, 1e-12))),
    }
    print(
        f"{name:<14} lead {bounded.lead:>4}  settled {result['settled_by_bound']:.3f}  faiss {ms['faiss']:6.1f} "
        f"ms/img  bounded {ms['bounded']:6.1f} ms/img  ({result['speedup']}x)  "
        f"same NN {result['same_neighbour_share']:.4f}",
        flush=True,
    )
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_ROOT))
    p.add_argument("--n-train", type=int, default=80)
    p.add_argument("--n-query", type=int, default=10, help="good and defect test-half images each")
    p.add_argument("--bank-size", type=int, default=5974)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(SETTINGS))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "knn_bound_cpu.json"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
    train, test = load_split(Path(args.data))
    _, test_half = halves(test)
    good = [s for s in test_half if s.label == 0][: args.n_query]
    bad = [s for s in test_half if s.label == 1][: args.n_query]
    queries = [s.path for s in good + bad]
    names = args.only.split(",") if args.only else list(SETTINGS)
    load_start = os.getloadavg()
    missing = [
        n
        for n in names
        if SETTINGS[n]["backbone"]["weights"] not in ("random", "imagenet")
        and not Path(SETTINGS[n]["backbone"]["weights"]).is_file()
    ]
    if missing:
        print(f"weights file {MNV2} not found: skipping {', '.join(missing)}", file=sys.stderr)
        names = [n for n in names if n not in missing]
    runs = {
        name: measure(name, SETTINGS[name], train[: args.n_train], queries, args.bank_size, args.repeats)
        for name in names
    }
    report = {
        "benchmark": "bounded exact kNN vs faiss IndexFlatL2 (bench/knn_bound.py)",
        "k": 1,
        "runs": runs,
        "machine": machine(),
        "load_average_at_start": [round(x, 2) for x in load_start],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
