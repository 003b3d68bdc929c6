r"""PFGM++ (Xu et al., arXiv 2302.04265) in the EDM parameterisation, with an exact empirical denoiser.

Setting. Data x in R^N are augmented by D extra dimensions; only the norm r of the augmentation matters.
With the alignment r = sigma sqrt(D) the perturbation kernel of PFGM++ is

    p_sigma(x | y) = C_{N,D} / (sigma^N D^{N/2}) * (1 + ||x - y||^2 / (D sigma^2))^{-(N+D)/2}
                   propto (||x - y||^2 + r^2)^{-(N+D)/2},
    C_{N,D} = Gamma((N+D)/2) / (Gamma(D/2) pi^{N/2}),

i.e. a multivariate Student-t with D degrees of freedom and scale sigma (the normalising constant is the
Student-t one). Radially, R = ||x - y|| has R^2 / r^2 ~ BetaPrime(N/2, D/2) and the direction is uniform.
We sample it as the Gaussian scale mixture x = y + sigma sqrt(D / (2 G)) g, g ~ N(0, I_N), G ~ Gamma(D/2):
then R^2/r^2 = (|g|^2/2) / G is a ratio of independent Gamma(N/2) and Gamma(D/2) variables, which is
BetaPrime(N/2, D/2) (the same law as b/(1-b), b ~ Beta(N/2, D/2), without the 1 - b cancellation at large D).
As D -> infinity, 2G/D -> 1 and the kernel becomes N(y, sigma^2 I): VE / EDM (D = ``math.inf`` here).

Training (PFGM++ with the EDM recipe): x = y + perturbation at sigma ~ exp(N(P_mean, P_std^2)) (-1.2, 1.2),
loss lambda(sigma) ||D_theta(x, sigma) - y||^2 with lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 and
D_theta = c_skip x + c_out F_theta(c_in x, c_noise), c_skip = sigma_d^2/(sigma^2 + sigma_d^2),
c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2), c_in = 1/sqrt(sigma^2 + sigma_d^2), c_noise = log(sigma)/4.
The minimiser is the posterior mean E[y | x] under the PFGM++ kernel.

Sampling. The PFGM++ field lines, written in sigma = r / sqrt(D), are the EDM ODE
dx/dsigma = (x - D(x, sigma)) / sigma with D the posterior mean under the PFGM++ kernel. The prior is
p_{r_max}, the data distribution convolved with the kernel at sigma_max; for sigma_max much larger than the
data it is the kernel centred at 0, which is what :func:`prior_sample` draws (as the reference code of the
paper does). Training and sampling go through the library's loop and samplers: the ``pfgmpp`` family
(:mod:`.family`, ``families.make("pfgmpp", D=...)``) is the VE core with this kernel's noise and prior, and
``samplers.sample`` (e.g. ``edm_heun``) integrates the ODE; :func:`edm_sigmas` is EDM's noise grid.

The kernel maths lives in :class:`diffusion_jax.fields.kernels.StudentT`; the functions here are its
PFGM++-named entry points with D passed explicitly.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.fields.kernels import StudentT, student_t_log_normaliser

Array = Any
DenoiserFn = Callable[[Array, Array], Array]

__all__ = [
    "kernel_log_normaliser", "sample_kernel", "kernel_logpdf", "prior_sample", "edm_preconditioning",
    "precondition", "loss_weight", "lognormal_sigma", "denoiser_loss", "empirical_denoiser", "edm_sigmas",
]


# ------------------------------------------------------------------ the kernel (fields.kernels.StudentT)
def _check_d(D: float) -> float:
    return StudentT(D).D


def _data_dim(y: Array) -> int:
    if jnp.ndim(y) < 2:
        raise ValueError(f"data must have shape (batch, *shape), got {jnp.shape(y)}")
    return int(np.prod(jnp.shape(y)[1:]))


def _per_example(sigma: Array, y: Array) -> Array:
    """sigma (scalar or (batch,)) broadcast against y (batch, *shape)."""
    s = jnp.asarray(sigma, jnp.result_type(y.dtype, float))
    if s.ndim == 0:
        s = jnp.broadcast_to(s, y.shape[:1])
    if s.shape != y.shape[:1]:
        raise ValueError(f"sigma must be a scalar or have shape ({y.shape[0]},), got {s.shape}")
    return s.reshape(s.shape + (1,) * (y.ndim - 1))


def kernel_log_normaliser(N: int, D: float) -> float:
    """log C_{N,D} - (N/2) log D = lgamma((N+D)/2) - lgamma(D/2) - (N/2) log(pi D) (host float64).

    log p_sigma(x|y) = this - N log sigma - (N+D)/2 log1p(||x-y||^2 / (D sigma^2)); for D = inf the Gaussian
    constant -(N/2) log(2 pi) (:func:`fields.kernels.student_t_log_normaliser`).
    """
    return student_t_log_normaliser(N, _check_d(D))


def sample_kernel(key: Array, y: Array, sigma: float | Array, D: float) -> Array:
    """x ~ p_sigma(. | y) for each row of y (batch, *shape); sigma a scalar or (batch,); D = math.inf: Gaussian.

    x = y + sigma sqrt(D / (2 G)) g with g ~ N(0, I_N), G ~ Gamma(D/2) per example (see the module docstring).
    """
    return StudentT(D).sample(key, y, sigma)


def kernel_logpdf(x: Array, y: Array, sigma: float | Array, D: float) -> Array:
    """log p_sigma(x | y), normalised, for rows x, y of shape (batch, *shape): shape (batch,)."""
    return StudentT(D).logpdf(x, y, sigma)


def prior_sample(key: Array, shape: tuple[int, ...], sigma_max: float, D: float, dtype: Any = None) -> Array:
    """x ~ p_{sigma_max}(. | 0), shape (batch, *data_shape): the PFGM++ prior for sigma_max >> data scale."""
    return StudentT(D).prior_sample(key, shape, sigma_max, dtype)


# ------------------------------------------------------------------ EDM preconditioning and loss
def edm_preconditioning(sigma: Array, sigma_data: float = 0.5) -> tuple[Array, Array, Array, Array]:
    """(c_skip, c_out, c_in, c_noise) of EDM at noise level sigma."""
    sigma = jnp.asarray(sigma)
    s2 = jnp.square(sigma) + sigma_data ** 2
    return sigma_data ** 2 / s2, sigma * sigma_data / jnp.sqrt(s2), 1.0 / jnp.sqrt(s2), jnp.log(sigma) / 4.0


def loss_weight(sigma: Array, sigma_data: float = 0.5) -> Array:
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 = 1 / c_out^2."""
    sigma = jnp.asarray(sigma)
    return (jnp.square(sigma) + sigma_data ** 2) / jnp.square(sigma * sigma_data)


