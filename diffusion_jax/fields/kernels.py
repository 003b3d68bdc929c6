r"""Force-field ODE models through their perturbation kernels: one interface, five kernels.

**The defining condition.** An ODE dx/dt = f_t(x) on R^N transports densities by the continuity equation
dp_t/dt + div(p_t f_t) = 0: the space-time vector (p_t, p_t f_t) is divergence-free in R^{N+1}. Take a
point-source solution (a Green's function) G(t; x, x0) = (G_1, G_{2..N+1}) with div_(t,x) G = 0,
G_1(0; ., x0) = delta_{x0} and int G_1 dx = 1; then

    p_t(x | x0) = G_1                (the perturbation kernel),
    f_t(x | x0) = G_{2..} / G_1      (the conditional velocity),
    f_t(x)      = E[f_t(x | x0) | x_t = x]   (the marginal velocity, a posterior average),

and the data law convolved with p_t is transported by f_t. Every kernel here is **radial and a scale
family**: p_t(x | x0) = t^{-N} q(|x - x0| / t), i.e. x_t = x0 + t rho u with a radius rho of fixed law and
u uniform on the sphere. For such a kernel f_t(x | x0) = (x - x0) / t solves the continuity equation:
with y = (x - x0)/t, d/dt [t^{-N} q(|y|)] = -t^{-N-1} (N q + y . grad q) and
div(t^{-N} q (x - x0)/t) = t^{-N-1} (N q + y . grad q). So the marginal velocity is

    f_t(x) = (x - E[x0 | x_t = x]) / t,

the VE / EDM probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma with D the posterior mean under
the kernel: a denoiser is all a network has to learn; only the noise law and the prior change.

**Noise-level alignment with the Gaussian (VE) case.** Each kernel is parameterised by the Gaussian-aligned
noise level sigma, x = x0 + sigma n with n the standardised noise (``noise``); ``native_scale(sigma, N)``
returns the kernel's own time (PFGM's z, PFGM++'s r, a radial CDF's t). Since x/t and x/sigma differ by a
constant, dx/dsigma = (x - x0)/sigma as well: the field lines are the same in either time.

Kernels (R = |x - x0|, all normalised on R^N):

* :class:`Gaussian` -- VE / EDM: n ~ N(0, I_N), R / sigma ~ chi_N.
* :class:`StudentT` -- PFGM++ with D augmented dimensions (Xu et al. 2023): p propto (R^2 + r^2)^{-(N+D)/2},
  r = sigma sqrt(D), i.e. a multivariate Student-t with D degrees of freedom and scale sigma,
  log p = lgamma((N+D)/2) - lgamma(D/2) - (N/2) log(pi D) - N log sigma - (N+D)/2 log1p(R^2/(D sigma^2)).
  R^2/r^2 ~ BetaPrime(N/2, D/2); sampled as the Gaussian scale mixture n = sqrt(D / (2 G)) g,
  g ~ N(0, I_N), G ~ Gamma(D/2) (then R^2/r^2 = (|g|^2/2)/G, a ratio of independent Gamma(N/2) and
  Gamma(D/2) variables: BetaPrime(N/2, D/2), with no 1 - b cancellation at large D). D -> inf is VE.
* :func:`pfgm` -- PFGM (Xu et al. 2022): gravitation in N + 1 dimensions. The only (N+1)-isotropic
  Green's function is G = C (t, x - x0) / (t^2 + R^2)^{(N+1)/2}, C = Gamma((N+1)/2) / pi^{(N+1)/2}: a
  multivariate Cauchy of scale t, i.e. StudentT(D = 1) with z = r = sigma.
* :class:`RadialCDF` -- any radial CDF Psi of the standardised radius: rho ~ Psi, spread uniformly over
  the sphere, R = c_N sigma rho. The density is p(x | x0) = Psi'(R/a) / (a S_{N-1} R^{N-1}), a = c_N sigma,
  S_{N-1} = 2 pi^{N/2} / Gamma(N/2) (S_0 = 2). For a general radial CDF psi_t(R) the continuity equation
  gives f = -(d psi/dt) / (R d psi/dR) (x - x0), which is (x - x0)/t for psi_t(R) = Psi(R/t). The radius is
  O(t), not O(t sqrt N) as for the Gaussian, so the **alignment** matches second moments:
  c_N = sqrt(N / E[rho^2]) gives E|x - x0|^2 = N sigma^2, as for N(x0, sigma^2 I_N).
  Presets: :func:`radial_tanh` (Psi = tanh, rho = artanh U, E rho^2 = pi^2/12) and :func:`radial_exp`
  (Psi = 1 - e^{-r}, rho ~ Exp(1), E rho^2 = 2); a user CDF is validated (Psi(0) = 0, increasing, -> 1,
  finite second moment) and inverted by bisection.

The **empirical field** of a finite data set {y_n}: the posterior under the uniform prior on the points has
weights w_n propto p_sigma(x | y_n), so D*(x, sigma) = sum_n w_n y_n / sum_n w_n and the exact marginal
velocity is (x - D*)/sigma (:meth:`Kernel.empirical_denoiser`, :meth:`Kernel.empirical_velocity`).
The prior at sigma_max is the kernel centred at 0 (:meth:`Kernel.prior_sample`): the data convolved with
p_{sigma_max} for sigma_max much larger than the data, as PFGM++ draws it.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate, stats

from diffusion_jax.analysis.meanshift import kernel_weighted_mean

Array = Any

__all__ = ["Kernel", "Gaussian", "StudentT", "RadialCDF", "pfgm", "radial_tanh", "radial_exp", "KERNELS",
           "make_kernel", "validate_radial_cdf", "sphere_log_area", "student_t_log_normaliser"]


def _data_dim(x: Array) -> int:
    if jnp.ndim(x) < 2:
        raise ValueError(f"arrays must have shape (batch, *shape), got {jnp.shape(x)}")
    return int(np.prod(jnp.shape(x)[1:]))


def _per_example(sigma: Array, x: Array) -> Array:
    """sigma (scalar or (batch,)) broadcast against x (batch, *shape)."""
    s = jnp.asarray(sigma, jnp.result_type(x.dtype, float))
    if s.ndim == 0:
        s = jnp.broadcast_to(s, x.shape[:1])
    if s.shape != x.shape[:1]:
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {s.shape}")
    return s.reshape(s.shape + (1,) * (x.ndim - 1))


def sphere_log_area(n: int) -> float:
    """log S_{n-1} = log(2 pi^{n/2} / Gamma(n/2)), the area of the unit sphere in R^n (S_0 = 2 points)."""
    return math.log(2.0) + 0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n)


def student_t_log_normaliser(n: int, D: float) -> float:
    """log C_{N,D} - (N/2) log D = lgamma((N+D)/2) - lgamma(D/2) - (N/2) log(pi D) (host float64).

    For D = inf the Gaussian constant -(N/2) log(2 pi). The two lgamma terms are ~ D log D and cancel, so
    above D = 1e7 the difference lgamma(a + N/2) - lgamma(a) is taken from its asymptotic series.
    """
    if math.isinf(D):
        return -0.5 * n * math.log(2.0 * math.pi)
    if D > 1e7:
        a, h = 0.5 * D, 0.5 * n
        diff = h * math.log(a) + h * (h - 1) / (2 * a) - h * (h - 1) * (2 * h - 1) / (12 * a * a)
        return diff - 0.5 * n * math.log(math.pi * D)
    return math.lgamma(0.5 * (n + D)) - math.lgamma(0.5 * D) - 0.5 * n * math.log(math.pi * D)


class Kernel:
    """A radial scale-family perturbation kernel p_sigma(x | x0) = sigma^{-N} q_N(|x - x0| / sigma).

    Subclasses define the standardised noise (``noise``), the log-density as a function of the squared
    distance (``log_density_d2``), the closed-form law of the standardised radius (``radius_cdf_np``) and the
    kernel's own time (``native_scale``); everything else (sampling, velocity, prior, empirical field) is
    generic. Arrays are batches (batch, *shape) with N = prod(shape); sigma is a scalar or (batch,).
    """

    name: str = "kernel"
    #: the kernel has a finite second moment matched to the Gaussian's (E|n|^2 = N)
    moment_aligned: bool = True

    # ------------------------------------------------------------------ to implement
    def noise(self, key: Array, shape: tuple[int, ...], dtype: Any = None) -> Array:
        """Standardised noise n ~ p_1(. | 0), shape (batch, *data); x = x0 + sigma n."""
        raise NotImplementedError

    def log_density_d2(self, d2: Array, sigma: Array, n: int) -> Array:
        """log p_sigma(x | x0) with d2 = |x - x0|^2 in R^n (normalised)."""
        raise NotImplementedError

    def radius_cdf_np(self, s: np.ndarray, n: int) -> np.ndarray:
        """P(|n| <= s) for the standardised noise in R^n (host float64, closed form)."""
        raise NotImplementedError

    def native_scale(self, sigma: Any, n: int) -> Any:
        """The kernel's own time parameter at Gaussian-aligned noise level sigma in R^n."""
        raise NotImplementedError

    def log_ratio(self, d2: Array, d2min: Array, sigma: Array, n: int) -> Array:
        """log p(d2) - log p(d2min) (<= 0 for d2 >= d2min); subclasses override with cancellation-free forms."""
        return self.log_density_d2(d2, sigma, n) - self.log_density_d2(d2min, sigma, n)

    # ------------------------------------------------------------------ generic
    def sample(self, key: Array, x0: Array, sigma: float | Array) -> Array:
        """x ~ p_sigma(. | x0) for each row of x0 (batch, *shape): x = x0 + sigma n."""
        x0 = jnp.asarray(x0)
        _data_dim(x0)
        dtype = jnp.result_type(x0.dtype, float)
        return x0 + _per_example(sigma, x0) * self.noise(key, x0.shape, dtype)

    def logpdf(self, x: Array, x0: Array, sigma: float | Array) -> Array:
        """log p_sigma(x | x0), normalised on R^N, for rows x, x0 (batch, *shape): shape (batch,)."""
        x = jnp.asarray(x)
        x0 = jnp.asarray(x0)
        if x.shape != x0.shape:
            raise ValueError(f"x and x0 must have the same shape, got {x.shape} and {x0.shape}")
        n = _data_dim(x)
        s = _per_example(sigma, x).reshape(-1)
        d2 = jnp.sum(jnp.square(x - x0).reshape(x.shape[0], -1), axis=-1)
        return self.log_density_d2(d2, s, n)

    def velocity(self, x: Array, x0: Array, sigma: float | Array) -> Array:
        """The conditional velocity dx/dsigma = f_sigma(x | x0) = (x - x0) / sigma (scale family)."""
        x = jnp.asarray(x)
        return (x - jnp.asarray(x0)) / _per_example(sigma, x)

    def prior_sample(self, key: Array, shape: tuple[int, ...], sigma_max: float, dtype: Any = None) -> Array:
        """x ~ p_{sigma_max}(. | 0), shape (batch, *data): the prior for sigma_max much larger than the data."""
        return jnp.asarray(sigma_max, dtype or jnp.result_type(float)) * self.noise(
            key, tuple(shape), dtype or jnp.result_type(float))

    def prior_logpdf(self, x: Array, sigma_max: float) -> Array:
        """log p_{sigma_max}(x | 0) per row of x (batch, *shape)."""
        x = jnp.asarray(x)
        return self.logpdf(x, jnp.zeros_like(x), sigma_max)

    def empirical_denoiser(self, data: Array, x: Array, sigma: float | Array, chunk: int = 1024) -> Array:
        r"""D*(x, sigma) = E[y | x_sigma = x] for the empirical law of ``data`` (n, *shape), x (M, *shape).

        D* = sum_n w_n y_n / sum_n w_n with w_n = p_sigma(x | y_n), computed relative to the nearest point
        (``log_ratio``) and streamed over chunks of the data. ``sigma`` is a scalar (vmap for one per row).
        """
        data = jnp.asarray(data)
        x = jnp.asarray(x)
        if data.shape[1:] != x.shape[1:]:
            raise ValueError(f"data {data.shape[1:]} and x {x.shape[1:]} differ in shape")
        n = _data_dim(data)
        s = jnp.asarray(sigma, jnp.result_type(x.dtype, float))
        if s.ndim != 0:
            raise ValueError(f"sigma must be a scalar here (vmap for per-example noise levels), got {s.shape}")
        log_ratio = lambda d2, d2min: self.log_ratio(d2, d2min, s, n)
        mean, _, _ = kernel_weighted_mean(data.reshape(data.shape[0], -1), x.reshape(x.shape[0], -1),
                                          log_ratio, chunk)
        return mean.reshape(x.shape).astype(x.dtype)

    def empirical_velocity(self, data: Array, x: Array, sigma: float | Array, chunk: int = 1024) -> Array:
        """The exact marginal velocity of the empirical law: E[f(x | y) | x] = (x - D*(x, sigma)) / sigma."""
        return (jnp.asarray(x) - self.empirical_denoiser(data, x, sigma, chunk)) / sigma

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class Gaussian(Kernel):
    """The VE / EDM kernel N(x0, sigma^2 I_N): R / sigma ~ chi_N; native time = sigma."""

    name = "gaussian"

    def noise(self, key, shape, dtype=None):
        return jax.random.normal(key, tuple(shape), dtype or jnp.result_type(float))

    def log_density_d2(self, d2, sigma, n):
        return -0.5 * n * math.log(2 * math.pi) - n * jnp.log(sigma) - 0.5 * d2 / jnp.square(sigma)

    def log_ratio(self, d2, d2min, sigma, n):
        # subtract before scaling: at small sigma the scaled distances are huge, their difference is not
        return -(d2 - d2min) * (0.5 / jnp.square(sigma))

    def radius_cdf_np(self, s, n):
        return stats.chi(n).cdf(np.asarray(s, np.float64))

    def native_scale(self, sigma, n):
        return sigma


