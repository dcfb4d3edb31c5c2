"""Tests of patchcore.coreset: greedy coreset selection, its fast exact variant, and helpers."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from patchcore import coreset, coreset_cpu

N, D = 5000, 64


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tensors are too small to gain from threads, and on a busy (oversubscribed) CI
    machine OpenMP barriers can stall each small op for milliseconds: run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    """Clustered data with a decaying spectrum plus noise, like patch features in miniature."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, D)) * 3.0
    scales = np.linspace(1.0, 0.05, D)
    x = centres[rng.integers(0, 20, N)] + rng.standard_normal((N, D)) * scales
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def projected(features) -> torch.Tensor:
    return coreset.project(features, 128, seed=0)


@pytest.fixture(scope="module")
def fast_picks(features) -> np.ndarray:
    return coreset.select_coreset(features, 0.02, seed=0, progress=False)


@pytest.fixture(scope="module")
def plain_picks(features) -> np.ndarray:
    return coreset.select_coreset(features, 0.02, method="greedy_plain", seed=0, progress=False)


def brute_force_radius(projected: torch.Tensor, selected: np.ndarray) -> float:
    y = projected.double()
    return float(torch.cdist(y, y[torch.as_tensor(selected)]).min(dim=1).values.max())


@pytest.mark.parametrize("method", ["approx_greedy", "greedy_plain", "random"])
def test_indices_unique_in_range_and_sized(features, method):
    for fraction in (0.02, 0.1):
        idx = coreset.select_coreset(features, fraction, method=method, seed=0, progress=False)
        assert idx.dtype == np.int64
        assert len(idx) == int(N * fraction)
        assert len(np.unique(idx)) == len(idx)
        assert idx.min() >= 0 and idx.max() < N


def test_tiny_fraction_gives_at_least_one_index(features):
    idx = coreset.select_coreset(features[:10], 0.01, seed=0, progress=False)
    assert len(idx) == 1 and 0 <= idx[0] < 10


def test_deterministic_for_a_seed_and_seed_dependent(features, fast_picks):
    again = coreset.select_coreset(features, 0.02, seed=0, progress=False)
    np.testing.assert_array_equal(fast_picks, again)
    other = coreset.select_coreset(features, 0.02, seed=1, progress=False)
    assert not np.array_equal(fast_picks, other)


def test_greedy_covers_better_than_random(projected, fast_picks):
    rand = coreset.select_coreset(np.empty((N, 1)), 0.02, method="random", seed=0)
    assert coreset.covering_radius(projected, fast_picks) < 0.8 * coreset.covering_radius(projected, rand)


def test_fast_method_matches_plain_greedy(projected, fast_picks, plain_picks):
    # The acceleration is exact: same picks, hence the same radius.
    np.testing.assert_array_equal(fast_picks, plain_picks)
    r_fast = coreset.covering_radius(projected, fast_picks)
    r_plain = coreset.covering_radius(projected, plain_picks)
    assert r_fast <= r_plain * 1.01


def test_fast_method_matches_plain_with_duplicates_and_ties():
    # Exact duplicates create exactly equal distances; ties must go to the smallest index
    # in both methods.
    rng = np.random.default_rng(3)
    base = rng.standard_normal((300, 16)).astype(np.float32)
    x = np.concatenate([base, base[::-1], base[:50]])
    kw = dict(seed=2, progress=False, projection_dim=16)
    fast = coreset.select_coreset(x, 0.3, **kw)
    plain = coreset.select_coreset(x, 0.3, method="greedy_plain", **kw)
    np.testing.assert_array_equal(fast, plain)


def test_fast_method_breaks_exact_ties_like_plain():
    # An integer lattice, symmetric in every axis with distinct spreads: its principal axes are
    # the coordinate axes, so the prepared matrix is exact and many distances tie exactly. Both
    # methods must then take the smallest index, although the fast one stores points in a
    # different (block) order.
    lattice = np.array(list(itertools.product(range(-5, 6), range(-4, 5), range(-2, 3), (-1, 1))), np.float32)
    kw = dict(seed=0, progress=False, projection_dim=None)
    fast = coreset.select_coreset(lattice, 0.2, **kw)
    plain = coreset.select_coreset(lattice, 0.2, method="greedy_plain", **kw)
    np.testing.assert_array_equal(fast, plain)


