"""Exact nearest-neighbour search of patch features against the memory bank.

Backends, picked by `make_index(..., backend="auto")`:
- "faiss": faiss `IndexFlatL2` on the CPU (exact; what the reference uses);
- "faiss-gpu": the same index cloned to a GPU, only where the installed faiss has GPU support
  and it actually runs on this card (PyPI's faiss-gpu wheels stop at compute capability 8.9, so
  H100/H200 cannot use them);
- "torch": exact chunked matmul + top-k on any torch device, the GPU path that needs no faiss-gpu;
- "bounded": exact search on the CPU that reads most of the bank in a few dimensions only
  (`BoundedIndex`); "auto" picks it on the CPU when the bank's spectrum makes it pay, else faiss.
All return SQUARED L2 distances (faiss' convention), ascending per query, computed as sums of
squared differences |q - b|^2 for the neighbours found: faiss and the matmul backends rank by
|q|^2 + |b|^2 - 2 q.b in float32, and with patch-feature norms ~100x the nearest-neighbour distance
that cancellation costs up to ~1e-3 relative error; recomputing the k found distances is exact to
float32 rounding and costs queries x k x dim operations. The caller decides whether to take the root.
At most min(k, bank size) neighbours come back. The faiss CPU index is what gets saved
(`index.faiss`), whatever backend scores.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import faiss
import numpy as np
import torch

logger = logging.getLogger(__name__)


def exact_sq_distances(rows: np.ndarray, queries: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(n, k) float32 |queries[i] - rows[indices[i, j]]|^2 as sums of squared differences (faiss'
    SIMD kernel: no |q|^2 + |b|^2 - 2 q.b cancellation). rows, queries: C-contiguous float32."""
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    n, k = indices.shape
    out = np.empty((n, k), dtype=np.float32)
    if n and k:
        faiss.fvec_L2sqr_by_idx(
            faiss.swig_ptr(out),
            faiss.swig_ptr(queries),
            faiss.swig_ptr(rows),
            faiss.swig_ptr(indices),
            rows.shape[1],
            n,
            k,
        )
    return out


@contextlib.contextmanager
def _faiss_blas_always():
    """Make faiss' flat search use its BLAS kernel whatever the query count.

    Below a size threshold (`faiss.cvar.distance_compute_blas_threshold`) faiss takes a non-BLAS
    kernel instead; for the bound's 64-d search over one image's 784 patches it measured 2.3x
    slower here (24 vs 11 ms) and for a 30-query fallback 4.6x (37 vs 8 ms). The setting is
    process-wide: it is restored on exit, and a concurrent search that sees either value only
    runs at a different speed (the bound's rounding margin covers BLAS's dot-product form)."""
    saved = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved


def _ascending(distances: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if distances.shape[1] < 2:
        return distances, indices
    order = np.argsort(distances, axis=1, kind="stable")
    return np.take_along_axis(distances, order, 1), np.take_along_axis(indices, order, 1)


class FaissIndex:
    name = "faiss"

    def __init__(self, index: faiss.Index, cpu_index: faiss.Index | None = None):
        """`index` searches; `cpu_index` is its flat CPU original when `index` lives on a GPU."""
        cpu = index if cpu_index is None else cpu_index
        if not isinstance(cpu, faiss.IndexFlat):
            raise TypeError(f"expected a flat (exact) faiss index, got {type(cpu).__name__}")
        self.index, self._cpu = index, cpu
        self.ntotal, self.dim = cpu.ntotal, cpu.d

    @classmethod
    def from_bank(cls, bank: np.ndarray) -> FaissIndex:
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(np.ascontiguousarray(bank, dtype=np.float32))
        return cls(index)

    def rows(self) -> np.ndarray:
        """The bank rows as faiss stores them (a view of the CPU index, not a copy)."""
        flat = self.cpu_index()
        return faiss.rev_swig_ptr(flat.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _, indices = self.index.search(queries, min(k, self.ntotal))
        return _ascending(exact_sq_distances(self.rows(), queries, indices), indices)

    def save(self, path: Path) -> None:
        faiss.write_index(self.cpu_index(), str(path))

    def cpu_index(self) -> faiss.Index:
        return self._cpu

    @classmethod
    def read(cls, path: Path) -> FaissIndex:
        return cls(faiss.read_index(str(path)))


class FaissGpuIndex(FaissIndex):
    name = "faiss-gpu"

    def __init__(self, cpu_index: faiss.Index, device_id: int = 0):
        self._resources = faiss.StandardGpuResources()
        super().__init__(faiss.index_cpu_to_gpu(self._resources, device_id, cpu_index), cpu_index)


class TorchIndex:
    """Exact L2 search by ||q||² + ||b||² − 2 q·b in chunks, then top-k; float32 by default.

    On CUDA, TF32 matmuls are left off: they perturb distances by ~1e-3 relative, enough to swap
    near-tied neighbours. float32 on an H100 is already far faster than the CPU path.
    """

    name = "torch"

    def __init__(self, bank: np.ndarray, device: torch.device | str = "cpu", query_chunk: int = 4096):
        self.device = torch.device(device)
        self.bank = torch.as_tensor(np.asarray(bank, dtype=np.float32)).to(self.device)
        self.bank_sq = (self.bank * self.bank).sum(dim=1)
        self.ntotal, self.dim = self.bank.shape
        self.query_chunk = query_chunk

    @torch.no_grad()
    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = torch.as_tensor(queries, dtype=torch.float32).to(self.device)
        k = min(k, self.ntotal)
        dists, idxs = [], []
        for start in range(0, len(queries), self.query_chunk):
            q = queries[start : start + self.query_chunk]
            d2 = (q * q).sum(dim=1, keepdim=True) + self.bank_sq[None, :] - 2.0 * (q @ self.bank.T)
            _, indices = torch.topk(d2, k, dim=1, largest=False)
            exact = (q[:, None, :] - self.bank[indices]).square_().sum(dim=-1)  # difference form
            exact, order = torch.sort(exact, dim=1, stable=True)
            dists.append(exact)
            idxs.append(torch.gather(indices, 1, order))
        return torch.cat(dists).cpu().numpy(), torch.cat(idxs).cpu().numpy().astype(np.int64)


class BoundedIndex:
    """Exact nearest neighbours that skip most of the work: a lower bound from a few principal
    axes, full distances for a handful of candidates, and faiss for whatever is left undecided.

    Rotating the centred bank onto its principal axes changes no distance, and the distance
    over the leading `lead` axes alone can only be smaller: |q - b|^2 >= |L(q - b)|^2. For every
    query the bound is computed against the whole bank (one (queries x lead) product instead of
    (queries x D)), the `candidates` bank rows with the smallest bounds get their full distance,
    and the query is settled when the next-smallest bound, lowered by a float32 rounding
    margin, is not below its k-th best full distance: no other row can be closer. Queries the
    bound cannot settle go to the faiss index unchanged, so every answer is exact (to the
    rounding of faiss' own float32 arithmetic); what varies with the data is only the speed.
    CNN patch features concentrate their variance on few axes (random-init WRN-50: 99.7% on 32
    of 1024; ImageNet MobileNetV2 at 288 px: 98% on about 384), which is when this pays;
    `build` declines (returns None) when more than half of the axes are needed.
    """

    name = "bounded"

    def __init__(self, fallback: FaissIndex, mean: np.ndarray, axes: np.ndarray, candidates: int = 16):
        self.fallback = fallback
        self.ntotal, self.dim = fallback.ntotal, fallback.dim
        self.lead = axes.shape[1]
        self.candidates = candidates
        self.bank = fallback.rows()  # a view of faiss' storage, not another copy of the bank
        self.mean = mean.astype(np.float32)
        self.axes = np.ascontiguousarray(axes, dtype=np.float32)
        self._axes_t = torch.from_numpy(self.axes)
        self.lead_index = faiss.IndexFlatL2(self.lead)  # the bound: distances over the leading axes
        self.max_centred_sq = 0.0
        for start in range(0, self.ntotal, 8192):  # in chunks: no bank-sized temporaries
            centred = self.bank[start : start + 8192] - self.mean
            self.lead_index.add(self._lead_coords(centred))
            self.max_centred_sq = max(self.max_centred_sq, float(np.einsum("ij,ij->i", centred, centred).max()))
        # Rounding of the bound's float32 products: |error| <= ~lead * 2^-24 * (|q|^2 + |b|^2),
        # doubled, plus the axes being orthonormal only to float32 precision.
        self.rel_margin = max(self.lead, 128) * 2.0**-23
        self.stats = {"queries": 0, "settled": 0}

    @classmethod
    def build(
        cls,
        bank: np.ndarray,
        fallback: FaissIndex | None = None,
        variance: float = 0.98,
        candidates: int = 16,
        sample_rows: int = 8192,
        seed: int = 0,
        max_lead_share: float = 0.5,
    ) -> BoundedIndex | None:
        """The index for `bank`, or None when its spectrum is too flat for the bound to pay (the
        leading axes that carry `variance` of it are more than `max_lead_share` of all).

        The axes come from a sample of rows; any orthonormal axes keep the search exact, the
        principal ones just make the bound tight."""
        bank = np.asarray(bank, dtype=np.float32)
        n, dim = bank.shape
        if n <= candidates + 1:
            return None
        rows = (
            bank
            if n <= sample_rows
            else bank[np.sort(np.random.default_rng(seed).choice(n, sample_rows, replace=False))]
        )
        mean = rows.mean(axis=0, dtype=np.float64)
        centred = rows - mean.astype(np.float32)
        # float32 scatter matrix (fast BLAS), float64 eigenvectors: orthonormal either way, which
        # is all exactness needs; the covariance's precision only affects how tight the bound is.
        eigenvalues, vectors = np.linalg.eigh((centred.T @ centred).astype(np.float64))
        eigenvalues, vectors = np.clip(eigenvalues[::-1], 0.0, None), vectors[:, ::-1]
        share = np.cumsum(eigenvalues) / max(float(eigenvalues.sum()), 1e-30)
        lead = int(np.searchsorted(share, variance) + 1)
        lead = min(dim, max(64, -(-lead // 32) * 32))
        if lead > max_lead_share * dim:
            return None
        return cls(fallback or FaissIndex.from_bank(bank), mean, vectors[:, :lead], candidates)

    def _lead_coords(self, centred: np.ndarray) -> np.ndarray:
        """Centred rows on the leading axes. In torch, not numpy: numpy's OpenBLAS keeps its own
        worker threads spinning for a while after each product, and on a 2-core machine they
        slowed the next backbone forward pass by 30-50 ms (torch's threads are the forward's own)."""
        return (torch.from_numpy(np.ascontiguousarray(centred)) @ self._axes_t).numpy()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n, m = len(queries), self.candidates
        if k > m or n == 0 or self.ntotal <= m:
            return self.fallback.search(queries, k)
        centred = queries - self.mean
        with _faiss_blas_always():
            bound, order = self.lead_index.search(self._lead_coords(centred), m + 1)  # ascending
        cand = np.ascontiguousarray(order[:, :m])
        full = exact_sq_distances(self.bank, queries, cand)  # the candidates' full distances
        pos = np.argsort(full, axis=1, kind="stable")[:, :k]
        distances, indices = np.take_along_axis(full, pos, 1), np.take_along_axis(cand, pos, 1)
        margin = self.rel_margin * (np.einsum("ij,ij->i", centred, centred) + self.max_centred_sq)
        rest = np.flatnonzero(bound[:, m] - margin < distances[:, -1])
        if len(rest):
            with _faiss_blas_always():
                distances[rest], indices[rest] = self.fallback.search(queries[rest], k)
        self.stats["queries"] += n
        self.stats["settled"] += n - len(rest)
        return distances, indices


def faiss_gpu_usable() -> bool:
    """True only when this faiss build has GPU support and a tiny search really runs on GPU 0."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return False
    try:
        probe = FaissGpuIndex(FaissIndex.from_bank(np.eye(4, dtype=np.float32)).index)
        probe.search(np.eye(4, dtype=np.float32), 1)
        return True
    except Exception as exc:  # e.g. "no kernel image is available" on an unsupported architecture
        logger.info("faiss-gpu present but not usable here (%s); using the torch GPU backend", exc)
        return False


def make_index(
    bank: np.ndarray, backend: str = "auto", device: torch.device | str = "cpu", cpu_index: faiss.Index | None = None
):
    """The search object for `bank`; `cpu_index` re-uses an index read from disk."""
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            backend = "faiss-gpu" if faiss_gpu_usable() else "torch"
        else:
            base = FaissIndex(cpu_index) if cpu_index is not None else FaissIndex.from_bank(bank)
            return BoundedIndex.build(bank, base) or base
    base = FaissIndex(cpu_index) if cpu_index is not None else None
    if backend == "faiss":
        return base or FaissIndex.from_bank(bank)
    if backend == "bounded":
        if device.type != "cpu":
            raise RuntimeError("scoring.knn_backend=bounded runs on the CPU; use 'torch' or 'auto' on a GPU")
        base = base or FaissIndex.from_bank(bank)
        return BoundedIndex.build(bank, base, max_lead_share=1.0) or base
    if backend == "faiss-gpu":
        if not faiss_gpu_usable():
            raise RuntimeError(
                "scoring.knn_backend=faiss-gpu, but this faiss build cannot run on a GPU here; "
                "use 'torch' (exact, any CUDA GPU) or 'faiss' (CPU)"
            )
        return FaissGpuIndex((base or FaissIndex.from_bank(bank)).index, device.index or 0)
    if backend == "torch":
        return TorchIndex(bank, device)
    raise ValueError(f"unknown knn backend {backend!r}")
