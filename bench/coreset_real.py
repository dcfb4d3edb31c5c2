"""Coreset selection on *real* patch features of Magnetic Tile Defects (MTD), both implementations.

The projected (128-d) patch features of MTD `train` (split.json, 762 images) are extracted once
through the product (`PatchCore.embed`, then `coreset.project` with the fit's seed, exactly what
`fit` selects on) and cached as a float32 .npy file outside the repository. Each timed selection
then runs in its own fresh process (so each has its own peak RSS):

* ``kernel``: approx_greedy as the product runs it on a CPU (stage 2 compiled, patchcore.coreset_cpu);
* ``torch``: approx_greedy with its torch stage 2 (``coreset._USE_KERNEL = False``; what other
  devices, or a CPU without numba, run); the implementation before the compiled kernel existed;
* ``plain``: greedy_plain, the loop every pick of the others must equal, for its first
  ``--plain-picks`` picks (the first k greedy picks do not depend on how many follow).

Picks are compared index for index; the covering radius is the square root of the largest final
squared distance the selection returns (distance of the farthest row to its nearest pick, in the
shared projection).

Feature sets (``--features``, comma-separated):
* ``wrn50-random``: WideResNet-50-2 layers 2+3, random init (seed 0), 256/224 px: 597,360 patches;
* ``mnv2-imagenet``: MobileNetV2 ImageNet weights from ../shared/weights (features.6/10/13),
  288/256 px: 780,288 patches, the bank whose 10% coreset took 4,773 s before (issue 18).

Examples:  python bench/coreset_real.py --features wrn50-random,mnv2-imagenet --fraction 0.1 \\
               --out bench/results/coreset_real_cpu.json
           python bench/coreset_real.py --features mnv2-imagenet --impls kernel --threads 1 \\
               --out bench/results/coreset_real_1thread_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import coreset_bench  # noqa: E402
from bench.mtd import DEFAULT_ROOT, load_split  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2_imagenet_tflite_quant.pth"
FEATURE_SETS = {
    "wrn50-random": {
        "backbone": {"name": "wide_resnet50_2", "weights": "random"},
        "image": {"resize": 256, "crop": 224},
    },
    "mnv2-imagenet": {
        "backbone": {
            "name": "mobilenet_v2",
            "layers": ["features.6", "features.10", "features.13"],
            "weights": str(WEIGHTS),
        },
        "image": {"resize": 288, "crop": 256},
    },
}


def config_for(name: str, fraction: float):
    from patchcore import PatchCoreConfig

    spec = FEATURE_SETS[name]
    return PatchCoreConfig.from_dict(
        {
            **spec,
            "features": {"patch_size": 3},
            "coreset": {"fraction": fraction},
            "runtime": {"device": "cpu", "batch_size": 8, "num_workers": 2},
        }
    )


def projected_features(name: str, data: Path, cache: Path, log) -> tuple[Path, dict]:
    """The cached (N, 128) float32 projection of MTD train's patch features for feature set `name`."""
    import torch

    from patchcore import PatchCore
    from patchcore import coreset as coreset_lib

    train, _ = load_split(data)
    cfg = config_for(name, 0.1)
    key = hashlib.sha256(json.dumps([name, FEATURE_SETS[name], [str(p) for p in train]]).encode()).hexdigest()[:16]
    path = cache / f"{name}-{key}.npy"
    info = {"images": len(train), "config": FEATURE_SETS[name], "cache": str(path)}
    if path.exists():
        info["extract_seconds"] = None  # cached
        return path, info
    cache.mkdir(parents=True, exist_ok=True)
    model = PatchCore(cfg)
    start = time.perf_counter()
    dim, seed = cfg.coreset.projection_dim, cfg.runtime.seed
    parts = [
        coreset_lib.project(np.ascontiguousarray(f, dtype=np.float32), dim, seed=seed)
        for _, f in model.embed([str(p) for p in train], progress=False)
    ]
    projected = torch.cat(parts).numpy()
    info["extract_seconds"] = time.perf_counter() - start
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, projected, allow_pickle=False)
    os.replace(tmp, path)
    log(f"{name}: {projected.shape[0]} x {projected.shape[1]} projected features in {info['extract_seconds']:.0f} s")
    return path, info


