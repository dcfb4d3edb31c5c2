"""Coreset subsampling of the PatchCore memory bank (Roth et al., CVPR 2022, Algorithm 1).

The memory bank holds one feature vector per training patch: N x D with N up to ~600k and
D ~ 1024. PatchCore keeps a small subset chosen by greedy k-center selection (Gonzalez' farthest
point rule): repeatedly add the point farthest from the current subset. Like the authors'
reference implementation (`ApproximateGreedyCoresetSampler`), the distances live in a random
128-d linear projection of the features, and the selection starts from the *mean* distance to
`num_starts` random start points (the start points are not part of the coreset).

Methods of `select_coreset` / `select_from_projected`:

* ``"approx_greedy"`` (default): the greedy rule above, accelerated *exactly* (see below).
* ``"greedy_plain"``: the same rule as a straightforward loop that updates every one of the N
  points at every pick. It is the baseline the fast method is checked and timed against.
* ``"random"``: a seeded random subset (sorted indices).
* ``"identity"``: every index (``fraction`` ignored).

Why the fast method is fast
---------------------------
A greedy pick must update ``min_dist[x] = min(min_dist[x], |x - c|)`` for every point x and
the new centre c. On a 2-core CPU one pass over the 600k x 128 float32 projection costs ~10 ms
of memory traffic alone, and almost all of it is wasted: only the few hundred points that end
up closer to c than to the rest of the coreset change. The fast method finds those with two
triangle-inequality bounds that are cheap to evaluate:

1. The points are stored in fixed blocks of 128 nearby points (a balanced PCA tree, built once)
   and each block keeps a bounding ball (centre m_b, radius rho_b) and U_b, the largest current
   min-distance of its points. Every x in block b has ``|x - c| >= |m_b - c| - rho_b``; when that
   reaches U_b, no point of the block can improve and the block is skipped. This costs one
   nb x 128 product per pick (nb ~ N/128); U_b also gives the next farthest point cheaply
   (argmax over blocks, then within one block).
2. For the remaining blocks, a per-point bound: the projection is rotated onto its principal
   axes once (distances are unchanged), so the 32 leading coordinates L carry most of the
   variance and ``|x - c|^2 >= |L(x - c)|^2 + (|R(c - m_b)| - |R(x - m_b)|)_+^2`` (R: the other
   96 coordinates) is tight yet reads a quarter of each row. Only points whose bound is below
   their current distance get their full 128-d distance computed.

On a CPU, stage 2 is one compiled pass over the surviving blocks (`patchcore.coreset_cpu`,
numba): it reads the 64 leading coordinates of each point from an int16 copy (128 bytes per
point) and rules out almost every point with that bound alone, less a slack for the quantisation
error; the rest get the second term above and, if still undecided, their remaining float32
coordinates. Real ImageNet features need it: their spectrum is flatter than that of random-init
ones (MobileNetV2 on MTD: 78% of the projection's variance on 32 of its 128 axes), the covering
radius stays close to the typical distance between points, and stage 1 rules out only 10-12% of
the blocks (measured at 2,000-20,000 picks of 780k), so stage 2 runs over most points at every
pick (`bench/coreset_real.py`).

Elsewhere (CUDA, or a CPU without numba) stage 2 runs as torch operations: when stage 1 prunes
little, the per-point bound is evaluated for every point straight from a contiguous float32 copy
of the 32 leading coordinates, without gathering blocks. Either way, when the bounds leave most
points undecided (the first picks), one dense pass updates all of them: the method is never much
slower than the plain loop. How much faster it is depends on the data: the bounds work well when
the features have a decaying spectrum and cluster structure (as CNN patch features do), and hardly
at all for isotropic noise.

Every skip test leaves a margin for float32 rounding, and the distances that are computed use
the same kernel with the same kind of row batches as ``greedy_plain`` on the same prepared
matrix: both methods give the same picks (an exact acceleration, not an approximation). Ties
between exactly equal distances go to the smallest index in both. (The bit-identity relies on
the CPU matrix-vector kernel rounding alike for any multiple-of-8 row count, which holds for
the MKL kernel used by torch on x86; on other back ends, e.g. CUDA, near-ties may resolve
differently, which changes individual picks but not the quality of the coreset.)

Incremental selection (warm start)
----------------------------------
Greedy selection is a sequence: the first k picks of a run do not depend on how many picks follow.
`greedy_selection` returns, with the picks, every row's final squared distance to the selection.
Passed back as ``prior`` (indices re-mapped to a larger feature set, NaN distances for the rows
the prior selection never saw), the selection continues where it stopped: only the new rows'
distances to the prior picks are computed (new rows x prior picks), and only the picks the larger
set needs on top are made. Retraining after adding m images so costs time proportional to m, not to
the whole set. Continuing on the *same* rows gives exactly the picks of one longer run.

Nothing ever builds an N x N (or N x coreset) matrix: every distance computation is chunked.
"""

from __future__ import annotations

import math
import mmap
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from tqdm.auto import tqdm

from patchcore import coreset_cpu

__all__ = [
    "METHODS",
    "GreedySelection",
    "project",
    "projected_width",
    "select_coreset",
    "select_from_projected",
    "greedy_selection",
    "covering_radius",
]

