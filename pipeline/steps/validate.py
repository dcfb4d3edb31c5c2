"""Step 2, validate: stop before any feature is extracted when the images are not fit to train on."""

from __future__ import annotations

import time
from typing import Any

from patchcore.data import DataError, check_readable
from pipeline.config import Params
from pipeline.io import read_json, resolve_recorded, write_json
from pipeline.results import Manifest, Validation
from pipeline.steps.fingerprint import image_path, load_manifest
from pipeline.store import Store
from pipeline.validation import (
    ValidationError,
    ValidationResult,
    load_reference,
    newest_reference,
    reference_record,
    validate_image_set,
)


class ValidationFailed(DataError):
    """The image set failed validation: nothing was extracted, trained or registered."""


def validate_dataset(
    store: Store, manifest: Manifest, params: Params, product: str, reference: Any = "auto"
) -> Validation:
    """The nominal images (train/good) must pass the Great Expectations suite of pipeline/validation.py
    (counts, formats, sizes, drift against the product's accepted version); every test image and
    mask must decode; at least two nominal images (one for the bank, one held out). Raises a
    DataError listing every problem (file, check, observed value, fix). reference: the drift
    baseline (a dict, None for none, "auto": the one in the store, see validate_image_set)."""
    start = time.perf_counter()
    content = load_manifest(manifest)
    result = validate_image_set(content["root"], params, product=product, store=store, reference=reference)
    problems: list[str] = []
    train = [e for e in content["images"] if e["split"] == "train"]
    if len(train) < 2:
        problems.append(
            f"{content['root']}/train/good: {len(train)} image(s); at least 2 are needed "
            "(one for the memory bank, one held out)"
        )
    files = [image_path(content, e["path"]) for e in content["images"] if e["split"] == "test"]
    files += [image_path(content, e["mask"]) for e in content["images"] if e["mask"]]
    try:
        check_readable(files)
    except DataError as exc:
        problems.append(f"test images / masks: {exc}")
    checks = write_json(
        result.out_dir / "pipeline_checks.json", {"test_files_checked": len(files), "problems": problems}
    )
    if not result.passed:
        raise ValidationError(result)
    if problems:
        raise ValidationFailed(f"data validation failed for {content['root']}:\n  " + "\n  ".join(problems))
    files_out = [str(p) for p in (result.summary_path, result.failures_path, checks) if p is not None]
    return Validation(
        summary=str(result.summary_path),
        files=files_out,
        docs_dir=str(result.docs_path.parent) if result.docs_path else None,
        n_files=result.summary["n_files"],
        seconds=time.perf_counter() - start,
    )


def drift_reference(validation: Validation, extra: dict[str, Any]) -> dict[str, Any]:
    """A validated set as the product's next drift baseline (registered with its model version)."""
    summary = read_json(validation.summary)
    result = ValidationResult(
        passed=bool(summary["passed"]),
        product=summary["product"],
        folder=resolve_recorded(summary["folder"]),
        summary=summary,
        stats=summary.get("stats") or {},
    )
    return reference_record(result, extra)


def current_reference(store: Store, product: str, registered: dict[str, Any] | None) -> dict[str, Any] | None:
    """The baseline a new set of `product` is checked against: the registry's (`registered`, from
    Registry.drift_reference) or one accepted by hand in the store, whichever is newer."""
    return newest_reference(registered, load_reference(product, store))


__all__ = ["ValidationFailed", "current_reference", "drift_reference", "validate_dataset"]
