"""The Magnetic Tile Defects (MTD) evaluation protocol: the fixed `split.json` of
../shared/datasets/mtd (train / test_good / test_defect), masks beside each image as `<name>.png`.

The data is read in place and never copied into the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

from patchcore.data import Sample

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mtd"


def load_split(root: Path = DEFAULT_ROOT) -> tuple[list[Path], list[Sample]]:
    """(training image paths, labelled test samples: good first, then defects with masks)."""
    split = json.loads((root / "split.json").read_text())
    train = [root / p for p in split["train"]]
    test = [Sample(root / p, 0, "good", None) for p in split["test_good"]]
    for rel in split["test_defect"]:
        path = root / rel
        defect = path.parts[-3].removeprefix("MT_").lower()
        test.append(Sample(path, 1, defect, path.with_suffix(".png")))
    return train, test


def halves(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """A fixed validation / test halving of the test lists (alternate items within good and within
    defect), used to choose settings on one half and report on the other."""
    good = [s for s in samples if s.label == 0]
    bad = [s for s in samples if s.label == 1]
    return good[0::2] + bad[0::2], good[1::2] + bad[1::2]
