"""Data validation: a product's nominal images must pass the expectation suite kept in
pipeline/expectations/nominal_images.yaml before any model is trained on them.

    result = validate_image_set("data/tiles", params)      # a Great Expectations Checkpoint run
    raise_for_failures(result)                              # ValidationError naming file and fix
    accept_reference(result)                                # after registration: the drift baseline

The folder becomes a table (one row per file: decodes, format, mode, size, luminance, blur...), the
YAML suite becomes a GX ExpectationSuite, a GX Checkpoint validates the table and builds Data
Docs; the result carries a compact JSON summary and a per-file report (file, expectation,
observed value). Drift is checked against the statistics of the previously *accepted* version of
the same product, stored as JSON under PATCHCORE_HOME/validation/<product>/accepted.json.

Great Expectations takes seconds to import: it is imported inside the one function that runs it,
with its analytics and progress bars off. Never imports prefect, mlflow or dvc.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from patchcore.data import GOOD, IMAGE_SUFFIXES, DataError, is_mvtec_root, to_rgb
from pipeline.config import Params
from pipeline.io import plain, recorded_path, write_json
from pipeline.store import Store

log = logging.getLogger(__name__)

SUITE_FILE = Path(__file__).with_name("expectations") / "nominal_images.yaml"
# The smallest side validation accepts by default (validation.min_side_px: null). Every image is
# resized to model.image.resize, so a smaller one still runs, but below 32 px a side it holds fewer
# than 2x2 cells of a stride-16 layer (layer3 of the default backbone) of real detail: nothing to
# compare patches on. Between this and the resize the model upsamples; the report notes it.
MIN_USABLE_SIDE_PX = 32
COLUMNS = (
    "path",
    "bytes",
    "sha256",
    "suffix",
    "decodes",
    "error",
    "format",
    "mode",
    "channels",
    "bit_depth",
    "width",
    "height",
    "pixels",
    "luminance_mean",
    "luminance_std",
    "blur",
)
SET_LEVEL = "(whole set)"  # the `file` of failures that concern the set, not one file
_BIT_DEPTH = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


class ValidationError(DataError):
    """A nominal image set failed its expectation suite; the message lists file, check, value, fix."""

    def __init__(self, result: ValidationResult):
        self.result = result
        super().__init__(result.report())


@dataclass(frozen=True)
class FileFailure:
    file: str  # the file's path, or SET_LEVEL for set-wide checks (count, set averages)
    expectation: str  # the rule in words, then the GX expectation name
    observed: Any  # the offending value (decode error, size, mode, luminance, ...)
    fix: str = ""

    def line(self) -> str:
        fix = f"; {self.fix}" if self.fix else ""
        return f"{self.file}: {self.expectation}: observed {_short(self.observed)}{fix}"


@dataclass
class ValidationResult:
    passed: bool
    product: str
    folder: Path  # the validated image folder (train/good of an MVTec-layout product)
    summary: dict[str, Any]  # compact, JSON-ready (also written to summary_path)
    failures: list[FileFailure] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # image_stats(): the next drift reference
    out_dir: Path | None = None
    summary_path: Path | None = None  # summary.json
    failures_path: Path | None = None  # failures.json: every (file, expectation, observed, fix)
    table_path: Path | None = None  # images.csv: the metadata table the suite ran on
    docs_path: Path | None = None  # Data Docs index.html (None when docs were not built)

    def failure_rows(self) -> list[dict[str, str]]:
        """The per-file report as rows of strings (a Prefect table artifact, a CSV, a log)."""
        return [
            {"file": f.file, "expectation": f.expectation, "observed": _short(f.observed), "fix": f.fix}
            for f in self.failures
        ]

    def report(self, limit: int = 50) -> str:
        """Human-readable outcome: one line per failure (at most `limit`), then where the reports are."""
        if self.passed:
            head = f"{self.folder}: {self.summary['n_files']} files passed the {self.summary['suite']} suite"
        else:
            head = (
                f"{self.folder}: {len(self.failures)} problem(s) in the nominal images of {self.product!r}; "
                "nothing may be trained on them until they are fixed:"
            )
        lines = [head] + [f"  {f.line()}" for f in self.failures[:limit]]
        lines += [f"  note: {note}" for note in self.summary.get("notes", [])]
        if len(self.failures) > limit:
            lines.append(f"  ... and {len(self.failures) - limit} more (see {self.failures_path})")
        where = [
            f"summary {self.summary_path}" if self.summary_path else "",
            f"Data Docs {self.docs_path}" if self.docs_path else "",
        ]
        if any(where):
            lines.append("Reports: " + ", ".join(w for w in where if w))
        return "\n".join(lines)


def raise_for_failures(result: ValidationResult) -> ValidationResult:
    """The result itself when it passed; otherwise ValidationError with the per-file report."""
    if not result.passed:
        raise ValidationError(result)
    return result


# -- the metadata table ---------------------------------------------------------------------


def image_folder(product_dir: str | Path) -> Path:
    """The nominal images of a product: `train/good` in MVTec layout, else the folder itself."""
    root = Path(product_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected a product folder in MVTec layout, e.g. data/tiles)")
    return root / "train" / GOOD if is_mvtec_root(root) else root


def _files(folder: Path) -> list[Path]:
    # Every file, not only image suffixes: stray non-image files are findings too. Dotfiles
    # (.DS_Store, .gitkeep) are tooling, not data.
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def inspect_image(path: str | Path, root: str | Path | None = None, max_pixels: int = 40_000_000) -> dict[str, Any]:
    """One row of the metadata table. Never raises for a bad file: problems land in `error`.
    Files with more than `max_pixels` pixels are only verified, never decoded (decompression bombs)."""
    path = Path(path)
    data = path.read_bytes()
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(
        path=(path.relative_to(root) if root else path).as_posix(),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        suffix=path.suffix.lower(),
        decodes=False,
    )
    if not data:
        row["error"] = "zero-byte file"
        return row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, below
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                row.update(
                    format=image.format,
                    mode=image.mode,
                    channels=len(image.getbands()),
                    bit_depth=_BIT_DEPTH.get(image.mode, 8),
                    width=image.width,
                    height=image.height,
                    pixels=image.width * image.height,
                )
                image.verify()
        if row["pixels"] > max_pixels:
            row["decodes"] = None  # unknown on purpose: the size checks report it
            row["error"] = f"not decoded: {row['width']}x{row['height']} pixels exceeds validation.max_pixels"
            return row
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            luminance = _luminance(image)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        row["error"] = _reason(exc)
        return row
    row.update(
        decodes=True,
        luminance_mean=float(luminance.mean()),
        luminance_std=float(luminance.std()),
        blur=float(ndimage.laplace(luminance).var()),
    )
    return row


# center_crop keeps a square: above this aspect ratio a quarter or more of each image is never seen.
CROP_ASPECT_NOTE = 4 / 3


def size_notes(table: pd.DataFrame, image) -> list[str]:
    """What the report says about sizes that pass but are not what the model works at (`image`:
    model.image): images the model upsamples, and elongated images a centre crop cuts short."""
    sides = table[["width", "height"]].dropna()
    shorter, longer = sides.min(axis=1), sides.max(axis=1)
    notes = []
    small = shorter[shorter < image.resize]
    if not small.empty:
        notes.append(
            f"{len(small)} of {len(sides)} images are smaller than model.image.resize ({image.resize} px) on their "
            f"shorter side (smallest {int(small.min())} px): the model upsamples them, so their detail is coarser "
            "than the backbone's patches assume"
        )
    aspect = longer / shorter
    long_ = aspect[aspect > CROP_ASPECT_NOTE]
    if image.mode == "center_crop" and not long_.empty:
        unseen = float((1 - (image.crop / image.resize) ** 2 / long_).mean())  # the crop's share of the area
        notes.append(
            f"{len(long_)} of {len(sides)} images have an aspect ratio above {CROP_ASPECT_NOTE:.2f} (up to "
            f"{float(long_.max()):.2f}): model.image.mode center_crop never sees {unseen:.0%} of each on average; "
            "set model.image.mode: full_frame (or tiled) to inspect the whole image"
        )
    return notes


def _luminance(image: Image.Image) -> np.ndarray:
    # Grey levels of exactly what the model sees (the library's one decode, patchcore.data.to_rgb:
    # 16-bit scaled by the full range, orientation applied), so the statistics describe its input.
    return np.asarray(to_rgb(image).convert("L"), dtype=np.float32)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(exc, Image.DecompressionBombError):
        return f"refused as a decompression bomb ({exc})"
    return str(exc) or type(exc).__name__


def build_table(folder: str | Path, max_pixels: int = 40_000_000, workers: int | None = None) -> pd.DataFrame:
    """The metadata table of every file under `folder` (sorted by path)."""
    folder = Path(folder)
    files = _files(folder)
    workers = workers or min(4, os.cpu_count() or 1)
    # PIL decoding and numpy release the GIL: threads overlap the files.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(lambda p: inspect_image(p, folder, max_pixels), files))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def image_stats(table: pd.DataFrame) -> dict[str, Any]:
    """What the next version of the product is compared with: luminance and contrast (mean and std
    over the decodable images), the colour mode, the count and a content hash."""
    ok = table[table["decodes"] == True]  # noqa: E712 (a nullable column)

    def describe(column: str) -> dict[str, float | None]:
        values = ok[column].astype(float)
        if values.empty:
            return {"mean": None, "std": None, "min": None, "max": None}
        return {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=0)),
            "min": float(values.min()),
            "max": float(values.max()),
        }

    modes = Counter(ok["mode"])
    content = hashlib.sha256("".join(sorted(table["sha256"])).encode()).hexdigest()
    return {
        "n_images": int(len(ok)),
        "mode": modes.most_common(1)[0][0] if modes else None,
        "luminance_mean": describe("luminance_mean"),
        "luminance_std": describe("luminance_std"),
        "blur": describe("blur"),
        "content_sha256": content,
    }


# -- the accepted version (drift reference) ----------------------------------------------------


def reference_path(product: str, store: Store | None = None) -> Path:
    """validation/<product>/accepted.json in the store (default: the one under $PATCHCORE_HOME)."""
    return (store or Store()).path("validation", product, "accepted.json")


def load_reference(product: str, store: Store | None = None) -> dict[str, Any] | None:
    """The statistics of the product's previously accepted version, or None for a first version."""
    path = reference_path(product, store)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable drift reference ({exc}); delete it to start a new baseline") from None