METHODS = ("approx_greedy", "greedy_plain", "random", "identity")

# Relative slack used by the block-skipping test. float32 dot products of 128 terms are
# accurate to a few 1e-7 relative to |x|^2 + |c|^2; 1e-5 is a wide safety margin that costs
# almost no pruning power.
_REL_TOL = 1e-5
# torch.mv on CPU (MKL) rounds a row's dot product identically whenever the batch has a multiple
# of 8 rows (measured with torch 2.14; other counts use a different tail kernel). Padding every
# distance batch to a multiple of 8 rows makes the fast and the plain method produce bit-identical
# distances, hence identical picks.
_ROW_ALIGN = 8
# Points per block of the fast method: large enough that the per-block work (one bound per block
# and pick) stays small, small enough that the blocks' bounding balls stay tight.
_BLOCK = 128
# Leading principal coordinates used by the fast method's per-point bound.
_LEAD_DIMS = 32
# When more than this fraction of the blocks survives stage 1, stage 2 reads every point's
# leading coordinates in place instead of gathering the surviving blocks (contiguous reads beat
# gathers of most of the matrix). On 153,600 real MobileNetV2 MTD patches (1,500 picks) any
# value from 0 to 0.5 ran within noise; the former dense pass at this point was ~1.6x slower.
_ALL_BLOCKS_FRACTION = 0.25
# When the per-point bound leaves more than this fraction of all points undecided, they are all
# updated in one dense pass (same kernel, same values) instead of gathered.
_DENSE_FRACTION = 0.5
# Leading coordinates the block tree is built on: they hold most of the spread. Using 32 of 128
# makes the build several times cheaper; on the benchmark data the blocks came out only ~1% less
# prunable (202 vs 199 active blocks per pick).
_TREE_DIMS = 32
# Stage 2 on the CPU runs as one compiled pass (patchcore.coreset_cpu) when numba is available;
# False forces the torch implementation of the same bounds (the path every other device takes).
_USE_KERNEL = True
# Leading coordinates the compiled stage 2 reads (as int16: 128 bytes per point).
_KERNEL_LEAD_DIMS = 64


# ---------------------------------------------------------------------------------------------
# projection
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _projection_matrix(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """(out_dim, in_dim) float32 map, the distribution of a fresh bias-free ``nn.Linear``
    (uniform in +-1/sqrt(in_dim)), drawn from a CPU generator so it is the same on any device."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    bound = 1.0 / math.sqrt(in_dim)
    return (torch.rand(out_dim, in_dim, generator=gen, dtype=torch.float32) * 2.0 - 1.0) * bound


def _rows_as_float32(features, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows [start, stop) as a float32 tensor on `device`, converting only this slice."""
    rows = features[start:stop]
    if isinstance(rows, torch.Tensor):
        return rows.to(device=device, dtype=torch.float32)
    rows = np.asarray(rows)  # reads just this slice of a memmap
    if rows.dtype != np.float32 or not rows.flags.c_contiguous or not rows.flags.writeable:
        rows = np.array(rows, dtype=np.float32, order="C")  # torch wants writable memory
    return torch.from_numpy(rows).to(device=device)


def _drop_mapped_pages(features) -> None:
    """Unmap the pages of a read-only np.memmap that were just read.

    They stay in the page cache, but no longer count in this process' resident memory, so
    projecting a 1.2 GB float16 bank does not show up as 1.2 GB of RSS. Only for mode "r":
    for a private copy-on-write mapping ("c") this would throw away modifications."""
    mm = getattr(features, "_mmap", None)
    if getattr(features, "mode", None) != "r" or mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError, AttributeError):
        pass  # purely an optimisation


def projected_width(in_dim: int, dim: int | None) -> int:
    """Columns `project` returns for `in_dim`-column features: `dim`, or `in_dim` when it skips the
    projection (``dim`` None or equal to `in_dim`)."""
    return in_dim if dim is None or dim == in_dim else int(dim)


