"""CMA-ES through pycma's ask/tell, seeded with a private generator and saved with it.

pycma draws its Gaussian samples through the `randn` option; we hand it a numpy Generator of our
own so that a run depends on its seed alone (not on whatever else touched `np.random`), and so
that pickling pycma's state (`.es`, what a checkpoint keeps) pickles the generator too: a resumed
run continues exactly.
"""

from __future__ import annotations

import warnings

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pycma warns when matplotlib is absent; we do not plot through it
    import cma


class _Randn:
    """randn(lam, N) for pycma, drawing from a private Generator (picklable, unlike a lambda)."""

    def __init__(self, seed: int):
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class CMAES:
    """Minimise a black-box loss over R^dim with CMA-ES.

    Args:
        dim: search dimension d (the intrinsic dimension).
        popsize: candidates per generation (queries per generation).
        sigma: initial step size; z starts at x0 (zeros by default).
        seed: seeds the sampler; the same seed gives the same candidates.
        bound: if given, z is kept in [-bound, bound] (early BBT used 5).
        diagonal: separable CMA-ES (diagonal covariance), O(d) per sample instead of O(d^2).
    """

    def __init__(self, dim: int, *, popsize: int = 20, sigma: float = 1.0, seed: int = 0,
                 bound: float | None = None, diagonal: bool = False, x0: np.ndarray | None = None):
        # pycma picks two-point step-size adaptation for a population of 2 in d >= 300, and its
        # tell() then fails on directions it injected itself; 3 is the smallest that always works
        if dim < 1 or popsize < 3 or not sigma > 0:
            raise ValueError(f"need dim >= 1, popsize >= 3, sigma > 0; got dim={dim}, popsize={popsize}, sigma={sigma}")
        opts = {
            "popsize": popsize,
            "seed": seed + 1,  # pycma treats 0 as "seed from the clock"
            "randn": _Randn(seed),
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "CMA_diagonal": bool(diagonal),
            "tolflatfitness": 10**9,  # the loss may sit flat for a while on few-shot data; keep going
            "tolfun": 0,
            "tolx": 0,
        }
        if bound is not None:
            opts["bounds"] = [-float(bound), float(bound)]
        x0 = np.zeros(dim) if x0 is None else np.asarray(x0, dtype=float)
        self.es = cma.CMAEvolutionStrategy(x0, sigma, inopts=opts)
        self.dim, self.popsize = dim, popsize

    @classmethod
    def from_state(cls, es: cma.CMAEvolutionStrategy) -> CMAES:
        """The optimizer around a pycma state saved earlier (`.es`, pickled with its sampler)."""
        self = cls.__new__(cls)
        self.es, self.dim, self.popsize = es, int(es.N), int(es.popsize)
        return self

    def ask(self) -> np.ndarray:
        """The next generation's candidates, shape [popsize, dim]."""
        return np.asarray(self.es.ask(), dtype=np.float64)

    def tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        """Report the losses of the candidates `ask` returned (lower is better)."""
        self.es.tell(list(np.asarray(candidates)), [float(x) for x in losses])

    @property
    def generation(self) -> int:
        return int(self.es.countiter)

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.es.mean)

    def stop(self) -> dict:
        """pycma's termination reasons (empty while it wants to go on)."""
        return dict(self.es.stop())