@pytest.mark.parametrize(
    "kernel,all_blocks,dense",
    [(True, 0.25, 0.5), (True, 0.25, 0.0), (False, 0.25, 0.5), (False, 1.1, 0.5), (False, 0.0, 1.1), (False, 0, 0)],
    ids=[
        "cpu-kernel",
        "cpu-kernel-dense",
        "torch",
        "torch-gathered-only",
        "torch-all-blocks-gathered",
        "torch-all-blocks-dense",
    ],
)
def test_fast_method_keeps_exactly_the_plain_distances(projected, monkeypatch, kernel, all_blocks, dense):
    # Stronger than equal picks: after many picks every point's running distance must be
    # bit-identical, i.e. the pruning never skipped an update the plain loop makes, whichever
    # way a pick's update is done: the compiled CPU pass (the CPU default) or the torch bounds
    # (other devices; gathered surviving blocks, every block in place with the undecided points
    # gathered, or a dense pass).
    monkeypatch.setattr(coreset, "_USE_KERNEL", kernel)
    monkeypatch.setattr(coreset, "_ALL_BLOCKS_FRACTION", all_blocks)
    monkeypatch.setattr(coreset, "_DENSE_FRACTION", dense)
    calls = []
    update_all = coreset._update_all_blocks
    monkeypatch.setattr(coreset, "_update_all_blocks", lambda *a: calls.append(1) or update_all(*a))
    y, sq = coreset._prepare(projected, torch.device("cpu"))
    start = coreset._initial_sq_distances(y, sq, N, coreset._start_points(N, 10, 0))
    plain_state = start.clone()
    bar = coreset.tqdm(disable=True)
    plain = coreset._greedy_plain(y, sq, plain_state, 300, bar)
    blocks = coreset._Blocks(y, sq, start.clone())
    fast = coreset._greedy_blocked(blocks, 300, bar)
    assert fast == plain
    real = blocks.order < len(y)  # blocks.order maps block positions to rows (>= len(y): padding)
    fast_state = torch.full_like(plain_state, float("nan"))
    fast_state[blocks.order[real]] = blocks.cur.view(-1)[real]
    assert torch.equal(fast_state, plain_state)
    assert blocks.kernel == kernel  # numba is a dependency: the CPU default must not fall back silently
    if not kernel:
        assert (len(calls) == 0) == (all_blocks > 1) and (all_blocks > 0 or len(calls) > 250)


