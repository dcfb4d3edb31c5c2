"""`patchcore validate` and `patchcore data ...`: the data layer on the command line.

    patchcore validate data/tiles [--json] [--docs DIR] [--accept]   exit 1 when the set fails
    patchcore data version data/tiles [--json]                       DVC md5 + git commit
    patchcore data check data/tiles --md5 HASH                       exit 1 when it differs
    patchcore data changed data/tiles --since HASH|record.json       exit 1 when changed
    patchcore data reproduce --model NAME [--version N | --alias A]  how to rebuild it
    patchcore data reproduce --record record.json

Great Expectations and MLflow are imported only by the commands that need them
(pipeline/validation.py imports Great Expectations when a validation runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from patchcore.config import ConfigError
from pipeline import config
from pipeline.data_version import TAG_PREFIX, changed_since, data_version, dir_md5, reproduce_instructions


def register(sub) -> None:
    """Add validate and data (version, check, changed, reproduce) to the `patchcore` sub-commands."""
    v = sub.add_parser("validate", help="check a product's nominal images with the Great Expectations suite")
    v.add_argument("folder", help="product folder in MVTec layout (its train/good is checked) or an image folder")
    v.add_argument("--params", help="params.yaml (default ./params.yaml or PATCHCORE_PARAMS)")
    v.add_argument("--product", help="product name for the drift reference (default: the folder's name)")
    v.add_argument("--out", help="report folder (default PATCHCORE_HOME/validation/<product>/latest)")
    v.add_argument("--docs", help="also copy the Data Docs (HTML) here")
    v.add_argument("--no-docs", action="store_true", help="skip building Data Docs")
    v.add_argument("--no-drift", action="store_true", help="do not compare with the accepted version")
    v.add_argument("--reference", help="drift reference JSON to compare with instead of the accepted one")
    v.add_argument("--accept", action="store_true", help="when it passes, make this set the product's drift reference")
    v.add_argument("--json", action="store_true", help="print the JSON summary instead of the report")
    v.set_defaults(func=cmd_validate)

    d = sub.add_parser("data", help="data versions (DVC md5 + git commit): show, check, compare, reproduce")
    dsub = d.add_subparsers(dest="data_command", required=True)
    ver = dsub.add_parser("version", help="the data version of a product folder now")
    ver.add_argument("folder")
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(func=cmd_version)

    chk = dsub.add_parser("check", help="exit 1 unless the folder is exactly the given version")
    chk.add_argument("folder")
    chk.add_argument("--md5", required=True, help="the recorded DVC md5 (<hex>.dir)")
    chk.set_defaults(func=cmd_check)

    chg = dsub.add_parser("changed", help="whether the folder changed since a recorded version (exit 1: changed)")
    chg.add_argument("folder")
    chg.add_argument("--since", required=True, help="a DVC md5, or a JSON file holding a data version record")
    chg.set_defaults(func=cmd_changed)

    rep = dsub.add_parser("reproduce", help="how to rebuild a registered model from its data version")
    src = rep.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="registered model name (its version's data.* tags are read)")
    src.add_argument("--record", help="JSON file with a data version record (or MLflow tags)")
    which = rep.add_mutually_exclusive_group()
    which.add_argument("--version", help="model version number")
    which.add_argument("--alias", help="model alias, e.g. champion (default when no --version)")
    rep.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    rep.set_defaults(func=cmd_reproduce)


def cmd_validate(args: argparse.Namespace) -> int:
    # lazy: the validation reads images with the library's loaders (torch, ~1.5 s) and runs GX
    from pipeline.validation import accept_reference, validate_image_set  # noqa: PLC0415

    params = config.load(args.params)
    reference = None if args.no_drift else (args.reference or "auto")
    result = validate_image_set(
        args.folder, params, reference=reference, out_dir=args.out, docs=not args.no_docs, product=args.product
    )
    if args.docs and result.docs_path:
        shutil.copytree(result.docs_path.parent, args.docs, dirs_exist_ok=True)
        result.summary["data_docs"] = str(Path(args.docs) / "index.html")
    if args.accept and result.passed:
        result.summary["accepted_as"] = str(accept_reference(result))
    print(json.dumps(result.summary, indent=2) if args.json else result.report(limit=200))
    return 0 if result.passed else 1


def cmd_version(args: argparse.Namespace) -> int:
    v = data_version(args.folder)
    if args.json:
        print(json.dumps(v.to_dict(), indent=2))
    else:
        width = max(len(k) for k in v.to_dict())
        print("\n".join(f"{k:<{width}}  {'' if val is None else val}" for k, val in v.to_dict().items()))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    now = dir_md5(args.folder)
    if now == args.md5:
        print(f"{args.folder}: is version {now}")
        return 0
    print(f"{args.folder}: is version {now}, not {args.md5}", file=sys.stderr)
    return 1


def cmd_changed(args: argparse.Namespace) -> int:
    since: object = args.since
    if Path(args.since).is_file():
        since = _read_record(Path(args.since))
    changed = changed_since(args.folder, since)
    print(f"{args.folder}: {'changed' if changed else 'unchanged'}")
    return 1 if changed else 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    if args.record:
        record, label = _read_record(Path(args.record)), None
    else:
        record, label = _model_version_tags(args.model, args.version, args.alias, args.tracking_uri)
    try:
        print(reproduce_instructions(record, model=label))
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{args.record or label}: no usable data version record ({exc})") from None
    return 0


def _read_record(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object with a data version record")
    return data.get("data_version", data)


def _model_version_tags(
    name: str, version: str | None, alias: str | None, tracking_uri: str | None
) -> tuple[dict, str]:
    from mlflow import MlflowClient  # noqa: PLC0415  # lazy: mlflow import takes ~3 s, only `data reproduce --model`
    from mlflow.exceptions import MlflowException  # noqa: PLC0415  # lazy: as above

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = (
            client.get_model_version(name, version)
            if version
            else client.get_model_version_by_alias(name, alias or "champion")
        )
    except MlflowException as exc:
        raise ConfigError(
            f"model {name!r} {'version ' + version if version else '@' + (alias or 'champion')}: "
            f"not found in the registry ({exc.message})"
        ) from None
    tags = dict(mv.tags or {})
    if not any(k.startswith(TAG_PREFIX) for k in tags) and mv.run_id:
        tags = dict(client.get_run(mv.run_id).data.tags)  # recorded on the training run only
    return tags, f"{name} version {mv.version}"