def reference_record(result: ValidationResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A passed set's statistics as a drift baseline (what the registry keeps with each version)."""
    if not result.passed:
        raise ValueError(f"{result.folder}: a set that failed validation cannot become the reference")
    return {
        **result.stats,
        "product": result.product,
        "folder": recorded_path(result.folder),
        "accepted_at": _now(),
        **(extra or {}),
    }


def newest_reference(*references: dict[str, Any] | None) -> dict[str, Any] | None:
    """The most recently accepted of several baselines (the registry's and a local one set by hand)."""
    found = [r for r in references if r]
    return max(found, key=lambda r: str(r.get("accepted_at") or "")) if found else None


def accept_reference(result: ValidationResult, extra: dict[str, Any] | None = None, store: Store | None = None) -> Path:
    """Make a passed set the product's baseline on this machine's store, by hand (`patchcore validate
    DIR --accept`). Trainings keep theirs in the registry, with the version (pipeline/registry.py);
    validation compares with whichever of the two was accepted last."""
    return write_json(reference_path(result.product, store), reference_record(result, extra))


# -- the suite ----------------------------------------------------------------------------------


def load_suite(path: str | Path = SUITE_FILE) -> dict[str, Any]:
    suite = yaml.safe_load(Path(path).read_text())
    if not isinstance(suite, dict) or not isinstance(suite.get("expectations"), list):
        raise DataError(f"{path}: an expectation suite needs `name` and a list of `expectations`")
    return suite


def suite_parameters(params: Params, table: pd.DataFrame, reference: dict[str, Any] | None) -> dict[str, Any]:
    """The run-time values of the suite's $placeholders."""
    v = params.validation
    ours = image_stats(table)
    values: dict[str, Any] = {
        "formats": [f.upper() for f in v.formats],
        "image_suffixes": list(IMAGE_SUFFIXES),
        "min_images": v.min_images,
        "min_side_px": v.min_side_px or MIN_USABLE_SIDE_PX,
        "max_side_px": v.max_side_px,
        "max_pixels": v.max_pixels,
        "mode": (reference or {}).get("mode") or ours["mode"],
        "drift_mostly": v.drift_mostly,
    }
    if reference:
        for name, column in (("lum", "luminance_mean"), ("contrast", "luminance_std")):
            ref = reference.get(column) or {}
            mean, std = ref.get("mean"), ref.get("std") or 0.0
            if mean is None:
                continue
            half = max(v.drift_band_std * std, v.drift_min_band)
            set_half = max(v.drift_set_band_std * std, v.drift_min_band)
            values.update(
                {
                    f"{name}_lo": mean - half,
                    f"{name}_hi": mean + half,
                    f"{name}_set_lo": mean - set_half,
                    f"{name}_set_hi": mean + set_half,
                }
            )
    return values


def _fill(value: Any, values: dict[str, Any], where: str) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        if value[1:] not in values:
            raise DataError(f"{SUITE_FILE.name}: {where} uses unknown parameter {value}")
        return values[value[1:]]
    if isinstance(value, list):
        return [_fill(v, values, where) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, values, where) for k, v in value.items()}
    return value


