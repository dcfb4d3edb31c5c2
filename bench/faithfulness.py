"""Faithfulness check: our PatchCore scores against the authors' reference implementation.

Runs `patchcore` (this library) and the reference implementation
(amazon-science/patchcore-inspection, `src/patchcore`) on the same images with the same backbone
weights, the coreset off (ours: `coreset.method = identity`, fraction 1.0; reference:
`IdentitySampler`), k = 1 and squared L2 distances, and compares image scores and anomaly maps.

Pretrained weights cannot be assumed to be downloadable, so the backbone is a seeded random-init
torchvision model (`torch.manual_seed(seed); torchvision.models.get_model(name, weights=None)`)
saved as a state_dict file; both implementations load that file. Random weights make the scores
meaningless for inspection but exercise exactly the same arithmetic as pretrained ones.

The reference's Python package is also called `patchcore`, so it runs in a separate process with
PYTHONPATH=<reference src> from a scratch directory; that process checks that `patchcore`
really resolves to the reference copy before doing anything. No reference code is copied here:
the runner below only calls its public classes (`PatchCore.load/fit/predict`, `IdentitySampler`,
`FaissNN`).

Acceptance: identical image ranking, Spearman >= 0.9999, max relative image-score difference
<= 1e-3, equal memory-bank size. Exit status 0 on pass, 1 on fail, 2 on a setup error.

Diagnostic (informative, in the JSON under "diagnostic"): both sides' test embeddings (recorded
while their predict runs) and memory banks are compared directly, and exact float64 image scores
are computed from each side's own embeddings and bank. This separates pipeline differences from
float32 nearest-neighbour arithmetic: the reference reports faiss' |q|^2 + |b|^2 - 2 q.b in
float32, which is off by up to ~1e-3 relative where nearest-neighbour distances are tiny compared
with the features' squared norms (random-init backbones on near-identical images), while this
library recomputes |q - b|^2 for the neighbour faiss found.

Examples:
    python bench/faithfulness.py                       # MTD subset -> bench/results/faithfulness.json
    python bench/faithfulness.py --synthetic           # -> bench/results/faithfulness_synthetic.json
    python bench/faithfulness.py --reference-src /tmp/patchcore-ref/src --n-train 20 --n-test 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror/amazon-science+patchcore-inspection/repo")
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "mtd"
RESULTS = REPO / "bench" / "results"
MIN_SPEARMAN = 0.9999
MAX_REL_DIFF = 1e-3

HOW_TO_GET_REFERENCE = (
    "The reference implementation is not available. Get it with\n"
    "  git clone https://github.com/amazon-science/patchcore-inspection /tmp/patchcore-inspection\n"
    "and pass --reference-src /tmp/patchcore-inspection/src (or set PATCHCORE_REFERENCE_SRC).\n"
    f"(Looked for a bare mirror at {MIRROR}.) Never copy it into this repository."
)

# Runs inside the reference process. Written to a scratch dir and executed with
# PYTHONPATH=<reference src>; it talks to us through JSON in and .npz out.
REFERENCE_RUNNER = textwrap.dedent(
    r"""
    import json, sys, time
    from pathlib import Path

    t_start = time.perf_counter()
    job = json.loads(Path(sys.argv[1]).read_text())
    import numpy as np
    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms

    import patchcore
    src = Path(job["reference_src"]).resolve()
    where = Path(patchcore.__file__).resolve()
    if src not in where.parents:
        sys.exit(f"patchcore resolves to {where}, not to the reference copy under {src}")
    import patchcore.common
    import patchcore.patchcore
    import patchcore.sampler

    torch.set_num_threads(job["threads"])
    device = torch.device("cpu")
    transform = transforms.Compose([
        transforms.Resize(job["resize"]),
        transforms.CenterCrop(job["crop"]),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])

    class Images(torch.utils.data.Dataset):
        def __init__(self, paths):
            self.paths = paths
        def __len__(self):
            return len(self.paths)
        def __getitem__(self, i):
            return transform(Image.open(self.paths[i]).convert("RGB"))

    def loader(paths):
        return torch.utils.data.DataLoader(Images(paths), batch_size=job["batch_size"], shuffle=False, num_workers=0)

    backbone = torchvision.models.get_model(job["backbone"], weights=None)
    backbone.load_state_dict(torch.load(job["weights"], map_location="cpu", weights_only=True), strict=True)
    backbone.name = job["backbone"]
    backbone.eval()

    model = patchcore.patchcore.PatchCore(device)
    model.load(
        backbone=backbone,
        layers_to_extract_from=job["layers"],
        device=device,
        input_shape=(3, job["crop"], job["crop"]),
        pretrain_embed_dimension=job["pretrain_dim"],
        target_embed_dimension=job["target_dim"],
        patchsize=job["patch_size"],
        featuresampler=(patchcore.sampler.RandomSampler(job["sampler_percentage"]) if job.get("sampler_percentage")
                        else patchcore.sampler.IdentitySampler()),
        anomaly_score_num_nn=1,
        nn_method=patchcore.common.FaissNN(False, job["threads"]),
    )
    t0 = time.perf_counter()
    model.fit(loader(job["train"]))
    t1 = time.perf_counter()
    # Record the test embeddings as predict computes them (a pass-through wrapper, no extra work).
    captured = []
    embed = model._embed
    def recording_embed(*args, **kwargs):
        out = embed(*args, **kwargs)
        if kwargs.get("provide_patch_shapes"):
            captured.append(np.asarray(out[0], dtype=np.float32))
        return out
    model._embed = recording_embed
    scores, masks, _, _ = model.predict(loader(job["test"]))
    t2 = time.perf_counter()
    np.savez(
        job["out"],
        bank=np.asarray(model.anomaly_scorer.detection_features, dtype=np.float32),
        test_features=np.concatenate(captured),
        scores=np.asarray(scores, dtype=np.float64),
        maps=np.stack([np.asarray(m, dtype=np.float32) for m in masks]),
        bank_shape=np.asarray(model.anomaly_scorer.detection_features.shape),
        fit_seconds=t1 - t0,
        predict_seconds=t2 - t1,
        setup_seconds=t0 - t_start,
        patchcore_file=str(where),
    )
    """
)


class SetupError(RuntimeError):
    """Something needed for the comparison is missing; exit status 2."""


# -- inputs -------------------------------------------------------------------------------------
def spread(items: list, n: int) -> list:
    """n items evenly spaced over the list (deterministic, covers the whole list)."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def mtd_images(root: Path, n_train: int, n_test: int) -> tuple[list[Path], list[Path], list[int]]:
    split_file = root / "split.json"
    if not split_file.is_file():
        raise SetupError(f"{split_file} not found; pass --data DIR (a folder with split.json) or --synthetic")
    split = json.loads(split_file.read_text())
    n_good = n_test // 2
    train = spread(split["train"], n_train)
    good = spread(split["test_good"], n_good)
    defect = spread(split["test_defect"], n_test - n_good)  # grouped by class: spreading covers all five
    return [root / p for p in train], [root / p for p in good + defect], [0] * len(good) + [1] * len(defect)


