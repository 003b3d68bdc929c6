r"""Score-matching losses for every linear family, in eps-prediction form (docs/maths.md section 4).

The network predicts eps w.r.t. a square root K_t of Sigma_t (K K^T = Sigma_t; ``K="R"``, gDDIM, or
``"L"``, Cholesky), i.e. its score is s_theta(u, t) = -K_t^{-T} eps_theta(u, t). Per data dimension:

* **HSM** (hybrid score matching, CLD): the auxiliary initial variables are integrated out through
  Sigma_0, so u_t | x_0 ~ N(m_t x_0, Sigma_t) and with u_t = m_t x_0 + K_t z the regression target is
  eps* = z. The minimiser is eps_theta(u) = E[z | u_t = u] = -K_t^T grad log p_t(u).
* **DSM** (denoising score matching on the full state): a_0 ~ N(0, Sigma_0^aux) is sampled, u_0 = (x_0,
  a_0), and u_t = Phi(t,0) u_0 + K'_t z' where K'_t K'_t^T = Sigma'_t is the covariance of u_t | u_0
  (Sigma_t without the Phi Sigma_0 Phi^T term). The conditional score is -K'^{-T}_t z', so in eps units
  the target is eps* = K_t^T K'^{-T}_t z'. It has the same minimiser as HSM but a larger variance (the
  K'^{-1} of a nearly singular Sigma'_t at small t), which is why CLD introduced HSM.

Weightings of the per-example squared error, averaged over data dimensions:

* ``"eps"``: |eps_theta - eps*|^2 (uniform in eps; DDPM's "simple" loss);
* ``"likelihood"``: beta(t) |G^T (s_theta - s*)|^2 = |W_t (eps_theta - eps*)|^2 with W_t = sqrt(beta)
  G_0^T K_t^{-T} (G_0 G_0^T = Q), the weighting under which the loss integrated over t bounds the
  negative log-likelihood (Song et al. 2021, "Maximum likelihood training of score-based models").

Times are drawn stratified (one uniform offset, then t_i = t_eps + (T - t_eps) frac(offset + i / n)),
which keeps each batch's times spread over [t_eps, T] and lowers the variance of the loss estimate.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusion_jax import linalg
from diffusion_jax.param import SquareRoot
from diffusion_jax.sdes.base import Family

Array = Any
OBJECTIVES = ("hsm", "dsm")
WEIGHTINGS = ("eps", "likelihood")


def check_loss_options(sde: Family, objective: str, weighting: str, t_eps: float) -> None:
    """Raise a ``ValueError`` naming the fix for a bad objective / weighting / t_eps."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown training objective {objective!r}; choose one of {OBJECTIVES}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}")
    if not (0.0 < t_eps < sde.T):
        raise ValueError(f"t_eps must lie in (0, T={sde.T}), got {t_eps}")


def stratified_times(key: Array, n: int, t_eps: float, T: float) -> Array:
    """n times in [t_eps, T]: a shared uniform offset plus i/n, wrapped (low-discrepancy sampling)."""
    offset = jax.random.uniform(key, (), jnp.result_type(float))
    frac = jnp.mod(offset + jnp.arange(n, dtype=offset.dtype) / n, 1.0)
    return t_eps + (T - t_eps) * frac


def perturb(sde: Family, sqrt: SquareRoot, key: Array, x0: Array, t: Array,
            objective: str = "hsm") -> tuple[Array, Array]:
    """Draw u_t given data x0 (shape (batch, *data)) at times t (batch,); returns (u_t, eps target).

    z comes from the family's ``sample_noise`` (N(0, I), or a force-field kernel's standardised noise):
    u_t = m_t x0 + K_t z with target z, whose minimiser E[z | u_t] gives the posterior mean in either case.
    """
    k_t = sqrt(t)
    # k = 1: Sigma_0 = 0, so the state at 0 is known and DSM is HSM exactly.
    if objective == "hsm" or sde.order == 1:
        z = sde.sample_noise(key, x0.shape + (sde.order,), x0.dtype)
        return sde.lift(sde.mean_coefficient(t), x0) + sde.apply(k_t, z), z
    k_a, k_z = jax.random.split(key)
    aux_sd = jnp.sqrt(jnp.asarray(sde.initial_variance, x0.dtype))
    u0 = sde.embed(x0) + aux_sd * jax.random.normal(k_a, x0.shape + (sde.order,), x0.dtype)
    cond = sde.known_start()
    k_c = cond.cholesky(t)
    z = jax.random.normal(k_z, u0.shape, u0.dtype)
    u_t = sde.apply(sde.transition(t=t, s=0.0), u0) + sde.apply(k_c, z)
    # eps* = K^T K'^{-T} z, per example: a triangular solve with K'^T (upper), then K^T.
    flat = z.reshape(z.shape[0], -1, sde.order)
    w = jnp.swapaxes(linalg.solve_triangular(k_c, jnp.swapaxes(flat, -1, -2), lower=True, trans=True), -1, -2)
    target = linalg.einsum("bji,bpj->bpi", k_t, w).reshape(z.shape)
    return u_t, target


def loss_weight_matrix(sde: Family, sqrt: SquareRoot, t: Array, weighting: str) -> Array | None:
    """W_t applied to the eps error (None for the ``"eps"`` weighting): G_t^T K_t^{-T} (G G^T = beta Q)."""
    if weighting == "eps":
        return None
    k_t = sqrt(t)
    g_t = sde.diffusion_matrix(t).astype(k_t.dtype)
    return linalg.matmul(jnp.swapaxes(g_t, -1, -2), jnp.swapaxes(linalg.inv(k_t), -1, -2))


def score_matching_loss(eps_fn: Callable[[Array, Array], Array], sde: Family, sqrt: SquareRoot,
                        key: Array, x0: Array, *, objective: str = "hsm", weighting: str = "eps",
                        t_eps: float = 1e-5, t: Array | None = None) -> tuple[Array, dict]:
    """Mean over the batch of the weighted eps regression error, averaged over data dimensions.

    ``eps_fn(u, t)`` maps states (batch, *data, k) and times (batch,) to eps predictions of the same
    shape as u. Returns (loss, aux) with aux = dict(per_example=..., t=...).
    """
    k_t, k_n = jax.random.split(key)
    if t is None:
        t = stratified_times(k_t, x0.shape[0], t_eps, sde.T)
    u_t, target = perturb(sde, sqrt, k_n, x0, t, objective)
    err = eps_fn(u_t, t) - target
    w = loss_weight_matrix(sde, sqrt, t, weighting)
    if w is not None:
        err = sde.apply(w, err)
    # Sum over the phase-space axis (the squared norm per data dimension), mean over data dimensions.
    per_example = jnp.mean(jnp.sum(jnp.square(err), axis=-1).reshape(err.shape[0], -1), axis=1)
    return jnp.mean(per_example), dict(per_example=per_example, t=t)