def resolved_expectations(suite: dict[str, Any], values: dict[str, Any], with_reference: bool) -> list[dict[str, Any]]:
    """The suite's entries with parameters filled in (drift entries only when there is a reference)."""
    out = []
    for entry in suite["expectations"]:
        if entry.get("needs") == "reference" and not with_reference:
            continue
        out.append({**entry, "kwargs": _fill(entry.get("kwargs", {}), values, entry.get("rule", "?"))})
    return out


# -- running it ---------------------------------------------------------------------------------


def validate_image_set(
    product_dir: str | Path,
    params: Params | None = None,
    reference: Any = "auto",
    out_dir: str | Path | None = None,
    docs: bool = True,
    product: str | None = None,
    suite_path: str | Path = SUITE_FILE,
    store: Store | None = None,
) -> ValidationResult:
    """Validate a product's nominal images with the repository's GX suite through a Checkpoint.

    reference: "auto" (the product's accepted statistics when they exist), None (no drift check),
    a dict from image_stats()/load_reference(), or the path of such a JSON file.
    out_dir: where summary.json, failures.json, images.csv and data_docs/ go
    (default validation/<product>/latest in `store`, itself by default $PATCHCORE_HOME). Never raises
    for bad data: check
    `result.passed` or call raise_for_failures(result).
    """
    params = params or Params()
    folder = image_folder(product_dir)
    product = product or Path(product_dir).expanduser().resolve().name
    if isinstance(reference, str) and reference == "auto":
        reference = load_reference(product, store)
    elif isinstance(reference, (str, Path)):
        reference = json.loads(Path(reference).read_text())
    out = Path(out_dir) if out_dir else (store or Store()).path("validation", product, "latest")
    out.mkdir(parents=True, exist_ok=True)

    table = build_table(folder, max_pixels=params.validation.max_pixels)
    suite = load_suite(suite_path)
    values = suite_parameters(params, table, reference)
    entries = resolved_expectations(suite, values, with_reference=bool(reference))
    docs_dir = out / "data_docs" if docs else None
    outcomes = _run_checkpoint(table, suite["name"], entries, product, docs_dir)

    failures = _failures(outcomes, table, folder)
    stats = image_stats(table)
    passed = all(o["success"] for o in outcomes)
    summary = {
        "product": product,
        "folder": recorded_path(folder),  # relative to the repository when inside it (tracking data)
        "passed": passed,
        "suite": suite["name"],
        "n_files": int(len(table)),
        "n_failures": len(failures),
        "checked_at": _now(),
        "great_expectations": _gx_version(),
        "drift_reference": (
            {"accepted_at": reference.get("accepted_at"), "n_images": reference.get("n_images")} if reference else None
        ),
        "expectations": [
            {
                "rule": o["rule"],
                "expectation": o["type"],
                "success": o["success"],
                "observed": _compact(o["observed"]),
                "unexpected": o["unexpected_count"],
            }
            for o in outcomes
        ],
        "stats": stats,
    }
    summary["notes"] = size_notes(table, params.model.image)
    for note in summary["notes"]:
        log.warning("%s: %s", folder, note)
    result = ValidationResult(
        passed=passed, product=product, folder=folder, summary=summary, failures=failures, stats=stats, out_dir=out
    )
    result.table_path = out / "images.csv"
    table.to_csv(result.table_path, index=False)
    result.failures_path = out / "failures.json"
    write_json(result.failures_path, result.failure_rows())
    if docs_dir is not None and (docs_dir / "index.html").is_file():
        result.docs_path = docs_dir / "index.html"
        summary["data_docs"] = result.docs_path.relative_to(out).as_posix()  # beside summary.json
    result.summary_path = out / "summary.json"
    write_json(result.summary_path, summary)
    if passed:
        log.info("%s: %d files passed the %s suite", folder, len(table), suite["name"])
    else:
        log.error(
            "%s: %d problem(s) found by the %s suite; per-file report: %s",
            folder,
            len(failures),
            suite["name"],
            result.failures_path,
        )
    return result


