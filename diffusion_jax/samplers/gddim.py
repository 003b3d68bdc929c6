r"""gDDIM (Zhang, Tao & Chen 2023): exponential integrator in eps for any linear family.

With s = -R_t^{-T} eps and eps extrapolated by the Lagrange polynomial through the last q+1 values,
the reverse ODE/SDE of the lambda-family  du = [F u - (1 + lambda^2)/2 G G^T s] dt + lambda G dW-bar  is
solved exactly over a step t -> t' (< t):

    u(t') = Psi(t', t) u(t) + (1 + lambda^2) sum_j C_j eps_j + lambda xi,   xi ~ N(0, Sigma_rev(t', t)),
    C_j = int_t^{t'} 1/2 Psi(t', tau) beta Q R_tau^{-T} l_j(tau) dtau,
    Sigma_rev = int_{t'}^{t} Psi(t', tau) beta Q Psi(t', tau)^T dtau.

Because d/dtau [Psi(t', tau) R_tau] = 1/2 Psi(t', tau) beta Q R_tau^{-T}, integration by parts gives

    C_j = l_j(t') R_{t'} - l_j(t) Psi(t', t) R_t - int_t^{t'} Psi(t', tau) R_tau l_j'(tau) dtau,

which needs no inverse of the near-singular R_tau; the last integral is Gauss-Legendre in log tau. Since
sum_j l_j = 1, sum_j C_j = R_{t'} - Psi(t', t) R_t exactly: with eps constant (a single data point and
lambda = 0) every step is exact, whatever the quadrature. The coefficients are computed once per grid
on the host in float64 and cached in memory.

Float32 form of the deterministic step (:func:`gddim_step`). Psi(t', t) of a long backward step is large (e^{lambda dB}) and
Psi u + C eps cancels catastrophically. Since Psi(t', t) m_t = m_{t'}, writing u = m_t D + R_t eps + r
(D the denoiser implied by eps, r the part of u that (D, eps) does not explain) gives the same update as

    u(t') = m_{t'} D_0 + R_{t'} eps_0 + sum_{j >= 1} C_j (eps_j - eps_0) + Psi(t', t) r.

For any exact score r = 0 identically (u | x_0 is Gaussian with mean m_t x_0, so eps = R^{-1}(u - m_t D));
we evaluate the step without the Psi r term, which in float32 is amplified rounding noise. Likewise eps and
D are not formed from the float32 state (eps = K^{-1}(u - m D) multiplies u's rounding by K^{-1}, condition
up to 1e10 at t = 1e-3) but from the carried representation u = m_t c + K_t z (c the last D, z the last eps
plus its multistep terms; param.convert.carried_tables), which is exact in float32 for a constant eps.
"""
from __future__ import annotations

import functools

import numpy as np

from diffusion_jax.param import SquareRoot
from diffusion_jax.param.convert import carried_tables
from diffusion_jax.sdes.base import Family

_GL_NODES = 24


def _lagrange(nodes: np.ndarray, j: int, x: np.ndarray) -> np.ndarray:
    out = np.ones_like(x)
    for m, tm in enumerate(nodes):
        if m != j:
            out = out * (x - tm) / (nodes[j] - tm)
    return out