@pytest.mark.parametrize(
    "scale,levels,slack",
    [(1.0, 32767, 1), (1e-3, 32767, 1), (1e3, 32767, 1), (1.0, 15, 1), (1.0, 15, 0)],
    ids=["unit", "tiny", "huge", "coarse", "coarse-without-slack-fails"],
)
def test_cpu_kernel_never_rules_out_a_point_that_would_improve(projected, scale, levels, slack):
    # The compiled stage 2 bounds distances from an int16 copy of the leading coordinates. Put
    # every point's current distance right at its true distance to a centre (within +-1e-3
    # relative), at any magnitude: every point that the plain method would lower must be among
    # the candidates, while the half that is clearly closer to the coreset (current distance
    # halved) must be ruled out. With a coarse quantisation (15 levels instead of 32767) the
    # quantisation error matters, and the check must notice when the kernel ignores it (slack 0:
    # the kernel is told the error is 0).
    pytest.importorskip("numba")
    y, sq = coreset._prepare(projected * scale, torch.device("cpu"))
    start = coreset._initial_sq_distances(y, sq, N, coreset._start_points(N, 10, 0))
    bk = coreset._Blocks(y, sq, start)
    assert bk.kernel
    q, q_scale, q_err = coreset_cpu.quantise_lead(bk.x[:, :, : bk.lead].numpy(), levels)
    rng = np.random.default_rng(1)
    missed, ruled_out = [], []
    for position in rng.choice(N, 5, replace=False):
        centre, c_sq = bk.x_flat[position].clone(), bk.sq_flat[position]
        true = coreset._sq_dists_to(bk.x_flat, bk.sq_flat, centre, c_sq)  # what plain computes
        jitter = torch.from_numpy(rng.uniform(-1e-3, 1e-3, len(true)).astype(np.float32))
        far = torch.from_numpy(rng.random(len(true)) < 0.5)
        cur = torch.where(far, true * 0.5, true * (1 + jitter))
        cur[bk.order >= N] = -1.0
        bk.cur_flat.copy_(cur)
        torch.amax(bk.cur, dim=1, out=bk.upper)
        found = coreset_cpu.candidates(
            np.arange(bk.num), bk.block, q, q_scale, q_err * slack, bk.x_flat.numpy(), bk.rest.view(-1).numpy(),
            bk.centre.numpy(), bk.max_sq.numpy(), bk.upper.numpy(), centre.numpy(), float(c_sq),
            bk.cur_flat.numpy(), coreset._REL_TOL, bk.scratch, 1,
        )  # fmt: skip
        found = set(found.tolist())
        improving = set(torch.nonzero((true < cur) & (cur >= 0)).squeeze(1).tolist())
        assert improving
        missed.append(len(improving - found))
        far_points = set(torch.nonzero(far & (cur >= 0)).squeeze(1).tolist())
        ruled_out.append(1 - len(found & far_points) / len(far_points))
    assert (sum(missed) == 0) == (slack == 1), missed
    assert min(ruled_out) > (0.99 if levels > 1000 else 0.5), ruled_out


def test_cpu_kernel_missing_falls_back_to_the_torch_path(features, fast_picks, monkeypatch, caplog):
    # Without numba (or where it cannot load) the selection still works, with the same picks,
    # and says once why it is slower.
    monkeypatch.setattr(coreset_cpu, "numba", None)
    monkeypatch.setattr(coreset_cpu, "_WARNED", False)
    with caplog.at_level("WARNING", logger="patchcore.coreset_cpu"):
        picks = coreset.select_coreset(features, 0.02, seed=0, progress=False)
        coreset.select_coreset(features[:1000], 0.02, seed=0, progress=False)
    np.testing.assert_array_equal(picks, fast_picks)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "numba unavailable" in caplog.records[0].message


def test_concurrent_selections_in_threads_agree(features, fast_picks):
    # Two fits in one process (e.g. Prefect tasks in threads) share the compiled kernel.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: coreset.select_coreset(features, 0.02, seed=0, progress=False), range(2)))
    for picks in results:
        np.testing.assert_array_equal(picks, fast_picks)


def test_prepared_matrix_preserves_distances(projected):
    y, sq = coreset._prepare(projected, torch.device("cpu"))
    assert y.shape[0] % 8 == 0 and torch.equal(y[N:], y[:1].expand(len(y) - N, -1))
    assert torch.allclose(sq, (y * y).sum(dim=1))
    sub = torch.arange(0, N, 37)
    before = torch.cdist(projected[sub].double(), projected[sub].double())
    after = torch.cdist(y[sub].double(), y[sub].double())
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["approx_greedy", "greedy_plain"])
def test_indices_stay_unique_when_everything_is_covered(method):
    # 5 distinct points, each 20 times: after 5 picks every distance is 0, yet the remaining
    # picks must still be new indices.
    x = np.repeat(np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32), 20, axis=0)
    idx = coreset.select_coreset(x, 0.2, method=method, progress=False, projection_dim=8)
    assert len(idx) == 20 and len(np.unique(idx)) == 20
    assert len(np.unique(x[idx[:5]], axis=0)) == 5  # the first 5 picks cover the 5 distinct points


