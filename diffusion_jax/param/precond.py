r"""Preconditioning: the layer between a family-agnostic network and the eps of a linear family.

The network sees a state scaled to unit variance and a time feature, and returns a residual; this
layer turns it into eps w.r.t. K_t (``"R"`` or ``"L"``). For data of variance sigma_data^2 per
dimension, the state's per-coordinate variance is

    v_i(t) = sigma_data^2 m_{t,i}^2 + (Sigma_t)_{ii},       c_in,i(t) = v_i(t)^{-1/2},

so the input u * c_in has unit scale at every t for every family (as EDM's c_in does for VE/VP).
The time feature c_noise(t) is ``time_input``: "1000t" = 1000 t / T (default; the range score_sde's
DDPM++ positional embedding was tuned for), "log_t" = log t (what CLD-SGM feeds NCSN++'s Fourier
features, of scale 16), or "t" = t.

**Mixed score** (CLD-SGM): eps_theta = eps_ref(u, t) + net, where eps_ref is the exact eps of the
Gaussian reference model x_0 ~ N(0, sigma_data^2): u_t ~ N(0, C_t), C_t = sigma_data^2 m m^T + Sigma_t, so
eps_ref = -K_t^T grad log N(u; 0, C_t) = K_t^T C_t^{-1} u. The network then only learns the departure of
the data from a Gaussian; at t = T (where p_T is close to that Gaussian) an untrained network already
matches the prior.

**Scaled residual** (``c_out=True``, with the mixed score): under the Gaussian reference the target eps
scatters around eps_ref with covariance I - K_t^T C_t^{-1} K_t, so the network's residual is multiplied
by c_out = sqrt(diag(I - K^T C^{-1} K)) per coordinate (per mode for a modal family), EDM's c_out in eps
units. Why: the denoiser implied by eps is D = (u - K eps) / m per mode, so an O(1) eps error in a mode
with a tiny mean coefficient (a blurred frequency of bdm, a_f ~ d_min alpha_t) is an O(sigma_t / a_f) error
in D, which exact integrators carry forward; with c_out it is at most sigma_data.

State layout: u has shape (batch, *data, k). Image data (batch, H, W, C, k) is fed to the network as
(batch, H, W, C k); flat data (batch, D, k) as (batch, D k). The output is reshaped back.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from diffusion_jax import linalg
from diffusion_jax.param.roots import SquareRoot, square_root
from diffusion_jax.sdes.base import Family

Array = Any
TIME_INPUTS = ("1000t", "log_t", "t")


class Preconditioner:
    """Maps a network ``net(x, c_noise, train, **kw)`` to eps(u, t) for a linear family."""

    def __init__(self, sde: Family, K: str | SquareRoot = "R", sigma_data: float = 0.5,
                 mixed: bool = False, c_out: bool = False, time_input: str = "1000t"):
        if time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time input {time_input!r} (config.model.time_input); choose one of "
                             f"{TIME_INPUTS}")
        if not (sigma_data > 0):
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        if c_out and not mixed:
            raise ValueError("c_out scales the residual around the mixed-score reference: set mixed=True "
                             "(config.model.mixed_score=True) or c_out=False")
        self.sde = sde
        self.sqrt = K if isinstance(K, SquareRoot) else square_root(sde, K)
        self.sigma_data = float(sigma_data)
        self.mixed = bool(mixed)
        self.scaled = bool(c_out)
        self.time_input = time_input

    def _ref_cov(self, t: Array) -> Array:
        m = self.sde.mean_coefficient(t)
        return self.sigma_data ** 2 * m[..., :, None] * m[..., None, :] + self.sde.covariance(t)

    def c_in(self, t: Array) -> Array:
        """Per-coordinate input scale, shape (*t.shape, k).

        For a modal family the pixel variance is the mean of the per-mode ones (V orthogonal, isotropic data).
        """
        return 1.0 / jnp.sqrt(self.sde.mode_mean(jnp.diagonal(self._ref_cov(t), axis1=-2, axis2=-1)))

    def c_noise(self, t: Array) -> Array:
        if self.time_input == "log_t":
            return jnp.log(t)
        if self.time_input == "t":
            return t
        return 1000.0 * t / self.sde.T

    def eps_ref(self, u: Array, t: Array) -> Array:
        """K_t^T C_t^{-1} u: the eps of the Gaussian reference model (the mixed-score part)."""
        k_t = self.sqrt(t)
        return self.sde.apply(linalg.matmul(jnp.swapaxes(k_t, -1, -2), linalg.inv(self._ref_cov(t))), u)

    def c_out(self, t: Array) -> Array:
        """sqrt(diag(I - K^T C^{-1} K)), shape (*t.shape, [*modes,] k): the reference posterior std of eps.

        With w = K^{-1} m, C = K (I + sigma_data^2 w w^T) K^T, so I - K^T C^{-1} K = sigma_data^2 w w^T /
        (1 + sigma_data^2 |w|^2) (Sherman-Morrison): c_out,i = sigma_data |w_i| / sqrt(1 + sigma_data^2 |w|^2),
        free of the cancellation in 1 - diag(...) when c_out is small.
        """
        w = linalg.solve(self.sqrt(t), self.sde.mean_coefficient(t)[..., None])[..., 0]
        sd = self.sigma_data
        return sd * jnp.abs(w) / jnp.sqrt(1.0 + sd * sd * jnp.sum(w * w, axis=-1, keepdims=True))

    @staticmethod
    def to_network(x: Array) -> Array:
        """(batch, *data, k) -> (batch, H, W, C k) for images or (batch, D k) for flat data."""
        if x.ndim == 5:
            return x.reshape(x.shape[:3] + (-1,))
        return x.reshape(x.shape[0], -1)

    def eps(self, net: Callable[..., Array], u: Array, t: Array, **net_kwargs: Any) -> Array:
        """eps(u, t) with ``t`` of shape (batch,); ``net_kwargs`` go to ``net`` (train, rngs, ...)."""
        t = jnp.asarray(t, u.dtype)
        scale = self.c_in(t)
        scale = scale.reshape(scale.shape[:1] + (1,) * (u.ndim - 2) + scale.shape[1:])
        out = net(self.to_network(u * scale), self.c_noise(t), **net_kwargs)
        out = out.astype(u.dtype).reshape(u.shape)
        if self.scaled:
            c = self.c_out(t)
            out = self.sde.apply(c[..., :, None] * jnp.eye(c.shape[-1], dtype=c.dtype), out)
        if self.mixed:
            out = out + self.eps_ref(u, t)
        return out


def network_channels(sde: Family, data_shape: tuple[int, ...]) -> int:
    """Width of the network's input and output: C k for images (H, W, C), D k for flat data (D,)."""
    if len(data_shape) == 3:
        return data_shape[-1] * sde.order
    if len(data_shape) == 1:
        return data_shape[0] * sde.order
    raise ValueError(f"data must be images (H, W, C) or flat vectors (D,), got data shape {data_shape}")
