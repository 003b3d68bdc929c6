r"""Shared pieces of the phase-space peers (CLD-SGM, PSLD): two coordinates per pixel, [x, v] channel blocks.

**Layout.** The peers concatenate position and velocity along the channel axis, ``u = cat([x, v], dim=1)``
(channel ``j C + c`` holds coordinate j of colour c); the library's state is (batch, H, W, C, k) and its
networks see channel ``c k + j``. :func:`to_blocks` / :func:`from_blocks` convert, so the peer's first conv and
input pyramid take their weights unchanged.

**The peer's Cholesky factor.** Both codes add ``numerical_eps`` to the diagonal of the perturbation kernel's
covariance before factorising it: Sigma^eps = Sigma_t + eps I (eps = 1e-9 in every published setting),
L^eps its lower Cholesky factor,

    l11 = sqrt(S_xx),   l21 = S_xv / l11,   l22 = sqrt(S_vv - l21^2) = sqrt(det S / S_xx).

**Scores to the library's eps.** A peer defines the score s of its model from the network output; the library
keeps eps w.r.t. its own K_t, eps_K = -K_t^T s, so that ``score_from_eps`` (s = -K^{-T} eps_K) gives back the
peer's score exactly. The peers' eps w.r.t. L^eps is eps_L = -L^{eps T} s; eps_K = K^T L^{eps,-T} eps_L.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from diffusion_jax import linalg

Array = Any


def to_blocks(u: Array) -> Array:
    """(batch, H, W, C, k) -> (batch, H, W, k C): the peers' ``cat([x, v], dim=1)`` in NHWC."""
    b, h, w, c, k = u.shape
    return jnp.swapaxes(u, -1, -2).reshape(b, h, w, k * c)


def from_blocks(y: Array, k: int) -> Array:
    """(batch, H, W, k C) in [x, v] blocks -> (batch, H, W, C, k)."""
    b, h, w, kc = y.shape
    return jnp.swapaxes(y.reshape(b, h, w, k, kc // k), -1, -2)


def peer_cholesky(cov: Array, eps: float) -> tuple[Array, Array, Array]:
    """(l11, l21, l22) of Sigma + eps I for covariances ``cov`` (..., 2, 2), the peers' formulas."""
    sxx = cov[..., 0, 0] + eps
    sxv = cov[..., 0, 1]
    svv = cov[..., 1, 1] + eps
    l11 = jnp.sqrt(sxx)
    l21 = sxv / l11
    l22 = jnp.sqrt((sxx * svv - sxv * sxv) / sxx)
    return l11, l21, l22


def lower(l11: Array, l21: Array, l22: Array) -> Array:
    """The 2 x 2 lower-triangular matrices [[l11, 0], [l21, l22]], shape (..., 2, 2)."""
    zero = jnp.zeros_like(l11)
    return jnp.stack([jnp.stack([l11, zero], -1), jnp.stack([l21, l22], -1)], -2)


def eps_in_library_basis(sde: Any, k_t: Array, l_eps: Array, eps_l: Array) -> Array:
    """eps_K = K^T L^{-T} eps_L: the library's eps of the model whose eps w.r.t. ``l_eps`` is ``eps_l``."""
    m = jnp.swapaxes(k_t, -1, -2) @ jnp.swapaxes(linalg.inv(l_eps), -1, -2)
    return sde.apply(m, eps_l)


def time_feature(t: Array, embedding_type: str) -> Array:
    """The peers' network time input: log t for Fourier features, t itself for the positional embedding."""
    return jnp.log(t) if embedding_type == "fourier" else t
