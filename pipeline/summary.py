"""The markdown summary of one training (Prefect artifact, MLflow run description)."""

from __future__ import annotations

from typing import Any

from pipeline.results import TrainingRecord


def _store_label(uri: str | None) -> str:
    """A tracking server by its address; a local store without this machine's file path."""
    if not uri:
        return "-"
    return uri if uri.startswith(("http://", "https://")) else f"local {uri.split(':', 1)[0]} store"


def summary_markdown(record: TrainingRecord, registry: dict[str, Any] | None = None) -> str:
    """The markdown summary of one training run (Prefect artifact, MLflow run description);
    `registry`: what registration returned (name, version, run_id, tracking_uri), when it ran."""
    result = record.to_dict()
    c = result["calibration"]
    m = result["metrics"]
    lines = [f"# PatchCore model for `{result['product']}`", ""]
    if result.get("weights_kind") == "random":
        lines += ["> **RANDOM backbone weights: scores are not meaningful for real inspection (demo/test only).**", ""]
    reg = registry or {}
    lines += [
        "| | |",
        "|---|---|",
        f"| registered model | `{reg.get('name', '-')}` version **{reg.get('version', '-')}** (alias `challenger`) |",
        f"| MLflow run | `{reg.get('run_id', '-')}` ({_store_label(reg.get('tracking_uri'))}) |",
        f"| data version | `{result['data_version'][:16]}` ({result['data_root']}) |",
        f"| mode | {c['mode']} |",
        f"| memory bank | {result['bank_size']} patches from {result['n_bank']} images |",
        f"| features | {result['features']['n_extracted']} images extracted, "
        f"{result['features']['n_cached']} from the cache |",
        f"| held-out nominal images | {c['n_heldout']} |",
        f"| threshold | **{c['threshold']:.6g}** — rule `{c['rule']}`: {c['rule_detail']} |",
        f"| held-out FPR at threshold | {c['heldout_fpr']:.3f} ({c['heldout_false_alarms']} of {c['n_heldout']})"
        + ("" if c["heldout_fpr_independent"] else " — in-sample: these scores picked the threshold")
        + " |",
        f"| figures at threshold measured on | {c['report_on']} |",
    ]
    continued = result.get("coreset_continued")
    if continued:
        lines.append(
            f"| coreset | continued bank `{continued['from_bank']}` ({continued['prior_images']} images, "
            f"{continued['prior_picks']} picks kept) with {continued['new_images']} new image(s) |"
        )
    at = c.get("at_threshold") or {}
    if at:
        lines.append(
            "| at threshold | "
            + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in at.items())
            + " |"
        )
    if "threshold_recall100" in c:
        r100 = c["at_recall100"]
        lines.append(
            f"| threshold at 100% recall | {c['threshold_recall100']:.6g} (on report images: recall "
            f"{r100['recall']:.3f}, FPR {r100['fpr']:.3f}) |"
        )
    for name in ("image_auroc", "pixel_auroc", "pro", "f1_max"):
        if name in m:
            lines.append(f"| {name} (all test images) | {m[name]:.4f} |")
    cached = set(result.get("cached_stages", []))
    lines.append(
        "| seconds per stage | "
        + ", ".join(f"{k} {v:.1f}" + (" (cached)" if k in cached else "") for k, v in result["seconds"].items())
        + " |"
    )
    return "\n".join(lines) + "\n"


__all__ = ["summary_markdown"]
