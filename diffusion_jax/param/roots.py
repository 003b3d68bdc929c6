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
  U_t comes from a cubic Hermite interpolant on a log-t grid (64 nodes per octave), followed by one
  Newton-Schulz step U (3I - U^T U) / 2, and L_t from the core. The interpolant alone is orthogonal only to
  O((h |t S(t)|)^4), largest near T where |t S| is (max |U U^T - I| at t ~ 0.99: 2.5e-7 CLD, 1.4e-6 TOLD,
  1.5e-5 CD-HOLD n = 4, 7.7e-5 n = 5, 1.9e-3 n = 8); the step squares that departure (host float64:
  4.8e-14, 1.4e-12, 1.7e-10, 4.5e-9, 2.8e-6), so in float32 R R^T = Sigma_t holds to ~1e-6 of
  sqrt(Sigma_ii Sigma_jj) for every t (measured up to n = 6; 3e-6 for n = 8).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from diffusion_jax import linalg
from diffusion_jax.sdes.base import Family, table_kernel

Array = Any
SQUARE_ROOTS = ("R", "L")
OUTPUTS = ("eps", "score", "denoiser")
MAGNUS_STEP = 0.05       # h |t S(t)| per Magnus step of the rotation ODE (sixth order: error ~ 0.05^7)


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
    def _rotation_generator(self, t: np.ndarray) -> np.ndarray:
        """S(t) = W - W^T, W = strictly upper part of L^{-1} M L, M = F + 1/2 G G^T Sigma^{-1}.

        Writing R = L U with L the Cholesky factor, R' = M R gives U' = L^{-1}(M L - L') U; since
        L^{-1} L' is the lower-triangular part (half diagonal) of L^{-1} Sigma' L^{-T} and
        Sigma' = F Sigma + Sigma F^T + G G^T, the generator reduces to the skew matrix above: U stays
        orthogonal, and t S(t) stays bounded as t -> 0, so the ODE in log t is smooth and non-stiff.
        """
        sde = self.sde
        chol = sde.cholesky_np(t)                                   # (*t, k, k): every time at once
        # L^{-1} M L = L^{-1} F L + 1/2 L^{-1} (G G^T) L^{-T}
        x = np.linalg.solve(chol, sde.drift_matrix_np(t) @ chol)
        y = np.linalg.solve(chol, np.swapaxes(np.linalg.solve(chol, sde.noise_matrix_np(t)), -1, -2))
        w = np.triu(x + 0.5 * y, 1)
        return w - np.swapaxes(w, -1, -2)

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
        if k == 1:
            u = np.ones((n_grid, 1, 1))
            du = np.zeros_like(u)                                   # R = L for scalar states
        else:
            u, du = self._solve_rotation(grid, log_t_hi)
        self._e_lo = e_lo
        self._per_octave = per_octave
        self._dlog = math.log(2.0) / per_octave
        self._n_grid = n_grid
        self._u_tab = u
        self._du_tab = du                                           # dU / d log t

    def _generator_log(self, tau: np.ndarray) -> np.ndarray:
        """t S(t) at t = e^tau (the generator of U in tau = log t), shape (len(tau), k, k)."""
        t = np.exp(np.ravel(np.asarray(tau, np.float64)))
        return t[:, None, None] * self._rotation_generator(t)

    def _solve_rotation(self, grid: np.ndarray, tau_hi: float) -> tuple[np.ndarray, np.ndarray]:
        r"""U at the grid nodes (and dU/dtau) from U(tau_hi) = I, by the sixth-order Magnus method.

        dU/dtau = Omega(tau) U with Omega = t S(t) skew and independent of U, so the solution is a product of
        orthogonal step propagators exp(Omega_h); the sixth-order Magnus integrator (Blanes, Casas & Ros 2000)
        builds each from Omega at the three Gauss-Legendre nodes of the step. Fixed steps, chosen per cell
        so that h |Omega| <= MAGNUS_STEP (local error O((h |Omega|)^7)): an adaptive solver would chase the
        float64 rounding of Omega at t < 1e-4 for k >= 5 (the Cholesky factor of a nearly singular Sigma_t,
        noise up to 1e-4 relative in Omega) with ever smaller steps (minutes per family); here that rounding
        enters once per step, with weight h.
        """
        k = self.sde.order
        n_grid = len(grid)
        om_nodes = self._generator_log(grid)                         # also gives dU/dtau at the nodes
        size = np.abs(om_nodes).sum(axis=-1).max(axis=-1)            # infinity norms
        below = grid <= tau_hi
        # segments from tau_hi to each node: downwards through the nodes below, upwards to those above
        seg_a, seg_b, seg_node = [], [], []
        prev = tau_hi
        for j in np.nonzero(below)[0][::-1]:
            seg_a.append(prev), seg_b.append(grid[j]), seg_node.append(j)
            prev = grid[j]
        prev = tau_hi
        for j in np.nonzero(~below)[0]:
            seg_a.append(prev), seg_b.append(grid[j]), seg_node.append(j)
            prev = grid[j]
        # substeps per segment from the generator's size at the segment's ends
        steps_a, steps_h, steps_seg = [], [], []
        for s, (a, b, j) in enumerate(zip(seg_a, seg_b, seg_node)):
            jj = min(max(j + (1 if b < a else -1), 0), n_grid - 1)
            bound = max(size[j], size[jj])
            m = max(1, int(math.ceil(abs(b - a) * bound / MAGNUS_STEP)))
            h = (b - a) / m
            steps_a.extend(a + h * np.arange(m)), steps_h.extend([h] * m), steps_seg.extend([s] * m)
        steps_a, steps_h = np.asarray(steps_a), np.asarray(steps_h)
        c = np.sqrt(15.0) / 10.0
        nodes = steps_a[:, None] + steps_h[:, None] * np.array([0.5 - c, 0.5, 0.5 + c])[None]
        om = self._generator_log(nodes.ravel()).reshape(len(steps_a), 3, k, k)
        h = steps_h[:, None, None]
        a1, a2 = h * om[:, 1], math.sqrt(15.0) / 3.0 * h * (om[:, 2] - om[:, 0])
        a3 = 10.0 / 3.0 * h * (om[:, 2] - 2.0 * om[:, 1] + om[:, 0])
        comm = lambda x, y: x @ y - y @ x
        c1 = comm(a1, a2)
        c2 = -comm(a1, 2.0 * a3 + c1) / 60.0
        big = a1 + a3 / 12.0 + comm(-20.0 * a1 - a3 + c1, a2 + c2) / 240.0
        big = 0.5 * (big - np.swapaxes(big, -1, -2))                  # skew to rounding: exp is orthogonal
        # exp by its Taylor series (|big| <~ MAGNUS_STEP: 16 terms are exact to rounding), batched
        props = np.broadcast_to(np.eye(k), big.shape).copy()
        for m in range(16, 0, -1):
            props = np.eye(k) + big @ props / m
        u = np.empty((n_grid, k, k))
        cur, s_prev = np.eye(k), 0
        for i, s in enumerate(steps_seg):
            if s != s_prev:
                u[seg_node[s_prev]] = cur
                if seg_a[s] == tau_hi and s > 0:                      # the upward pass restarts at U_T = I
                    cur = np.eye(k)
                s_prev = s
            cur = props[i] @ cur
        u[seg_node[s_prev]] = cur
        du = om_nodes @ u
        return u, du

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
        s = s[..., None, None]                                      # (*t, 1, 1) against (*t, k, k)
        h00 = (1 + 2 * s) * (1 - s) ** 2
        h10 = s * (1 - s) ** 2
        h01 = s * s * (3 - 2 * s)
        h11 = s * s * (s - 1)
        q = h00 * u[j] + h10 * self._dlog * du[j] + h01 * u[j + 1] + h11 * self._dlog * du[j + 1]
        # The interpolant is orthogonal only to O(h^4) between nodes. One Newton-Schulz step q (3I - q^T q) / 2
        # takes q = P (I + E) (polar factor P, E symmetric) to P (I + O(E^2)): it moves q towards the nearest
        # orthogonal matrix and leaves the rotation itself (P) as interpolated.
        eye = xp.eye(q.shape[-1], dtype=q.dtype)
        return 0.5 * linalg.matmul_xp(q, 3.0 * eye - linalg.matmul_xp(xp.swapaxes(q, -1, -2), q, xp), xp)

    # -------------------------------------------------------------- public
    def __call__(self, t: Array) -> Array:
        """K_t, shape (*t.shape, k, k), float32 by default."""
        if self.kind == "L":
            return self.sde.cholesky(t)
        chol = self.sde.cholesky(t)
        t = jnp.asarray(t, dtype=chol.dtype)
        return linalg.matmul(chol, self._per_mode(t.shape, table_kernel(self, "_rotation", t)))

    def np(self, t: float | np.ndarray) -> np.ndarray:
        """K_t in float64 on the host, for a float or an array of times: shape (*t.shape, [*modes,] k, k)."""
        if self.kind == "L":
            return self.sde.cholesky_np(t)
        t = np.asarray(t, np.float64)
        return self.sde.cholesky_np(t) @ self._per_mode(t.shape, self._rotation(t, np))

    def _per_mode(self, t_shape: tuple[int, ...], rot: Array) -> Array:
        """U_t (*t, k, k) aligned with the (*t, *modes, k, k) factor of a modal family (U is shared by every mode)."""
        return rot.reshape(tuple(t_shape) + (1,) * self.sde.mode_ndim + rot.shape[-2:])


@functools.lru_cache(maxsize=32)
def square_root(sde: Family, kind: str = "R") -> SquareRoot:
    """Cached :class:`SquareRoot` (solving for R takes a moment; do it once per family)."""
    return SquareRoot(sde, kind)