def worker(job: dict) -> dict:
    """One timed selection in this fresh process."""
    import torch

    from patchcore import coreset

    coreset._USE_KERNEL = job["impl"] != "torch"
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    projected = torch.from_numpy(np.load(job["features"]))
    n = projected.shape[0]
    picks = job["picks"]
    method = "greedy_plain" if job["impl"] == "plain" else "approx_greedy"
    compile_seconds = None
    if job["impl"] == "kernel":  # numba compiles (or loads its on-disk cache) at the first call
        t = time.perf_counter()
        coreset.greedy_selection(projected[:4096], 0.01, progress=False)
        compile_seconds = time.perf_counter() - t
    start, cpu0 = time.perf_counter(), time.process_time()
    sel = coreset.greedy_selection(projected, picks / n + 0.5 / n, method=method, seed=0, progress=False)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    assert len(sel.indices) == picks, (len(sel.indices), picks)
    np.save(job["picks_out"], sel.indices, allow_pickle=False)
    final = sel.sq_distances[sel.sq_distances >= 0]
    return {
        "impl": job["impl"],
        "method": method,
        "rows": n,
        "picks": picks,
        "seconds": round(seconds, 2),
        "picks_per_second": round(picks / seconds, 1),
        "covering_radius": float(np.sqrt(final.max())),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "threads": torch.get_num_threads(),
        "cpu_seconds_per_wall_second": round(cpu / seconds, 2),
        "first_call_seconds_numba": None if compile_seconds is None else round(compile_seconds, 2),
        "kernel_used": job["impl"] == "kernel" and coreset.coreset_cpu.available(),
    }


def run_child(job: dict, log) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {job['impl']} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    log(
        f"  {result['impl']:6s} {result['picks']:>6} picks of {result['rows']} in {result['seconds']:8.1f} s = "
        f"{result['picks_per_second']:7.1f} picks/s, radius {result['covering_radius']:.4f}, "
        f"peak RSS {result['peak_rss_mib']} MiB, cpu/wall {result['cpu_seconds_per_wall_second']}"
    )
    return result


def machine_info() -> dict:
    info = coreset_bench.machine_info()
    try:
        import numba

        info["numba"] = numba.__version__
    except Exception:  # noqa: BLE001 - report, do not fail
        info["numba"] = None
    return info


