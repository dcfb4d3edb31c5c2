"""The library's command line: fit, predict, evaluate, demo-data (`python -m patchcore.cli`).

The `patchcore` console script (apps/cli.py) adds the pipeline's commands: it composes its parser
from new_parser and the add_* functions here, and runs it with `run`.

Settings come from params.yaml (`model` section; `--params` or PATCHCORE_PARAMS picks the file),
then PATCHCORE_WEIGHTS, then the flags: the last one wins. Bad input exits with status 2 and one
clear message naming the file and the problem.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from patchcore.config import IMAGE_MODES, PatchCoreConfig, load_config, parse_overrides, set_dotted
from patchcore.errors import USER_ERRORS

# The model code (torch) is imported by the commands that use it, not here: `--help` and the
# pipeline's registry commands (apps/cli.py builds on this module) start in well under a second
# instead of paying ~1.5 s for torch.
DESCRIPTION = "PatchCore anomaly detection (Roth et al., CVPR 2022)."


def _config_from_args(args: argparse.Namespace) -> PatchCoreConfig:
    data = load_config(args.params).to_dict()  # params.yaml + PATCHCORE_WEIGHTS / PATCHCORE_BACKBONE
    flags = {
        "backbone.name": args.backbone,
        "backbone.layers": args.layers,
        "backbone.weights": args.weights,
        "backbone.weights_sha256": args.weights_sha256,
        "coreset.fraction": args.coreset,
        "runtime.seed": args.seed,
        "image.mode": args.mode,
        "image.resize": args.resize,
        "image.crop": args.crop,
        "runtime.device": args.device,
        "runtime.batch_size": args.batch_size,
    }
    if args.backbone and not args.layers:
        set_dotted(data, "backbone.layers", None)  # another architecture: its own default layers
    for key, value in flags.items():
        if value is not None:
            set_dotted(data, key, value)
    for key, value in parse_overrides(args.set).items():
        set_dotted(data, key, value)
    return PatchCoreConfig.from_dict(data)


def cmd_fit(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    from patchcore.model import PatchCore  # noqa: PLC0415  lazy: torch (see above)

    model = PatchCore(config).fit(args.images, progress=not args.quiet)
    out = model.save(args.out)
    print(
        f"model: {out} (memory bank {len(model.memory_bank_)} of {model.n_train_patches_} patches "
        f"from {model.n_train_images_} images; weights {model.weights_.kind})"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from patchcore.model import PatchCore  # noqa: PLC0415  lazy: torch (see above)
    from patchcore.viz import write_overlays  # noqa: PLC0415  # lazy: matplotlib, only for --maps

    model = PatchCore.load(args.model, device=args.device)
    predictions = model.predict(args.images, maps=bool(args.maps), progress=not args.quiet)
    records = predictions.records()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records, indent=2))
    print(f"scores: {args.out} ({len(records)} images)")
    if args.maps:
        written = write_overlays(predictions.items, predictions.anomaly_maps, args.maps)
        print(f"heatmaps: {args.maps} ({len(written)} PNG)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`evaluate --model DIR --data DIR [--out FILE]`: also the handler of the application's
    `evaluate --model` (apps/commands.py), whose arguments carry the same names."""
    from patchcore.evaluation import evaluate  # noqa: PLC0415  lazy: torch (see above)
    from patchcore.model import PatchCore  # noqa: PLC0415

    model = PatchCore.load(args.model, device=args.device)
    result = evaluate(model, args.data, progress=not args.quiet)
    text = json.dumps(result.summary(), indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from patchcore.synthetic import generate_product  # noqa: PLC0415  lazy: torch (see above)

    folder = generate_product(args.out, args.product, seed=args.seed, size_px=args.size)
    print(f"synthetic product: {folder}")
    return 0


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params", help="params.yaml to read the `model` section from (default: ./params.yaml or PATCHCORE_PARAMS)"
    )
    p.add_argument("--backbone", help="torchvision model name or timm/<name> (default wide_resnet50_2)")
    p.add_argument("--layers", help="comma-separated layer module paths, e.g. layer2,layer3")
    p.add_argument(
        "--weights", help="imagenet | random | PATH to a state_dict file (default imagenet; env PATCHCORE_WEIGHTS)"
    )
    p.add_argument("--weights-sha256", help="expected sha256 of the weights file")
    p.add_argument("--coreset", type=float, help="coreset fraction in (0, 1]; 1.0 keeps every patch (default 0.1)")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--mode",
        choices=IMAGE_MODES,
        help="how images become the model's input (default center_crop; see model.image.mode in params.yaml)",
    )
    p.add_argument("--resize", type=int, help="shorter side the image is resized to (default 256)")
    p.add_argument("--crop", type=int, help="centre crop size in pixels (default 224)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. scoring.k=3 (repeatable)")