def synthetic_images(
    root: Path, n_train: int, n_test: int, size_px: int, seed: int
) -> tuple[list[Path], list[Path], list[int]]:
    from patchcore.synthetic import DEFECT_TYPES, generate_product

    n_good = n_test // 2
    n_defect = n_test - n_good
    per_type = math.ceil(n_defect / len(DEFECT_TYPES))
    folder = generate_product(
        root, "tiles", n_train=n_train, n_test_good=n_good, n_test_defect=per_type, size_px=size_px, seed=seed
    )
    train = sorted((folder / "train" / "good").glob("*.png"))
    good = sorted((folder / "test" / "good").glob("*.png"))
    by_type = [sorted((folder / "test" / d).glob("*.png")) for d in DEFECT_TYPES]
    defect = [paths[i] for i in range(per_type) for paths in by_type][:n_defect]  # round-robin over types
    return train, good + defect, [0] * len(good) + [1] * len(defect)


def write_weights(directory: Path, backbone: str, seed: int) -> tuple[Path, str, float]:
    import torch
    import torchvision

    from patchcore.backbone import sha256_file

    start = time.perf_counter()
    torch.manual_seed(seed)
    model = torchvision.models.get_model(backbone, weights=None)
    path = directory / f"{backbone}_seed{seed}.pth"
    torch.save(model.state_dict(), path)
    return path, sha256_file(path), time.perf_counter() - start


