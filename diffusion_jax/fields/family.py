r"""Force-field ODE models as families: the VE geometry with a kernel's noise law and prior.

For a radial scale-family kernel (:mod:`.kernels`) the conditional velocity is f(x | x0) = (x - x0)/sigma, so
the marginal ODE is dx/dsigma = (x - D(x, sigma)) / sigma with D(x, sigma) = E[x0 | x_sigma = x] under the
kernel. That is the VE probability-flow ODE in its noise level sigma(t) written with a denoiser: with the VE
core (A = 0, Q = 1, Sigma_t = sigma(t)^2, m_t = 1, K_t = sigma(t)) the library's conversions give
eps = (u - D)/sigma, score s = -eps/sigma, and du/dt = -1/2 beta(t) s = sigma'(t) eps = sigma'(t) (u - D)/sigma.
So every deterministic sampler of :mod:`diffusion_jax.samplers` integrates a field model unchanged; what
differs from VE is

* the **training noise**: u_t = x0 + sigma(t) n with n the kernel's standardised noise
  (:meth:`FieldFamily.sample_noise`, the hook that :func:`diffusion_jax.training.losses.perturb` uses); the eps
  regression target is n and its minimiser E[n | u_t] = (u - E[x0 | u_t]) / sigma holds whatever the law of n,
  so the implied denoiser is the posterior mean under the kernel;
* the **prior**: the kernel at sigma(T) centred at 0 (:meth:`FieldFamily.prior_sample`, its log-density
  :meth:`FieldFamily.prior_logp`).

The reverse-time SDE of a non-Gaussian kernel is not the Gaussian one, so stochastic samplers
(euler_maruyama; gddim and sscs with lam > 0) refuse these families (``deterministic_only``).

Names (``families.make`` / ``config.family.name``): ``pfgm`` (Cauchy kernel in N + 1 dimensions),
``pfgmpp`` (Student-t with ``D`` augmented dimensions), ``radial_tanh``, ``radial_exp``; each takes the
VE noise range ``sigma_min`` / ``sigma_max`` (EDM's 0.002 / 80 by default), ``T`` and ``t_min`` (default: the
time where the noise level sigma(t) = sqrt(B(t)) equals sigma_min, so samplers span EDM's range).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.fields.kernels import Kernel, make_kernel
from diffusion_jax.sdes.base import Family
from diffusion_jax.sdes.linear import LinearSDE
from diffusion_jax.sdes.schedules import GeometricSigma

Array = Any

__all__ = ["FieldFamily", "field_family", "FIELD_KERNELS", "empirical_denoiser_fn"]

#: family name -> kernel name (fields.kernels.make_kernel)
FIELD_KERNELS = {"pfgm": "pfgm", "pfgmpp": "pfgmpp", "radial_tanh": "radial_tanh", "radial_exp": "radial_exp"}


class FieldFamily(LinearSDE):
    """The VE core (sigma(t) = sigma_min (sigma_max/sigma_min)^t) whose noise and prior come from ``kernel``."""

    #: only the probability-flow ODE is exact for a non-Gaussian kernel (samplers refuse noise)
    deterministic_only = True

    def __init__(self, kernel: Kernel, name: str, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 T: float = 1.0, t_min: float | None = None, params: dict | None = None):
        if not isinstance(kernel, Kernel):
            raise ValueError(f"{name}: kernel must be a fields.kernels.Kernel, got {kernel!r}")
        for what, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("T", T)):
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ValueError(f"{name}: {what} must be a positive finite number, got {v!r}")
        if not sigma_min < sigma_max:
            raise ValueError(f"{name}: need sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if t_min is None:
            # sigma(t)^2 = sigma_min^2 (e^{2 t log(smax/smin) / T} - 1) = sigma_min^2 at t = T log 2 / (2 log(smax/smin)):
            # the samplers then run over EDM's noise range [sigma_min, ~sigma_max]
            t_min = T * math.log(2.0) / (2.0 * math.log(sigma_max / sigma_min))
        self.kernel = kernel                   # set before the base class freezes the family
        super().__init__(name, [[0.0]], [[1.0]], GeometricSigma(float(sigma_min), float(sigma_max)), (), T, t_min,
                         dict(params or {}, sigma_min=sigma_min, sigma_max=sigma_max))

    def _definition(self):
        try:
            kernel_key = (type(self.kernel).__name__, hash(self.kernel), self.kernel)
        except TypeError:                      # a kernel holding an unhashable user CDF: identity
            kernel_key = ("id", id(self.kernel))
        return (super()._definition(), kernel_key)

    def prior_sigma(self) -> float:
        """sigma(T) = sqrt(B(T)), the noise level the prior is drawn at (about sigma_max)."""
        return float(self.noise_level_np(self.T))

    def sample_noise(self, key: Array, shape: tuple[int, ...], dtype: Any = None) -> Array:
        """The kernel's standardised noise n for states of shape (batch, *data, 1): u_t = x0 + sigma(t) n."""
        shape = tuple(shape)
        if len(shape) < 2 or shape[-1] != 1:
            raise ValueError(f"{self.name}: states have shape (batch, *data, 1), got {shape}")
        return self.kernel.noise(key, shape[:-1], dtype or jnp.result_type(float))[..., None]

    def prior_sample(self, key: Array, shape: tuple[int, ...]) -> Array:
        """u_T = sigma(T) n, n the kernel's noise over (batch, *data): shape (*shape, 1)."""
        n = self.kernel.noise(key, tuple(shape), jnp.result_type(float))
        return (self.prior_sigma() * n)[..., None]

    def prior_logp(self, u: Array, batch_ndim: int = 1) -> Array:
        """log p_{sigma(T)}(x | 0) of the data coordinate, one value per example (the kernel is joint over N)."""
        if batch_ndim != 1:
            raise ValueError(f"{self.name}: the kernel prior is joint over the data axes; use batch_ndim=1")
        return self.kernel.prior_logpdf(u[..., 0], self.prior_sigma())

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"FieldFamily({self.name}, {self.kernel!r}, {ps})"