def precondition(net_fn: Callable[[Array, Array], Array], sigma_data: float = 0.5) -> DenoiserFn:
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) for a raw network ``net_fn(x_in, c_noise)``.

    x has shape (batch, *shape) and sigma shape (batch,) (or a scalar, broadcast).
    """
    def denoiser(x: Array, sigma: Array) -> Array:
        s = _per_example(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_preconditioning(s, sigma_data)
        return c_skip * x + c_out * net_fn(c_in * x, c_noise.reshape(-1))
    return denoiser


def lognormal_sigma(p_mean: float = -1.2, p_std: float = 1.2) -> Callable[[Array, int], Array]:
    """EDM's training noise levels: sigma = exp(P_mean + P_std z), z ~ N(0, 1)."""
    def draw(key: Array, n: int) -> Array:
        return jnp.exp(p_mean + p_std * jax.random.normal(key, (n,)))
    return draw


def denoiser_loss(denoiser_fn: DenoiserFn, key: Array, y: Array, D: float,
                  sigma_sampler: Callable[[Array, int], Array] | None = None,
                  sigma_data: float = 0.5) -> Array:
    """E_sigma E_{x ~ p_sigma(.|y)} lambda(sigma) ||D(x, sigma) - y||^2, averaged over the batch y (batch, *shape).

    The squared norm is summed over the data dimensions and divided by N (a per-dimension mean, as EDM).
    """
    y = jnp.asarray(y)
    n = _data_dim(y)
    draw = sigma_sampler or lognormal_sigma()
    k_sig, k_kernel = jax.random.split(key)
    sigma = draw(k_sig, y.shape[0]).astype(jnp.result_type(y.dtype, float))
    x = sample_kernel(k_kernel, y, sigma, D)
    err = jnp.sum(jnp.square(denoiser_fn(x, sigma) - y).reshape(y.shape[0], -1), axis=-1) / n
    return jnp.mean(loss_weight(sigma, sigma_data) * err)


# ------------------------------------------------------------------ the optimal denoiser of a data set
def empirical_denoiser(data: Array, x: Array, sigma: float | Array, D: float, chunk: int = 1024) -> Array:
    r"""E[y | x] for the empirical distribution of ``data`` (n, *shape) under the PFGM++ kernel, x (M, *shape).

        D*(x, sigma) = sum_n w_n y_n / sum_n w_n,   w_n = (||x - y_n||^2 + r^2)^{-(N+D)/2},  r^2 = D sigma^2,

    (w_n = exp(-||x - y_n||^2 / 2 sigma^2) for D = inf: a Gaussian mean-shift step); weights relative to the
    nearest point, streamed over chunks (:meth:`fields.kernels.Kernel.empirical_denoiser`).
    ``sigma`` is a scalar (one noise level for the batch).
    """
    return StudentT(D).empirical_denoiser(data, x, sigma, chunk)


# ------------------------------------------------------------------ the EDM noise grid
def edm_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               append_zero: bool = True) -> np.ndarray:
    """Karras et al.'s grid sigma_i = (s_max^{1/rho} + i/(n-1) (s_min^{1/rho} - s_max^{1/rho}))^rho, i < n,
    decreasing, float64, with a final 0 appended by default (n + 1 values then)."""
    if not (isinstance(n, (int, np.integer)) and n >= 2):
        raise ValueError(f"need n >= 2 noise levels, got {n!r}")
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = np.arange(n) / (n - 1)
    s = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    s[0], s[-1] = sigma_max, sigma_min
    return np.concatenate([s, [0.0]]) if append_zero else s