def resolve_reference(arg: str | None, scratch: Path) -> tuple[Path, str | None]:
    """(reference src folder, git commit when known)."""
    src = arg or os.environ.get("PATCHCORE_REFERENCE_SRC")
    if src:
        src = Path(src).expanduser().resolve()
        if not (src / "patchcore" / "patchcore.py").is_file():
            raise SetupError(
                f"{src} is not the reference's src folder (no patchcore/patchcore.py in it)\n{HOW_TO_GET_REFERENCE}"
            )
        return src, None
    if not MIRROR.is_dir():
        raise SetupError(f"{HOW_TO_GET_REFERENCE}")
    export = scratch / "reference"
    export.mkdir()
    archive = subprocess.run(["git", f"--git-dir={MIRROR}", "archive", "HEAD", "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(export)], input=archive.stdout, check=True)
    commit = subprocess.run(
        ["git", f"--git-dir={MIRROR}", "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return export / "src", commit


# -- the two implementations ----------------------------------------------------------------------
def run_reference(src: Path, job: dict, scratch: Path) -> dict:
    runner = scratch / "reference_runner.py"
    runner.write_text(REFERENCE_RUNNER)
    job_file = scratch / "reference_job.json"
    job = {**job, "reference_src": str(src), "out": str(scratch / "reference_out.npz")}
    job_file.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(src)
    env["TQDM_DISABLE"] = "1"  # the reference's progress bars would interleave with our table
    start = time.perf_counter()
    # -P: no script dir on sys.path; cwd is the scratch dir, so this repo's `patchcore` cannot shadow.
    proc = subprocess.run([sys.executable, "-P", str(runner), str(job_file)], cwd=scratch, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SetupError(f"the reference implementation failed (exit {proc.returncode}); see its output above")
    out = np.load(job["out"])
    return {
        "scores": out["scores"],
        "maps": out["maps"],
        "bank_shape": [int(v) for v in out["bank_shape"]],
        "bank": out["bank"],
        "test_features": out["test_features"],
        "fit_seconds": float(out["fit_seconds"]),
        "predict_seconds": float(out["predict_seconds"]),
        "setup_seconds": float(out["setup_seconds"]),
        "process_wall_seconds": wall,
        "patchcore_file": str(out["patchcore_file"]),
    }


def run_ours(
    job: dict, coreset: dict | None = None, num_workers: int = 0, knn_backend: str = "auto", engine: str = "torch"
) -> dict:
    import torch

    import patchcore
    from patchcore import PatchCore, PatchCoreConfig

    torch.set_num_threads(job["threads"])
    start = time.perf_counter()
    cfg = PatchCoreConfig.from_dict(
        {
            "backbone": {"name": job["backbone"], "layers": job["layers"], "weights": job["weights"]},
            "image": {"resize": job["resize"], "crop": job["crop"]},
            "features": {
                "patch_size": job["patch_size"],
                "pretrain_dim": job["pretrain_dim"],
                "target_dim": job["target_dim"],
            },
            "coreset": coreset or {"method": "identity", "fraction": 1.0},
            "scoring": {
                "k": 1,
                "distance": "squared",
                "reweight": False,
                "knn_backend": knn_backend,
                "smoothing_sigma": 4.0,
            },
            "runtime": {
                "device": "cpu",
                "batch_size": job["batch_size"],
                "num_workers": num_workers,
                "engine": engine,
            },
        }
    )
    model = PatchCore(cfg)
    model._setup()  # build the backbone now, so fit_seconds is comparable with the reference's
    t0 = time.perf_counter()
    model.fit(job["train"], progress=False)
    export_seconds = 0.0
    if engine != "torch":  # the one-off export (done when a model is saved) is not part of scoring
        start_export = time.perf_counter()
        model._scoring_patches(torch.zeros(1, 3, job["crop"], job["crop"]))
        export_seconds = time.perf_counter() - start_export
    t1 = time.perf_counter()
    captured = []
    batch_features = model._batch_features

    def recording_batch_features(images, **kwargs):  # pass-through: keep the test embeddings predict computes
        feats = batch_features(images, **kwargs)  # one (h, w, dim) tensor per image
        captured.extend(f.reshape(-1, f.shape[-1]).cpu().numpy().astype(np.float32) for f in feats)
        return feats

    model._batch_features = recording_batch_features
    pred = model.predict(job["test"], maps=True, progress=False)
    t2 = time.perf_counter()
    return {
        "scores": np.asarray(pred.scores, dtype=np.float64),
        "maps": np.stack(pred.input_maps),  # the crop x crop maps, the frame the reference's maps have
        "bank": np.asarray(model.memory_bank_, dtype=np.float32),
        "test_features": np.concatenate(captured),
        "bank_shape": list(model.memory_bank_.shape),
        "fit_seconds": t1 - t0 - export_seconds,
        "export_seconds": export_seconds,
        "predict_seconds": t2 - t1,
        "setup_seconds": t0 - start,
        "patchcore_file": str(Path(patchcore.__file__).resolve()),
        "knn_backend": model.index_.name,
        "knn_settled_by_bound": (
            round(model.index_.stats["settled"] / max(1, model.index_.stats["queries"]), 4)
            if hasattr(model.index_, "stats")
            else None
        ),
    }


# -- comparison -----------------------------------------------------------------------------------
def compare_scores(
    ours: np.ndarray, ref: np.ndarray, min_spearman: float = MIN_SPEARMAN, max_rel_diff: float = MAX_REL_DIFF
) -> dict:
    """Spearman, rank identity and max relative difference (relative to the reference)."""
    from scipy.stats import rankdata, spearmanr

    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape or ours.ndim != 1:
        raise ValueError(f"score arrays differ in shape: {ours.shape} vs {ref.shape}")
    rel = np.abs(ours - ref) / np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
    rho = float(spearmanr(ours, ref).statistic) if len(ours) > 1 else 1.0
    same_ranking = bool(np.array_equal(rankdata(ours, method="ordinal"), rankdata(ref, method="ordinal")))
    max_rel = float(rel.max())
    checks = {
        "same_ranking": same_ranking,
        "spearman_ok": bool(rho >= min_spearman),
        "max_rel_diff_ok": bool(max_rel <= max_rel_diff),
        "all_finite": bool(np.isfinite(ours).all() and np.isfinite(ref).all()),
    }
    return {
        "spearman": rho,
        "same_ranking": same_ranking,
        "max_rel_diff": max_rel,
        "mean_rel_diff": float(rel.mean()),
        "max_abs_diff": float(np.abs(ours - ref).max()),
        "rel_diff": rel.tolist(),
        "thresholds": {"min_spearman": min_spearman, "max_rel_diff": max_rel_diff},
        "checks": checks,
        "passed": all(checks.values()),
    }


def compare_maps(ours: np.ndarray, ref: np.ndarray) -> dict:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return {"shape_ours": list(ours.shape), "shape_reference": list(ref.shape), "comparable": False}
    diff = np.abs(ours - ref)
    per_image_rel = diff.reshape(len(diff), -1).max(1) / np.abs(ref).reshape(len(ref), -1).max(1)
    positive = np.abs(ref) > 0
    argmax_same = [bool(np.argmax(o) == np.argmax(r)) for o, r in zip(ours, ref)]
    return {
        "comparable": True,
        "shape": list(ours.shape),
        "max_abs_diff": float(diff.max()),
        "reference_max_value": float(np.abs(ref).max()),
        "max_abs_diff_over_reference_max": float(diff.max() / np.abs(ref).max()),
        "max_per_image_rel_diff": float(per_image_rel.max()),  # per image: max |diff| / max |ref map|
        "max_pixel_rel_diff": float((diff[positive] / np.abs(ref[positive])).max()) if positive.any() else None,
        "mean_abs_diff": float(diff.mean()),
        "argmax_pixel_identical_fraction": float(np.mean(argmax_same)),
    }


def exact_scores(features: np.ndarray, bank: np.ndarray, n_images: int, shortlist: int = 16) -> np.ndarray:
    """Image scores (max over patches of the squared L2 distance to the nearest bank row) without the
    float32 cancellation of faiss' |q|^2 + |b|^2 - 2 q.b: faiss shortlists `shortlist` candidates per
    patch, then their distances are recomputed as sums of squared differences in float64."""
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    nearest = np.empty(len(features))
    bank64 = bank.astype(np.float64)
    for start in range(0, len(features), 2048):
        q = np.ascontiguousarray(features[start : start + 2048], dtype=np.float32)
        _, candidates = index.search(q, min(shortlist, len(bank)))
        exact = ((bank64[candidates] - q.astype(np.float64)[:, None, :]) ** 2).sum(-1)
        nearest[start : start + len(q)] = exact.min(1)
    return nearest.reshape(n_images, -1).max(1)


def compare_features(ours: dict, ref: dict, n_images: int) -> dict:
    """Where score differences come from: the embeddings and memory bank (the pipeline), or the
    float32 nearest-neighbour arithmetic. Exact float64 scores are computed from each
    implementation's own test embeddings and bank (as recorded during its predict)."""
    from scipy.stats import spearmanr

    out: dict = {}
    for name in ("bank", "test_features"):
        a, b = ours[name].astype(np.float64), ref[name].astype(np.float64)
        if a.shape != b.shape:
            out[name] = {"comparable": False, "shape_ours": list(a.shape), "shape_reference": list(b.shape)}
            continue
        row_rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)
        out[name] = {
            "comparable": True,
            "shape": list(a.shape),
            "max_abs_diff": float(np.abs(a - b).max()),
            "max_abs_value": float(np.abs(b).max()),
            "max_row_rel_l2_diff": float(row_rel.max()),
            "mean_row_sq_norm": float((b * b).sum(1).mean()),
        }
        del a, b
    if out["bank"].get("comparable") and out["test_features"].get("comparable"):
        exact_ours = exact_scores(ours["test_features"], ours["bank"], n_images)
        exact_ref = exact_scores(ref["test_features"], ref["bank"], n_images)
        rel = lambda a, b: float(np.max(np.abs(a - b) / np.abs(b)))  # noqa: E731
        out["exact_float64_scores"] = {
            "ours": exact_ours.tolist(),
            "reference": exact_ref.tolist(),
            "max_rel_diff_ours_vs_reference": rel(exact_ours, exact_ref),
            "spearman_ours_vs_reference": float(spearmanr(exact_ours, exact_ref).statistic) if n_images > 1 else 1.0,
            # How far each implementation's reported score is from the exact one for its own features:
            "max_rel_error_ours": rel(ours["scores"], exact_ours),
            "max_rel_error_reference": rel(ref["scores"], exact_ref),
            "min_nn_distance_over_mean_sq_norm": float(
                min(exact_ref.min(), exact_ours.min()) / out["test_features"]["mean_row_sq_norm"]
            ),
        }
    return out


def library_fingerprint() -> dict:
    """sha256 over this library's source files, so a result can be tied to the code that produced it."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted((REPO / "patchcore").glob("*.py"))
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return {
        "patchcore_sources_sha256": digest.hexdigest(),
        "n_files": len(files),
        "git_head": git.stdout.strip() if git.returncode == 0 else None,
    }


def environment(threads: int) -> dict:
    import faiss
    import PIL
    import scipy
    import torch
    import torchvision

    cpu = platform.processor()
    try:
        cpu = (
            next(
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            )
            or cpu
        )
    except (OSError, StopIteration):
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = None
    return {
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu,
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "memory_gib": round(mem, 1) if mem else None,
            "device": "cpu",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "faiss": faiss.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "pillow": PIL.__version__,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:" + __doc__.split("Examples:")[1],
    )
    parser.add_argument(
        "--reference-src",
        help="exported reference `src` folder (default: $PATCHCORE_REFERENCE_SRC, "
        f"else exported from the mirror {MIRROR} into a temp dir)",
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="MTD folder with split.json (default: %(default)s)"
    )
    parser.add_argument("--synthetic", action="store_true", help="use patchcore.synthetic images instead of --data")
    parser.add_argument(
        "--synthetic-size", type=int, default=256, help="synthetic image side in px (default: %(default)s)"
    )
    parser.add_argument("--n-train", type=int, default=40, help="training images (default: %(default)s)")
    parser.add_argument(
        "--n-test", type=int, default=40, help="test images, half good half defect (default: %(default)s)"
    )
    parser.add_argument("--backbone", default="wide_resnet50_2", help="torchvision architecture (default: %(default)s)")
    parser.add_argument("--layers", default="layer2,layer3", help="comma-separated layers (default: %(default)s)")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=3)
    parser.add_argument("--pretrain-dim", type=int, default=1024)
    parser.add_argument("--target-dim", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random backbone weights and synthetic data")
    parser.add_argument(
        "--threads", type=int, default=min(os.cpu_count() or 1, 8), help="torch/faiss threads, both sides"
    )
    parser.add_argument("--knn-backend", default="auto", help="our scoring.knn_backend (default: the product default)")
    parser.add_argument("--min-spearman", type=float, default=MIN_SPEARMAN)
    parser.add_argument("--max-rel-diff", type=float, default=MAX_REL_DIFF)
    parser.add_argument("--out", type=Path, help="results JSON (default: bench/results/faithfulness[_synthetic].json)")
    args = parser.parse_args(argv)
    try:
        return run(args, argv)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.n_train < 1 or args.n_test < 2:
        raise SetupError("need --n-train >= 1 and --n-test >= 2")
    out = args.out or RESULTS / ("faithfulness_synthetic.json" if args.synthetic else "faithfulness.json")

    library = library_fingerprint()
    scratch = Path(tempfile.mkdtemp(prefix="patchcore-faithfulness-"))
    try:
        ref_src, ref_commit = resolve_reference(args.reference_src, scratch)
        version_file = ref_src / "patchcore" / "VERSION"
        ref_version = version_file.read_text().strip() if version_file.is_file() else None
        if args.synthetic:
            data_root = scratch / "data"
            train, test, labels = synthetic_images(data_root, args.n_train, args.n_test, args.synthetic_size, args.seed)
            data_root = data_root / "tiles"
            dataset = {
                "kind": "synthetic",
                "generator": "patchcore.synthetic.generate_product",
                "product": "tiles",
                "size_px": args.synthetic_size,
                "seed": args.seed,
            }
        else:
            data_root = args.data.resolve()
            train, test, labels = mtd_images(data_root, args.n_train, args.n_test)
            dataset = {
                "kind": "mtd",
                "root": str(data_root),
                "split": "split.json",
                "selection": "evenly spaced over split.json train / test_good / test_defect",
            }
        weights, weights_sha, weights_seconds = write_weights(scratch, args.backbone, args.seed)
        job = {
            "backbone": args.backbone,
            "layers": [s.strip() for s in args.layers.split(",") if s.strip()],
            "weights": str(weights),
            "resize": args.resize,
            "crop": args.crop,
            "patch_size": args.patch_size,
            "pretrain_dim": args.pretrain_dim,
            "target_dim": args.target_dim,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "train": [str(p) for p in train],
            "test": [str(p) for p in test],
        }
        print(
            f"{len(train)} train / {len(test)} test images, {args.backbone} {job['layers']} random weights "
            f"(seed {args.seed}, sha256 {weights_sha[:12]}), {args.resize}->{args.crop}",
            flush=True,
        )
        print(f"reference: {ref_src}", flush=True)
        ref = run_reference(ref_src, job, scratch)
        ours = run_ours(job, knn_backend=args.knn_backend)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    scores = compare_scores(ours["scores"], ref["scores"], args.min_spearman, args.max_rel_diff)
    maps = compare_maps(ours["maps"], ref["maps"])
    features = compare_features(ours, ref, len(test))
    bank_ok = ours["bank_shape"] == ref["bank_shape"]
    scores["checks"]["bank_shape_equal"] = bank_ok
    scores["passed"] = scores["passed"] and bank_ok

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(data_root))
        except ValueError:
            return str(p)

    print(f"\n{'image':<44} {'label':>5} {'ours':>14} {'reference':>14} {'rel diff':>10}")
    for i, p in enumerate(test):
        print(
            f"{rel(p)[-44:]:<44} {labels[i]:>5} {ours['scores'][i]:>14.6g} {ref['scores'][i]:>14.6g} "
            f"{scores['rel_diff'][i]:>10.2e}"
        )
    print(f"\nmemory bank: ours {ours['bank_shape']}, reference {ref['bank_shape']}")
    print(
        f"Spearman {scores['spearman']:.8f} (>= {args.min_spearman})  same ranking: {scores['same_ranking']}  "
        f"max rel diff {scores['max_rel_diff']:.3e} (<= {args.max_rel_diff:g})"
    )
    if maps.get("comparable"):
        print(
            f"maps {maps['shape']}: max abs diff {maps['max_abs_diff']:.3e} "
            f"(reference max {maps['reference_max_value']:.4g}, ratio {maps['max_abs_diff_over_reference_max']:.3e}), "
            f"max pixel rel diff {maps['max_pixel_rel_diff']:.3e}"
        )
    else:
        print(f"maps not comparable: {maps}")
    if "exact_float64_scores" in features:
        fx = features["exact_float64_scores"]
        print(
            f"diagnostic: test embeddings max row rel L2 diff {features['test_features']['max_row_rel_l2_diff']:.2e}, "
            f"bank {features['bank']['max_row_rel_l2_diff']:.2e}; exact float64 scores from each side's own "
            f"features: ours vs reference max rel diff {fx['max_rel_diff_ours_vs_reference']:.2e}; reported vs exact: "
            f"ours {fx['max_rel_error_ours']:.2e}, reference {fx['max_rel_error_reference']:.2e}"
        )
    print(
        f"time: ours fit {ours['fit_seconds']:.1f}s predict {ours['predict_seconds']:.1f}s | reference fit "
        f"{ref['fit_seconds']:.1f}s predict {ref['predict_seconds']:.1f}s (process {ref['process_wall_seconds']:.1f}s)"
    )
    print("PASS" if scores["passed"] else f"FAIL: {[k for k, v in scores['checks'].items() if not v]}")

    fx = features.get("exact_float64_scores")
    diagnosis = None
    if fx:
        diagnosis = (
            f"embeddings agree to {features['test_features']['max_row_rel_l2_diff']:.1e} (row-relative L2), bank to "
            f"{features['bank']['max_row_rel_l2_diff']:.1e}; exact float64 scores from each side's own features "
            "agree to "
            f"{fx['max_rel_diff_ours_vs_reference']:.1e}. Reported scores deviate from those exact scores by "
            f"{fx['max_rel_error_ours']:.1e} (ours) and {fx['max_rel_error_reference']:.1e} (reference): "
            "faiss computes "
            "|q|^2+|b|^2-2q.b in float32, and the smallest nearest-neighbour distance here is only "
            f"{fx['min_nn_distance_over_mean_sq_norm']:.1e} of a feature's squared norm."
        )
    env = environment(args.threads)
    if library_fingerprint() != library:
        print("warning: patchcore/*.py changed while this ran; the numbers may mix two versions", file=sys.stderr)
        library["changed_during_run"] = True
    result = {
        "benchmark": "faithfulness",
        "description": (
            "image scores of this library vs the reference implementation, same weights and images, coreset off"
        ),
        "passed": scores["passed"],
        "settings": {
            "backbone": args.backbone,
            "layers": job["layers"],
            "weights": "random init, torch.manual_seed(seed) "
            "then torchvision.models.get_model(backbone, weights=None), saved as state_dict",
            "seed": args.seed,
            "resize": args.resize,
            "crop": args.crop,
            "patch_size": args.patch_size,
            "pretrain_dim": args.pretrain_dim,
            "target_dim": args.target_dim,
            "k": 1,
            "distance": "squared L2",
            "smoothing_sigma": 4.0,
            "coreset": {"ours": "identity (fraction 1.0)", "reference": "IdentitySampler"},
            "knn": {
                "ours": f"scoring.knn_backend={args.knn_backend} (ran: {ours['knn_backend']}), distances as "
                "PatchCore.patch_scores returns them",
                "reference": "FaissNN(on_gpu=False): IndexFlatL2 distances as returned",
            },
            "batch_size": args.batch_size,
            "threads": args.threads,
            "device": "cpu",
        },
        "weights_sha256": weights_sha,
        "dataset": dataset,
        "n_train": len(train),
        "n_test": len(test),
        "n_test_good": labels.count(0),
        "n_test_defect": labels.count(1),
        "reference": {
            "src": "exported from mirror" if ref_commit else str(ref_src),
            "repository": "https://github.com/amazon-science/patchcore-inspection",
            "commit": ref_commit,
            "version": ref_version,
        },
        "packages": {
            "ours": str(Path(ours["patchcore_file"]).relative_to(REPO))
            if REPO in Path(ours["patchcore_file"]).parents
            else ours["patchcore_file"],
            "reference": "patchcore/__init__.py of the reference src (checked in its process)",
        },
        "library": library,
        "memory_bank_shape": {"ours": ours["bank_shape"], "reference": ref["bank_shape"]},
        "image_scores": {k: v for k, v in scores.items() if k != "rel_diff"},
        "anomaly_maps": maps,
        "diagnostic": features,
        "diagnosis": diagnosis,
        "per_image": [
            {
                "path": rel(p),
                "label": labels[i],
                "ours": float(ours["scores"][i]),
                "reference": float(ref["scores"][i]),
                "rel_diff": scores["rel_diff"][i],
            }
            for i, p in enumerate(test)
        ],
        "wall_seconds": {
            "write_weights": weights_seconds,
            "ours": {"setup": ours["setup_seconds"], "fit": ours["fit_seconds"], "predict": ours["predict_seconds"]},
            "reference": {
                "setup": ref["setup_seconds"],
                "fit": ref["fit_seconds"],
                "predict": ref["predict_seconds"],
                "process": ref["process_wall_seconds"],
            },
        },
        **env,
        "command": " ".join(["python", "bench/faithfulness.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if scores["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