def _check_aug_dim(D: Any) -> float:
    try:
        D = float(D)
    except (TypeError, ValueError):
        raise ValueError(f"augmentation dimension D must be a positive number (math.inf for VE), got {D!r}") from None
    if not D > 0:         # also rejects nan
        raise ValueError(f"augmentation dimension D must be > 0 (math.inf for VE/EDM), got {D}")
    return D


class StudentT(Kernel):
    """PFGM++ with D augmented dimensions: a Student-t of D degrees of freedom and scale sigma, r = sigma sqrt(D).

    D = ``math.inf`` is the Gaussian (VE) limit; D = 1 is PFGM's Cauchy kernel (:func:`pfgm`).
    """

    def __init__(self, D: float, name: str = "pfgmpp"):
        self.D = _check_aug_dim(D)
        self.name = name
        self.moment_aligned = math.isinf(self.D)

    def noise(self, key, shape, dtype=None):
        dtype = dtype or jnp.result_type(float)
        k_dir, k_rad = jax.random.split(key)
        g = jax.random.normal(k_dir, tuple(shape), dtype)
        if math.isinf(self.D):
            return g
        gam = jax.random.gamma(k_rad, 0.5 * self.D, tuple(shape[:1]), dtype)
        scale = jnp.sqrt(0.5 * self.D / gam)
        return g * scale.reshape(scale.shape + (1,) * (len(shape) - 1))

    def log_density_d2(self, d2, sigma, n):
        const = student_t_log_normaliser(n, self.D)
        if math.isinf(self.D):
            return const - n * jnp.log(sigma) - 0.5 * d2 / jnp.square(sigma)
        return const - n * jnp.log(sigma) - 0.5 * (n + self.D) * jnp.log1p(d2 / (self.D * jnp.square(sigma)))

    def log_ratio(self, d2, d2min, sigma, n):
        if math.isinf(self.D):
            return -(d2 - d2min) * (0.5 / jnp.square(sigma))
        r2 = self.D * jnp.square(sigma)
        return -0.5 * (n + self.D) * jnp.log1p((d2 - d2min) / (d2min + r2))

    def radius_cdf_np(self, s, n):
        s = np.asarray(s, np.float64)
        if math.isinf(self.D):
            return stats.chi(n).cdf(s)
        # (R/sigma)^2 / D = R^2 / r^2 ~ BetaPrime(N/2, D/2)
        return stats.betaprime(0.5 * n, 0.5 * self.D).cdf(s * s / self.D)

    def native_scale(self, sigma, n):
        """r = sigma sqrt(D) (PFGM++'s alignment); D = inf: sigma."""
        return sigma if math.isinf(self.D) else sigma * math.sqrt(self.D)

    def __repr__(self) -> str:
        return f"StudentT({self.name}, D={self.D})"


