"""Patch features follow the reference definition; nearest-neighbour search is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchcore.features import patch_features
from patchcore.knn import BoundedIndex, FaissIndex, TorchIndex, make_index


def _reference_definition(maps, patch_size, pretrain_dim, target_dim):
    """Straight from the definition: unfold every layer, resize the UNPOOLED neighbourhood maps
    of deeper layers onto the first grid, then pool each layer and the stack."""
    grid = maps[0].shape[-2:]
    per_layer = []
    for fmap in maps:
        b, c, h, w = fmap.shape
        unfolded = F.unfold(fmap, patch_size, padding=patch_size // 2).reshape(b, c * patch_size**2, h, w)
        if (h, w) != grid:
            unfolded = F.interpolate(unfolded, size=tuple(grid), mode="bilinear", align_corners=False)
        vectors = unfolded.permute(0, 2, 3, 1).reshape(-1, 1, c * patch_size**2)
        per_layer.append(F.adaptive_avg_pool1d(vectors, pretrain_dim)[:, 0])
    stacked = torch.stack(per_layer, dim=1).reshape(len(per_layer[0]), 1, -1)
    return F.adaptive_avg_pool1d(stacked, target_dim)[:, 0]


@pytest.mark.parametrize("channels,dims", [((64, 96), (128, 100)), ((40, 72), (256, 256))])
def test_patch_features_equal_the_reference_definition(channels, dims):
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, channels[0], 12, 10, generator=gen), torch.randn(2, channels[1], 6, 5, generator=gen)]
    ours = patch_features(maps, 3, *dims)
    assert ours.shape == (2, 12, 10, dims[1])
    expected = _reference_definition(maps, 3, *dims)
    torch.testing.assert_close(ours.reshape(-1, dims[1]), expected, rtol=1e-5, atol=1e-6)


def test_neighbourhood_matters():
    # A change at one position moves the features of its 3x3 neighbours and nothing further away.
    fmap = torch.zeros(1, 8, 9, 9)
    changed = fmap.clone()
    changed[0, :, 4, 4] = 1.0
    diff = (patch_features([changed], 3, 16, 16) - patch_features([fmap], 3, 16, 16)).abs().sum(-1)[0]
    touched = torch.nonzero(diff > 0).tolist()
    assert sorted(touched) == [[y, x] for y in (3, 4, 5) for x in (3, 4, 5)]


def _brute_force(bank, queries, k):
    d2 = ((queries[:, None, :].astype(np.float64) - bank[None, :, :]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d2, order, axis=1), order


@pytest.mark.parametrize("backend", ["faiss", "torch", "bounded"])
@pytest.mark.parametrize("k", [1, 3])
def test_knn_equals_brute_force(backend, k):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(500, 32)).astype(np.float32)
    queries = rng.normal(size=(64, 32)).astype(np.float32)
    index = make_index(bank, backend=backend, device="cpu")
    distances, indices = index.search(queries, k)
    expected_d, expected_i = _brute_force(bank, queries, k)
    np.testing.assert_array_equal(indices, expected_i)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-4, atol=1e-4)


def _patch_like(rng, n, dim=128, rank=12):
    """Rows with most of their variance on a few axes (as CNN patch features have) plus noise."""
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:, :rank]
    return (
        (rng.normal(size=(n, rank)) * np.geomspace(30, 3, rank)) @ basis.T + rng.normal(scale=0.3, size=(n, dim)) + 5.0
    ).astype(np.float32)


@pytest.mark.parametrize("k", [1, 3])
def test_bounded_search_is_exact_whether_the_bound_settles_a_query_or_not(k):
    rng = np.random.default_rng(4)
    bank = _patch_like(rng, 3000)
    queries = np.concatenate(
        [bank[:200] + rng.normal(scale=0.5, size=(200, 128)).astype(np.float32), _patch_like(rng, 200)]
    )
    expected_d, expected_i = _brute_force(bank, queries, k)
    tight = BoundedIndex.build(bank)  # most queries settled by the bound
    # Any orthonormal axes keep the search exact (random ones just give a weaker bound).
    loose = BoundedIndex(FaissIndex.from_bank(bank), bank.mean(axis=0), np.linalg.qr(rng.normal(size=(128, 32)))[0], 4)
    for index in (tight, loose):
        distances, indices = index.search(queries, k)
        np.testing.assert_array_equal(indices, expected_i)
        np.testing.assert_allclose(distances, expected_d, rtol=1e-4, atol=1e-3)
    near = BoundedIndex.build(bank)
    near.search(queries[:200], k)  # patches close to a bank entry, like nominal test patches
    assert near.lead == 64 and near.stats["settled"] > 0.9 * 200
    # Novel patches (the second half) sit among many near-equidistant entries: faiss settles those.
    assert tight.stats["settled"] < len(queries) and loose.stats["settled"] < len(queries)


@pytest.mark.parametrize("backend", ["faiss", "torch", "bounded"])
def test_distances_are_exact_where_norms_dwarf_the_distances(backend):
    # Patch features: squared norms far larger than nearest-neighbour distances. A float32
    # |q|^2 + |b|^2 - 2 q.b (faiss' raw value) is off by more than the distance itself here.
    # (Enough queries for faiss to take its BLAS path, as a batch of images does.)
    rng = np.random.default_rng(7)
    bank = _patch_like(rng, 1500) + np.float32(300.0)
    queries = bank[:1000] + rng.normal(scale=0.05, size=(1000, 128)).astype(np.float32)
    distances, indices = make_index(bank, backend=backend, device="cpu").search(queries, 3)
    q64, b64 = queries.astype(np.float64), bank.astype(np.float64)
    np.testing.assert_array_equal(indices[:, 0], np.arange(1000))  # each query's own row is nearest
    # The reported distances are those of the rows reported, to float32 rounding, and ascending.
    np.testing.assert_allclose(distances, ((q64[:, None, :] - b64[indices]) ** 2).sum(-1), rtol=1e-5)
    assert (np.diff(distances, axis=1) >= 0).all()
    raw, _ = FaissIndex.from_bank(bank).index.search(queries, 1)
    exact = ((q64 - b64[:1000]) ** 2).sum(-1)
    assert np.abs(raw[:, 0] - exact).max() > exact.min()  # the trap is real: raw faiss is off by more


@pytest.mark.parametrize("backend", ["faiss", "torch", "bounded"])
def test_k_beyond_the_bank_returns_every_row_once(backend):
    bank = np.random.default_rng(8).normal(size=(3, 8)).astype(np.float32)
    distances, indices = make_index(bank, backend=backend, device="cpu").search(bank[:2], 5)
    assert indices.shape == distances.shape == (2, 3)
    assert [sorted(row) for row in indices.tolist()] == [[0, 1, 2]] * 2
    assert (np.diff(distances, axis=1) >= 0).all()


def test_auto_backend_takes_the_bound_only_where_the_spectrum_pays():
    rng = np.random.default_rng(5)
    assert isinstance(make_index(_patch_like(rng, 1000), backend="auto", device="cpu"), BoundedIndex)
    isotropic = rng.normal(size=(1000, 128)).astype(np.float32)
    assert type(make_index(isotropic, backend="auto", device="cpu")) is FaissIndex


def test_auto_backend_is_faiss_on_cpu_and_index_round_trips(tmp_path):
    bank = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    index = make_index(bank, backend="auto", device="cpu")
    assert isinstance(index, FaissIndex)
    index.save(tmp_path / "i.faiss")
    again = FaissIndex.read(tmp_path / "i.faiss")
    np.testing.assert_array_equal(again.search(bank[:5], 1)[1][:, 0], np.arange(5))


def test_torch_backend_chunks_queries():
    bank = np.random.default_rng(2).normal(size=(40, 8)).astype(np.float32)
    index = TorchIndex(bank, "cpu", query_chunk=7)
    np.testing.assert_array_equal(index.search(bank, 1)[1][:, 0], np.arange(40))


def test_faiss_gpu_request_without_gpu_support_is_a_clear_error():
    bank = np.zeros((4, 4), np.float32)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="cannot run on a GPU"):
        make_index(bank, backend="faiss-gpu", device="cpu")


@pytest.mark.parametrize("channels", [(48, 32), (48, 64), (512, 1024), (24, 40, 56)])
def test_channel_layouts_of_real_backbones_give_the_same_numbers(channels):
    # (512, 1024) is wide_resnet50_2's layer2/layer3 at pretrain/target 1024; three layers work too.
    gen = torch.Generator().manual_seed(1)
    dim = 1024 if channels[0] == 512 else 32
    maps = [
        torch.randn(1, c, 8 // (2 ** min(i, 1)), 8 // (2 ** min(i, 1)), generator=gen) for i, c in enumerate(channels)
    ]
    torch.testing.assert_close(
        patch_features(maps, 3, dim, dim).reshape(-1, dim),
        _reference_definition(maps, 3, dim, dim),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("length,out", [(10, 4), (4608, 1024), (2048, 1024), (7, 7), (5, 9)])
def test_pooling_matrix_is_torchs_adaptive_average_pooling(length, out):
    from patchcore.features import _pooling_matrix

    x = torch.randn(3, 1, length, dtype=torch.float64)
    torch.testing.assert_close(x[:, 0] @ _pooling_matrix(length, out).T, F.adaptive_avg_pool1d(x, out)[:, 0])


def test_patch_size_five_matches_too():
    gen = torch.Generator().manual_seed(2)
    maps = [torch.randn(2, 16, 10, 10, generator=gen), torch.randn(2, 24, 5, 5, generator=gen)]
    torch.testing.assert_close(
        patch_features(maps, 5, 64, 48).reshape(-1, 48), _reference_definition(maps, 5, 64, 48), rtol=1e-5, atol=1e-5
    )