# -- the parser, in parts: this module's build_parser and the application's (apps/cli.py) both
# compose it from these ------------------------------------------------------------------------------
def new_parser(description: str = DESCRIPTION) -> tuple[argparse.ArgumentParser, Any]:
    """The top-level `patchcore` parser (with -v) and its sub-command collection (the object
    `add_subparsers` returns), for the add_* functions below to add commands to."""
    parser = argparse.ArgumentParser(prog="patchcore", description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser, parser.add_subparsers(dest="command", required=True)


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """--device and --quiet, the last flags of fit, predict and evaluate."""
    p.add_argument("--device", help="auto | cpu | cuda[:N]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_fit(sub) -> argparse.ArgumentParser:
    fit = sub.add_parser("fit", help="build a model from nominal images")
    fit.add_argument(
        "--images", required=True, help="folder (MVTec layout: uses train/good), image folder, or text file of paths"
    )
    fit.add_argument("--out", required=True, help="model directory to write")
    _add_model_flags(fit)
    add_runtime_flags(fit)
    fit.set_defaults(func=cmd_fit)
    return fit


def add_predict(sub) -> argparse.ArgumentParser:
    predict = sub.add_parser("predict", help="score images with a saved model")
    predict.add_argument("--model", required=True, help="model directory written by `patchcore fit`")
    predict.add_argument("--images", required=True, help="image folder or text file of paths")
    predict.add_argument("--out", required=True, help="JSON file: list of {path, score[, is_anomalous]}")
    predict.add_argument("--maps", help="folder for heatmap overlay PNGs")
    add_runtime_flags(predict)
    predict.set_defaults(func=cmd_predict)
    return predict


def add_evaluate(sub) -> argparse.ArgumentParser:
    """The library's `evaluate` (a saved model folder). The application adds its own `evaluate`
    instead, which takes this form too and hands it to cmd_evaluate."""
    ev = sub.add_parser("evaluate", help="metrics of a saved model on an MVTec-layout test split")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", required=True, help="MVTec-layout folder (test/good, test/<defect>, ground_truth/)")
    ev.add_argument("--out", help="also write the metrics JSON here")
    add_runtime_flags(ev)
    ev.set_defaults(func=cmd_evaluate)
    return ev


def add_demo_data(sub) -> argparse.ArgumentParser:
    demo = sub.add_parser("demo-data", help="write the synthetic demo product in MVTec layout")
    demo.add_argument("--out", default="data", help="parent folder (default: data)")
    demo.add_argument("--product", default="tiles")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--size", type=int, default=256, help="image side in pixels (default 256: not below the 224 crop)"
    )
    demo.set_defaults(func=cmd_demo_data)
    return demo


def build_parser() -> argparse.ArgumentParser:
    """The library's own command line (`python -m patchcore.cli`): fit, predict, evaluate, demo-data."""
    parser, sub = new_parser()
    add_fit(sub)
    add_predict(sub)
    add_evaluate(sub)
    add_demo_data(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None, user_errors: tuple = ()) -> int:
    """Parse, run the chosen command, turn expected failures into one line on stderr and exit 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    try:
        return args.func(args)
    except USER_ERRORS + tuple(user_errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