def pfgm() -> StudentT:
    """PFGM's (N+1)-dimensional gravitation kernel: multivariate Cauchy of scale z = sigma (StudentT, D = 1)."""
    return StudentT(1.0, name="pfgm")


# ------------------------------------------------------------------ radial-CDF kernels
_CDF_GRID = np.concatenate([[0.0], np.geomspace(1e-6, 1e4, 4001)])


def _host_cdf(cdf: Callable, r: np.ndarray) -> np.ndarray:
    """Psi(r) in float64 on the host (a jax.numpy CDF is evaluated with x64 enabled)."""
    with jax.enable_x64(True):
        return np.asarray(cdf(np.asarray(r, np.float64)), np.float64)


def validate_radial_cdf(cdf: Callable[[Array], Array], name: str = "radial") -> None:
    """Check a standardised radial CDF on a float64 grid of [0, 1e4]; raise ``ValueError`` naming the defect.

    Needs Psi(0) = 0, values in [0, 1], Psi non-decreasing and strictly increasing near 0 (a density of the
    radius), Psi(r) -> 1 (1 - Psi(1e4) < 1e-4), and a finite second moment (for the alignment).
    """
    try:
        vals = _host_cdf(cdf, _CDF_GRID)
    except Exception as e:
        raise ValueError(f"{name}: the CDF could not be evaluated on a float64 array ({e})") from e
    if vals.shape != _CDF_GRID.shape or not np.all(np.isfinite(vals)):
        raise ValueError(f"{name}: the CDF must map an array of radii to finite values of the same shape")
    if abs(vals[0]) > 1e-9:
        raise ValueError(f"{name}: a radial CDF needs Psi(0) = 0, got Psi(0) = {vals[0]:.4g}")
    if vals.min() < -1e-12 or vals.max() > 1 + 1e-12:
        raise ValueError(f"{name}: CDF values must lie in [0, 1], got range [{vals.min():.4g}, {vals.max():.4g}]")
    drops = np.diff(vals)
    if drops.min() < -1e-12:
        i = int(np.argmin(drops))
        raise ValueError(f"{name}: the CDF is not increasing: Psi({_CDF_GRID[i + 1]:.4g}) = {vals[i + 1]:.6g} < "
                         f"Psi({_CDF_GRID[i]:.4g}) = {vals[i]:.6g}")
    if not vals[np.searchsorted(_CDF_GRID, 1e-2)] > 0:
        raise ValueError(f"{name}: the CDF must increase from 0 near r = 0 (it is flat on [0, 1e-2])")
    if not 1 - vals[-1] < 1e-4:
        raise ValueError(f"{name}: a radial CDF must tend to 1 as r -> inf, got Psi(1e4) = {vals[-1]:.6g}")


