"""The CPU kernel of the fast greedy coreset (`patchcore.coreset`), compiled with numba.

Stage 2 of a fast pick must find, among the points of the blocks that stage 1 could not rule out,
those that may get closer to the new centre c than they are to the coreset. On real ImageNet
features stage 1 rules out few blocks, so this test runs over most of the ~600k-800k points at
every pick; as separate torch operations it streamed several N-sized temporaries through memory
per pick. This kernel fuses it into one pass that reads, per point, two cache lines:

1. the point's 64 leading principal coordinates, stored as int16 (128 bytes; quantisation step:
   the block's largest |x_j| / 32767 per coordinate): their squared distance to c, less a slack
   for the block's quantisation error, is a lower bound on |L(x - c)|^2, and it rules out almost
   every point;
2. for the few it leaves undecided, the norm of the remaining coordinates around the block centre
   m_b: ``|R(x - c)| >= |R(c - m_b)| - |R(x - m_b)|``;
3. and if that does not decide either, the remaining float32 coordinates, 16 at a time, adding
   ``(x_j - c_j)^2`` until the sum reaches the point's current distance.

Measured on 780,288 MobileNetV2-ImageNet MTD patches (2 cores): 64 int16 coordinates took 4.5-7 ms
per pick across the run, 32 took 4-25 ms (more points fell through to the float32 rows), and an
early exit after 16 coordinates or a square root per point made the pass 2-4x slower.

A point is ruled out only when its lower bound, lowered by a relative 1e-5 for float32 rounding,
reaches its current squared distance plus the rounding margin of the plain method's distance
(``1e-5 * (|x|^2 + |c|^2)``, with the block's largest |x|^2). The kernel only *selects*
candidates; their distances are then computed by the same torch kernel as in ``greedy_plain``,
so the picks stay bit-identical to the plain loop.

numba is a dependency of the package. Where it cannot be imported, or on a non-CPU device,
`patchcore.coreset` uses its torch implementation of the same bounds (same picks, slower on
real features).
"""

from __future__ import annotations

import logging
import threading

import numpy as np

logger = logging.getLogger(__name__)

try:  # pragma: no cover - exercised by whichever environment runs the tests
    import numba
    from numba import njit, prange
except Exception as exc:  # ImportError, or a numba that does not support this numpy
    numba = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None

__all__ = ["available", "quantise_lead", "candidates"]

# Kernel calls from several Python threads at once (e.g. two fits in one Prefect worker) are
# serialised: numba's fallback "workqueue" threading layer is not thread-safe.
_LOCK = threading.Lock()
_WARNED = False


def available() -> bool:
    """Whether the compiled kernel can be used (numba importable); logs once why not."""
    global _WARNED
    if numba is None and not _WARNED:
        _WARNED = True
        logger.warning("numba unavailable (%s): the coreset uses its slower torch implementation", _IMPORT_ERROR)
    return numba is not None