def test_plain_greedy_follows_the_reference_rule(features, projected, plain_picks):
    """Straight numpy transcription of the rule: start at the mean distance to the start
    points, then repeatedly take the farthest point and update the minimum distances."""
    y = projected.double().numpy()
    starts = coreset._start_points(N, 10, 0)
    current = np.linalg.norm(y[:, None, :] - y[starts][None], axis=2).mean(axis=1)
    expected = []
    for _ in range(len(plain_picks)):
        i = int(np.argmax(current))
        expected.append(i)
        current = np.minimum(current, np.linalg.norm(y - y[i], axis=1))
    # float32 vs float64 rounding may break a near-tie late in the sequence; the early picks and
    # the covering radius must agree.
    np.testing.assert_array_equal(plain_picks[:20], expected[:20])
    r_ref = brute_force_radius(projected, np.array(expected))
    assert coreset.covering_radius(projected, plain_picks) == pytest.approx(r_ref, rel=0.01)


def test_start_points_are_not_part_of_the_coreset(features, projected, fast_picks):
    starts = coreset._start_points(N, 10, 0)
    # The first pick is the point with the largest mean distance to the start points.
    y = projected.double()
    mean_dist = torch.cdist(y, y[torch.as_tensor(starts)]).mean(dim=1)
    # (Were the start points in the coreset, the first pick would maximise the *minimum*
    # distance to them instead, and the result would hold 10 more indices.)
    assert fast_picks[0] == int(torch.argmax(mean_dist))
    assert fast_picks[0] != int(torch.argmax(torch.cdist(y, y[torch.as_tensor(starts)]).min(dim=1).values))
    assert len(fast_picks) == int(N * 0.02)


def test_covering_radius_matches_brute_force(projected, fast_picks):
    r = coreset.covering_radius(projected, fast_picks, chunk_rows=777)
    assert r == pytest.approx(brute_force_radius(projected, fast_picks), rel=1e-5)
    # every selected point is covered by itself
    assert coreset.covering_radius(projected[torch.as_tensor(fast_picks)], np.arange(len(fast_picks))) < 1e-4


def test_identity_and_random_semantics(features):
    np.testing.assert_array_equal(coreset.select_coreset(features, 0.1, method="identity"), np.arange(N))
    # identity ignores the fraction
    np.testing.assert_array_equal(coreset.select_coreset(features, 5.0, method="identity"), np.arange(N))
    r1 = coreset.select_coreset(features, 0.1, method="random", seed=0)
    r2 = coreset.select_coreset(features, 0.1, method="random", seed=0)
    r3 = coreset.select_coreset(features, 0.1, method="random", seed=1)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(r1, r3)
    assert np.all(np.diff(r1) > 0)  # sorted, unique
    for method in ("approx_greedy", "greedy_plain", "random"):
        np.testing.assert_array_equal(
            coreset.select_coreset(features, 1.0, method=method, progress=False), np.arange(N)
        )


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), "abc"])
def test_bad_fraction_raises(features, fraction):
    with pytest.raises(ValueError) as err:
        coreset.select_coreset(features, fraction, progress=False)
    assert "fraction" in str(err.value) and repr(fraction) in str(err.value)


def test_bad_method_raises(features):
    with pytest.raises(ValueError, match="nope"):
        coreset.select_coreset(features, 0.1, method="nope")


def test_float16_memmap_input(tmp_path, features):
    path = tmp_path / "bank.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=features.shape)
    mm[:] = features
    mm.flush()
    del mm
    bank = np.memmap(path, dtype=np.float16, mode="r", shape=features.shape)
    # small chunks: the projection must stitch chunks together correctly
    proj = coreset.project(bank, 128, seed=0, chunk_rows=999)
    assert proj.dtype == torch.float32 and proj.shape == (N, 128)
    direct = coreset.project(features.astype(np.float16).astype(np.float32), 128, seed=0)
    torch.testing.assert_close(proj, direct)
    idx = coreset.select_coreset(bank, 0.02, seed=0, progress=False)
    assert len(idx) == int(N * 0.02) and len(np.unique(idx)) == len(idx)
    idx32 = coreset.select_coreset(features.astype(np.float16).astype(np.float32), 0.02, seed=0, progress=False)
    np.testing.assert_array_equal(idx, idx32)