def _second_moment(cdf: Callable, name: str) -> float:
    """E[rho^2] = int_0^inf 2 r (1 - Psi(r)) dr (float64 quadrature)."""
    # in u = log r: int 2 r^2 (1 - Psi(r)) du, smooth; Simpson on 1e-8 .. 1e6 and on 1e6 .. 1e8
    u = np.linspace(math.log(1e-8), math.log(1e8), 16001)
    r = np.exp(u)
    f = 2.0 * r * r * (1.0 - _host_cdf(cdf, r))
    cut = int(np.searchsorted(r, 1e6))
    at_1e6 = float(integrate.simpson(f[:cut + 1], x=u[:cut + 1])) + 1e-16   # + int_0^1e-8 (negligible)
    val = at_1e6 + float(integrate.simpson(f[cut:], x=u[cut:]))
    # a finite moment has converged by r = 1e6 (the integral from 1e6 to 1e8 adds nothing visible)
    if not (math.isfinite(val) and val > 0 and val - at_1e6 < 1e-6 * val):
        raise ValueError(f"{name}: the radius must have a finite second moment for the alignment E|n|^2 = N "
                         f"(quadrature gave {val:.4g})")
    return float(val)


class RadialCDF(Kernel):
    r"""Radius rho ~ Psi spread uniformly over the sphere, aligned so that E|n|^2 = N (see the module docstring).

    ``cdf``: Psi written with ``jax.numpy`` operations (it is traced for the density and the sampler).
    Optional closed forms: ``inverse`` (U -> Psi^{-1}(U)), ``log_pdf`` (log Psi'), ``second_moment`` (E rho^2);
    without them the density is Psi' by autodiff, sampling inverts Psi by bisection, and E rho^2 comes
    from quadrature. The CDF is validated at construction (:func:`validate_radial_cdf`).
    """

    def __init__(self, cdf: Callable[[Array], Array], name: str = "radial", inverse: Callable | None = None,
                 log_pdf: Callable | None = None, second_moment: float | None = None):
        if not callable(cdf):
            raise ValueError(f"{name}: cdf must be a callable Psi(r) on arrays, got {cdf!r}")
        validate_radial_cdf(cdf, name)
        try:
            jax.eval_shape(jax.vmap(jax.grad(lambda r: cdf(r))), jax.ShapeDtypeStruct((3,), jnp.float32))
        except Exception as e:
            raise ValueError(f"{name}: the CDF must be written with jax.numpy operations (it is "
                             f"differentiated for the density and traced for sampling): {e}") from e
        self.name = name
        self.cdf = cdf
        self.second_moment = float(second_moment) if second_moment is not None else _second_moment(cdf, name)
        self._inverse = inverse
        self._log_pdf = log_pdf
        # bisection bracket: the radius where 1 - Psi falls below 1e-7 (float32 uniforms are < 1 - 6e-8)
        vals = _host_cdf(cdf, _CDF_GRID)
        self._r_hi = float(_CDF_GRID[min(int(np.searchsorted(vals, 1 - 1e-7)), len(_CDF_GRID) - 1)])

    def scale(self, n: int) -> float:
        """c_N = sqrt(N / E[rho^2]): the alignment E|x - x0|^2 = N sigma^2."""
        return math.sqrt(n / self.second_moment)

    def log_pdf_std(self, y: Array) -> Array:
        """log Psi'(y) of the standardised radius."""
        if self._log_pdf is not None:
            return self._log_pdf(y)
        d = jax.vmap(jax.grad(lambda r: self.cdf(r)))(y.reshape(-1)).reshape(y.shape)
        return jnp.log(jnp.maximum(d, jnp.finfo(d.dtype).tiny))

    def inverse_cdf(self, u: Array) -> Array:
        """rho = Psi^{-1}(u): closed form when given, else 60 bisection steps on [0, r_hi]."""
        if self._inverse is not None:
            return self._inverse(u)
        lo = jnp.zeros_like(u)
        hi = jnp.full_like(u, self._r_hi)

        def body(_, c):
            lo, hi = c
            mid = 0.5 * (lo + hi)
            below = self.cdf(mid) < u
            return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 60, body, (lo, hi))
        return 0.5 * (lo + hi)

    def noise(self, key, shape, dtype=None):
        dtype = dtype or jnp.result_type(float)
        shape = tuple(shape)
        n = int(np.prod(shape[1:]))
        k_dir, k_rad = jax.random.split(key)
        g = jax.random.normal(k_dir, shape, dtype).reshape(shape[0], -1)
        unit = g / jnp.linalg.norm(g, axis=-1, keepdims=True)
        rho = self.inverse_cdf(jax.random.uniform(k_rad, shape[:1], dtype))
        return (self.scale(n) * rho[:, None] * unit).reshape(shape)

    def log_density_d2(self, d2, sigma, n):
        a = self.scale(n) * sigma
        r = jnp.sqrt(jnp.maximum(d2, jnp.finfo(jnp.result_type(d2)).tiny))
        return self.log_pdf_std(r / a) - jnp.log(a) - sphere_log_area(n) - (n - 1) * jnp.log(r)

    def log_ratio(self, d2, d2min, sigma, n):
        tiny = jnp.finfo(jnp.result_type(d2)).tiny
        d2, d2min = jnp.maximum(d2, tiny), jnp.maximum(d2min, tiny)
        a = self.scale(n) * sigma
        return (self.log_pdf_std(jnp.sqrt(d2) / a) - self.log_pdf_std(jnp.sqrt(d2min) / a)
                - 0.5 * (n - 1) * (jnp.log(d2) - jnp.log(d2min)))

    def radius_cdf_np(self, s, n):
        return _host_cdf(self.cdf, np.asarray(s, np.float64) / self.scale(n))

    def native_scale(self, sigma, n):
        """t = c_N sigma, the scale of Psi(R / t)."""
        return self.scale(n) * sigma


