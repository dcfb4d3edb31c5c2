"""The content-addressed store and the atomic writes under it: on a local folder and on an fsspec URL
(fsspec's in-memory filesystem and file:// URLs, both real fsspec backends), a reader never sees a
half-written entry and a failed write leaves nothing behind; typed step results round-trip
through JSON."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from patchcore import atomic
from pipeline.results import Bank, Evaluation, Manifest, Split
from pipeline.store import INCOMPLETE, Store


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHCORE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def stores(tmp_path):
    return [
        Store(tmp_path / "local"),
        Store(f"memory://patchcore-{uuid.uuid4().hex}"),
        Store(f"file://{tmp_path / 'shared'}"),
    ]


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["folder", "memory-url", "file-url"])
def test_entries_round_trip_and_are_listed_once_complete(home, tmp_path, kind):
    store = stores(tmp_path)[kind]
    assert not store.has("splits", "abc.json")
    store.write_json("splits", "abc.json", data={"bank": ["a.png"], "n": np.int64(3)})
    store.save_npy("features", "id1", "sha1.npy", array=np.arange(6, dtype=np.float64).reshape(2, 3))
    with store.directory("banks", "k1") as folder:
        (folder / "model.json").write_text("{}")
    assert store.has("splits", "abc.json") and store.has("banks", "k1") and store.has("banks", "k1", "model.json")
    assert store.read_json("splits", "abc.json") == {"bank": ["a.png"], "n": 3}
    assert store.keys("banks") == ["k1"]
    if not store.is_local:  # a fresh client (another machine) reads it back through the URL
        fresh = Store(store.url)
        for path in (fresh.path("splits"), fresh.path("features"), fresh.path("banks")):
            if path.exists():
                import shutil

                shutil.rmtree(path)
        assert fresh.read_json("splits", "abc.json")["n"] == 3
        loaded = np.load(fresh.fetch("features", "id1", "sha1.npy"))
        assert loaded.dtype == np.float32 and loaded.tolist() == [[0, 1, 2], [3, 4, 5]]
        assert (fresh.fetch("banks", "k1") / "model.json").read_text() == "{}"


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["folder", "memory-url", "file-url"])
def test_a_folder_that_fails_half_way_is_never_an_entry(home, tmp_path, kind):
    store = stores(tmp_path)[kind]
    with pytest.raises(RuntimeError, match="disk full"):
        with store.directory("banks", "broken") as folder:
            (folder / "memory_bank.npy").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert not store.has("banks", "broken") and store.keys("banks") == []
    assert not any(p.name.endswith(".tmp") for p in store.path("banks").parent.rglob("*"))


def test_a_remote_folder_whose_upload_died_half_way_is_ignored(home, tmp_path, monkeypatch):
    store = Store(f"memory://patchcore-{uuid.uuid4().hex}")
    uploads = []
    original = store._fs.pipe_file

    def dying_pipe(path, data, **kwargs):
        uploads.append(path)
        if path.endswith("index.faiss"):  # the second file of the folder: the machine dies here
            raise ConnectionError("connection reset")
        return original(path, data, **kwargs)

    monkeypatch.setattr(store._fs, "pipe_file", dying_pipe)
    with pytest.raises(ConnectionError):
        with store.directory("banks", "k") as folder:
            (folder / "memory_bank.npy").write_bytes(b"bank")
            (folder / "index.faiss").write_bytes(b"index")
    assert uploads[0].endswith(INCOMPLETE)  # marked before the first file went up
    assert not store.has("banks", "k") and not store.has("banks", "k", "memory_bank.npy") and store.keys("banks") == []
    monkeypatch.setenv("PATCHCORE_HOME", str(tmp_path / "another-machine"))
    with pytest.raises(FileNotFoundError, match="not in the store"):
        Store(store.url).fetch("banks", "k", "memory_bank.npy")


def test_atomic_file_leaves_the_old_file_and_no_temporary_on_failure(tmp_path):
    target = tmp_path / "x.json"
    atomic.write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        atomic.write_json(target, {"v": object()})  # not JSON-able: fails half-way through the dump
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_directory_swaps_a_whole_folder(tmp_path):
    target = tmp_path / "model"
    with atomic.atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic.atomic_directory(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_step_results_round_trip_through_json():
    results = [
        Manifest(
            manifest="/s/datasets/m.json",
            manifest_sha256="ab",
            data_root="/d",
            data_version="md5",
            data_version_record={"md5": "md5"},
            n_train=3,
            n_test_good=1,
            n_test_defect=1,
            seconds=0.5,
        ),
        Split(
            split="/s/splits/k.json", split_key="k", mode="labelled", n_bank=2, n_holdout=1, n_calibration=1, n_report=1
        ),
        Bank(
            bank_dir="/s/banks/b",
            bank_key="b",
            bank_size=10,
            n_train_patches=100,
            weights_kind="random",
            coreset_continued={"from_bank": "a"},
        ),
        Evaluation(evaluation_dir="/s/evaluations/e", mode="labelled", metrics={"image_auroc": 0.9}),
    ]
    for result in results:
        again = type(result).from_dict(json.loads(json.dumps(result.to_dict())))
        assert again == result
    with pytest.raises(Exception):  # frozen: a step cannot change an earlier step's result
        results[0].n_train = 4  # type: ignore[misc]


def test_a_store_url_is_one_store_with_or_without_a_trailing_slash_and_an_empty_root_is_home(home):
    assert Store("memory://bucket/prefix/") == Store("memory://bucket/prefix")
    assert Store("").local_root == Store(None).local_root == home.resolve()
