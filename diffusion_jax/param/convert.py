r"""eps <-> score <-> denoiser conversions, and :class:`Model`: one network seen in every parameterisation.

With u_t = m_t x_0 + K_t eps and K_t K_t^T = Sigma_t (per data dimension, or per mode of a modal family):

    s = -K_t^{-T} eps,     eps = K_t^{-1} (u - m_t D),     D = w^T (K_t^{-1} u - eps) / |w|^2,  w = K_t^{-1} m_t.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from diffusion_jax import linalg
from diffusion_jax.param.roots import OUTPUTS, SquareRoot, square_root

Array = Any


# ------------------------------------------------------------------ conversions (per pixel, or per mode)
# Per-mode algebra goes through the family's ``apply`` / ``lift`` / ``project``, which hold the basis change
# of a modal family (the identity for the pixel-shared ones).
def _inv(k: Array) -> Array:
    return linalg.inv(k)


def score_from_eps(sde: Any, eps: Array, k_t: Array) -> Array:
    """s = -K^{-T} eps."""
    return -sde.apply(jnp.swapaxes(_inv(k_t), -1, -2), eps)


def eps_from_score(sde: Any, score: Array, k_t: Array) -> Array:
    """eps = -K^T s."""
    return -sde.apply(jnp.swapaxes(k_t, -1, -2), score)


def eps_from_denoiser(sde: Any, u: Array, d: Array, m_t: Array, k_t: Array) -> Array:
    """eps = K^{-1} (u - m_t D)."""
    return sde.apply(_inv(k_t), u - sde.lift(m_t, d))


def denoiser_from_eps(sde: Any, u: Array, eps: Array, m_t: Array, k_t: Array) -> Array:
    """D = w^T (K^{-1} u - eps) / |w|^2 with w = K^{-1} m_t."""
    k_inv = _inv(k_t)
    w = linalg.einsum("...ij,...j->...i", k_inv, m_t)
    return sde.project(w / jnp.sum(w * w, axis=-1, keepdims=True), sde.apply(k_inv, u) - eps)


# ------------------------------------------------------------------ carried representation (float32-safe)
def carried_tables(sde: Any, carried: SquareRoot, K: SquareRoot, ts: np.ndarray) -> dict[str, np.ndarray]:
    r"""Host float64 tables, per time t in ``ts``, for conversions relative to a carried representation

        u = m_t c + S_t z        (S = ``carried``, the sampler's square root; c data-shaped, z state-shaped):

    ``w`` = S^{-1} m_t, ``w_hat`` = w / |w|^2, ``kz`` = S^{-1} K_t (the model's eps w.r.t. ``K`` -> eps w.r.t. S),
    ``kt`` = S^T (score -> eps w.r.t. S: eps = -S^T s), ``s_inv`` = S^{-1}. Per mode for a modal family.

    Why: at small t, S_t is ill-conditioned (condition 1.6e5 for TOLD, 3.6e7 for CD-HOLD n = 4, 8.9e9 for
    n = 5 at t = 1e-3) and the exact flow of the sampler expands the near-null directions of Sigma_t (the step
    matrix S_{t'} S_t^{-1} reaches 1.3e4 (TOLD), 1.3e6 (CD-HOLD n = 4), 1.6e10 (n = 6) on an 18-step power grid
    to 1e-3). Forming eps = S^{-1}(u - m D) from a float32 state u turns u's rounding (6e-8 |u| in every
    direction) into eps errors of 6e-8 |u| |S^{-1}|, carried into the next state by S_{t'}: 1e-3 (TOLD) to
    6e-2 (CD-HOLD n = 4) relative on a single data point. Carrying (c, z) instead, eps = z + w (c - D)
    differs from z only by the (exactly zero for a constant D) denoiser change, and no
    float32 inverse of S is ever formed.
    """
    out: dict[str, list] = dict(w=[], w_hat=[], kz=[], kt=[], s_inv=[])
    for t in np.asarray(ts, np.float64):
        s_t = carried.np(t)
        m_t = np.asarray(sde.transition_np(t=t, s=0.0))[..., :, 0]
        s_inv = np.linalg.inv(s_t)
        w = (s_inv @ m_t[..., None])[..., 0]                     # host float64 table
        if K is carried or K.kind == carried.kind:
            kz = np.broadcast_to(np.eye(sde.order), s_t.shape).copy()
        elif carried.kind == "R" and K.kind == "L":              # R = L U: R^{-1} L = U^T (no solve)
            kz = np.broadcast_to(np.swapaxes(np.asarray(carried._rotation(np.float64(t), np)), -1, -2),
                                 s_t.shape).copy()
        else:
            kz = np.linalg.solve(s_t, K.np(t))
        out["w"].append(w)
        out["w_hat"].append(w / np.sum(w * w, axis=-1, keepdims=True))
        out["kz"].append(kz)
        out["kt"].append(np.swapaxes(s_t, -1, -2))
        out["s_inv"].append(s_inv)
    return {k: np.stack(v) for k, v in out.items()}


def carried_conversion(sde: Any, output: str, out: Array, c: Array, z: Array, row: dict) -> tuple[Array, Array]:
    r"""(eps w.r.t. the carried root S, denoiser D) from a network output ``out`` at u = m_t c + S_t z, with
    ``row`` the :func:`carried_tables` entries at t (see there for why):

    * denoiser:  D = out,  eps = z + w (c - D);
    * eps (w.r.t. K):  eps = (S^{-1} K) out,  D = c + w_hat^T (z - eps)   (the Sigma^{-1}-weighted fit);
    * score:  eps = -S^T out,  D as for eps.
    """
    if output == "denoiser":
        return z + sde.lift(row["w"], c - out), out
    eps = sde.apply(row["kz"], out) if output == "eps" else -sde.apply(row["kt"], out)
    return eps, c + sde.project(row["w_hat"], z - eps)


class Model:
    """A function ``fn(u, t_batch)`` seen as eps, score and denoiser, whatever it returns.

    ``output`` says what ``fn`` returns ("eps" w.r.t. the square root ``K``, "score" or "denoiser");
    ``fn`` is called with u of shape (batch, *data, k) and t of shape (batch,). Every conversion costs no
    extra network evaluation.
    """

    def __init__(self, sde: Any, fn: Callable, output: str = "eps", K: str | SquareRoot = "R"):
        if output not in OUTPUTS:
            raise ValueError(f"unknown model output {output!r}; choose one of {OUTPUTS}")
        self.sde = sde
        self.fn = fn
        self.output = output
        self.sqrt = K if isinstance(K, SquareRoot) else square_root(sde, K)

    def _call(self, u: Array, t: Array) -> Array:
        out = self.fn(u, jnp.full((u.shape[0],), t, u.dtype))
        expected = u.shape[:-1] if self.output == "denoiser" else u.shape
        if out.shape != expected:
            raise ValueError(f"fn returned shape {out.shape}, expected {expected} for output={self.output!r} "
                             f"(state shape {u.shape})")
        return out

    def eps(self, u: Array, t: Array) -> Array:
        out = self._call(u, t)
        k_t = self.sqrt(t)
        if self.output == "eps":
            return out
        if self.output == "score":
            return eps_from_score(self.sde, out, k_t)
        return eps_from_denoiser(self.sde, u, out, self.sde.mean_coefficient(t), k_t)

    def score(self, u: Array, t: Array) -> Array:
        out = self._call(u, t)
        if self.output == "score":
            return out
        k_t = self.sqrt(t)
        if self.output == "eps":
            return score_from_eps(self.sde, out, k_t)
        return score_from_eps(self.sde, eps_from_denoiser(self.sde, u, out, self.sde.mean_coefficient(t), k_t), k_t)

    def carried(self, u: Array, t: Array, c: Array, z: Array, row: dict) -> tuple[Array, Array]:
        """(eps w.r.t. the carried root, D) at u = m_t c + S_t z from one evaluation (:func:`carried_conversion`)."""
        return carried_conversion(self.sde, self.output, self._call(u, t), c, z, row)

    def all(self, u: Array, t: Array) -> tuple[Array, Array, Array]:
        """(eps, score, denoiser) from one evaluation."""
        out = self._call(u, t)
        k_t = self.sqrt(t)
        m_t = self.sde.mean_coefficient(t)
        if self.output == "eps":
            eps = out
        elif self.output == "score":
            eps = eps_from_score(self.sde, out, k_t)
        else:
            eps = eps_from_denoiser(self.sde, u, out, m_t, k_t)
        d = out if self.output == "denoiser" else denoiser_from_eps(self.sde, u, eps, m_t, k_t)
        return eps, score_from_eps(self.sde, eps, k_t), d


@functools.lru_cache(maxsize=256)
def with_params(fn: Callable) -> Callable:
    """``fn(u, t)`` as ``apply(params, u, t)`` (params ignored).

    The samplers and the likelihood compile once per ``apply`` function; this wrapper is one object per ``fn``,
    so passing the same ``fn`` again reuses the compiled program. Networks should be passed as
    ``apply(params, u, t)`` with their parameters as an argument instead of a closure over them.
    """
    def apply(params, u, t):
        return fn(u, t)
    return apply
