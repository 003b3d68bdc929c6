r"""The linear phase-space SDE core.

A family is, per data dimension, a k-dimensional state u = (x, a_1, ..., a_{k-1}) following

    du = beta(t) A u dt + sqrt(beta(t)) G dW,     Q = G G^T,     B(t) = int_0^t beta,

applied identically to every pixel. With the time change B the process is time-homogeneous, so

    Phi(t, s) = expm(A (B(t) - B(s))),
    Sigma_t   = Phi(t,0) Sigma_0 Phi(t,0)^T + int_0^{B(t)} e^{A r} Q e^{A^T r} dr,
    u_t | x_0 ~ N(Phi(t,0) (x_0, 0, ..., 0), Sigma_t),     Sigma_0 = diag(0, s_1, ..., s_{k-1}).

Numerics. Sigma_t spans many orders of magnitude at small t for k >= 2 (entries scale like powers of B)
and is nearly singular, so neither a float32 Van Loan block exponential nor the Lyapunov form is
accurate everywhere. We never form Sigma_t and factor it; we propagate a *square root*:

* a float64 host table on the grid B_j = j h (h a power of two with ||A||_inf h <= 1/4) of Phi(B_j) and
  of a lower-triangular factor L(B_j), built by the square-root recursion
  L(B_{j+1}) = tri([Phi(h) L(B_j) | N_h]) where N_h N_h^T = int_0^h e^{Ar} Q e^{A^T r} dr (Gauss-Legendre);
* at run time, for B = B_j + delta (0 <= delta < h): Phi(B) = Phi(delta) Phi(B_j) with Phi(delta) a
  truncated Taylor series (exact structural zeros, so every entry is relatively accurate), and
  Sigma(B) = K K^T with K = [Phi(delta) L(B_j) | N_delta]; the triangular factor tri(K) comes from a
  Householder QR of K^T.

Householder QR is column-wise backward stable, so (L L^T)_ij carries an error of order
eps * sqrt(Sigma_ii Sigma_jj): exactly the scaled accuracy the data coordinate needs at t ~ 1e-5.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from diffusion_jax import linalg
from diffusion_jax.sdes.base import FamilyBase, apply_matrix, table_kernel, tri_factor
from diffusion_jax.sdes.schedules import Schedule

Array = Any

_TAYLOR_EXTRA = 14      # Taylor terms beyond the order k-1 of the smallest (structurally delayed) entry
_GAUSS_EXTRA = 6        # Gauss-Legendre nodes beyond k
_MAX_TABLE = 200_000


class LinearSDE(FamilyBase):
    """A linear phase-space diffusion family: data (A, Q, beta schedule, Sigma_0, T, t_min).

    The state layout is ``(..., *data_shape, k)``: the phase-space coordinate is the last axis and the
    data coordinate is ``u[..., 0]``. All array methods are pure, jit/vmap/grad compatible, and work in
    the default JAX float dtype (float32 unless x64 is enabled). Methods ending in ``_np`` are the host
    float64 versions (for tables of sampler coefficients computed once per time grid).
    """

    def __init__(self, name: str, A: Array, Q: Array, schedule: Schedule, sigma0_aux=(),
                 T: float = 1.0, t_min: float = 1e-5, params: dict | None = None):
        A = np.array(A, dtype=np.float64, ndmin=2)
        Q = np.array(Q, dtype=np.float64, ndmin=2)
        k = A.shape[0]
        if A.shape != (k, k) or Q.shape != (k, k):
            raise ValueError(f"{name}: A and Q must be square of the same size, got {A.shape}, {Q.shape}")
        if not np.all(np.isfinite(A)) or not np.all(np.isfinite(Q)):
            raise ValueError(f"{name}: A and Q must be finite")
        if not np.allclose(Q, Q.T, atol=1e-12 * max(1.0, np.abs(Q).max())):
            raise ValueError(f"{name}: Q must be symmetric")
        q_eig, q_vec = np.linalg.eigh(Q)
        if q_eig.min() < -1e-12 * max(1.0, q_eig.max()):
            raise ValueError(f"{name}: Q must be positive semi-definite (min eigenvalue {q_eig.min():.3g})")
        sigma0_aux = tuple(float(s) for s in np.atleast_1d(np.asarray(sigma0_aux, dtype=np.float64)))
        if len(sigma0_aux) != k - 1:
            raise ValueError(f"{name}: need {k - 1} initial auxiliary variances, got {len(sigma0_aux)}")
        if any(not (s >= 0 and math.isfinite(s)) for s in sigma0_aux):
            raise ValueError(f"{name}: initial auxiliary variances must be finite and >= 0, got {sigma0_aux}")
        self.name = name
        self._check_horizon(T, t_min)
        self.params = dict(params or {})
        self.A = A
        self.Q = Q
        self.schedule = schedule
        self.T = float(T)
        self.t_min = float(t_min)
        self.sigma0 = np.diag(np.array((0.0,) + sigma0_aux))
        self.initial_variance = np.diag(self.sigma0).copy()
        if np.allclose(Q, np.diag(np.diag(Q))):
            # Diagonal Q (every family here): exact factor, no rounding from an eigensolver.
            cols = [i for i in range(k) if Q[i, i] > 0]
            g0 = np.zeros((k, len(cols)))
            for c, i in enumerate(cols):
                g0[i, c] = math.sqrt(Q[i, i])
            self.diffusion_factor = np.diag(np.sqrt(np.diag(Q)))
        else:
            keep = q_eig > 1e-14 * q_eig.max()
            g0 = q_vec[:, keep] * np.sqrt(q_eig[keep])
            self.diffusion_factor = (q_vec * np.sqrt(np.clip(q_eig, 0, None))) @ q_vec.T
        if g0.shape[1] == 0:
            raise ValueError(f"{name}: Q is zero, the process injects no noise")
        self.noise_factor = g0
        self._build_tables()
        self._build_prior()
        self.noise_rows = tuple(i for i in range(k) if np.any(Q[i] != 0))
        self._finish()

    def _definition(self):
        return (self.A.tobytes(), self.Q.tobytes(), self.schedule, tuple(np.diag(self.sigma0)))

    # ------------------------------------------------------------------ construction
    @property
    def order(self) -> int:
        """k, the number of phase-space coordinates per data dimension."""
        return self.A.shape[0]

    def _build_tables(self) -> None:
        k = self.order
        rho = float(np.abs(self.A).sum(axis=1).max())
        # 5% beyond B(T), and past T by 2% in t (the R_t table of param.py reaches just beyond T)
        b_max = float(self.schedule.integral(np.float64(self.T * 1.02), np)) * 1.05
        if rho > 0:
            h = 2.0 ** math.floor(math.log2(0.25 / rho))
        else:
            h = 2.0 ** math.ceil(math.log2(max(b_max, 1e-30) / 64.0))
        n_tab = int(math.ceil(b_max / h)) + 2
        if n_tab > _MAX_TABLE:
            raise ValueError(
                f"{self.name}: B(T)={b_max:.4g} needs {n_tab} table steps of h={h:.3g}; reduce beta or T")
        self._h = h
        self._n_tab = n_tab
        n_terms = k + _TAYLOR_EXTRA
        # Scaled Taylor coefficients: Phi(x h) = sum_m x^m P_m with P_m = (A h)^m / m!.
        p = np.empty((n_terms, k, k))
        p[0] = np.eye(k)
        for m in range(1, n_terms):
            p[m] = p[m - 1] @ (self.A * h) / m
        self._p = p
        self._pg = p @ self.noise_factor                       # (n_terms, k, r)
        nodes, weights = np.polynomial.legendre.leggauss(k + _GAUSS_EXTRA)
        self._gl_nodes = (1.0 + nodes) / 2.0                   # on [0, 1]
        self._gl_weights = weights / 2.0
        phi_h = self._taylor(1.0, p, np)
        phi_h_inv = self._taylor(-1.0, p, np)                  # expm(-A h): same series, ||A h|| <= 1/4
        n_h = self._noise_root(1.0, np)
        phi_tab = np.empty((n_tab, k, k))
        inv_tab = np.empty((n_tab, k, k))
        l_tab = np.empty((n_tab, k, k))
        phi_tab[0] = inv_tab[0] = np.eye(k)
        l_tab[0] = np.sqrt(self.sigma0)
        for j in range(1, n_tab):
            phi_tab[j] = phi_h @ phi_tab[j - 1]
            inv_tab[j] = phi_h_inv @ inv_tab[j - 1]
            l_tab[j] = tri_factor(np.concatenate([phi_h @ l_tab[j - 1], n_h], axis=1), np)
        self._phi_tab = phi_tab
        # expm(-A b) from its own table rather than by inverting expm(A b) in float32: Phi(b) is ill-conditioned
        # for the higher orders (cdhold n = 5 at b ~ 4: condition 5e7), and an LU inverse loses that many digits.
        self._inv_tab = inv_tab
        self._l_tab = l_tab

    def _build_prior(self) -> None:
        eig_real = np.linalg.eigvals(self.A).real
        self.is_stable = bool(eig_real.max() < 0)
        if self.is_stable:
            cov = scipy.linalg.solve_continuous_lyapunov(self.A, -self.Q)
            cov = 0.5 * (cov + cov.T)
        else:
            # No stationary law (VE): the prior is the marginal at T of x_0 = 0.
            cov = self.covariance_np(self.T)
        self.prior_covariance = cov
        self.prior_cholesky = np.linalg.cholesky(cov)

    # ------------------------------------------------------------------ float kernels (xp = np or jnp)
    @staticmethod
    def _taylor(x, coeffs, xp):
        """Horner evaluation of sum_m x^m coeffs[m] (coeffs: (M, ...))."""
        acc = coeffs[-1]
        for m in range(coeffs.shape[0] - 2, -1, -1):
            acc = acc * x + coeffs[m]
        return acc

    def _noise_root(self, x, xp, dtype=None):
        """N (*x.shape, k, n r) with N N^T = int_0^{x h} e^{Ar} Q e^{A^T r} dr, Gauss-Legendre on [0, x h]."""
        pg = self._pg if dtype is None else xp.asarray(self._pg, dtype)
        nodes = self._gl_nodes if dtype is None else xp.asarray(self._gl_nodes, dtype)
        weights = self._gl_weights if dtype is None else xp.asarray(self._gl_weights, dtype)
        x = xp.asarray(x)[..., None]                             # (*x, 1)
        xq = x * nodes                                           # (*x, n)
        cols = self._taylor(xq[..., None, None], pg[:, None], xp)  # (*x, n, k, r)
        cols = cols * xp.sqrt(weights * x * self._h)[..., None, None]
        # node-major columns: N = [N_1 | N_2 | ...]
        return xp.swapaxes(cols, -3, -2).reshape(cols.shape[:-3] + (cols.shape[-2], -1))

    def _split(self, b, xp):
        idx = xp.clip(xp.floor(b / self._h), 0, self._n_tab - 1).astype(np.int32)
        x = (b - idx * self._h) / self._h
        return idx, x

    def _expm(self, b, xp, dtype=None):
        """expm(A b) for b of either sign: Taylor in the offset x from the table node of |b|, times the
        node's expm(A h)^j (b >= 0) or expm(-A h)^j (b < 0)."""
        idx, x = self._split(xp.abs(b), xp)
        conv = (lambda a: a) if dtype is None else (lambda a: xp.asarray(a, dtype))
        neg = xp.asarray(b < 0)
        node = xp.where(neg[..., None, None], conv(self._inv_tab)[idx], conv(self._phi_tab)[idx])
        return linalg.matmul_xp(self._taylor(xp.where(neg, -x, x)[..., None, None], conv(self._p), xp), node, xp)

    def _chol_b(self, b, xp, dtype=None):
        idx, x = self._split(b, xp)
        p = self._p if dtype is None else xp.asarray(self._p, dtype)
        tab = self._l_tab if dtype is None else xp.asarray(self._l_tab, dtype)
        kmat = xp.concatenate([linalg.matmul_xp(self._taylor(xp.asarray(x)[..., None, None], p, xp), tab[idx], xp),
                               self._noise_root(x, xp, dtype)], axis=-1)
        return tri_factor(kmat, xp)

    # ------------------------------------------------------------------ public API (JAX)
    def beta(self, t: Array) -> Array:
        """beta(t)."""
        return self.schedule.beta(self._float(t))

    def B(self, t: Array) -> Array:
        """B(t) = int_0^t beta."""
        return self.schedule.integral(self._float(t))

    def drift_matrix(self, t: Array) -> Array:
        """F(t) = beta(t) A, shape (*t.shape, k, k)."""
        beta = self.beta(t)
        return beta[..., None, None] * jnp.asarray(self.A, beta.dtype)

    def diffusion_matrix(self, t: Array) -> Array:
        """G(t) = sqrt(beta(t)) Q^{1/2}, shape (*t.shape, k, k); G G^T = beta Q."""
        beta = self.beta(t)
        return jnp.sqrt(beta)[..., None, None] * jnp.asarray(self.diffusion_factor, beta.dtype)

    def expm_b(self, b: Array) -> Array:
        """expm(A b) for a B-increment b of any sign (negative: the inverse of expm(A |b|))."""
        return table_kernel(self, "_expm", self._float(b))

    def transition(self, *, t: Array, s: Array) -> Array:
        """Phi(t, s) = expm(A (B(t) - B(s))): maps the mean at time s to time t (t < s allowed)."""
        self._check_t(s, "s")
        self._check_t(t)
        return self.expm_b(self.B(t) - self.B(s))

    def cholesky(self, t: Array) -> Array:
        """Lower-triangular L_t with L_t L_t^T = Sigma_t, shape (*t.shape, k, k)."""
        self._check_t(t)
        return table_kernel(self, "_chol_b", self.B(t))

    def prior_sample(self, key: Array, shape: tuple[int, ...]) -> Array:
        """Samples of the prior N(0, Sigma_prior) per pixel, shape (*shape, k)."""
        z = jax.random.normal(key, tuple(shape) + (self.order,), jnp.result_type(float))
        return apply_matrix(jnp.asarray(self.prior_cholesky, z.dtype), z)

    def prior_logp(self, u: Array, batch_ndim: int = 1) -> Array:
        """log N(u; 0, Sigma_prior) summed over every axis after the first ``batch_ndim``."""
        k = self.order
        chol = jnp.asarray(self.prior_cholesky, u.dtype)
        w = linalg.solve_triangular(chol, u.reshape(-1, k).T, lower=True).T.reshape(u.shape)
        logdet = 2.0 * float(np.log(np.diag(self.prior_cholesky)).sum())
        per_pixel = -0.5 * jnp.sum(w * w, axis=-1) - 0.5 * (logdet + k * math.log(2 * math.pi))
        return jnp.sum(per_pixel, axis=tuple(range(batch_ndim, per_pixel.ndim)))

    # ------------------------------------------------------------------ the common family interface
    def known_start(self) -> "LinearSDE":
        """The same process started from a known full state (Sigma_0 = 0): its covariance is Sigma'_t."""
        return _known_start(self)

    def noise_matrix(self, t: Array) -> Array:
        """G G^T (t) = beta(t) Q, shape (*t.shape, k, k)."""
        beta = self.beta(t)
        return beta[..., None, None] * jnp.asarray(self.Q, beta.dtype)

    def drift_trace(self, t: Array, data_shape: tuple[int, ...]) -> Array:
        """tr F over a whole state of data shape ``data_shape``: n_pixels beta(t) tr A."""
        n = int(np.prod(data_shape, dtype=np.int64))
        return self.beta(t) * (n * float(np.trace(self.A)))

    # ------------------------------------------------------------------ public API (host float64)
    # The host twins of the transition, the factor and the drift and noise matrices take a float or an array of
    # times and return (*t.shape, k, k): one call builds a whole quadrature's worth of tables.
    def _beta_np(self, t) -> np.ndarray:
        return np.asarray(self.schedule.beta(np.asarray(t, np.float64), np), np.float64)[..., None, None]

    def drift_matrix_np(self, t: float | np.ndarray) -> np.ndarray:
        return self._beta_np(t) * self.A

    def noise_matrix_np(self, t: float | np.ndarray) -> np.ndarray:
        return self._beta_np(t) * self.Q

    def reverse_covariance_np(self, t_next: float, t: float) -> np.ndarray:
        """Sigma_rev = int_0^b e^{-A r} Q e^{-A^T r} dr, b = B(t) - B(t'): the noise of the exact reverse
        linear step t -> t' < t, by Van Loan's block exponential."""
        b = float(self.schedule.integral(np.float64(t), np) - self.schedule.integral(np.float64(t_next), np))
        k = self.order
        blk = np.zeros((2 * k, 2 * k))
        blk[:k, :k] = self.A
        blk[:k, k:] = self.Q
        blk[k:, k:] = -self.A.T
        e = scipy.linalg.expm(blk * b)
        cov = e[k:, k:].T @ e[:k, k:]
        return 0.5 * (cov + cov.T)

    def expm_b_np(self, b: float | np.ndarray) -> np.ndarray:
        return self._expm(np.asarray(b, np.float64), np)

    def transition_np(self, *, t: float | np.ndarray, s: float | np.ndarray) -> np.ndarray:
        big_b = lambda x: self.schedule.integral(np.asarray(x, np.float64), np)
        return self.expm_b_np(big_b(t) - big_b(s))

    def cholesky_np(self, t: float | np.ndarray) -> np.ndarray:
        return self._chol_b(np.asarray(self.schedule.integral(np.asarray(t, np.float64), np), np.float64), np)


@functools.lru_cache(maxsize=64)
def _known_start(sde: LinearSDE) -> LinearSDE:
    return LinearSDE(sde.name + "|u0", sde.A, sde.Q, sde.schedule, (0.0,) * (sde.order - 1), sde.T, sde.t_min,
                     sde.params)
