"""`patchcore train | evaluate | promote | rollback | inspect | status`: the training pipeline and
the model registry on the command line.

    patchcore train --product tiles [--data data/tiles] [--weights random] [--set model.coreset.fraction=0.05]
    patchcore promote --product tiles [--allow-random-weights]     exit 1 when the gate rejects
    patchcore rollback --product tiles
    patchcore inspect --product tiles --images DIR --out DIR [--alias champion | --version N]
    patchcore evaluate --product tiles [--alias champion | --version N] [--data DIR]
    patchcore status [--product tiles] [--json]

Settings: params.yaml (--params or PATCHCORE_PARAMS), then --weights, then --set (dotted keys of any
section). The tracking store: mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else
sqlite:///$PATCHCORE_HOME/mlflow/mlflow.db. Expected failures (unknown product, no champion yet,
tracking store unreachable, bad data) print one line and exit 2.

The Prefect flows are imported only by the commands that run them, so `patchcore status` and
`patchcore --help` do not pay for Prefect.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from patchcore.atomic import atomic_file
from patchcore.cli import cmd_evaluate as library_evaluate
from patchcore.config import (
    PRODUCTION,
    ConfigError,
    apply_profile,
    default_params_path,
    env_weights,
    load_params,
    parse_overrides,
)
from patchcore.errors import USER_ERRORS
from pipeline.config import Params, load_settings
from pipeline.io import resolve_recorded
from pipeline.locks import LockTimeout
from pipeline.registry import Registry, RegistryError, rollback, status
from pipeline.store import Store
from pipeline.watching import heartbeat

REGISTRY_ALIASES = ("champion", "challenger", "previous")


def register(sub) -> None:
    """Add train, evaluate, promote, rollback, inspect and status to the `patchcore` sub-commands
    (apps/cli.py). This `evaluate` takes the library's form (--model DIR --data DIR) too."""
    tr = sub.add_parser(
        "train",
        help="run the training flow: validate, extract, coreset, evaluate, calibrate, register",
        description="Run the Prefect flow `train-product-model`: a product's images become a new "
        "registered model version with alias `challenger`.",
    )
    _product(tr)
    tr.add_argument("--data", help="the product's folder in MVTec layout (default data/<product>)")
    tr.add_argument(
        "--weights", help="backbone weights: imagenet | random | PATH (shortcut for --set model.backbone.weights=...)"
    )
    _settings(tr)
    tr.add_argument("--json", action="store_true", help="print the result as JSON")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "evaluate",
        help="metrics of a registered version (or a model folder) on labelled images",
        description="With --product: score a registered version on the product's test split. "
        "With --model: a saved PatchCore folder (the library command).",
    )
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--product", help="product whose registered model to evaluate")
    which.add_argument("--model", help="a saved PatchCore folder instead of a registered model")
    _version(ev)
    ev.add_argument(
        "--data",
        help="MVTec-layout folder whose test/ split is scored (default: the folder the version "
        "was trained on; required with --model)",
    )
    ev.add_argument("--out", help="also write the metrics JSON here")
    ev.add_argument("--params", help="params.yaml (for mlflow.tracking_uri)")
    ev.add_argument("--device", help="auto | cpu | cuda[:N] (with --model)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars (with --model)")
    ev.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser(
        "promote",
        help="run the promotion gate: challenger vs champion on a pinned evaluation set",
        description="Run the Prefect flow `promote-product-model`. Exit 0 when the challenger is "
        "(or already was) champion, 1 when the gate rejects it.",
    )
    _product(pr)
    pr.add_argument(
        "--data", help="folder whose test/ split is the evaluation set (default: the challenger's data folder)"
    )
    pr.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="let a model built on RANDOM backbone weights become champion (demos only)",
    )
    _settings(pr)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_promote)

    rb = sub.add_parser("rollback", help="move alias champion back to the previous champion")
    _product(rb)
    rb.add_argument("--params", help="params.yaml (for mlflow.tracking_uri)")
    rb.add_argument("--json", action="store_true")
    rb.set_defaults(func=cmd_rollback)

    ins = sub.add_parser("inspect", help="score a folder of images with a registered model: CSV/JSON + heatmap PNGs")
    _product(ins)
    ins.add_argument(
        "--images", required=True, help="image folder (recursive), MVTec test/ folder or a text file of paths"
    )
    ins.add_argument("--out", required=True, help="output folder: scores.csv, scores.json, heatmaps/")
    _version(ins)
    ins.add_argument("--no-maps", action="store_true", help="skip the heatmap PNGs")
    ins.add_argument("--params", help="params.yaml (for mlflow.tracking_uri)")
    ins.set_defaults(func=cmd_inspect)

    st = sub.add_parser("status", help="champion / challenger / previous of each product, with their numbers")
    st.add_argument("--product", help="only this product")
    st.add_argument("--params", help="params.yaml (for mlflow.tracking_uri)")
    st.add_argument("--json", action="store_true", help="machine-readable, including the tracking URI")
    st.set_defaults(func=cmd_status)

    pf = sub.add_parser(
        "profile",
        help="show or switch params.yaml's active profile (production | demo)",
        description="Without NAME: print the active profile and what it changes. With NAME: set `profile: NAME` "
        "in params.yaml (one line; the file's comments are kept), so the CLI, the deployments, new-data "
        "retrains and `dvc repro` all use that profile.",
    )
    pf.add_argument("name", nargs="?", help="profile to activate: production or one defined under profiles:")
    pf.add_argument("--params", help="params.yaml (default ./params.yaml or PATCHCORE_PARAMS)")
    pf.set_defaults(func=cmd_profile)


