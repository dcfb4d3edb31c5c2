"""Where a fit's memory goes: resident set size sampled during `PatchCore.fit` on MTD `train`,
attributed to the stage running at the time.

A sampler thread reads VmRSS / VmHWM from /proc/self/status every `--interval` seconds while the
stages it can see (feature extraction, the coreset's preparation, initial distances, block tree,
block setup, the selection loop, the read-back of the selected rows) are marked by wrapping the
library's functions. Prints and writes the peak RSS per stage and the overall peak (VmHWM). Linux
only. `--stop-after-loop S` ends the run S seconds into the selection loop (its memory is flat; a
10% MobileNetV2 selection takes most of an hour): the peak then covers everything up to there,
not the final read-back of the selected rows.

    python bench/fit_memory.py --fraction 0.1            # WRN50 random init -> results/fit_memory_*.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mtd import DEFAULT_ROOT, load_split  # noqa: E402
from bench.run_mtd import machine  # noqa: E402
from patchcore import PatchCore, PatchCoreConfig  # noqa: E402
from patchcore import coreset as coreset_lib  # noqa: E402
from patchcore import model as model_lib  # noqa: E402

STAGES = [
    (coreset_lib, "_prepare"),
    (coreset_lib, "_initial_sq_distances"),
    (coreset_lib, "_tree_order"),
    (coreset_lib, "_greedy_blocked"),
    (model_lib, "_read_rows"),
]
LOOP = "_greedy_blocked"


class Sampler:
    def __init__(self, interval: float, stop_after_loop: float | None):
        self.interval, self.stop_after_loop = interval, stop_after_loop
        self.stage = "setup"
        self.samples: list[tuple[float, str, int, int]] = []  # (seconds, stage, RSS MiB, HWM MiB)
        self.stopped = threading.Event()
        self.t0 = time.perf_counter()

    @staticmethod
    def read() -> tuple[int, int]:
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) // 1024
        return values["VmRSS"], values["VmHWM"]

    def run(self) -> None:
        loop_start = None
        while not self.stopped.is_set():
            rss, hwm = self.read()
            now = time.perf_counter() - self.t0
            self.samples.append((round(now, 2), self.stage, rss, hwm))
            if self.stage == LOOP:
                loop_start = now if loop_start is None else loop_start
                if self.stop_after_loop is not None and now - loop_start >= self.stop_after_loop:
                    self.stopped.set()
                    raise_in_main()
            time.sleep(self.interval)

    def mark(self, module, name: str) -> None:
        fn = getattr(module, name)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            outer, self.stage = self.stage, name
            try:
                return fn(*args, **kwargs)
            finally:
                # extraction is over once any marked stage has run: what follows is the fit's rest
                self.stage = "rest of fit" if outer == "extraction" else outer

        setattr(module, name, wrapper)

    def mark_blocks(self) -> None:
        init = coreset_lib._Blocks.__init__

        def wrapper(obj, *args, **kwargs):
            outer, self.stage = self.stage, "_Blocks (setup)"
            try:
                init(obj, *args, **kwargs)
            finally:
                self.stage = "rest of fit" if outer == "extraction" else outer

        coreset_lib._Blocks.__init__ = wrapper

    def summary(self) -> dict:
        per_stage: dict[str, dict] = {}
        for t, stage, rss, _ in self.samples:
            entry = per_stage.setdefault(stage, {"first_s": t, "last_s": t, "peak_rss_mib": rss})
            entry["last_s"] = t
            entry["peak_rss_mib"] = max(entry["peak_rss_mib"], rss)
        return per_stage


class _Stop(Exception):
    pass


def raise_in_main() -> None:
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.main_thread().ident), ctypes.py_object(_Stop))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_ROOT))
    p.add_argument("--backbone", default="wide_resnet50_2")
    p.add_argument("--layers", default=None, help="comma-separated; default: the architecture's pair")
    p.add_argument("--weights", default="random", help="random | imagenet | PATH")
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    p.add_argument("--stop-after-loop", type=float, default=None, metavar="S")
    p.add_argument("--label", default="wrn50-random")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*random.*weights.*")

    train, _ = load_split(Path(args.data))
    cfg = PatchCoreConfig.from_dict(
        {
            "backbone": {
                "name": args.backbone,
                "layers": args.layers.split(",") if args.layers else None,
                "weights": args.weights,
            },
            "image": {"resize": args.resize, "crop": args.crop},
            "coreset": {"fraction": args.fraction},
            "runtime": {"device": "cpu"},
        }
    )
    sampler = Sampler(args.interval, args.stop_after_loop)
    for module, name in STAGES:
        sampler.mark(module, name)
    sampler.mark_blocks()
    model = PatchCore(cfg)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    sampler.stage = "extraction"
    completed = True
    try:
        model.fit(train, progress=False)
    except _Stop:
        completed = False
    sampler.stage = "done"
    time.sleep(2 * args.interval)
    sampler.stopped.set()
    thread.join()
    result = {
        "benchmark": "fit peak RSS by stage (bench/fit_memory.py)",
        "label": args.label,
        "settings": cfg.to_dict(),
        "n_train_images": len(train),
        "completed": completed,
        "stopped_after_loop_seconds": None if completed else args.stop_after_loop,
        "peak_rss_mib": sampler.read()[1],
        "stages": sampler.summary(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for stage, entry in result["stages"].items():
        print(f"{stage:24s} {entry['first_s']:8.1f}-{entry['last_s']:8.1f} s  peak RSS {entry['peak_rss_mib']:6d} MiB")
    print(
        f"peak RSS (VmHWM) {result['peak_rss_mib']} MiB"
        + ("" if completed else f" (stopped {args.stop_after_loop} s into the selection loop)")
    )
    out = Path(
        args.out or REPO / "bench" / "results" / f"fit_memory_{args.label}-{round(args.fraction * 100)}pct_cpu.json"
    )
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