def _run_checkpoint(
    table: pd.DataFrame, suite_name: str, entries: list[dict[str, Any]], asset: str, docs_dir: Path | None
) -> list[dict[str, Any]]:
    gx = _import_gx()
    from great_expectations.data_context.types.base import (  # noqa: PLC0415  lazy: see _import_gx
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        for stale in ("validations", "expectations"):  # only this run's pages, not earlier runs'
            shutil.rmtree(docs_dir / stale, ignore_errors=True)
        sites["local"] = {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        data_docs_sites=sites,
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    batch = (
        context.data_sources.add_pandas("images")
        .add_dataframe_asset(asset)
        .add_batch_definition_whole_dataframe("all files")
    )
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration  # noqa: PLC0415

    suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
    for index, entry in enumerate(entries):
        suite.add_expectation(
            ExpectationConfiguration(
                type=entry["expectation"],
                kwargs=entry["kwargs"],
                meta={"index": index, "rule": entry.get("rule", ""), "fix": entry.get("fix", "")},
            ).to_domain_obj()
        )
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=suite_name, data=batch, suite=suite))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs")] if sites else []
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"{suite_name}_checkpoint",
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]},
        )
    )
    run = checkpoint.run(batch_parameters={"dataframe": table})

    outcomes: dict[int, dict[str, Any]] = {}
    for validation in run.run_results.values():
        for r in validation.results:
            meta = r.expectation_config.meta or {}
            result = r.result or {}
            error = (r.exception_info or {}).get("exception_message") if not r.success else None
            outcomes[int(meta["index"])] = {
                "rule": meta.get("rule", ""),
                "fix": meta.get("fix", ""),
                "type": r.expectation_config.type,
                "column": r.expectation_config.kwargs.get("column"),
                "success": bool(r.success),
                "observed": result.get("observed_value", error),
                "unexpected_count": result.get("unexpected_count"),
                "unexpected_paths": [row["path"] for row in result.get("unexpected_index_list") or []],
                "observed_column": entries[int(meta["index"])].get("observed"),
            }
    return [outcomes[i] for i in sorted(outcomes)]