def _tanh_log_pdf(y):
    # log sech^2 y = 2 (log 2 - y - log1p(e^{-2y})), no overflow for large y
    return 2.0 * (math.log(2.0) - y - jnp.log1p(jnp.exp(-2.0 * y)))


def radial_tanh() -> RadialCDF:
    """Psi(r) = tanh r: rho = artanh(U), Psi' = sech^2, E[rho^2] = pi^2 / 12."""
    return RadialCDF(jnp.tanh, "radial_tanh",
                     inverse=jnp.arctanh, log_pdf=_tanh_log_pdf, second_moment=math.pi ** 2 / 12)


def radial_exp() -> RadialCDF:
    """Psi(r) = 1 - e^{-r}: rho ~ Exp(1), log Psi' = -r, E[rho^2] = 2."""
    return RadialCDF(lambda r: -jnp.expm1(-r), "radial_exp",
                     inverse=lambda u: -jnp.log1p(-u), log_pdf=lambda y: -y, second_moment=2.0)


KERNELS: dict[str, Callable[..., Kernel]] = {
    "gaussian": Gaussian, "ve": Gaussian, "pfgm": pfgm, "cauchy": pfgm, "pfgmpp": StudentT,
    "student_t": StudentT, "radial_tanh": radial_tanh, "radial_exp": radial_exp, "radial": RadialCDF,
}


def make_kernel(name: str, **params: Any) -> Kernel:
    """A kernel by name: gaussian (= ve), pfgm (= cauchy), pfgmpp (= student_t; ``D``), radial_tanh,
    radial_exp, radial (``cdf`` and optional closed forms)."""
    if name not in KERNELS:
        raise ValueError(f"unknown force-field kernel {name!r}; known kernels: {', '.join(sorted(KERNELS))}")
    builder = KERNELS[name]
    try:
        return builder(**params)
    except TypeError as e:
        import inspect
        raise ValueError(f"{name}: bad parameters {sorted(params)} ({e}); {name} accepts "
                         f"{list(inspect.signature(builder).parameters)}") from None
