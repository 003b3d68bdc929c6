r"""Numerical checks of the conditions that make a kernel a force-field ODE model (any :class:`Kernel`).

With G = (p_sigma(x | x0), p_sigma(x | x0) f_sigma(x | x0)) the point-source solution (see :mod:`.kernels`):

* **divergence-free space-time flow** (continuity equation) dp/dsigma + div_x(p f) = 0, by centred finite
  differences in float64 (:func:`continuity_residual`): relative step h gives a truncation error O(h^2)
  and a rounding error O(1e-16 / h);
* **normalisation** int p_sigma(x | x0) dx = 1 and the radial law of the log-density equal to the closed-form
  radius CDF used for sampling tests: int_{|x - x0| < s sigma} p dx = P(|n| <= s), by float64 quadrature of
  S_{N-1} R^{N-1} p(R) (:func:`radial_mass`);
* **delta limit** at sigma -> 0: the mass outside a ball of radius eps about x0 tends to 0
  (:func:`delta_limit`, from samples and from the closed form);
* **prior independent of the data** at sigma_max: the total variation between p_{sigma_max}(. | y) and
  p_{sigma_max}(. | 0) for |y| <= data radius is small, TV = E_{x ~ p(.|0)} [(1 - p(x|y)/p(x|0))_+]
  (:func:`prior_dependence`);
* **sampling** agrees with the density: a Kolmogorov-Smirnov test of |x - x0| / sigma against the closed-form
  radius CDF (:func:`ks_radius`).

:func:`check_kernel` runs all of them in dimensions 1 and 2 and raises ``ValueError`` naming what failed.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate, stats

from diffusion_jax.fields.kernels import Kernel, sphere_log_area

Array = Any

__all__ = ["continuity_residual", "radial_mass", "delta_limit", "prior_dependence", "ks_radius", "check_kernel"]


def _points(key: Array, n: int, count: int, sigma: float) -> np.ndarray:
    """Points at radii in [0.3 sigma, 3 sigma] (away from the source) in uniform directions, float64."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().astype(np.uint32))
    g = rng.normal(size=(count, n))
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    return unit * rng.uniform(0.3, 3.0, size=(count, 1)) * sigma


def continuity_residual(kernel: Kernel, n: int, sigma: float = 0.7, key: Array | None = None,
                        count: int = 16, h: float = 1e-4) -> dict:
    """Residual of dp/dsigma + div(p f) at ``count`` points of R^n about x0 (float64 centred differences).

    Returns ``max_abs`` (max |residual|), ``scale`` (max |dp/dsigma|) and ``relative`` = max_abs / scale.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    x0 = np.linspace(-0.3, 0.4, n)
    pts = x0 + _points(key, n, count, sigma)
    hs, hx = h * sigma, h * sigma
    with jax.enable_x64(True):
        def dens(x, s):
            x = jnp.asarray(x, jnp.float64)
            return np.asarray(jnp.exp(kernel.logpdf(x, jnp.broadcast_to(jnp.asarray(x0), x.shape), s)))

        def flux(x, s, i):
            x = jnp.asarray(x, jnp.float64)
            v = kernel.velocity(x, jnp.broadcast_to(jnp.asarray(x0), x.shape), s)
            return dens(x, s) * np.asarray(v[:, i])

        dp = (dens(pts, sigma + hs) - dens(pts, sigma - hs)) / (2 * hs)
        div = np.zeros(count)
        for i in range(n):
            e = np.zeros(n)
            e[i] = hx
            div += (flux(pts + e, sigma, i) - flux(pts - e, sigma, i)) / (2 * hx)
    res = np.abs(dp + div)
    scale = float(np.abs(dp).max())
    return dict(max_abs=float(res.max()), scale=scale, relative=float(res.max()) / scale)


def radial_mass(kernel: Kernel, n: int, sigma: float = 0.7, s: float = math.inf) -> float:
    """int_{|x - x0| < s sigma} p_sigma(x | x0) dx = int_0^{s sigma} S_{n-1} R^{n-1} p(R) dR (float64 quad)."""
    log_area = sphere_log_area(n)
    with jax.enable_x64(True):
        logp = jax.jit(lambda d2: kernel.log_density_d2(d2, jnp.asarray(sigma, jnp.float64), n))

        def integrand(y):                      # in y = R / sigma
            r = y * sigma
            return float(np.exp(log_area + (n - 1) * math.log(max(r, 1e-300))
                                + float(logp(jnp.asarray([r * r], jnp.float64))[0]))) * sigma

        pieces = [0.0, 1e-3, 0.1, 1.0, 10.0, 100.0, np.inf]
        total = 0.0
        for a, b in zip(pieces[:-1], pieces[1:]):
            if a >= s:
                break
            total += integrate.quad(integrand, a, min(b, s), limit=400, epsabs=1e-13, epsrel=1e-11)[0]
    return total


def delta_limit(kernel: Kernel, n: int, eps: float = 1e-2, sigmas=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5),
                key: Array | None = None, count: int = 20000) -> dict:
    """Mass of p_sigma(. | x0) outside the ball of radius ``eps``, per sigma: ``sampled`` and ``closed_form``."""
    key = jax.random.PRNGKey(1) if key is None else key
    x0 = jnp.full((count, n), 0.25)
    sampled, closed = [], []
    for i, s in enumerate(sigmas):
        x = kernel.sample(jax.random.fold_in(key, i), x0, s)
        r = np.linalg.norm(np.asarray(x - x0, np.float64), axis=1)
        sampled.append(float(np.mean(r > eps)))
        closed.append(float(1.0 - kernel.radius_cdf_np(np.asarray([eps / s]), n)[0]))
    return dict(sigmas=tuple(sigmas), sampled=np.array(sampled), closed_form=np.array(closed))


def prior_dependence(kernel: Kernel, n: int, sigma_max: float, data_radius: float = 1.0,
                     key: Array | None = None, count: int = 20000) -> float:
    """Monte Carlo total variation between p_{sigma_max}(. | 0) and p_{sigma_max}(. | y), |y| = data_radius."""
    key = jax.random.PRNGKey(2) if key is None else key
    zero = jnp.zeros((count, n))
    y = jnp.zeros((count, n)).at[:, 0].set(data_radius)
    x = kernel.sample(key, zero, sigma_max)
    log_ratio = kernel.logpdf(x, y, sigma_max) - kernel.logpdf(x, zero, sigma_max)
    return float(jnp.mean(jnp.maximum(0.0, -jnp.expm1(log_ratio))))


def ks_radius(kernel: Kernel, n: int, sigma: float = 0.7, key: Array | None = None, count: int = 4000,
              sampler: Kernel | None = None) -> float:
    """KS p-value of |x - x0| / sigma, x ~ ``sampler`` (default: the kernel), against the kernel's radius CDF."""
    key = jax.random.PRNGKey(3) if key is None else key
    sampler = kernel if sampler is None else sampler
    x0 = jnp.full((count, n), -0.5)
    x = sampler.sample(key, x0, sigma)
    r = np.linalg.norm(np.asarray(x - x0, np.float64), axis=1) / sigma
    return float(stats.kstest(r, lambda s: kernel.radius_cdf_np(s, n)).pvalue)


