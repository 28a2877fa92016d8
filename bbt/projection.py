"""The fixed random projection A that maps an intrinsic vector z (d numbers) to a prompt.

    p = A z + p0,   A: D x d,   D = L * H   (L prompt tokens, H hidden size)

A is never stored or sent: it is regenerated from a `ProjectionSpec` (kind, seed, d, D, scale)
with numpy's PCG64 generator, so the client and any server build the same matrix.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from functools import lru_cache

import numpy as np

from bbt.protocol import ProjectionSpec


def uniform_spec(*, seed: int, d: int, D: int) -> ProjectionSpec:
    """A as PyTorch's nn.Linear(d, D) default init draws it: U(-1/sqrt(d), 1/sqrt(d)) (the BBT paper)."""
    return ProjectionSpec(kind="uniform", seed=seed, d=d, D=D, scale=1.0 / math.sqrt(d))


def normal_spec(*, seed: int, d: int, D: int, target_std: float, alpha: float = 1.0, sigma: float = 1.0) -> ProjectionSpec:
    """A ~ N(0, s^2) with s = alpha * target_std / (sqrt(d) * sigma) (BBT code, BBTv2 paper).

    With z ~ N(0, sigma^2 I) (CMA-ES's first population) every entry of A z then has std
    alpha * target_std: the prompt starts at the scale of the model's own embeddings.
    """
    if not (math.isfinite(target_std) and target_std > 0):
        raise ValueError(f"target_std must be a positive number, got {target_std}")
    return ProjectionSpec(kind="normal", seed=seed, d=d, D=D, scale=alpha * target_std / (math.sqrt(d) * sigma))


def build_matrix(spec: ProjectionSpec) -> np.ndarray:
    """A as a float32 array of shape (D, d), identical on every machine for the same spec."""
    rng = np.random.Generator(np.random.PCG64(spec.seed))
    if spec.kind == "uniform":
        a = rng.random((spec.D, spec.d), dtype=np.float32)
        return (a * np.float32(2 * spec.scale) - np.float32(spec.scale)).astype(np.float32)
    a = rng.standard_normal((spec.D, spec.d), dtype=np.float32)
    return a * np.float32(spec.scale)


@lru_cache(maxsize=8)
def cached_matrix(spec: ProjectionSpec) -> np.ndarray:
    """`build_matrix` memoised by spec (a 50x384 prompt with d=500 is a 38 MB matrix)."""
    matrix = build_matrix(spec)
    matrix.flags.writeable = False
    return matrix


# Rows of A z already worked out, for a z that is the whole batch (every candidate the same): BBTv2
# sends each layer's current best z with every request, one layer changing per generation, so a
# 30-layer model would otherwise rebuild 29 matrices per request (more than `cached_matrix` keeps).
_ROWS: OrderedDict[tuple[ProjectionSpec, bytes], np.ndarray] = OrderedDict()
_ROWS_KEPT = 256  # rows of D floats (at most 0.2 MB each for L = 50, H = 1024)
_ROWS_LOCK = threading.Lock()


def project(z: np.ndarray, spec: ProjectionSpec, p0: np.ndarray | None = None) -> np.ndarray:
    """Prompts for a batch of intrinsic vectors: z [K, d] -> A z + p0, shape [K, D] (float32)."""
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] != spec.d:
        raise ValueError(f"z has shape {z.shape}, expected [K, {spec.d}]")
    rows, inverse = np.unique(z, axis=0, return_inverse=True)
    if len(rows) == 1:
        # one distinct row is always the same one-row product, so a kept copy has the bits a new one would
        key = (spec, rows.tobytes())
        with _ROWS_LOCK:
            row = _ROWS.get(key)
            if row is not None:
                _ROWS.move_to_end(key)
        if row is None:
            row = rows @ cached_matrix(spec).T  # (1, D)
            row.flags.writeable = False
            with _ROWS_LOCK:
                _ROWS[key] = row
                while len(_ROWS) > _ROWS_KEPT:
                    _ROWS.popitem(last=False)
        out = np.repeat(row, len(z), axis=0)
    elif len(rows) < len(z):
        # A GEMM may round identical rows differently by where they sit; BBTv2 sends the same z for
        # every layer but the tuned one, and the model side reuses work only when the prompts it
        # gets are bit-identical. So each distinct row is projected once.
        out = (rows @ cached_matrix(spec).T)[inverse.reshape(-1)]
    else:
        out = z @ cached_matrix(spec).T  # (K, D)
    if p0 is not None:
        out = out + np.asarray(p0, dtype=np.float32).reshape(1, spec.D)
    return out