def markdown(result: dict) -> str:
    lines = [
        f"Coreset on real MTD patch features ({result['fraction']:.0%}), `bench/coreset_real.py`, "
        f"{result['machine']['cpu_model']} ({result['machine']['logical_cores']} cores), {result['date']}.",
        "",
        "| features | rows | implementation | threads | picks | seconds | picks/s | covering radius | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, fs in result["feature_sets"].items():
        for r in fs["runs"].values():
            lines.append(
                f"| {name} | {r['rows']:,} | {r['impl']} ({r['method']}){' *' if r.get('from_earlier_run') else ''} | "
                f"{r['threads']} | {r['picks']:,} | {r['seconds']:.1f} | {r['picks_per_second']:.1f} | "
                f"{r['covering_radius']:.4f} | {r['peak_rss_mib']:,} |"
            )
    lines.append("")
    if any(r.get("from_earlier_run") for fs in result["feature_sets"].values() for r in fs["runs"].values()):
        lines.append("\\* from an earlier run of this script on the same machine (`--earlier`), same code path.")
        lines.append("")
    for name, fs in result["feature_sets"].items():
        for k, v in fs["comparison"].items():
            lines.append(f"- {name}: {k}: {v}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_ROOT))
    p.add_argument("--features", default="wrn50-random,mnv2-imagenet")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--plain-picks", type=int, default=1000, help="picks of the greedy_plain prefix (0: skip)")
    p.add_argument(
        "--torch-picks", type=int, default=0, help="picks of the torch implementation (0: the full run, like kernel)"
    )
    p.add_argument("--impls", default="kernel,torch,plain", help="which of kernel, torch, plain to run")
    p.add_argument("--threads", type=int, default=0, help="torch (and kernel) threads in the workers (0: default)")
    p.add_argument(
        "--earlier",
        default=None,
        help="an earlier result JSON of this script: runs of implementations not run now are taken from it "
        "(marked with that file's date) and compared",
    )
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "patchcore-coreset-real"))
    p.add_argument("--out", default="bench/results/coreset_real_cpu.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    data = Path(args.data)
    if not (data / "split.json").exists():
        print(f"MTD not found at {data} (needs split.json): pass --data", file=sys.stderr)
        return 2
    if "mnv2-imagenet" in args.features and not WEIGHTS.exists():
        print(f"MobileNetV2 ImageNet weights not found at {WEIGHTS}", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    result = {
        "benchmark": "coreset on real MTD features (bench/coreset_real.py)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "fraction": args.fraction,
        "projection_dim": 128,
        "num_starts": 10,
        "seed": 0,
        "feature_sets": {},
    }
    cache = Path(args.cache)
    earlier_runs, earlier_label = {}, None
    if args.earlier:
        previous = json.loads(Path(args.earlier).read_text())
        earlier_runs = previous["feature_sets"]
        earlier_label = f"{previous['date']} (load {previous['machine']['load_average_at_start']})"
    with tempfile.TemporaryDirectory(prefix="coreset-real-") as tmp:
        for name in [s.strip() for s in args.features.split(",") if s.strip()]:
            path, info = projected_features(name, data, cache, log)
            rows = int(np.load(path, mmap_mode="r").shape[0])
            picks = max(1, int(rows * args.fraction))
            log(f"{name}: {rows} rows, {picks} picks ({args.fraction:.0%})")
            impls = {s.strip() for s in args.impls.split(",")}
            jobs = {
                "kernel": picks,
                "torch": args.torch_picks or picks,
                **({"plain": min(args.plain_picks, picks)} if args.plain_picks else {}),
            }
            jobs = {impl: k for impl, k in jobs.items() if impl in impls}
            runs, chosen = {}, {}
            for impl, k in jobs.items():
                out = str(Path(tmp) / f"{name}-{impl}.npy")
                job = {"impl": impl, "features": str(path), "picks": k, "picks_out": out, "threads": args.threads}
                runs[impl] = run_child(job, log)
                chosen[impl] = np.load(out)
            earlier = earlier_runs.get(name, {}).get("runs", {})
            for impl, run in earlier.items():
                if impl not in runs:
                    runs[impl] = {**run, "from_earlier_run": earlier_label}
                    if run.get("picks_file") and Path(run["picks_file"]).exists():
                        chosen[impl] = np.load(run["picks_file"])
            for impl in jobs:  # keep the picks beside the results, for --earlier comparisons
                keep = cache / f"{name}-{impl}-{runs[impl]['picks']}-picks.npy"
                np.save(keep, chosen[impl], allow_pickle=False)
                runs[impl]["picks_file"] = str(keep)
            comparison = {}
            for other in ("torch", "plain"):
                if other in chosen and "kernel" in chosen:
                    k = len(chosen[other])
                    same = bool(np.array_equal(chosen["kernel"][:k], chosen[other]))
                    comparison[f"kernel picks == {other} picks (first {k:,})"] = same
            for k, v in earlier_runs.get(name, {}).get("comparison", {}).items():
                if "torch" in k and not any("torch" in c for c in comparison):
                    comparison[f"{k} (in the earlier run)"] = v
            if runs.get("torch", {}).get("picks") == picks and "kernel" in runs:
                comparison["kernel speed-up over torch, full run"] = round(
                    runs["torch"]["seconds"] / runs["kernel"]["seconds"], 2
                )
            info["rows"] = rows
            result["feature_sets"][name] = {"features": info, "runs": runs, "comparison": comparison}
            for k, v in comparison.items():
                log(f"  {k}: {v}")
    result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