def _lagrange_deriv(nodes: np.ndarray, j: int, x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for m, tm in enumerate(nodes):
        if m == j:
            continue
        term = np.ones_like(x) / (nodes[j] - tm)
        for p, tp in enumerate(nodes):
            if p not in (j, m):
                term = term * (x - tp) / (nodes[j] - tp)
        out = out + term
    return out


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    return v * np.sqrt(np.clip(w, 0.0, None))[..., None, :]


@functools.lru_cache(maxsize=4096)
def _p_vals(sde: Family, sqrt: SquareRoot, t_next: float, t: float) -> np.ndarray:
    """Psi(t', tau) R_tau at the Gauss-Legendre nodes in log tau of [t', t] (shared by every order)."""
    gl_x, _ = np.polynomial.legendre.leggauss(_GL_NODES)
    v_lo, v_hi = np.log(t_next), np.log(t)
    taus = np.exp(0.5 * (v_hi - v_lo) * gl_x + 0.5 * (v_hi + v_lo))
    return sde.transition_np(t=t_next, s=taus) @ sqrt.np(taus)


@functools.lru_cache(maxsize=64)
def gddim_coefficients(sde: Family, sqrt: SquareRoot, grid: tuple[float, ...], order: int,
                       lam: float) -> dict[str, np.ndarray]:
    """Host float64 step coefficients for the decreasing ``grid`` (N steps):

    ``psi`` (N, k, k), ``coef`` C (N, q+1, k, k) (times 1 + lam^2; C[i, j] multiplies the eps evaluated at
    grid[i - j], slots beyond the available history are zero), ``noise`` factors (N, k, k), ``m_next``
    (N, k) = m_{t'}, ``r_next`` (N, k, k) = R_{t'}, ``zcoef`` = R_{t'}^{-1} C and the carried conversions at
    grid[i] (``w``, ``w_hat``, ``kz``, ``kt``, ``s_inv``: :func:`diffusion_jax.param.convert.carried_tables`);
    a modal family's carry its ``mode_shape`` before (k, k).
    """
    ts = np.asarray(grid, np.float64)
    n = len(ts) - 1
    # Per-step matrices have the family's shape: (k, k), or (*mode_shape, k, k) for a modal family.
    psi = sde.transition_np(t=ts[1:], s=ts[:-1])
    coef = np.zeros((n, order + 1) + psi.shape[1:])
    noise = np.zeros_like(psi)
    m_next = sde.transition_np(t=ts[1:], s=0.0)[..., :, 0]
    r_all = sqrt.np(ts)
    r_next = r_all[1:]
    gl_x, gl_w = np.polynomial.legendre.leggauss(_GL_NODES)
    for i in range(n):
        t, t_next = ts[i], ts[i + 1]
        r_t, r_tn = r_all[i], r_next[i]
        q = min(order, i)
        nodes = ts[i - q:i + 1][::-1]                   # t_i, t_{i-1}, ..., t_{i-q}
        # quadrature in v = log tau over [log t', log t] (R varies on a log scale near 0)
        v_lo, v_hi = np.log(t_next), np.log(t)
        v = 0.5 * (v_hi - v_lo) * gl_x + 0.5 * (v_hi + v_lo)
        taus = np.exp(v)
        wts = 0.5 * (v_hi - v_lo) * gl_w * taus       # d tau = tau dv
        p_vals = _p_vals(sde, sqrt, float(t_next), float(t)) if q else None
        for j in range(q + 1):
            lj_next = _lagrange(nodes, j, np.array([t_next]))[0]
            lj_t = _lagrange(nodes, j, np.array([t]))[0]
            # int_t^{t'} P l_j' dtau = -int_{t'}^{t} P l_j' dtau  (l_0 = 1 and l_0' = 0 when q = 0)
            integral = -np.tensordot(wts * _lagrange_deriv(nodes, j, taus), p_vals, axes=1) if q else 0.0
            coef[i, j] = lj_next * r_tn - lj_t * psi[i] @ r_t - integral
        if lam > 0:
            noise[i] = _psd_sqrt(lam ** 2 * sde.reverse_covariance_np(t_next, t))
    coef *= 1.0 + lam ** 2
    # the carried representation u = m_t c + R_t z (float32 safety, param.convert.carried_tables)
    zcoef = np.linalg.solve(r_next[:, None], coef)
    return dict(psi=psi, coef=coef, zcoef=zcoef, noise=noise, m_next=m_next, r_next=r_next,
                **carried_tables(sde, sqrt, sqrt, ts[:-1]))


def gddim_step(sde: Family, model, t, row: dict, u, c, z, hist):
    r"""One deterministic (lam = 0) step of the eps form from t, float32-safe (module docstring): eps and D from
    the model relative to the carried representation u = m_t c + K_t z (``row``: :func:`gddim_coefficients`'
    row of the step with its carried conversions), then

        u' = m_{t'} D + K_{t'} eps_0 + sum_{j >= 1} C_j (eps_j - eps_0),
        c' = D,   z' = eps_0 + sum_{j >= 1} (K_{t'}^{-1} C_j) (eps_j - eps_0),

    so a constant eps (a single data point) gives z' = eps_0 exactly. ``hist`` (q + 1, ...) holds the earlier
    eps values, newest first. Returns (u', c', z', new history, D)."""
    import jax.numpy as jnp
    eps, d = model.carried(u, t, c, z, row)
    hist = jnp.concatenate([eps[None], hist[:-1]], axis=0)      # hist[j] = eps at t_{i-j}
    # history slots not yet filled have C_j = 0, so their (zero) content never matters
    u_next = sde.lift(row["m_next"], d) + sde.apply(row["r_next"], eps)
    z_next = eps
    for j in range(1, hist.shape[0]):
        u_next = u_next + sde.apply(row["coef"][j], hist[j] - eps)
        z_next = z_next + sde.apply(row["zcoef"][j], hist[j] - eps)
    return u_next, d, z_next, hist, d
