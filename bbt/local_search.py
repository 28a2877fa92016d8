"""The second stage of a two-stage search: COBYLA (scipy) from CMA-ES's best point.

BBT-RGB spends the end of the budget on a local derivative-free method instead of more CMA-ES
generations. COBYLA builds its first linear model from dim + 1 points, which in the full
intrinsic space (d = 500) would eat a few-hundred-query budget before it took one step; so it
searches the k directions along which CMA-ES's covariance has grown most (the eigenvectors of
sigma^2 C with the largest eigenvalues), each scaled to one standard deviation of the search
distribution: x in R^k gives z = z_best + B x, and COBYLA starts at x = 0 with a trust radius of
one such deviation.

scipy's COBYLA is deterministic, so a resumed run replays the losses it already paid for (they
are kept in the checkpoint) and continues with the first evaluation it had not made.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize

from bbt.optimizer import CMAES


class Stop(Exception):
    """Raised by an objective to end the search (the budget cannot pay for another query)."""


def subspace(es: CMAES, k: int) -> np.ndarray:
    """[d, k] basis: the k principal axes of the CMA-ES search distribution, each one std long."""
    k = min(k, es.dim)
    sigma = float(es.es.sigma)
    if np.ndim(es.es.C) == 2:
        values, vectors = np.linalg.eigh(np.asarray(es.es.C))  # ascending
        top = np.argsort(-values, kind="stable")[:k]
        return vectors[:, top] * (sigma * np.sqrt(np.maximum(values[top], 0.0)))
    variances = np.asarray(es.es.sm.variances)  # separable CMA-ES: the axes are the coordinates
    top = np.argsort(-variances, kind="stable")[:k]
    basis = np.zeros((es.dim, k))
    basis[top, np.arange(k)] = sigma * np.sqrt(variances[top])
    return basis


def cobyla(objective: Callable[[np.ndarray], float], k: int, done: list[float], max_evals: int,
           after: Callable[[], None] = lambda: None) -> str:
    """Minimise objective(x) over R^k from x = 0 with COBYLA, at most `max_evals` evaluations.

    The first len(done) evaluations are answered from `done` (a resumed search); each new one
    calls `objective`, appends its value to `done`, then calls `after` (where the caller may
    checkpoint: `done` then holds every value paid for). Returns why the search ended: "budget"
    (the objective raised Stop, or max_evals was reached) or "converged".
    """
    calls = 0

    def f(x: np.ndarray) -> float:
        nonlocal calls
        calls += 1
        if calls <= len(done):
            return done[calls - 1]
        if calls > max_evals:
            raise Stop
        value = float(objective(np.asarray(x, dtype=float)))
        done.append(value)
        after()
        return value

    try:
        minimize(f, np.zeros(k), method="COBYLA", options={"rhobeg": 1.0, "tol": 1e-4, "maxiter": max_evals + 1})
    except Stop:
        return "budget"
    return "budget" if calls > max_evals else "converged"
