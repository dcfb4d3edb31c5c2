"""Exact nearest-neighbour search of patch features against the memory bank.

Backends, picked by `make_index(..., backend="auto")`:
- "faiss": faiss `IndexFlatL2` on the CPU (exact; what the reference uses);
- "faiss-gpu": the same index cloned to a GPU, only where the installed faiss has GPU support
  and it actually runs on this card (PyPI's faiss-gpu wheels stop at compute capability 8.9, so
  H100/H200 cannot use them);
- "torch": exact chunked matmul + top-k on any torch device, the GPU path that needs no faiss-gpu.
All return SQUARED L2 distances (faiss' convention); the caller decides whether to take the root.
The faiss CPU index is what gets saved (`index.faiss`), whatever backend scores.

Must never import prefect, mlflow, dvc or great_expectations.
"""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
import torch

logger = logging.getLogger(__name__)


class FaissIndex:
    name = "faiss"

    def __init__(self, index: faiss.Index):
        self.index = index
        self.ntotal, self.dim = index.ntotal, index.d

    @classmethod
    def from_bank(cls, bank: np.ndarray) -> FaissIndex:
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(np.ascontiguousarray(bank, dtype=np.float32))
        return cls(index)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        distances, indices = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return distances, indices

    def save(self, path: Path) -> None:
        faiss.write_index(self.cpu_index(), str(path))

    def cpu_index(self) -> faiss.Index:
        return self.index

    @classmethod
    def read(cls, path: Path) -> FaissIndex:
        return cls(faiss.read_index(str(path)))


class FaissGpuIndex(FaissIndex):
    name = "faiss-gpu"

    def __init__(self, cpu_index: faiss.Index, device_id: int = 0):
        self._cpu = cpu_index
        self._resources = faiss.StandardGpuResources()
        super().__init__(faiss.index_cpu_to_gpu(self._resources, device_id, cpu_index))

    def cpu_index(self) -> faiss.Index:
        return self._cpu


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
            values, indices = torch.topk(d2.clamp_min_(0.0), k, dim=1, largest=False)
            dists.append(values)
            idxs.append(indices)
        return torch.cat(dists).cpu().numpy(), torch.cat(idxs).cpu().numpy().astype(np.int64)


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


def make_index(bank: np.ndarray, backend: str = "auto", device: torch.device | str = "cpu",
               cpu_index: faiss.Index | None = None):
    """The search object for `bank`; `cpu_index` re-uses an index read from disk."""
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            backend = "faiss-gpu" if faiss_gpu_usable() else "torch"
        else:
            backend = "faiss"
    base = FaissIndex(cpu_index) if cpu_index is not None else None
    if backend == "faiss":
        return base or FaissIndex.from_bank(bank)
    if backend == "faiss-gpu":
        if not faiss_gpu_usable():
            raise RuntimeError("scoring.knn_backend=faiss-gpu, but this faiss build cannot run on a GPU here; "
                               "use 'torch' (exact, any CUDA GPU) or 'faiss' (CPU)")
        return FaissGpuIndex((base or FaissIndex.from_bank(bank)).index, device.index or 0)
    if backend == "torch":
        return TorchIndex(bank, device)
    raise ValueError(f"unknown knn backend {backend!r}")
