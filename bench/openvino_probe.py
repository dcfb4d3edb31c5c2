"""Does an OpenVINO engine pay? The exported feature extractor (the `extractor.onnx` that
model.runtime.engine=onnxruntime saves: WRN50 to layer3 + patch aggregation, 224 px) timed on this
CPU through torch (the product's path), ONNX Runtime and OpenVINO at fp32 and at OpenVINO's default
CPU precision (bf16 where the CPU has it), with each output's difference from torch's.

OpenVINO is not a dependency of the product; install it to rerun (`pip install openvino`):

    python bench/openvino_probe.py      # -> bench/results/openvino_probe_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch

from patchcore import PatchCore, PatchCoreConfig
from patchcore.engines import OnnxEngine


def best_ms_per_image(fn, batch: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(best / batch * 1000, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "openvino_probe_cpu.json"))
    args = p.parse_args(argv)
    try:
        import openvino as ov
    except ImportError:
        print("openvino is not installed: pip install openvino", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
    torch.set_num_threads(args.threads)
    model = PatchCore(PatchCoreConfig.from_dict({"backbone": {"weights": "random"}, "runtime": {"device": "cpu"}}))
    model._setup()
    graph = model.onnx_extractor()
    x = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = model._backbone_patches(x).numpy()
    ort = OnnxEngine(graph)
    core = ov.Core()
    rows = {
        "torch (product default)": {
            "ms_per_image": best_ms_per_image(lambda: model._backbone_patches(x), args.batch_size, args.repeats)
        },
        "onnxruntime fp32": {
            "ms_per_image": best_ms_per_image(lambda: ort(x), args.batch_size, args.repeats),
            "max_relative_difference": float(np.abs(ort(x).numpy() - expected).max() / np.abs(expected).max()),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "extractor.onnx"
        path.write_bytes(graph)
        for label, precision in (("openvino fp32", {"INFERENCE_PRECISION_HINT": "f32"}), ("openvino CPU default", {})):
            compiled = core.compile_model(
                core.read_model(str(path)),
                "CPU",
                {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY", **precision},
            )
            got = compiled(x.numpy())[0]
            rows[label] = {
                "ms_per_image": best_ms_per_image(lambda c=compiled: c(x.numpy()), args.batch_size, args.repeats),
                "max_relative_difference": float(np.abs(got - expected).max() / np.abs(expected).max()),
                "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
            }
    cpu_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    report = {
        "benchmark": "OpenVINO vs ONNX Runtime vs torch for the exported extractor (bench/openvino_probe.py)",
        "what_is_timed": "backbone to layer3 + patch aggregation, wide_resnet50_2 random init, 224 px, min of repeats",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "openvino": ov.__version__,
        "cpu_has_avx512_bf16": "avx512_bf16" in cpu_flags,
        "results": rows,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for label, row in rows.items():
        print(f"{label:<26} {row['ms_per_image']:7.1f} ms/image  {row.get('max_relative_difference', 0):.1e}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