def project(
    features, dim: int = 128, seed: int = 0, device="cpu", chunk_rows: int = 65536, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Random linear projection (no bias) of (N, D) features to (N, dim) float32 on `device`.

    `features` may be a numpy array / memmap (float16 or float32) or a torch tensor. Rows are
    converted to float32 `chunk_rows` at a time, so a float16 memmap is never materialised in
    float32 as a whole. The map depends only on (D, dim, seed), so projecting a bank piecewise
    gives the same map as projecting it at once. As in the reference, features that already
    have `dim` columns are returned unprojected (as float32); ``dim=None`` also skips it.
    `out`: write into this (N, dim) float32 tensor instead of a new one (and return it).
    """
    if len(getattr(features, "shape", ())) != 2:
        raise ValueError(f"features must be a 2-d (N, D) array, got shape {getattr(features, 'shape', None)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    device = torch.device(device)
    n, d = int(features.shape[0]), int(features.shape[1])
    if dim is not None and dim < 1:
        raise ValueError(f"projection dim must be >= 1, got {dim}")
    width = projected_width(d, dim)
    if out is None:
        out = torch.empty((n, width), dtype=torch.float32, device=device)
    elif tuple(out.shape) != (n, width) or out.dtype != torch.float32 or out.device.type != device.type:
        raise ValueError(
            f"out must be a float32 ({n}, {width}) tensor on {device}, got {out.dtype} "
            f"{tuple(out.shape)} on {out.device}"
        )
    if width == d:
        for s in range(0, n, chunk_rows):
            out[s : s + chunk_rows] = _rows_as_float32(features, s, min(n, s + chunk_rows), device)
            _drop_mapped_pages(features)
        return out
    weight_t = _projection_matrix(d, int(dim), int(seed)).to(device).t()
    with torch.no_grad():
        for s in range(0, n, chunk_rows):
            e = min(n, s + chunk_rows)
            torch.matmul(_rows_as_float32(features, s, e, device), weight_t, out=out[s:e])
            _drop_mapped_pages(features)
    return out


# ---------------------------------------------------------------------------------------------
# public selection API
# ---------------------------------------------------------------------------------------------
def _check_fraction(fraction) -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}") from None
    if not 0.0 < f <= 1.0:  # also rejects NaN
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return f


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown coreset method {method!r}; expected one of {', '.join(METHODS)}")


def _num_picks(n: int, fraction: float) -> int:
    return max(1, int(n * fraction))


def select_coreset(
    features,
    fraction: float,
    method: str = "approx_greedy",
    projection_dim: int = 128,
    num_starts: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Indices (int64) of the coreset of `features` (N, D), in selection order.

    Greedy methods return ``max(1, int(N * fraction))`` indices in the order they were picked;
    ``"random"`` returns that many sorted indices; ``"identity"`` (or ``fraction == 1``) returns
    ``arange(N)``. Results are deterministic for a given seed. Greedy methods project the
    features first (see `project`), chunk by chunk.
    """
    trivial = _trivial_selection(int(features.shape[0]), fraction, method, seed)
    if trivial is not None:
        return trivial
    projected = project(features, projection_dim, seed=seed, device=device)
    return select_from_projected(
        projected, fraction, method=method, num_starts=num_starts, seed=seed, device=device, progress=progress
    )


def _trivial_selection(n: int, fraction, method: str, seed: int) -> np.ndarray | None:
    """Checks shared by both entry points; the answer when no greedy search is needed, else None."""
    _check_method(method)
    if n < 1:
        raise ValueError("cannot select a coreset of an empty feature set")
    if method == "identity":
        return np.arange(n, dtype=np.int64)
    fraction = _check_fraction(fraction)
    if method == "random" or fraction == 1.0:
        return _select_trivial(n, fraction, method, seed)
    return None


@dataclass(frozen=True)
class GreedySelection:
    """A greedy coreset selection and the state needed to continue it.

    indices: int64 row indices in pick order. sq_distances: float32 (N,), each row's squared
    distance to the selection in the projected space (-1 for selected rows). As a ``prior`` for
    `greedy_selection`, NaN marks rows whose distance is not known yet (rows added since)."""

    indices: np.ndarray
    sq_distances: np.ndarray


def select_from_projected(
    projected: torch.Tensor,
    fraction: float,
    method: str = "approx_greedy",
    num_starts: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Like `select_coreset`, for features that are already projected ((N, d) tensor or array)."""
    n = int(projected.shape[0])
    trivial = _trivial_selection(n, fraction, method, seed)
    if trivial is not None:
        return trivial
    return greedy_selection(
        projected, fraction, method=method, num_starts=num_starts, seed=seed, device=device, progress=progress
    ).indices


def greedy_selection(
    projected: torch.Tensor,
    fraction: float,
    method: str = "approx_greedy",
    num_starts: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    prior: GreedySelection | None = None,
) -> GreedySelection:
    """Greedy selection of ``max(1, int(N * fraction))`` rows of `projected` ((N, d)), with the
    final distances; with `prior`, continue that selection (see "Incremental selection" above)
    instead of starting from the `num_starts` random start points."""
    if method not in ("approx_greedy", "greedy_plain"):
        raise ValueError(f"greedy_selection needs a greedy method (approx_greedy or greedy_plain), got {method!r}")
    n = int(projected.shape[0])
    if n < 1:
        raise ValueError("cannot select a coreset of an empty feature set")
    fraction = _check_fraction(fraction)
    device = torch.device(device)
    with torch.no_grad():
        y, sq_norms = _prepare(projected, device)
        if prior is None:
            kept = np.empty(0, dtype=np.int64)
            min_sq = _initial_sq_distances(y, sq_norms, n, _start_points(n, num_starts, seed))
        else:
            kept, min_sq = _continue_from(prior, y, sq_norms, n)
        n_picks = max(0, _num_picks(n, fraction) - len(kept))
        bar = tqdm(
            total=n_picks,
            desc=f"coreset ({method})",
            disable=not progress or n_picks == 0,
            unit="pick",
            mininterval=0.5,
        )
        try:
            if method == "greedy_plain":
                picks = _greedy_plain(y, sq_norms, min_sq, n_picks, bar)
                final = min_sq[:n]
            else:
                blocks = _Blocks(y, sq_norms, min_sq)
                del y, sq_norms, min_sq  # the blocks hold their own (reordered) copy
                picks = _greedy_blocked(blocks, n_picks, bar)
                final = blocks.distances_in_original_order(n)
        finally:
            bar.close()
    indices = np.concatenate([kept, np.asarray(picks, dtype=np.int64)])
    return GreedySelection(indices, final.cpu().numpy().astype(np.float32, copy=True))


def _continue_from(
    prior: GreedySelection, y: torch.Tensor, sq_norms: torch.Tensor, n: int
) -> tuple[np.ndarray, torch.Tensor]:
    """Prior picks and the starting squared distances for a continued selection: known rows keep
    theirs, NaN rows get their squared distance to the nearest prior pick."""
    kept = np.asarray(prior.indices, dtype=np.int64)
    known = np.asarray(prior.sq_distances, dtype=np.float32)
    if known.shape != (n,):
        raise ValueError(f"prior.sq_distances must have one entry per row ({n}), got shape {known.shape}")
    if len(kept) == 0 or kept.min() < 0 or kept.max() >= n or len(np.unique(kept)) != len(kept):
        raise ValueError(f"prior.indices must be distinct row indices in [0, {n}), at least one")
    min_sq = torch.full((y.shape[0],), -1.0, dtype=torch.float32, device=y.device)
    min_sq[:n] = torch.from_numpy(known).to(y.device)
    unknown = torch.from_numpy(np.flatnonzero(np.isnan(known))).to(y.device)
    if len(unknown):
        centres = torch.from_numpy(kept).to(y.device)
        min_sq[unknown] = _sq_distance_to_nearest(
            y.index_select(0, unknown),
            sq_norms.index_select(0, unknown),
            y.index_select(0, centres),
            sq_norms.index_select(0, centres),
        )
    min_sq[torch.from_numpy(kept).to(y.device)] = -1.0
    return kept, min_sq


def _sq_distance_to_nearest(
    rows: torch.Tensor, rows_sq: torch.Tensor, centres: torch.Tensor, centres_sq: torch.Tensor
) -> torch.Tensor:
    """min over centres of |row - centre|^2, chunked (see _nearest_centre)."""
    step = _row_chunk(len(centres), rows.shape[0])
    parts = [
        _nearest_centre(rows[s : s + step], rows_sq[s : s + step], centres, centres_sq)[0]
        for s in range(0, rows.shape[0], step)
    ]
    return torch.cat(parts).clamp_(min=0.0)


_CENTRE_CHUNK = 4096


def _row_chunk(n_centres: int, max_rows: int) -> int:
    """Rows per block so that a rows x centre-chunk distance block stays at ~16M entries (~64 MB)."""
    return max(1, min(max_rows, (1 << 24) // max(1, min(n_centres, _CENTRE_CHUNK))))


def _nearest_centre(
    x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor, centres_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared distance, index) of each row's nearest centre by the |x|^2 + |c|^2 - 2 x.c
    expansion, over centre chunks of _CENTRE_CHUNK: never an N x |centres| matrix."""
    best = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    best_idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for t in range(0, len(centres), _CENTRE_CHUNK):
        d2 = x_sq[:, None] + centres_sq[t : t + _CENTRE_CHUNK] - 2.0 * (x @ centres[t : t + _CENTRE_CHUNK].T)
        val, idx = d2.min(dim=1)
        better = val < best
        best = torch.where(better, val, best)
        best_idx = torch.where(better, idx + t, best_idx)
    return best, best_idx


def covering_radius(projected: torch.Tensor, selected: np.ndarray, chunk_rows: int = 65536) -> float:
    """max_x min_{s in selected} |x - s| over all rows x of `projected`, computed in chunks.

    Memory stays at O(chunk x chunk): neither an N x N nor an N x |selected| matrix is built.
    The nearest selected point is found with the fast expansion, then its distance is recomputed
    directly (difference, then norm) so the result is accurate even for small distances.
    """
    y = torch.as_tensor(projected)
    if not y.is_floating_point() or y.dtype in (torch.float16, torch.bfloat16):
        y = y.float()
    if y.ndim != 2:
        raise ValueError(f"projected must be 2-d, got shape {tuple(y.shape)}")
    sel = torch.as_tensor(np.asarray(selected, dtype=np.int64)).to(y.device)
    if sel.numel() == 0:
        raise ValueError("selected must not be empty")
    n = y.shape[0]
    mean = y.mean(dim=0, keepdim=True)
    centres = y[sel] - mean
    centre_sq = (centres * centres).sum(dim=1)
    radius, step = 0.0, _row_chunk(len(sel), chunk_rows)
    with torch.no_grad():
        for s in range(0, n, step):
            x = y[s : s + step] - mean
            _, best_idx = _nearest_centre(x, (x * x).sum(dim=1), centres, centre_sq)
            exact = (x - centres[best_idx]).norm(dim=1)
            radius = max(radius, float(exact.max()))
    return radius


# ---------------------------------------------------------------------------------------------
# shared pieces of the greedy methods
# ---------------------------------------------------------------------------------------------
def _select_trivial(n: int, fraction: float, method: str, seed: int) -> np.ndarray:
    if fraction == 1.0:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, _num_picks(n, fraction), replace=False)).astype(np.int64)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _prepare(projected, device: torch.device, chunk_rows: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrix both greedy methods work on, and its squared row norms.

    Centred (distances are translation invariant; centring shrinks |x|^2 relative to the
    distances, making the |x|^2 + |c|^2 - 2 x.c expansion and the skip bounds more accurate) and
    rotated onto its principal axes (a rotation preserves all distances, and puts most of the
    variance into the leading coordinates, which the fast method uses for a cheap lower bound).
    Rows are padded to a multiple of 8 (see _ROW_ALIGN) with copies of row 0. Both methods share
    this exact matrix, which is what makes their distances, and picks, bit-identical. Written
    chunk by chunk into one preallocated buffer: one extra N x d copy at most."""
    src = torch.as_tensor(projected)
    n, d = src.shape
    mean = torch.zeros(d, dtype=torch.float64, device=device)
    for s in range(0, n, chunk_rows):
        mean += src[s : s + chunk_rows].to(device=device, dtype=torch.float64).sum(dim=0)
    mean = (mean / n).to(torch.float32)
    cov = torch.zeros(d, d, dtype=torch.float64, device=device)
    for s in range(0, n, chunk_rows):
        part = src[s : s + chunk_rows].to(device=device, dtype=torch.float32) - mean
        cov += (part.T @ part).double()
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    rotation = vecs.flip(1).to(torch.float32)
    y = torch.empty(_round_up(n, _ROW_ALIGN), d, dtype=torch.float32, device=device)
    for s in range(0, n, chunk_rows):
        e = min(n, s + chunk_rows)
        torch.matmul(src[s:e].to(device=device, dtype=torch.float32) - mean, rotation, out=y[s:e])
    y[n:] = y[0]
    sq_norms = torch.empty(len(y), dtype=torch.float32, device=device)
    for s in range(0, len(y), chunk_rows):  # row by row, so chunking leaves the values alone
        part = y[s : s + chunk_rows]
        torch.sum(part * part, dim=1, out=sq_norms[s : s + chunk_rows])
    return y, sq_norms


def _start_points(n: int, num_starts: int, seed: int) -> np.ndarray:
    if num_starts < 1:
        raise ValueError(f"num_starts must be >= 1, got {num_starts}")
    rng = np.random.default_rng(seed)
    return rng.choice(n, min(int(num_starts), n), replace=False)


def _sq_dists_to(
    rows: torch.Tensor,
    rows_sq: torch.Tensor,
    centre: torch.Tensor,
    centre_sq: torch.Tensor,
) -> torch.Tensor:
    """Squared distances of `rows` (k, d) to one centre, clamped at 0.

    Both greedy methods call exactly this, with a row count that is a multiple of 8, so their
    distances are bit-identical (see _ROW_ALIGN)."""
    dots = torch.mv(rows, centre)
    return (rows_sq + centre_sq).sub_(dots, alpha=2.0).clamp_(min=0.0)


def _initial_sq_distances(
    y: torch.Tensor, sq_norms: torch.Tensor, n: int, start_points: np.ndarray, chunk_rows: int = 65536
) -> torch.Tensor:
    """Squared mean Euclidean distance of every point to the start points (reference rule);
    padding rows get -1."""
    starts = y[torch.as_tensor(start_points, device=y.device)]
    starts_sq = sq_norms[torch.as_tensor(start_points, device=y.device)]
    out = torch.empty(y.shape[0], dtype=torch.float32, device=y.device)
    for s in range(0, y.shape[0], chunk_rows):
        x = y[s : s + chunk_rows]
        d2 = (sq_norms[s : s + chunk_rows, None] + starts_sq[None, :]) - 2.0 * (x @ starts.T)
        mean_dist = d2.clamp_(min=0.0).sqrt_().mean(dim=1)
        out[s : s + chunk_rows] = mean_dist * mean_dist
    out[n:] = -1.0
    return out


def _greedy_plain(y, sq_norms, min_sq, n_picks, bar, chunk_rows: int = 65536) -> list[int]:
    """Baseline: every pick updates all N points (one chunked pass over the projection).

    The running distance is kept squared: sqrt is monotone, so argmax and min are unchanged."""
    picks = []
    for _ in range(n_picks):
        idx = int(torch.argmax(min_sq))  # first maximum = smallest index on ties
        picks.append(idx)
        # A selected point is at distance 0 from the coreset; -1 (like padding) additionally keeps
        # it from being picked again when everything left is at distance 0 (duplicate features).
        min_sq[idx] = -1.0
        centre, centre_sq = y[idx].clone(), sq_norms[idx]
        for s in range(0, y.shape[0], chunk_rows):  # chunk_rows and N are multiples of 8
            part = min_sq[s : s + chunk_rows]
            torch.minimum(
                part, _sq_dists_to(y[s : s + chunk_rows], sq_norms[s : s + chunk_rows], centre, centre_sq), out=part
            )
        bar.update(1)
    return picks


# ---------------------------------------------------------------------------------------------
# the fast method: block-pruned greedy selection
# ---------------------------------------------------------------------------------------------
def _tree_order(z: torch.Tensor, num_blocks: int, block: int, max_rows_per_batch: int = 1 << 18) -> torch.Tensor:
    """Row order that groups the rows of `z` (num_blocks * block) into `num_blocks` blocks of
    nearby points: a balanced PCA tree, each node split at the median of its principal axis.

    A node of k blocks splits into k // 2 and k - k // 2 blocks, so at every depth the nodes have
    at most two sizes and each size is processed as one batched tensor operation."""
    device = z.device
    order = torch.arange(z.shape[0], device=device)
    nodes = [(0, num_blocks)]  # (first row, number of blocks)
    while nodes:
        children = []
        for k in sorted({k for _, k in nodes if k > 1}):
            starts = [s for s, kk in nodes if kk == k]
            rows = k * block
            offsets = torch.arange(rows, device=device)
            per_batch = max(1, max_rows_per_batch // rows)
            for i in range(0, len(starts), per_batch):
                st = torch.tensor(starts[i : i + per_batch], device=device)
                pos = (st[:, None] + offsets).view(-1)  # positions in `order`, node by node
                idx = order.index_select(0, pos).view(len(st), rows)
                x = z.index_select(0, idx.view(-1)).view(len(st), rows, z.shape[1])
                x -= x.mean(dim=1, keepdim=True)
                cov = torch.bmm(x.transpose(1, 2), x)
                # Power iteration for the principal axis; a rough axis is good enough to split on.
                v = torch.ones(cov.shape[0], cov.shape[1], 1, device=device, dtype=z.dtype)
                for _ in range(8):
                    v = torch.bmm(cov, v)
                    v /= v.norm(dim=1, keepdim=True).clamp_min(1e-30)
                along = torch.bmm(x, v).squeeze(2)
                order.index_copy_(0, pos, idx.gather(1, torch.argsort(along, dim=1, stable=True)).view(-1))
            half = (k // 2) * block
            children += [(s, k // 2) for s in starts] + [(s + half, k - k // 2) for s in starts]
        nodes = children
    return order


class _Blocks:
    """State of the fast method: the prepared matrix reordered into blocks of nearby points.

    Per block b: bounding ball (centre m_b, radius rho_b), largest squared norm, and U_b, the
    largest current squared min-distance of its points. Per point: the current squared
    min-distance, and for the second-stage bound the leading `lead` coordinates (a contiguous
    copy) and the norm of the remaining coordinates of x - m_b."""

    def __init__(
        self, y: torch.Tensor, sq_norms: torch.Tensor, min_sq: torch.Tensor, block: int = _BLOCK, lead: int = _LEAD_DIMS
    ):
        total, dim = y.shape
        self.block = block
        self.num = -(-total // block)
        self.kernel = _USE_KERNEL and y.device.type == "cpu" and coreset_cpu.available()
        if self.kernel:
            lead = _KERNEL_LEAD_DIMS
        self.lead = lead = max(1, min(lead, dim // 2))
        # The last block is filled up with padding positions (>= total): they read row 0 and get
        # a current distance of -1, so they are never picked and never change.
        pad = self.num * block - total
        tree_coords = y[:, :_TREE_DIMS]
        if pad:
            tree_coords = torch.cat([tree_coords, tree_coords[:1].expand(pad, -1)])
        self.order = _tree_order(tree_coords.contiguous(), self.num, block)
        del tree_coords
        source = torch.where(self.order < total, self.order, 0)
        self.x = y.index_select(0, source).view(self.num, block, dim)
        self.sq = sq_norms.index_select(0, source).view(self.num, block)
        self.cur = min_sq.index_select(0, source).view(self.num, block)  # current squared min-distance
        self.cur.view(-1)[self.order >= total] = -1.0
        self.x_flat, self.sq_flat, self.cur_flat = self.x.view(-1, dim), self.sq.view(-1), self.cur.view(-1)
        self.centre = self.x.mean(dim=1)
        self.centre_sq = (self.centre * self.centre).sum(dim=1)
        self.max_sq = self.sq.amax(dim=1)
        self.upper = self.cur.amax(dim=1)  # U_b
        if self.kernel:  # int16 leading coordinates, read by the compiled stage 2
            self.q_lead, self.q_scale, self.q_err = coreset_cpu.quantise_lead(self.x[:, :, :lead].numpy())
            self.scratch = np.empty(2 * self.num * block, dtype=np.int64)
        else:  # float32 leading coordinates, read by the torch stage 2
            self.x_lead = self.x[:, :, :lead].contiguous()
            self.x_lead_sq = (self.x_lead * self.x_lead).sum(dim=2)
        radius = torch.empty(self.num, dtype=self.x.dtype, device=self.x.device)
        self.rest = torch.empty_like(self.cur)  # |x - m_b| over the non-leading coordinates
        step = max(1, (1 << 16) // block)  # blocks per chunk: 64k points of temporaries at a time
        for s in range(0, self.num, step):
            diff = self.x[s : s + step] - self.centre[s : s + step, None]
            radius[s : s + step] = diff.norm(dim=2).amax(dim=1)
            self.rest[s : s + step] = diff[:, :, lead:].norm(dim=2)
        # Rounding slack: these enter lower bounds with a minus sign, never underestimate them.
        self.radius = radius * (1.0 + _REL_TOL)
        self.rest *= 1.0 + _REL_TOL

    def distances_in_original_order(self, n: int) -> torch.Tensor:
        """The current squared distances of rows 0..n-1, undoing the block order."""
        out = torch.empty(n, dtype=self.cur_flat.dtype, device=self.cur_flat.device)
        real = self.order < n
        out[self.order[real]] = self.cur_flat[real]
        return out


class _ThreadGovernor:
    """Drops torch to one intra-op thread while the machine is oversubscribed (CPU only).

    The fast loop issues ~30 small torch ops per pick, each an OpenMP parallel region that ends
    in a barrier. When other processes keep one of our cores busy, every barrier waits for a
    descheduled thread: on this project's 2-core machine that made the loop 10-15x slower than
    on an idle one, whereas one thread loses only ~30% when idle. So: every `window` picks,
    compare the CPU time we got with the wall time; below 75% of the thread count, go
    single-threaded, and retry the original setting now and then. Results do not depend on the
    thread count (checked: torch.mv and the elementwise ops round the same with 1 or 2 threads).
    The original setting is restored on exit."""

    def __init__(self, device: torch.device, window: int = 250, retry_every: int = 20):
        self.active = device.type == "cpu" and torch.get_num_threads() > 1
        self.threads = torch.get_num_threads()
        self.window, self.retry_every, self.windows = window, retry_every, 0
        self.count = 0
        self._mark()

    def _mark(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def step(self) -> None:
        if not self.active:
            return
        self.count += 1
        if self.count % self.window:
            return
        self.windows += 1
        threads = torch.get_num_threads()
        busy = (time.process_time() - self.cpu) / max(1e-9, (time.perf_counter() - self.wall) * threads)
        if threads > 1 and busy < 0.75:
            torch.set_num_threads(1)
        elif threads == 1 and self.windows % self.retry_every == 0:
            torch.set_num_threads(self.threads)
        self._mark()

    def restore(self) -> None:
        if self.active:
            torch.set_num_threads(self.threads)


def _greedy_blocked(blocks: _Blocks, n_picks: int, bar) -> list[int]:
    """Exact greedy selection with two pruning stages (see the module docstring).

    Stage 1 (per block, all blocks): |x - c| >= |m_b - c| - rho_b. Skip the block when that
    bound reaches U_b: no point in it can get closer to c than it already is to the coreset.
    Stage 2 (per point, surviving blocks): split the coordinates into the leading ones (L) and
    the rest (R); |x - c|^2 = |L(x - c)|^2 + |R(x - c)|^2 >= |L(x - c)|^2 + (|R(c - m_b)| -
    |R(x - m_b)|)_+^2. The L part is exact and cheap (the leading principal axes carry most of
    the variance); only points whose bound is below their current distance get the full
    128-d distance. Every test leaves a margin for float32 rounding, so nothing that the plain
    method would update is ever skipped."""
    picks = []
    governor = _ThreadGovernor(blocks.x.device)
    try:
        for _ in range(n_picks):
            picks.append(_blocked_pick(blocks))
            governor.step()
            bar.update(1)
    finally:
        governor.restore()
    return picks


def _blocked_pick(bk: _Blocks) -> int:
    """One step of _greedy_blocked: take the farthest point, update the distances, return it."""
    block = bk.block
    b = int(torch.argmax(bk.upper))
    j = int(torch.argmax(bk.cur[b]))
    best = bk.upper[b]
    if int((bk.upper == best).sum()) > 1 or int((bk.cur[b] == best).sum()) > 1:
        b, j = _smallest_index_tie(bk, best)
    pick = int(bk.order[b * block + j])
    centre, centre_sq = bk.x[b, j].clone(), bk.sq[b, j]
    bk.cur[b, j] = -1.0  # selected: never picked again (as in _greedy_plain)

    # Stage 1. The expansion of |m_b - c|^2 is lowered by a rounding margin first.
    scale = bk.centre_sq + centre_sq
    d2 = (scale - 2.0 * torch.mv(bk.centre, centre)).sub_(scale, alpha=_REL_TOL)
    lower = (d2.clamp_(min=0.0).sqrt_() - bk.radius).clamp_(min=0.0)
    # Margin for the rounding of the distances the plain method would compute.
    margin = (bk.max_sq + centre_sq).mul_(_REL_TOL)
    act = ((lower * lower) < bk.upper + margin).nonzero().squeeze(1)
    if bk.kernel:
        _kernel_update(bk, act, centre, centre_sq, b)
        return pick
    if len(act) > _ALL_BLOCKS_FRACTION * bk.num:
        _update_all_blocks(bk, centre, centre_sq, margin)
        return pick

    # Stage 2 on the blocks that survived.
    bound = _point_bounds(bk, centre, act)
    cur_act = bk.cur.index_select(0, act)
    hit_b, hit_j = (bound < cur_act + margin.index_select(0, act)[:, None]).nonzero(as_tuple=True)
    rows = act.index_select(0, hit_b) * block + hit_j
    if len(rows):
        _update_rows(bk, rows, centre, centre_sq)
        bk.upper.index_copy_(0, act, bk.cur.index_select(0, act).amax(dim=1))
    bk.upper[b] = bk.cur[b].amax()  # the pick's own entry changed even if nothing else did
    return pick


def _kernel_update(bk: _Blocks, act: torch.Tensor, centre: torch.Tensor, centre_sq: torch.Tensor, b: int) -> None:
    """Stage 2 of `_blocked_pick` on the CPU: the compiled pass (patchcore.coreset_cpu) picks the
    points of the blocks `act` that the bounds cannot rule out; they get their full distance
    (gathered, or in one dense pass when they are most of the points) by the plain method's kernel."""
    found = coreset_cpu.candidates(
        act.numpy(), bk.block, bk.q_lead, bk.q_scale, bk.q_err, bk.x_flat.numpy(), bk.rest.view(-1).numpy(),
        bk.centre.numpy(), bk.max_sq.numpy(), bk.upper.numpy(), centre.numpy(), float(centre_sq),
        bk.cur_flat.numpy(), _REL_TOL, bk.scratch, torch.get_num_threads(),
    )  # fmt: skip
    rows = torch.from_numpy(found)
    if _update_candidates(bk, rows, centre, centre_sq):
        torch.amax(bk.cur, dim=1, out=bk.upper)
        return
    if len(rows):
        touched = torch.unique(torch.div(rows, bk.block, rounding_mode="floor"))
        bk.upper.index_copy_(0, touched, bk.cur.index_select(0, touched).amax(dim=1))
    bk.upper[b] = bk.cur[b].amax()  # the pick's own entry changed even if nothing else did


def _update_candidates(bk: _Blocks, rows: torch.Tensor, centre: torch.Tensor, centre_sq: torch.Tensor) -> bool:
    """Give the (flat) candidate rows their full distance to the centre: gathered when they are
    few, else in one dense pass over all rows (the plain method's update; row counts stay multiples
    of 8, so either way the values are the plain method's). True when it made the dense pass."""
    if len(rows) > _DENSE_FRACTION * len(bk.cur_flat):
        torch.minimum(bk.cur_flat, _sq_dists_to(bk.x_flat, bk.sq_flat, centre, centre_sq), out=bk.cur_flat)
        return True
    if len(rows):
        _update_rows(bk, rows, centre, centre_sq)
    return False


def _update_all_blocks(bk: _Blocks, centre: torch.Tensor, centre_sq: torch.Tensor, margin: torch.Tensor) -> None:
    """Stage 2 of `_blocked_pick` for every block, when stage 1 pruned too few to gather: the same
    per-point bound, read in place. Points it cannot rule out get their full distance
    (`_update_candidates`)."""
    bound = _point_bounds(bk, centre)
    _update_candidates(bk, (bound < bk.cur + margin[:, None]).view(-1).nonzero().squeeze(1), centre, centre_sq)
    torch.amax(bk.cur, dim=1, out=bk.upper)  # the pick's own entry changed in any case


def _point_bounds(bk: _Blocks, centre: torch.Tensor, act: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 2's lower bound on |x - c|^2 for every point of the blocks `act` ((len(act), block);
    None: all blocks, read in place), lowered by the float32 rounding margins:
    |L(x - c)|^2 by expansion, plus (|R(c - m_b)| - |R(x - m_b)|)_+^2."""
    lead = bk.lead
    blocks = (lambda t: t) if act is None else (lambda t: t.index_select(0, act))
    c_lead = centre[:lead]
    c_lead_sq = (c_lead * c_lead).sum()
    lead_sq = blocks(bk.x_lead_sq)
    dots = torch.mv(blocks(bk.x_lead).view(-1, lead), c_lead).view(lead_sq.shape)
    bound = (lead_sq + c_lead_sq).sub_(dots, alpha=2.0).sub_(lead_sq + c_lead_sq, alpha=_REL_TOL)
    c_rest = (centre[lead:] - blocks(bk.centre)[:, lead:]).norm(dim=1).mul_(1.0 - _REL_TOL)
    gap = (c_rest[:, None] - blocks(bk.rest)).clamp_(min=0.0)
    return bound.addcmul_(gap, gap)


def _update_rows(bk: _Blocks, rows: torch.Tensor, centre: torch.Tensor, centre_sq: torch.Tensor) -> None:
    """Lower the current distances of the (flat) rows `rows` to their full distance to the centre,
    computed in a batch padded to a multiple of 8 rows so that the kernel rounds exactly as in
    greedy_plain (duplicates of a row are harmless)."""
    if len(rows) % _ROW_ALIGN:
        rows = torch.cat([rows, rows[:1].expand(_ROW_ALIGN - len(rows) % _ROW_ALIGN)])
    new = _sq_dists_to(bk.x_flat.index_select(0, rows), bk.sq_flat.index_select(0, rows), centre, centre_sq)
    bk.cur_flat[rows] = torch.minimum(bk.cur_flat.index_select(0, rows), new)


def _smallest_index_tie(blocks: _Blocks, best: torch.Tensor) -> tuple[int, int]:
    """Among all points whose current distance equals the maximum, the one with the smallest
    original index (what argmax over the unpermuted array picks in greedy_plain)."""
    tied_blocks = (blocks.upper == best).nonzero().squeeze(1)
    b_idx, j_idx = (blocks.cur.index_select(0, tied_blocks) == best).nonzero(as_tuple=True)
    b_idx = tied_blocks[b_idx]
    original = blocks.order[b_idx * blocks.block + j_idx]
    k = int(torch.argmin(original))
    return int(b_idx[k]), int(j_idx[k])