# -- argument helpers ------------------------------------------------------------------------------
def _product(p: argparse.ArgumentParser) -> None:
    p.add_argument("--product", required=True, help="product name (registered model patchcore-<product>)")


def _version(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--alias", choices=REGISTRY_ALIASES, help="registry alias (default champion)")
    g.add_argument("--version", help="model version number")


def _settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", help="params.yaml (default ./params.yaml or PATCHCORE_PARAMS)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override any setting, e.g. model.coreset.fraction=0.05 or promotion.tolerance=0.02 (repeatable)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--weights, then --set. The pipeline's settings come from params.yaml (its active profile) and
    these flags only, so what a run used is what DVC and the run record see: PATCHCORE_WEIGHTS is
    for loading saved models and the library's `patchcore fit`, and only noted here."""
    out: dict[str, Any] = {}
    if getattr(args, "weights", None):
        out["model.backbone.weights"] = args.weights
    out.update(parse_overrides(args.set))
    if env_weights() and "model.backbone.weights" not in out:
        print(
            f"note: PATCHCORE_WEIGHTS={env_weights()} is not used for the pipeline's settings; set "
            "model.backbone.weights in params.yaml (or pass --weights) so every entry point and DVC see it",
            file=sys.stderr,
        )
    return out


def _settings_from(args: argparse.Namespace) -> Params:
    return load_settings(getattr(args, "params", None), _overrides(args) if hasattr(args, "set") else None)


def _registry(args: argparse.Namespace, settings: Params | None = None) -> Registry:
    return Registry((settings or _settings_from(args)).mlflow)


def _user_errors(func):
    """Registry errors the user can fix become one line on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (RegistryError, LockTimeout) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper


class _RunNameFilter(logging.Filter):
    """Prefix Prefect run log lines with the task or flow run's name ("[extract features-1d6] ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        if name and not getattr(record, "_run_name_shown", False):
            record.msg, record._run_name_shown = f"[{str(name).replace('%', '%%')}] {record.msg}", True
        return True


EXPECTED_ERRORS = (*USER_ERRORS, RegistryError, LockTimeout)


class _ExpectedErrorFilter(logging.Filter):
    """A task that failed on an error the user can fix (bad data or settings, a full disk, a lost
    tracking server) is logged by Prefect with its traceback; keep the one-line message only. The
    command ends with that error's own `error:` line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], EXPECTED_ERRORS):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_prefect_defaults() -> None:
    # Every HTTP call to the Prefect API would otherwise be an INFO line.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RunNameFilter) for f in handler.filters):
            handler.addFilter(_RunNameFilter())
            handler.addFilter(_ExpectedErrorFilter())
    # The same offline-friendly defaults `make` sets, for people who call the console script directly.
    for key, value in (
        ("DO_NOT_TRACK", "true"),
        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        ("MLFLOW_DISABLE_TELEMETRY", "true"),
        ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"),
    ):
        os.environ.setdefault(key, value)
    if not os.environ.get("PREFECT_API_URL"):
        # The temporary Prefect server lives and dies with this command: when a SIGTERM to the
        # process group (systemd, a job runner) has stopped it, the run's last reports are retried
        # once, not for minutes (Prefect's default of 5 backed-off retries held a terminated
        # training for ~170 s).
        os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "1")


# -- commands ----------------------------------------------------------------------------------------
@_user_errors
def cmd_train(args: argparse.Namespace) -> int:
    _quiet_prefect_defaults()
    _registry(args)  # fail now, not after the training, when the tracking store is unreachable (or settings are bad)
    from flows.train import train  # noqa: PLC0415  # lazy: Prefect (~3 s), only for the commands that run a flow

    result = train(args.product, args.data or f"data/{args.product}", args.params, _overrides(args))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    reg, c, m = result["registry"], result["calibration"], result["metrics"]
    print()
    if reg.get("unchanged"):
        print(
            f"unchanged: {reg['name']} version {reg['version']} was trained on exactly these images and "
            "settings; nothing new registered"
        )
    else:
        print(f"registered {reg['name']} version {reg['version']} (alias challenger); run {reg['run_id']}")
    if reg["random_weights"]:
        print(
            "  WARNING: RANDOM backbone weights: not for production; promotion needs --allow-random-weights "
            "or promotion.allow_random_weights (the demo profile)"
        )
    shown = ", ".join(f"{k} {m[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "pro", "f1_max") if k in m)
    print(f"  {shown or 'no labelled defects: held-out nominal scores only'}")
    print(
        f"  threshold {c['threshold']:.6g} ({c['rule']}); held-out FPR {c['heldout_fpr']:.3f}; memory bank "
        f"{result['bank_size']} patches; features {result['features']['n_extracted']} extracted, "
        f"{result['features']['n_cached']} cached"
    )
    print(f"  tracking store: {reg['tracking_uri']} (experiment and registered model {reg['name']})")
    return 0


@_user_errors
def cmd_promote(args: argparse.Namespace) -> int:
    _quiet_prefect_defaults()
    registry = _registry(args)
    registry.require_product(args.product)
    registry.version(args.product, "challenger")  # "no challenger" before a flow run is started
    from flows.promote import promote  # noqa: PLC0415  # lazy: Prefect (~3 s), only for the commands that run a flow

    result = promote(
        args.product, args.data, args.params, _overrides(args), allow_random_weights=args.allow_random_weights
    )
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print()
        print(
            ("PROMOTED: " if result["promote"] else "NOT PROMOTED: " if result.get("outcome") != "unchanged" else "")
            + result["summary"]
        )
        for reason in result.get("reasons", []):
            print(f"  - {reason}")
        for note in result.get("notes", []):
            print(f"  note: {note}")
        if "aliases" in result:
            print(f"  aliases: {', '.join(f'{a}=v{v}' for a, v in sorted(result['aliases'].items()))}")
    return 0 if result["promote"] or result.get("outcome") == "unchanged" else 1


@_user_errors
def cmd_rollback(args: argparse.Namespace) -> int:
    result = rollback(_registry(args), args.product)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"rolled back {args.product}: champion v{result['from_version']} -> v{result['to_version']}; aliases "
            + ", ".join(f"{a}=v{v}" for a, v in sorted(result["aliases"].items()))
        )
    return 0


@_user_errors
def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.inspection import inspect_images  # noqa: PLC0415  lazy: torch (~1.5 s)

    result = inspect_images(
        _registry(args),
        args.product,
        args.images,
        args.out,
        alias=args.alias,
        version=args.version,
        maps=not args.no_maps,
        progress=True,
    )  # tqdm bar on stderr
    print(
        f"{len(result.rows)} images scored with {result.model} v{result.version}: {result.n_anomalous} anomalous "
        f"(threshold {result.threshold:.6g})"
    )
    print(
        f"  {result.scores_csv}, {result.scores_json}"
        + (f", {len(result.heatmaps)} heatmaps in {result.heatmaps[0].parent}" if result.heatmaps else "")
    )
    return 0


@_user_errors
def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.model:
        if not args.data:
            raise ConfigError("--data is required with --model")
        return library_evaluate(args)
    settings = _settings_from(args)
    registry = _registry(args, settings)
    version = registry.version(args.product, args.alias or ("champion" if args.version is None else None), args.version)
    recorded = version.tags.get("data_root")
    data = args.data or (str(resolve_recorded(recorded)) if recorded else f"data/{args.product}")
    from pipeline.promotion import pin_evaluation_set, score_version  # noqa: PLC0415  lazy: torch (~1.5 s)

    store = Store.from_settings(settings)
    eval_set = pin_evaluation_set(store, data)
    scores = score_version(registry, store, args.product, str(version.version), eval_set)
    report = {
        "product": args.product,
        "version": str(version.version),
        "eval_set_sha256": eval_set["eval_set_sha256"],
        "data": data,
        **scores,
    }
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


@_user_errors
def cmd_profile(args: argparse.Namespace) -> int:
    path = Path(args.params or default_params_path() or "params.yaml")
    raw = load_params(path)
    if args.name:
        set_profile(path, args.name)
        raw = load_params(path)
        print(f"{path}: profile {args.name}")
    active = raw.get("profile") or PRODUCTION
    changes = (raw.get("profiles") or {}).get(active) or {}
    if not args.name:
        print(f"{path}: profile {active}")
    for key, value in changes.items():
        print(f"  {key}: {value}")
    if active != PRODUCTION:
        print(f"  (back to production settings: patchcore profile {PRODUCTION})")
    return 0


def set_profile(path: Path, name: str) -> None:
    """Rewrite the `profile:` line of params.yaml (comments and layout kept); the new file must load."""
    raw = load_params(path)
    if name != PRODUCTION and name not in (raw.get("profiles") or {}):
        known = ", ".join([PRODUCTION, *sorted(raw.get("profiles") or {})])
        raise ConfigError(f"{path}: no profile {name!r} under profiles: (known: {known})")
    text = path.read_text()
    line = re.compile(r"^profile:[ \t]*[^\s#]*", re.MULTILINE)
    text = line.sub(f"profile: {name}", text, count=1) if line.search(text) else f"profile: {name}\n" + text
    check = yaml.safe_load(text)  # the new file must load, with this profile, before it replaces the old one
    if not isinstance(check, dict) or (check.get("profile") or PRODUCTION) != name:
        raise ConfigError(f"{path}: could not set `profile: {name}` (edit the file by hand)")
    Params.from_dict(apply_profile(check))
    with atomic_file(path, "w") as handle:
        handle.write(text)


@_user_errors
def cmd_status(args: argparse.Namespace) -> int:
    report = status(_registry(args), args.product)
    report["watcher"] = heartbeat()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"tracking store: {report['tracking_uri']}")
    beat = report["watcher"]
    if beat is None:
        print("new-data watcher: never ran here (`make serve` starts it)")
    else:
        alive = beat["age_seconds"] <= 3 * max(float(beat.get("interval_seconds") or 10), 10)
        print(
            f"new-data watcher: {'alive' if alive else 'NOT RUNNING'} (last heartbeat {beat['age_seconds']:.0f} s "
            f"ago, pid {beat['pid']}, {beat['mode']}, {beat['events_sent']} event(s) sent)"
        )
    if not report["products"]:
        print("no products registered yet: run `patchcore train --product NAME`")
    for product, entry in report["products"].items():
        print(f"\n{product} ({entry['registered_model']}, latest v{entry['latest_version']})")
        for alias in REGISTRY_ALIASES:
            info = entry["aliases"].get(alias)
            if info is None:
                print(f"  {alias:<10} -")
                continue
            shown = "  ".join(f"{k} {v:.4f}" for k, v in info["metrics"].items() if v is not None)
            fpr, threshold = info["heldout_fpr"], info["threshold"]
            print(
                f"  {alias:<10} v{info['version']:<4} {shown or 'no labelled metrics'}  threshold "
                f"{'-' if threshold is None else format(threshold, '.6g')} ({info['threshold_rule']})  held-out FPR "
                f"{'-' if fpr is None else f'{fpr:.3f}'}  data {info['data_version']}  weights {info['weights']}"
            )
        if "champion" not in entry["aliases"]:
            print(f"  no champion yet: `patchcore promote --product {product}`")
        if entry.get("incomplete_registrations"):
            versions = ", v".join(entry["incomplete_registrations"])
            print(
                f"  incomplete registrations (a registering process died): v{versions} (tagged orphaned by the "
                "next training or promotion if not already; never promoted)"
            )
        if entry.get("champion_change_pending"):
            print(
                f"  a champion move to v{entry['champion_change_pending']} was cut short: the next promotion, "
                "rollback or training finishes or undoes it"
            )
    return 0