def test_torch_input_and_projection_properties(features):
    t = torch.from_numpy(features)
    np.testing.assert_array_equal(
        coreset.select_coreset(t, 0.02, seed=0, progress=False),
        coreset.select_coreset(features, 0.02, seed=0, progress=False),
    )
    p0 = coreset.project(features, 32, seed=0)
    assert p0.shape == (N, 32)
    assert not torch.equal(p0, coreset.project(features, 32, seed=1))
    # linear, no bias: projecting a zero vector gives zero
    assert torch.count_nonzero(coreset.project(np.zeros((3, D), np.float32), 32)) == 0


def test_progress_bar_and_torch_threads_left_alone(features, capsys):
    threads = torch.get_num_threads()
    idx = coreset.select_coreset(features[:1000], 0.05, seed=0, progress=True)
    assert len(idx) == 50
    assert "coreset" in capsys.readouterr().err  # the tqdm bar
    assert torch.get_num_threads() == threads


# -- incremental selection (warm start) ------------------------------------------------------------
@pytest.mark.parametrize("method", ["approx_greedy", "greedy_plain"])
def test_continuing_a_selection_on_the_same_rows_equals_one_longer_run(projected, method):
    short = coreset.greedy_selection(projected, 0.01, method=method, seed=0, progress=False)
    longer = coreset.greedy_selection(projected, 0.03, method=method, seed=0, progress=False)
    continued = coreset.greedy_selection(projected, 0.03, method=method, seed=0, progress=False, prior=short)
    np.testing.assert_array_equal(continued.indices, longer.indices)
    np.testing.assert_array_equal(continued.sq_distances, longer.sq_distances)


def test_final_distances_are_each_rows_distance_to_the_selection(projected):
    sel = coreset.greedy_selection(projected, 0.02, seed=0, progress=False)
    y = projected.double()
    exact = torch.cdist(y, y[torch.as_tensor(sel.indices)]).min(dim=1).values.square().numpy()
    chosen = np.zeros(len(exact), bool)
    chosen[sel.indices] = True
    assert np.all(sel.sq_distances[chosen] == -1.0)
    np.testing.assert_allclose(sel.sq_distances[~chosen], exact[~chosen], rtol=1e-3, atol=1e-3)


def test_warm_start_covers_new_rows_and_only_adds_their_share_of_picks(features, projected):
    """New images land: the continued selection keeps the old picks, adds picks for the new
    rows (fraction x new rows), and covers the new cluster about as well as a fresh run."""
    old = projected[:4000]
    rng = np.random.default_rng(1)
    new = projected[4000:].clone()
    new[:500] += torch.from_numpy(rng.standard_normal(128).astype(np.float32)) * 20  # a new kind of surface
    both = torch.cat([old, new])
    prior = coreset.greedy_selection(old, 0.02, seed=0, progress=False)
    carried = coreset.GreedySelection(
        prior.indices, np.concatenate([prior.sq_distances, np.full(len(new), np.nan, np.float32)])
    )
    warm = coreset.greedy_selection(both, 0.02, seed=0, progress=False, prior=carried)
    fresh = coreset.greedy_selection(both, 0.02, seed=0, progress=False)
    assert len(warm.indices) == len(fresh.indices) == 100
    np.testing.assert_array_equal(warm.indices[:80], prior.indices)
    assert np.all(warm.indices[80:] >= 4000)  # the old rows were already covered: the new picks go to the new rows
    r_prior = coreset.covering_radius(both, prior.indices)
    r_warm, r_fresh = coreset.covering_radius(both, warm.indices), coreset.covering_radius(both, fresh.indices)
    assert r_warm < 0.5 * r_prior
    assert r_warm <= 1.25 * r_fresh


def test_warm_start_rejects_a_prior_that_does_not_fit(projected):
    prior = coreset.greedy_selection(projected[:100], 0.1, seed=0, progress=False)
    with pytest.raises(ValueError, match="one entry per row"):
        coreset.greedy_selection(projected, 0.1, seed=0, progress=False, prior=prior)
    bad = coreset.GreedySelection(np.array([0, 0]), np.full(len(projected), np.nan, np.float32))
    with pytest.raises(ValueError, match="distinct row indices"):
        coreset.greedy_selection(projected, 0.1, seed=0, progress=False, prior=bad)