def _failures(outcomes: list[dict[str, Any]], table: pd.DataFrame, folder: Path) -> list[FileFailure]:
    rows = table.set_index("path", drop=False)
    failures = []
    for o in outcomes:
        if o["success"]:
            continue
        name = f"{o['rule']} ({o['type']})"
        if not o["unexpected_paths"]:  # a set-level expectation (count, set average)
            failures.append(FileFailure(SET_LEVEL, name, _compact(o["observed"]), o["fix"]))
            continue
        column = o["observed_column"] or o["column"]
        for path in o["unexpected_paths"]:
            row = rows.loc[path]
            if o["type"] == "expect_column_values_to_be_unique":
                same = [p for p in table.loc[table["sha256"] == row["sha256"], "path"] if p != path]
                observed: Any = f"same bytes as {', '.join(same)}"
            else:
                observed = _compact(row[column])
            failures.append(FileFailure(str(folder / path), name, observed, o["fix"]))
    return failures


# -- helpers ----------------------------------------------------------------------------------------


def _import_gx():
    # Before the first import: no usage statistics; GX's import-time INFO chatter and deprecation
    # warnings stay out of the pipeline's logs.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import great_expectations as gx  # noqa: PLC0415  lazy: GX takes 2-4 s to import; only validation runs need it

    return gx


def _gx_version() -> str:
    return metadata.version("great_expectations")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _compact(value: Any) -> Any:
    """An observed value as the summary shows it: plain JSON, floats rounded to 4 digits."""
    value = plain(value)
    if isinstance(value, float):
        # Integral floats are counts/sizes from a column pandas widened to float by a missing value.
        return int(value) if value.is_integer() else round(value, 4)
    if isinstance(value, (list, tuple)):
        return [_compact(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _compact(v) for k, v in value.items()}
    return value


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(_compact(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "FileFailure",
    "ValidationError",
    "ValidationResult",
    "accept_reference",
    "newest_reference",
    "reference_record",
    "build_table",
    "image_folder",
    "image_stats",
    "inspect_image",
    "load_reference",
    "raise_for_failures",
    "reference_path",
    "validate_image_set",
]