def quantise_lead(lead: np.ndarray, levels: int = 32767) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int16 copy of the leading coordinates of each block ((num, block, L) float32), quantised per
    block and coordinate (step: the block's largest |x_j| / `levels`, so an outlying point coarsens
    only its own block), as (num * block, L); the (num, L) scales; and per block an upper bound on
    the norm of any point's quantisation error (each coordinate's largest |x_j - q_j * s_j| in the
    block, measured in float32 as the kernel computes it, plus a few ulps)."""
    lead = np.asarray(lead, dtype=np.float32)
    num, block, width = lead.shape
    q = np.empty((num * block, width), dtype=np.int16)
    scale = np.empty((num, width), dtype=np.float32)
    err = np.empty(num, dtype=np.float32)
    step = max(1, 65536 // max(1, block))  # blocks per chunk
    for s in range(0, num, step):
        part = lead[s : s + step]
        biggest = np.abs(part).max(axis=1)  # (blocks, L)
        sc = (np.maximum(biggest, np.float32(1e-30)) / np.float32(levels)).astype(np.float32)
        qs = np.clip(np.rint(part / sc[:, None, :]), -levels, levels).astype(np.int16)
        back = qs.astype(np.float32) * sc[:, None, :]
        e = np.abs(part.astype(np.float64) - back).max(axis=1) + biggest.astype(np.float64) * 2.0**-21
        q[s * block : (s + len(part)) * block] = qs.reshape(-1, width)
        scale[s : s + len(part)] = sc
        err[s : s + len(part)] = np.sqrt((e**2).sum(axis=1)) * (1.0 + 1e-4) + 1e-30
    return q, scale, err


if numba is not None:

    @njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True, boundscheck=False)
    def _candidates(act, block, q, scale, err, x, rest, centre, max_sq, upper, c, c_sq, cur, rel_tol, out, counts):
        lead = q.shape[1]
        dim = x.shape[1]
        keep = np.float32(1.0) - rel_tol
        for a in prange(act.shape[0]):
            b = act[a]
            margin = (max_sq[b] + c_sq) * rel_tol
            # Slack for the quantisation error e of this block without a square root per point:
            # ruling x out needs sqrt(acc) - e >= sqrt(limit), i.e. acc >= limit + 2 e sqrt(limit) + e^2;
            # with radius >= sqrt(every limit in the block) (U_b bounds them) it is enough that
            # acc >= limit + slack, and acc - slack bounds |L(x - c)|^2 from below for the others
            # (that needs sqrt(acc) <= radius for them: they have acc < limit + slack < radius^2).
            e = err[b]
            radius = np.sqrt(np.float32(1.001) * (max(upper[b], np.float32(0.0)) + margin) + e * e) + 3 * e
            slack = 2 * e * radius + e * e
            sc = scale[b]
            c_rest = np.float32(-1.0)  # |R(c - m_b)|, computed when a point of the block needs it
            found = 0
            first = a * block
            for i in range(b * block, (b + 1) * block):
                now = cur[i]
                if now < 0:  # selected, or padding
                    continue
                limit = now + margin
                acc = np.float32(0.0)
                for j in range(lead):  # one pass, no early exit: it vectorises
                    t = np.float32(q[i, j]) * sc[j] - c[j]
                    acc += t * t
                if acc * keep >= limit + slack:
                    continue  # the common case
                bound = acc * keep - slack  # a lower bound on |L(x - c)|^2
                if bound < 0:
                    bound = np.float32(0.0)
                if c_rest < 0:
                    c_rest = np.float32(0.0)
                    for j in range(lead, dim):
                        t = c[j] - centre[b, j]
                        c_rest += t * t
                    c_rest = np.sqrt(c_rest) * keep
                gap = c_rest - rest[i]
                if gap > 0 and (bound + gap * gap) * keep >= limit:
                    continue
                undecided = True
                for j0 in range(lead, dim, 16):
                    for j in range(j0, min(j0 + 16, dim)):
                        t = x[i, j] - c[j]
                        bound += t * t
                    if bound * keep >= limit:
                        undecided = False
                        break
                if undecided:
                    out[first + found] = i
                    found += 1
            counts[a] = found
        return 0

    @njit(cache=True, nogil=True, boundscheck=False)
    def _compact(out, counts, n_act, block, result):
        total = 0
        for a in range(n_act):
            first = a * block
            for k in range(counts[a]):
                result[total] = out[first + k]
                total += 1
        return total


def candidates(
    act: np.ndarray,
    block: int,
    q: np.ndarray,
    scale: np.ndarray,
    err: np.ndarray,
    x: np.ndarray,
    rest: np.ndarray,
    centre: np.ndarray,
    max_sq: np.ndarray,
    upper: np.ndarray,
    c: np.ndarray,
    c_sq: float,
    cur: np.ndarray,
    rel_tol: float,
    scratch: np.ndarray,
    threads: int,
) -> np.ndarray:
    """Flat (block-order) indices of the points of blocks `act` that may get closer to `c` than
    their current squared distance `cur` (all others provably do not). `q`, `scale`, `err`: from
    `quantise_lead`; `upper`: each block's largest current squared distance (or more).
    `scratch`: an int64 buffer of at least 2 * len(act) * block entries, reused across picks; the
    result is a view into it."""
    n_act = len(act)
    out, result = scratch[: n_act * block], scratch[n_act * block : 2 * n_act * block]
    counts = np.empty(n_act, dtype=np.int64)
    f32 = np.float32
    with _LOCK:
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
        _candidates(
            act, block, q, scale, err, x, rest, centre, max_sq, upper, c, f32(c_sq), cur, f32(rel_tol), out, counts
        )
        total = _compact(out, counts, n_act, block, result)
    return result[:total]
