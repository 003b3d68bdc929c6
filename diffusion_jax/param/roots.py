r"""Score parameterisation: square roots K_t of Sigma_t and the eps <-> score <-> denoiser conversions.

The network predicts eps with u_t = m_t x_0 + K_t eps, so per data dimension

    score s(u, t) = -K_t^{-T} eps,                                   (K_t K_t^T = Sigma_t)
    denoiser D(u, t) = E[x_0 | u_t = u]:  s = -Sigma_t^{-1} (u - m_t D)   (exact: u | x_0 is Gaussian),
    so  eps = K_t^{-1} (u - m_t D)  and, from eps, the Sigma^{-1}-weighted least-squares
        D = w^T (K_t^{-1} u - eps) / |w|^2,   w = K_t^{-1} m_t.

Two square roots (docs/maths.md section 4):

* ``"L"``: the Cholesky factor of the core (CLD-SGM).
* ``"R"`` (gDDIM, default): the solution of dR/dt = (F_t + 1/2 G G^T Sigma_t^{-1}) R with R R^T = Sigma_t.
  Along the probability-flow ODE of a single data point, u_t = m_t x_0 + R_t eps with eps constant, so
  an exponential integrator in eps (gDDIM) is exact there. We write R_t = L_t U_t with U_t orthogonal
  (U_T = I) and solve the smooth rotation ODE for U once on the host in float64 (in log t); at run time
  U_t comes from a cubic Hermite interpolant on a log-t grid and L_t from the core, so R R^T = Sigma_t
  holds to the core's accuracy whatever the interpolation error.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from scipy.integrate import solve_ivp

from diffusion_jax.sdes.base import Family

Array = Any
SQUARE_ROOTS = ("R", "L")
OUTPUTS = ("eps", "score", "denoiser")


class SquareRoot:
    """K_t with K_t K_t^T = Sigma_t: ``kind="R"`` (gDDIM) or ``"L"`` (Cholesky)."""

    def __init__(self, sde: Family, kind: str = "R", per_octave: int = 64):
        if kind not in SQUARE_ROOTS:
            raise ValueError(f"unknown square root {kind!r}; choose one of {SQUARE_ROOTS}")
        self.sde = sde
        self.kind = kind
        if kind == "R":
            self._build_r_table(per_octave)

    # -------------------------------------------------------------- R: host float64 solve
    def _rotation_generator(self, t: float) -> np.ndarray:
        """S(t) = W - W^T, W = strictly upper part of L^{-1} M L, M = F + 1/2 G G^T Sigma^{-1}.

        Writing R = L U with L the Cholesky factor, R' = M R gives U' = L^{-1}(M L - L') U; since
        L^{-1} L' is the lower-triangular part (half diagonal) of L^{-1} Sigma' L^{-T} and
        Sigma' = F Sigma + Sigma F^T + G G^T, the generator reduces to the skew matrix above: U stays
        orthogonal, and t S(t) stays bounded as t -> 0, so the ODE in log t is smooth and non-stiff.
        """
        sde = self.sde
        chol = sde.cholesky_np(t)
        # L^{-1} M L = L^{-1} F L + 1/2 L^{-1} (G G^T) L^{-T}
        x = np.linalg.solve(chol, sde.drift_matrix_np(t) @ chol)
        y = np.linalg.solve(chol, np.linalg.solve(chol, sde.noise_matrix_np(t)).T)
        w = np.triu(x + 0.5 * y, 1)
        return w - w.T

    def _build_r_table(self, per_octave: int) -> None:
        # Grid uniform in log2 t, aligned to octaves: the run-time lookup splits t = 2^e * mantissa
        # exactly (frexp), so the position inside a cell carries float32 precision even at t ~ 1e-5.
        sde = self.sde
        k = sde.order
        e_lo = math.floor(math.log2(sde.t_min))
        log_t_hi = math.log(sde.T)
        # cells up to (and including) the one that contains T
        n_grid = int(math.ceil((math.log2(sde.T) - e_lo) * per_octave - 1e-9)) + 1
        grid = math.log(2.0) * (e_lo + np.arange(n_grid) / per_octave)   # in tau = log t

        def rhs(tau, y):
            t = math.exp(tau)
            return (t * self._rotation_generator(t) @ y.reshape(k, k)).ravel()

        u = np.empty((n_grid, k, k))
        if k == 1:
            u[:] = 1.0
        else:
            below = grid <= log_t_hi
            # U_T = I; the ODE runs down to t_min and, for the last cell, up past T by under 1/64 octave
            for mask, end in ((below, grid[0]), (~below, grid[-1])):
                if not mask.any():
                    continue
                pts = grid[mask] if end > log_t_hi else grid[mask][::-1]
                sol = solve_ivp(rhs, (log_t_hi, end), np.eye(k).ravel(), method="DOP853", rtol=1e-12,
                                atol=1e-14, t_eval=pts)
                if sol.status != 0:
                    raise RuntimeError(f"{sde.name}: solving for R_t failed: {sol.message}")
                vals = sol.y.T.reshape(-1, k, k)
                u[mask] = vals if end > log_t_hi else vals[::-1]
        if k == 1:
            du = np.zeros_like(u)                                   # R = L for scalar states
        else:
            du = np.stack([rhs(tau, u_j.ravel()).reshape(k, k) for tau, u_j in zip(grid, u)])
        self._e_lo = e_lo
        self._per_octave = per_octave
        self._dlog = math.log(2.0) / per_octave
        self._n_grid = n_grid
        self._u_tab = u
        self._du_tab = du                                           # dU / d log t

    def _rotation(self, t, xp, dtype=None):
        """U_t by cubic Hermite interpolation in log t (U is orthogonal; R_t = L_t U_t)."""
        conv = (lambda a: a) if dtype is None else (lambda a: xp.asarray(a, dtype))
        mant, expo = xp.frexp(t)                                   # t = mant 2^expo, mant in [1/2, 1)
        frac = xp.log2(2.0 * mant) * self._per_octave             # in [0, per_octave)
        cell = xp.floor(frac)
        j = (expo - 1 - self._e_lo) * self._per_octave + cell.astype(np.int32)
        s = frac - cell
        over = j > self._n_grid - 2                                 # t at (or rounding past) the top
        s = xp.where(over, 1.0, xp.where(j < 0, 0.0, s))
        j = xp.clip(j, 0, self._n_grid - 2).astype(np.int32)
        u, du = conv(self._u_tab), conv(self._du_tab)
        h00 = (1 + 2 * s) * (1 - s) ** 2
        h10 = s * (1 - s) ** 2
        h01 = s * s * (3 - 2 * s)
        h11 = s * s * (s - 1)
        return h00 * u[j] + h10 * self._dlog * du[j] + h01 * u[j + 1] + h11 * self._dlog * du[j + 1]

    # -------------------------------------------------------------- public
    def __call__(self, t: Array) -> Array:
        """K_t, shape (*t.shape, k, k), float32 by default."""
        if self.kind == "L":
            return self.sde.cholesky(t)
        chol = self.sde.cholesky(t)
        t = jnp.asarray(t, dtype=chol.dtype)
        rot = jnp.vectorize(lambda tt: self._rotation(tt, jnp, tt.dtype), signature="()->(i,j)")(t)
        # U_t is shared by every mode: align it with the (*t, *modes, k, k) factor of a modal family
        return chol @ rot.reshape(t.shape + (1,) * self.sde.mode_ndim + rot.shape[-2:])

    def np(self, t: float) -> np.ndarray:
        """K_t in float64 on the host."""
        if self.kind == "L":
            return self.sde.cholesky_np(t)
        return self.sde.cholesky_np(t) @ self._rotation(np.float64(t), np)


@functools.lru_cache(maxsize=32)
def square_root(sde: Family, kind: str = "R") -> SquareRoot:
    """Cached :class:`SquareRoot` (solving for R takes a moment; do it once per family)."""
    return SquareRoot(sde, kind)
