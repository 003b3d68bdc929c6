"""Independent float64 references for the SDE core: ODE quadrature of the moment equations."""
from __future__ import annotations

import numpy as np
from scipy.integrate import solve_ivp


def moments_by_ode(A: np.ndarray, Q: np.ndarray, sigma0: np.ndarray, b: float) -> tuple[np.ndarray, np.ndarray]:
    """(Phi, Sigma) at B = b from dPhi/dB = A Phi, dSigma/dB = A Sigma + Sigma A^T + Q (DOP853, float64).

    Tight relative tolerance and a negligible absolute one, so that tiny entries (Sigma_xx ~ 1e-11 at
    t = 1e-5) are resolved to their own relative precision.
    """
    k = A.shape[0]

    def rhs(_, y):
        p = y[: k * k].reshape(k, k)
        s = y[k * k:].reshape(k, k)
        return np.concatenate([(A @ p).ravel(), (A @ s + s @ A.T + Q).ravel()])

    y0 = np.concatenate([np.eye(k).ravel(), sigma0.ravel()])
    if b == 0:
        return np.eye(k), sigma0.copy()

    def solve(atol):
        sol = solve_ivp(rhs, (0.0, b), y0, method="DOP853", rtol=1e-13, atol=atol,
                        first_step=min(b, 1e-3) / 16)
        if sol.status != 0:
            raise RuntimeError(sol.message)
        return sol.y[:, -1]

    # Pass 1 finds every entry's scale; pass 2 asks each Phi_ij for its own relative precision and each
    # Sigma_ij for precision relative to sqrt(Sigma_ii Sigma_jj) (an absolute floor of 0 would chase the
    # rounding noise of entries that cross zero forever).
    y = solve(1e-22)
    d = np.sqrt(np.abs(np.diag(y[k * k:].reshape(k, k))))
    atol = np.concatenate([1e-16 * np.abs(y[: k * k]) + 1e-300, 1e-16 * np.outer(d, d).ravel() + 1e-300])
    y = solve(atol)
    s = y[k * k:].reshape(k, k)
    return y[: k * k].reshape(k, k), 0.5 * (s + s.T)