def check_kernel(kernel: Kernel, dims=(1, 2), continuity_tol: float = 1e-6, mass_tol: float = 1e-6,
                 ks_level: float = 1e-3, sigma_max: float = 80.0, tv_tol: float = 0.05) -> dict:
    """Run every check in each dimension of ``dims``; raise ``ValueError`` listing the failures, else the report.

    Tolerances: relative continuity residual (float64, h = 1e-4: measured <= 1e-8 for the kernels here),
    |mass - 1|, KS p-value, monotone delta limit ending under 1 % of its start, TV at ``sigma_max`` for data of
    radius 1.
    """
    report, failures = {}, []
    for n in dims:
        cont = continuity_residual(kernel, n)
        mass = radial_mass(kernel, n)
        within = radial_mass(kernel, n, s=1.0)
        cdf1 = float(kernel.radius_cdf_np(np.asarray([1.0]), n)[0])
        delta = delta_limit(kernel, n)
        tv = prior_dependence(kernel, n, sigma_max)
        p_ks = ks_radius(kernel, n)
        report[n] = dict(continuity=cont["relative"], mass=mass, mass_within_sigma=(within, cdf1),
                         delta=delta["closed_form"], prior_tv=tv, ks_pvalue=p_ks)
        if not cont["relative"] < continuity_tol:
            failures.append(f"d={n}: continuity residual {cont['relative']:.3g} (relative) >= {continuity_tol}")
        if not abs(mass - 1) < mass_tol:
            failures.append(f"d={n}: density integrates to {mass:.8g}, not 1")
        if not abs(within - cdf1) < 1e3 * mass_tol:
            failures.append(f"d={n}: mass within sigma {within:.6g} != radius CDF {cdf1:.6g}")
        closed = delta["closed_form"]
        if not (np.all(np.diff(closed) <= 1e-12) and closed[-1] < 0.01 * max(closed[0], 1e-300) + 1e-12):
            failures.append(f"d={n}: no delta limit, mass outside eps per sigma {closed}")
        if not tv < tv_tol:
            failures.append(f"d={n}: the prior at sigma_max={sigma_max} depends on the data (TV {tv:.3g})")
        if not p_ks > ks_level:
            failures.append(f"d={n}: samples fail the KS test of the radius law (p = {p_ks:.3g})")
    if failures:
        raise ValueError(f"{kernel!r} is not a valid force-field kernel: " + "; ".join(failures))
    return report
