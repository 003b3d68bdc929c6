r"""Gaussian mean shift, kernel density estimates, and the VE ODE / mean-shift identity (arXiv 2305.19947).

For data {y_n} (n, d) and bandwidth h, the Gaussian KDE and one mean-shift step are

    log p_h(x) = logsumexp_n(-|x - y_n|^2 / (2 h^2)) - log n - (d/2) log(2 pi h^2),
    m_h(x)     = sum_n w_n y_n,   w_n = softmax_n(-|x - y_n|^2 / (2 h^2)).

Mean shift is an EM (minorise-maximise) step for the KDE at the same bandwidth, so log p_h(m_h(x)) >= log p_h(x).
Annealed mean shift iterates x_{i+1} = m_{h_i}(x_i) on a decreasing sequence h_0 > h_1 > ...

VE identity. The optimal denoiser of the empirical distribution under the VE kernel N(x; y, sigma^2 I) is
the posterior mean, i.e. exactly m_sigma(x). One Euler step of the VE PF-ODE dx/dsigma = (x - D*(x, sigma))/sigma
from sigma to sigma' therefore reads

    x' = x + (sigma' - sigma) (x - m_sigma(x)) / sigma = (sigma'/sigma) x + (1 - sigma'/sigma) m_sigma(x),

a convex combination of the current point and its mean-shift image (sigma' < sigma). Any linear family with
k = 1 (VP too) has the same ODE in the rescaled coordinate xhat = u / m_t with sigma(t) = sqrt(Sigma_t) / m_t
(:func:`samplers.grids.noise_level`; for VE, sigma(t) = sqrt(B(t)) = sqrt(s(t)^2 - s(0)^2) with the
schedule's geometric s(t), and m_t = 1). :func:`euler_mean_shift_identity` evaluates both sides, the
left one with the library's :func:`exact.empirical_denoiser`, the right one with :func:`mean_shift_step`.

The view needs one scalar law for every data dimension. A modal family (blurring diffusion: mean coefficient
a_f(t) per mode f of an orthogonal basis V) has none: its optimal denoiser weighs mode f of the data with its
own bandwidth sigma_f(t) = s_f(t) / a_f(t) (exact.py, "Modal families"), an anisotropic kernel in mode
coordinates rather than one Gaussian of bandwidth sigma, and no rescaling of u turns its PF-ODE into the VE
ODE. :func:`euler_mean_shift_identity` rejects such a family up front; its trajectories are analysed by
:mod:`.geometry` and :func:`.deviation.score_deviation` (with :func:`exact.empirical_denoiser`).

Numerics: weights are formed as exp(-(d_n - d_min) / (2 h^2)) with squared distances taken from explicit
differences (not |x|^2 - 2 x.y + |y|^2, which cancels when x is near a data point at small h), and the data
are streamed in chunks with an online softmax, so memory is O(batch * chunk * d).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_jax import exact, linalg
from diffusion_jax.analysis.geometry import reference_mean_coefficient
from diffusion_jax.samplers.grids import noise_level
from diffusion_jax.sdes.base import Family

Array = Any

__all__ = ["kernel_weighted_mean", "mean_shift_step", "gaussian_kde_logpdf", "annealed_mean_shift",
           "euler_mean_shift_identity", "check_scalar_law"]


def kernel_weighted_mean(data: Array, x: Array, log_ratio: Callable[[Array, Array], Array],
                         chunk: int = 256) -> tuple[Array, Array, Array]:
    r"""Kernel-weighted mean of ``data`` (n, d) for each query in ``x`` (M, d), radial kernels.

    The weight of y_n is w(|x - y_n|^2) for a decreasing w, given through
    ``log_ratio(d2, d2_min) = log w(d2) - log w(d2_min)`` (<= 0, evaluated only with d2 >= d2_min), so that
    the nearest point has weight exactly 1 and nothing overflows. Returns (mean (M, d), d2_min (M,),
    total (M,)) with total = sum_n w_n / w(d2_min), hence log sum_n w_n = log w(d2_min) + log total.
    """
    data = jnp.asarray(data)
    x = jnp.asarray(x)
    if data.ndim != 2 or x.ndim != 2 or data.shape[1] != x.shape[1]:
        raise ValueError(f"need data (n, d) and queries (M, d), got {data.shape} and {x.shape}")
    dtype = jnp.result_type(x.dtype, data.dtype, float)
    x = x.astype(dtype)
    n, d = data.shape
    chunk = int(max(1, min(int(chunk), n)))

    def update(carry, y):
        dmin, tot, acc = carry
        y = y.astype(dtype)
        diff = x[:, None, :] - y[None, :, :]                                    # (M, c, d)
        dist = jnp.sum(diff * diff, axis=-1)                                    # (M, c)
        new_min = jnp.minimum(dmin, jnp.min(dist, axis=-1))
        # the first chunk has dmin = inf: its rescale factor multiplies zeros
        scale = jnp.where(jnp.isfinite(dmin), jnp.exp(log_ratio(dmin, new_min)), 0.0)
        p = jnp.exp(log_ratio(dist, new_min[:, None]))
        return new_min, tot * scale + jnp.sum(p, -1), acc * scale[:, None] + linalg.matmul(p, y)

    m = x.shape[0]
    carry = (jnp.full((m,), jnp.inf, dtype), jnp.zeros((m,), dtype), jnp.zeros((m, d), dtype))
    n_full = n // chunk
    if n_full > 0:
        carry, _ = lax.scan(lambda c, i: (update(c, lax.dynamic_slice_in_dim(data, i * chunk, chunk, 0)), None),
                            carry, jnp.arange(n_full))
    if n_full * chunk < n:
        carry = update(carry, data[n_full * chunk:])
    dmin, tot, acc = carry
    return acc / tot[:, None], dmin, tot


def _gaussian_log_ratio(bandwidth: Array) -> Callable[[Array, Array], Array]:
    inv = 0.5 / jnp.square(bandwidth)
    # subtract before scaling: at small h the scaled distances are huge, their difference is not
    return lambda d2, d2min: -(d2 - d2min) * inv


def _check_bandwidth(bandwidth: Any) -> None:
    if not isinstance(bandwidth, jax.core.Tracer):
        b = np.asarray(bandwidth, np.float64)
        if b.size and not (np.all(np.isfinite(b)) and b.min() > 0):
            raise ValueError(f"bandwidth must be positive and finite, got {bandwidth!r}")


@functools.partial(jax.jit, static_argnums=3)
def _gaussian_weighted(data: Array, x: Array, h: Array, chunk: int) -> tuple[Array, Array, Array]:
    return kernel_weighted_mean(data, x, _gaussian_log_ratio(h), chunk)


def mean_shift_step(data: Array, x: Array, bandwidth: float | Array, chunk: int = 256) -> Array:
    """One Gaussian mean-shift step m_h(x) = sum_n softmax_n(-|x - y_n|^2 / 2h^2) y_n for x (M, d)."""
    _check_bandwidth(bandwidth)
    return _gaussian_weighted(data, x, jnp.asarray(bandwidth), int(chunk))[0]


def gaussian_kde_logpdf(data: Array, x: Array, bandwidth: float | Array, chunk: int = 256) -> Array:
    """log of the normalised Gaussian KDE (1/n) sum_n N(x; y_n, h^2 I_d) at each query x (M, d): shape (M,)."""
    _check_bandwidth(bandwidth)
    h = jnp.asarray(bandwidth)
    _, dmin, tot = _gaussian_weighted(data, x, h, int(chunk))
    n, d = jnp.shape(data)
    return (-0.5 * dmin / jnp.square(h) + jnp.log(tot) - math.log(n)
            - 0.5 * d * jnp.log(2.0 * math.pi * jnp.square(h)))


def annealed_mean_shift(data: Array, x: Array, sigmas: Array, chunk: int = 256) -> tuple[Array, Array]:
    """x_{i+1} = m_{sigma_i}(x_i) for each bandwidth in ``sigmas`` (L,); returns (x_L, path (L+1, M, d))."""
    sigmas = jnp.asarray(sigmas)
    _check_bandwidth(sigmas)
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D sequence of bandwidths, got shape {sigmas.shape}")
    return _annealed(jnp.asarray(data), jnp.asarray(x), sigmas, int(chunk))


@functools.partial(jax.jit, static_argnums=3)
def _annealed(data: Array, x: Array, sigmas: Array, chunk: int) -> tuple[Array, Array]:
    def step(xx, h):
        nxt = _gaussian_weighted(data, xx, h, chunk)[0].astype(xx.dtype)
        return nxt, nxt

    x_fin, path = lax.scan(step, x, sigmas)
    return x_fin, jnp.concatenate([x[None], path])


@functools.partial(jax.jit, static_argnums=(0, 4))
def _empirical_batch(sde: Family, data: Array, u: Array, t: Array, chunk: int) -> Array:
    return exact.empirical_denoiser(sde, data, u, t, chunk)


def check_scalar_law(sde: Family, ts: float | Sequence[float] = ()) -> None:
    r"""Raise a ValueError unless every data dimension has the same scalar law N(m_t x_0, s_t^2) (k = 1).

    Checked on the host (nothing is compiled) at the times ``ts`` and at T, where a per-mode decay such as
    blurring is largest (at t -> 0 every a_f(t) -> 1, so small times alone would not reveal it).
    """
    if sde.order != 1:
        raise ValueError(f"{sde.name}: the mean-shift view holds for scalar (k = 1) families; "
                         f"this one has k = {sde.order}")
    for t in tuple(float(v) for v in np.atleast_1d(ts)) + (sde.T,):
        m = np.asarray(sde.transition_np(t=t, s=0.0), np.float64).ravel()      # one entry per mode (1 if shared)
        var = np.asarray(sde.covariance_np(t), np.float64).ravel()
        for what, v in (("mean coefficient", m), ("variance", var)):
            if np.ptp(v) > 1e-9 * np.max(np.abs(v)):
                raise ValueError(
                    f"{sde.name}: the mean-shift view needs one scalar law for every data dimension (k = 1 and "
                    f"the same mean coefficient and variance in every mode), but this family's {what} differs "
                    f"across its {v.size} modes (at t = {t:.3g}: {v.min():.3g} to {v.max():.3g}), so its "
                    f"optimal denoiser is a per-mode (anisotropic) kernel, not a Gaussian mean-shift step. "
                    f"Use analysis.score_deviation / exact.empirical_denoiser and the trajectory geometry "
                    f"(analysis.trajectory_geometry) instead.")


def euler_mean_shift_identity(sde: Family, data: Array, x: Array, t: float, t_next: float,
                              chunk: int = 256) -> dict[str, Array]:
    r"""Both sides of the Euler step / mean-shift identity for a k = 1 family, in xhat = u / m_t.

    ``x`` (M, d) are points xhat at time t (for VE the states themselves). With sigma = sigma(t),
    sigma' = sigma(t_next) from :func:`noise_level`:

    * ``euler``  = xhat + (sigma' - sigma) (xhat - D*(u, t)) / sigma, D* from :func:`exact.empirical_denoiser`
      at the state u = m_t xhat (the optimal denoiser of the empirical data);
    * ``convex`` = (sigma'/sigma) xhat + (1 - sigma'/sigma) m_sigma(xhat), m from :func:`mean_shift_step`.

    Also returned: ``denoiser`` D*, ``mean_shift`` m_sigma(xhat), ``sigma``, ``sigma_next`` and ``m_next``
    (the state at t_next is u' = m_next * xhat').

    Families with k >= 2 and modal families (a mean coefficient per mode, e.g. blurring) raise a ValueError
    before anything is compiled (:func:`check_scalar_law`).
    """
    if not (0 < t_next < t <= sde.T):
        raise ValueError(f"need 0 < t_next < t <= T, got t={t}, t_next={t_next}")
    check_scalar_law(sde, (t, t_next))
    sig, sig_next = (float(v) for v in noise_level(sde, np.array([t, t_next])))
    m_t = reference_mean_coefficient(sde, t)
    m_next = reference_mean_coefficient(sde, t_next)
    x = jnp.asarray(x)
    data = jnp.asarray(data)
    u = (m_t * x)[..., None]                                                   # (M, d, 1)
    den = _empirical_batch(sde, data, u, jnp.asarray(t, u.dtype), int(chunk))
    euler = x + (sig_next - sig) * (x - den) / sig
    ms = mean_shift_step(data, x, sig, chunk)
    ratio = sig_next / sig
    convex = ratio * x + (1.0 - ratio) * ms
    return dict(euler=euler, convex=convex, denoiser=den, mean_shift=ms, sigma=sig, sigma_next=sig_next,
                m_next=m_next)