def field_family(name: str, sigma_min: float = 0.002, sigma_max: float = 80.0, T: float = 1.0,
                 t_min: float | None = None, **kernel_params: Any) -> FieldFamily:
    """Build the field family ``name`` (pfgm, pfgmpp with ``D``, radial_tanh, radial_exp)."""
    if name not in FIELD_KERNELS:
        raise ValueError(f"unknown force-field family {name!r}; known: {', '.join(sorted(FIELD_KERNELS))}")
    kernel = make_kernel(FIELD_KERNELS[name], **kernel_params)
    return FieldFamily(kernel, name, sigma_min, sigma_max, T, t_min, dict(kernel_params))


def empirical_denoiser_fn(sde: Family, data: Array, kernel: Kernel | None = None, chunk: int = 1024):
    """The exact denoiser of the training set ``data`` (n, *data) as ``fn(u, t)`` for ``samplers.sample``
    (``output="denoiser"``): D*(u[..., 0], sigma(t)) under ``kernel`` (default: the family's), per example,
    with sigma(t) = sqrt(B(t)) the VE noise level (``sde`` a field family or VE)."""
    kernel = kernel if kernel is not None else getattr(sde, "kernel", None)
    if kernel is None:
        raise ValueError(f"{sde.name} has no kernel: pass kernel=fields.kernels.Gaussian() for VE")
    data = jnp.asarray(data)

    def fn(u: Array, t: Array) -> Array:
        sigma = jnp.sqrt(sde.B(t))
        one = lambda x, s: kernel.empirical_denoiser(data, x[None], s, chunk)[0]
        return jax.vmap(one)(u[..., 0], sigma)
    return fn
