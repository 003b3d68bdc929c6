r"""Exact scores and denoisers of every linear family for Gaussian-mixture and empirical data.

Setting. Per data dimension the forward process gives u_t | x_0 ~ N(m_t x_0, Sigma_t), with
m_t = Phi(t, 0)[:, 0] (shape (k,)) and Sigma_t (k x k) shared by every data dimension (a pixel-shared
:class:`~diffusion_jax.sdes.linear.LinearSDE`; modal families are below). For mixture data

    x_0 ~ sum_i w_i N(mu_i, v_i I_d)                (isotropic components; v_i = 0 is a Dirac point)

the state is Gaussian given the component, independently over the d data dimensions:

    u_t | i ~ prod_j N(u_j; m_t mu_ij, C_i),        C_i = v_i m_t m_t^T + Sigma_t,

so p_t(u) = sum_i w_i prod_j N(u_j; m_t mu_ij, C_i), a Gaussian mixture on R^{d k}, and with the
responsibilities r_i(u) = softmax_i(log w_i + sum_j log N(u_j; m_t mu_ij, C_i)):

    score     grad_u log p_t(u)_j = sum_i r_i(u) (-C_i^{-1} (u_j - m_t mu_ij)),
    denoiser  D(u)_j = E[x_0j | u] = sum_i r_i(u) (mu_ij + v_i m_t^T C_i^{-1} (u_j - m_t mu_ij)),
    Tweedie   grad_u log p_t(u)_j = -Sigma_t^{-1} (u_j - m_t D(u)_j)   (any prior on x_0, v_i > 0 too),
    eps       eps(u)_j = -K_t^T grad_u log p_t(u)_j = K_t^{-1} (u_j - m_t D(u)_j)  for K_t K_t^T = Sigma_t.

Numerics (float32; measured against float64 references, see ``tests/test_exact.py``). At small t and
k >= 2, Sigma_t is nearly singular (CD-HOLD n=4 at t=1e-3: condition 1e15, smallest eigenvalue 8e-17),
but for v_i = 0.01 every C_i is well conditioned (condition <= ~100 for every family and t), so the
Gaussian-mixture score is a well-posed float32 computation. How C_i is factored decides whether it stays so:

* forming C_i = v m m^T + L L^T and calling Cholesky is accurate for v_i = 0.01 (relative score error
  ~2e-7 at t = 1e-3 for CLD and CD-HOLD n=4) and for v_i = 1e-4, but as v_i -> 0 it rounds the tiny
  eigenvalues of Sigma_t away (v_i = 0: NaN for CD-HOLD n=4 at t = 1e-3);
* whitening with L_t (C_i' = I + v a a^T, a = L^{-1} m, Sherman-Morrison and the determinant lemma) is
  exact in real arithmetic and fine for v_i = 0, but for v_i > 0 it cancels catastrophically: |a| ~ 1e8,
  the whitened residual is ~1e7, the projection that removes its a-component leaves O(1) from it, and
  L^{-T} (norm ~1e8) amplifies that rounding. Measured relative score errors at t = 1e-3, v_i = 0.01:
  1e-3 (CLD), 4e3 (TOLD), 6e7 (CD-HOLD n=4).

Here each C_i is factored from a square root instead, C_i = [L_t | sqrt(v_i) m][L_t | sqrt(v_i) m]^T, by a
Householder QR of that k x (k+1) matrix (column-wise backward stable, the construction the SDE core uses
for L_t): the factor carries errors of order eps sqrt(C_aa C_bb), so it is as accurate as C_i is well
conditioned, and it is L_t itself when v_i = 0. Every solve is triangular; relative score errors are
<= ~5e-6 for all families, t in [1e-3, 1] and v_i in {0.01, 1e-4}.

The Dirac case (v_i = 0, and the empirical data set) is intrinsically ill conditioned at small t for
k >= 2. The likelihood of a data point y depends on u only through the generalised-least-squares estimate
xhat = m^T Sigma^{-1} u / (m^T Sigma^{-1} m) of x_0 (see :func:`gls_estimate`), whose noise level is
sigma_eff = (m^T Sigma^{-1} m)^{-1/2}: 1.8e-6 for TOLD and 9e-9 for CD-HOLD n=4 at t = 1e-3, against the
float32 resolution eps |x_0| ~ 6e-8 of the data coordinate. Rounding u to float32 then moves the exact
(float64) Dirac score by 3e-2 (TOLD) and O(1) (CD-HOLD n=4) relative; no float32 algorithm can do better,
and this one stays within a small factor of that bound (and finite down to t = 1e-5).

Logits. At small t the quadratic forms reach ~1e16. Under jit, XLA contracts a*b + c into an FMA in one
fusion and not in another, so the same huge logit evaluated twice can differ by ~1e9 and exp(l - max l)
overflows (observed: NaN). Logits are therefore formed from differences q_i - min q first (and the
empirical denoiser from squared distances minus the running minimum), so the leading ones are moderate.

Modal families (:class:`~diffusion_jax.sdes.modal.ModalSDE`, e.g. blurring diffusion). The law is
diagonal in an orthogonal basis V rather than shared by the pixels: in mode coordinates w = V^T u and
xhat_0 = V^T x_0, mode j has w_j | x_0 ~ N(m_j xhat_0j, Sigma_j) with its own m_j (k,) and Sigma_j (k x k).
Since V is orthogonal, an isotropic component N(mu_i, v_i I) is N(V^T mu_i, v_i I) in mode coordinates, and
the whole computation above runs there with per-mode factors: C_ij = v_i m_j m_j^T + Sigma_j = F_ij F_ij^T,
log det terms sum_j log det C_ij instead of d log det C_i, and the GLS estimate, its variance
sigma_eff,j^2 = (m_j^T Sigma_j^{-1} m_j)^{-1} and the empirical weights become per mode
(log N(u; m y, .) = -sum_j (xhat_j - V^T y)_j^2 / (2 sigma_eff,j^2) + const). log|det V| = 0, so densities
are the same in both coordinates; scores, eps and mixture denoisers are mapped back with V (grad_u = V grad_w),
and the empirical denoiser, a convex combination of the data points, is formed from the pixel-space data
directly. Internally every quantity is indexed by G "groups" of data dimensions sharing one law: G = 1 for a
pixel-shared family (one k x k factor for all d dimensions, solved with d right-hand sides) and G = d for
a modal one. Measured for blurring diffusion on 4x4x1 and 4x4x2 images against a float64 pixel-space
reference (``tests/test_exact.py``): relative score errors <= 2e-6 for t >= 0.1 and <= 7e-5 at t = 1e-3,
where sigma_t = 1.6e-3 and the basis change adds a few roundings of |u| to residuals of size sigma_t
(Dirac components: 2-3x the error that rounding u to float32 alone causes), or where the responsibilities
of two components are balanced and their logits are sums of d squares.

Calling convention (the library's): every function takes a batch of states u of shape (batch, *data, k)
(phase-space axis last, as in :mod:`diffusion_jax.sdes`) and per-example times t of shape (batch,) (a scalar
is broadcast), and returns per-example results: scores / eps (batch, *data, k), denoisers (batch, *data),
log densities (batch,). The data dimensions are flattened to d = prod(data) for the mixture (means (M, d));
a modal family needs data = its data shape. Internally each example is one (d, k) problem, vmapped. jit
with the SDE static (``jax.jit(mixture_score, static_argnums=0)``; ``GaussianMixture`` is a NamedTuple,
hence a pytree that can be traced). ``K`` means what it means everywhere in the library: the square root
"R" (gDDIM) or "L" (Cholesky), or a :class:`~diffusion_jax.param.roots.SquareRoot`-like callable t -> K_t.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.sdes.base import tri_factor as _core_tri_factor
import numpy as np
from jax import lax
from diffusion_jax.linalg import einsum, matmul, solve_triangular

Array = Any

__all__ = [
    "GaussianMixture", "ring_of_gaussians", "mixture_log_density", "mixture_score", "mixture_denoiser",
    "mixture_eps", "empirical_denoiser", "empirical_score", "gls_estimate",
]


# ----------------------------------------------------------------------------------------- data
class GaussianMixture(NamedTuple):
    r"""Isotropic Gaussian mixture sum_i w_i N(mu_i, v_i I_d) on R^d (a pytree: pass it through jit).

    means (M, d), variances (M,) with v_i >= 0 (v_i = 0: a Dirac point), weights (M,) summing to 1.
    Build with :meth:`create` (validates and broadcasts) or :func:`ring_of_gaussians`.
    """
    means: Array
    variances: Array
    weights: Array

    @classmethod
    def create(cls, means: Array, variances: Array | float = 0.0, weights: Array | None = None,
               dtype: Any = None) -> "GaussianMixture":
        """Validated mixture: ``variances`` broadcast to (M,), ``weights`` default uniform (must sum to 1)."""
        dtype = dtype or jnp.result_type(float)
        means_np = np.asarray(means, dtype=np.float64)
        if means_np.ndim != 2 or means_np.shape[0] < 1 or means_np.shape[1] < 1:
            raise ValueError(f"GaussianMixture: means must have shape (M, d), got {means_np.shape}")
        n_comp = means_np.shape[0]
        var_np = np.broadcast_to(np.asarray(variances, dtype=np.float64), (n_comp,))
        w_np = (np.full(n_comp, 1.0 / n_comp) if weights is None
                else np.asarray(weights, dtype=np.float64))
        if w_np.shape != (n_comp,):
            raise ValueError(f"GaussianMixture: weights must have shape ({n_comp},), got {w_np.shape}")
        if not (np.all(np.isfinite(means_np)) and np.all(np.isfinite(var_np)) and np.all(np.isfinite(w_np))):
            raise ValueError("GaussianMixture: means, variances and weights must be finite")
        if np.any(var_np < 0):
            raise ValueError(f"GaussianMixture: variances must be >= 0, got min {var_np.min():.3g}")
        if np.any(w_np < 0) or abs(w_np.sum() - 1.0) > 1e-6:
            raise ValueError(f"GaussianMixture: weights must be >= 0 and sum to 1 (sum {w_np.sum():.8g})")
        return cls(jnp.asarray(means_np, dtype), jnp.asarray(var_np, dtype), jnp.asarray(w_np, dtype))

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, key: Array, n: int) -> Array:
        """n samples x_0 of the mixture, shape (n, d)."""
        k_comp, k_noise = jax.random.split(key)
        comp = jax.random.categorical(k_comp, jnp.log(self.weights), shape=(n,))
        z = jax.random.normal(k_noise, (n, self.means.shape[1]), self.means.dtype)
        return self.means[comp] + jnp.sqrt(self.variances[comp])[:, None] * z


def ring_of_gaussians(n: int = 8, radius: float = 1.0, variance: float = 0.01,
                      dtype: Any = None) -> GaussianMixture:
    """n equally weighted components N(mu_i, variance I_2), mu_i = radius (cos 2 pi i/n, sin 2 pi i/n)."""
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"ring_of_gaussians: n must be an integer >= 1, got {n!r}")
    angle = 2.0 * np.pi * np.arange(n) / n
    means = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return GaussianMixture.create(means, variance, None, dtype)


# ----------------------------------------------------------------------------------------- helpers
def _tri_factor(k_mat: Array) -> Array:
    """Lower-triangular F (positive diagonal) with F F^T = K K^T (the core's Householder-QR factor)."""
    return _core_tri_factor(k_mat, jnp)


def _modes(sde, x: Array) -> Array:
    """V^T x for flat states x (..., d, k): mode coordinates, same shape (the identity for pixel-shared families)."""
    if sde.mode_ndim == 0:
        return x
    return sde.to_modes(x.reshape(x.shape[:-2] + tuple(sde.data_shape) + x.shape[-1:])).reshape(x.shape)


def _pixels(sde, w: Array) -> Array:
    """V w for flat mode coordinates w (..., d, k): back to the pixel-space state."""
    if sde.mode_ndim == 0:
        return w
    return sde.from_modes(w.reshape(w.shape[:-2] + tuple(sde.data_shape) + w.shape[-1:])).reshape(w.shape)


def _group(x: Array, n_grp: int) -> Array:
    """(..., d, k) -> (..., G, k, d/G): the data dimensions of each group as right-hand-side columns."""
    d, k = x.shape[-2:]
    return jnp.swapaxes(x.reshape(x.shape[:-2] + (n_grp, d // n_grp, k)), -1, -2)


def _ungroup(x: Array) -> Array:
    """(..., G, k, c) -> (..., G c, k), the inverse of :func:`_group`."""
    g, k, c = x.shape[-3:]
    return jnp.swapaxes(x, -1, -2).reshape(x.shape[:-3] + (g * c, k))


def _moments(sde, u: Array, t: Array) -> tuple[Array, Array, Array, Array]:
    """(w, t, m, chol): the state in mode coordinates (d, k) and the per-group law m (G, k), chol (G, k, k).

    G = 1 for a pixel-shared family; for a modal family G = d and row j is the law of mode j (the family's
    per-mode arrays broadcast to the data shape, channels included, and flattened like u).
    """
    dtype = jnp.result_type(u.dtype, float)          # shapes were checked by _flat: u (d, k), t scalar
    t = jnp.asarray(t, dtype)
    k = sde.order
    m = sde.mean_coefficient(t).astype(dtype)            # (k,) or (*modes, k)
    chol = sde.cholesky(t).astype(dtype)                  # (k, k) or (*modes-or-ones, k, k)
    if sde.mode_ndim == 0:
        return u.astype(dtype), t, m[None], chol[None]
    shape = tuple(sde.data_shape)
    d = int(np.prod(shape, dtype=np.int64))
    m = jnp.broadcast_to(m, shape + (k,)).reshape(d, k)
    chol = jnp.broadcast_to(chol, shape + (k, k)).reshape(d, k, k)
    return _modes(sde, u.astype(dtype)), t, m, chol


def _softmax(logit: Array) -> Array:
    """softmax over the last axis; the logits must be moderate near their maximum (see _mixture_parts).

    jax.nn.softmax differentiates by its closed form, never through the max: XLA may recompute the logits
    in two fusions that round differently (FMA contraction), and then the max equals none of them bitwise,
    so the max's own gradient (mask of the maximisers / their count) would be 0 / 0.
    """
    return jax.nn.softmax(logit, axis=-1)


class _Parts(NamedTuple):
    m: Array          # (G, k) mean coefficients
    chol: Array       # (G, k, k) factors of Sigma
    fac: Array        # (M, G, k, k) lower, fac fac^T = C_i (per group)
    white: Array      # (M, G, k, c) fac^{-1} (w_j - m mu_ij), mode coordinates
    logit: Array      # (M,) log w_i + log N(u; ., .) - shift
    shift: Array      # () the component-independent remainder
    means: Array      # (M, d) component means in mode coordinates


def _mixture_parts(sde, mix: GaussianMixture, u: Array, t: Array) -> _Parts:
    """Per-component factors, whitened residuals and responsibilities (see the module docstring)."""
    w, t, m, chol = _moments(sde, u, t)
    dtype = w.dtype
    means = jnp.asarray(mix.means, dtype)
    var = jnp.asarray(mix.variances, dtype)
    n_comp, d = means.shape
    n_grp, k = m.shape
    cols = d // n_grp
    means = _modes(sde, means[..., None])[..., 0]                               # V^T mu_i
    sq = jnp.concatenate([jnp.broadcast_to(chol, (n_comp, n_grp, k, k)),
                          (jnp.sqrt(var)[:, None, None] * m)[..., None]], axis=-1)   # (M, G, k, k+1)
    fac = _tri_factor(sq)
    # v_i = 0: C_i = Sigma_t exactly, keep the core's factor bit for bit.
    fac = jnp.where((var == 0)[:, None, None, None], chol, fac)
    resid = _group(w, n_grp)[None] - m[None, :, :, None] * means.reshape(n_comp, n_grp, 1, cols)  # (M, G, k, c)
    white = solve_triangular(fac, resid, lower=True)                            # (M, G, k, c)
    # Quadratic forms reach ~1e16 at small t (Dirac components, k >= 2). Logits built as a*b + c from such
    # values are not reproducible under jit (XLA contracts to FMA in one fusion and not in another, a
    # 1e9 discrepancy), so subtract the smallest form first: the leading logits are then moderate.
    quad = jnp.sum(white * white, axis=(-3, -2, -1))                            # (M,)
    # The reference values quad_min and diag_ref cancel between logit and shift, so they are held under
    # stop_gradient: differentiating a min / max is 0/0 when XLA recomputes its operand in another fusion
    # with other rounding (the NaN described in _softmax).
    quad_min = jax.lax.stop_gradient(jnp.min(quad))
    # log det C_i relative to a common reference, from ratios of the factors' diagonals (d * log det C_i
    # itself is ~1e5 for images, whose float32 rounding would be an O(0.01) error in the weights). The
    # reference is the largest diagonal over components: positive even at t = 0, where Sigma_0 is singular.
    # Each group's determinant counts once per data dimension in it (cols = d for a pixel-shared family).
    diag = jnp.diagonal(fac, axis1=-2, axis2=-1)                                 # (M, G, k)
    diag_ref = jax.lax.stop_gradient(jnp.max(diag, axis=0))                      # (G, k)
    logdet_rel = 2.0 * jnp.sum(jnp.log(diag / diag_ref), axis=(-2, -1))        # (M,)
    logit = (jnp.log(jnp.asarray(mix.weights, dtype)) - 0.5 * (quad - quad_min) - 0.5 * cols * logdet_rel)
    # the i-independent remainder of log N(u; m mu_i, I_d (x) C_i):
    shift = (-0.5 * quad_min - cols * jnp.sum(jnp.log(diag_ref)) - 0.5 * d * k * math.log(2.0 * math.pi))
    return _Parts(m, chol, fac, white, logit, shift, means)


# ----------------------------------------------------------------------------------------- mixture
def _log_density_one(sde, mix: GaussianMixture, u: Array, t: Array) -> Array:
    """One state u (d, k), scalar t: see :func:`mixture_log_density`."""
    p = _mixture_parts(sde, mix, u, t)
    # logsumexp holds its max under stop_gradient (the value does not depend on it): see _softmax for the
    # NaN that differentiating the max gave (measured: jit(vmap(grad)) at LLVM -O0, CLD, t = 0.1).
    return jax.nn.logsumexp(p.logit) + p.shift


def _score_one(sde, mix: GaussianMixture, u: Array, t: Array) -> Array:
    """One state u (d, k), scalar t: see :func:`mixture_score`."""
    p = _mixture_parts(sde, mix, u, t)
    resp = _softmax(p.logit)                                                     # (M,)
    per = solve_triangular(p.fac, p.white, lower=True, trans=True)               # (M, G, k, c) = C_i^{-1} r
    per = jnp.where(resp[:, None, None, None] > 0, per, 0.0)   # far components may overflow; their weight is 0
    return _pixels(sde, -_ungroup(einsum("i,igkc->gkc", resp, per)))


def _denoiser_one(sde, mix: GaussianMixture, u: Array, t: Array) -> Array:
    """One state u (d, k), scalar t: see :func:`mixture_denoiser`."""
    p = _mixture_parts(sde, mix, u, t)
    dtype = p.white.dtype
    resp = _softmax(p.logit)
    b = solve_triangular(p.fac, jnp.broadcast_to(p.m[..., None], p.fac.shape[:-1] + (1,)), lower=True)[..., 0]
    var = jnp.asarray(mix.variances, dtype)                                      # b: (M, G, k)
    shrink = jnp.where(var[:, None, None] > 0, var[:, None, None] * einsum("igk,igkc->igc", b, p.white), 0.0)
    post = p.means + shrink.reshape(p.means.shape)                               # (M, d)
    den = matmul(resp, jnp.where(resp[:, None] > 0, post, 0.0))
    return _pixels(sde, den[:, None])[:, 0]


def _square_root_per_group(sde, K: Array, chol: Array) -> Array:
    """K as per-group matrices (G, k, k) like ``chol``; see :func:`mixture_eps` for the accepted shapes."""
    k = chol.shape[-1]
    kmat = jnp.asarray(K, chol.dtype)
    if sde.mode_ndim == 0:
        if kmat.shape != (k, k):
            raise ValueError(f"K must have shape {(k, k)}, got {kmat.shape}")
        return kmat[None]
    full = tuple(sde.data_shape) + (k, k)
    try:
        ok = kmat.shape[-2:] == (k, k) and np.broadcast_shapes(kmat.shape, full) == full
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"K must broadcast to (*data_shape, k, k) = {full} (one square root per mode), "
                         f"got {kmat.shape}")
    return jnp.broadcast_to(kmat, full).reshape(chol.shape)


def _eps_one(sde, mix: GaussianMixture, u: Array, t: Array, K: Array | None = None) -> Array:
    """One state u (d, k), scalar t: see :func:`mixture_eps`."""
    p = _mixture_parts(sde, mix, u, t)
    kmat = p.chol if K is None else _square_root_per_group(sde, K, p.chol)
    resp = _softmax(p.logit)
    g = solve_triangular(p.fac, jnp.broadcast_to(kmat, p.fac.shape), lower=True)   # (M, G, k, k) = F_i^{-1} K
    per = jnp.where(resp[:, None, None, None] > 0, einsum("iglk,iglc->igkc", g, p.white), 0.0)
    return _pixels(sde, _ungroup(einsum("i,igkc->gkc", resp, per)))


# ----------------------------------------------------------------------------------------- empirical
def _gls_one(sde, u: Array, t: Array) -> tuple[Array, Array]:
    """One state u (d, k), scalar t: see :func:`gls_estimate`."""
    w, t, m, chol = _moments(sde, u, t)
    n_grp = m.shape[0]
    a = solve_triangular(chol, m[..., None], lower=True)[..., 0]                 # (G, k)
    uw = solve_triangular(chol, _group(w, n_grp), lower=True)                    # (G, k, c)
    # |a|^2 = m^T Sigma^{-1} m passes the float32 range (3e38) for CD-HOLD n >= 5 at t = 1e-5: scale by max|a|.
    scale = jnp.max(jnp.abs(a), axis=-1)                                         # (G,)
    a_s = a / scale[:, None]
    a2_s = jnp.sum(a_s * a_s, axis=-1)
    xhat = einsum("gk,gkc->gc", a_s, uw) / a2_s[:, None] / scale[:, None]
    s2 = 1.0 / a2_s / scale / scale
    return xhat.reshape(-1), (s2 if sde.mode_ndim else s2[0])


def _data_modes(sde, y: Array) -> Array:
    """Data rows (n, d) in mode coordinates (n, d)."""
    return _modes(sde, y[..., None])[..., 0]


def _empirical_denoiser_one(sde, data: Array, u: Array, t: Array, chunk: int = 1024) -> Array:
    """One state u (d, k), scalar t: see :func:`empirical_denoiser`."""
    # --- force-field families: the posterior mean under the family's kernel ---
    kernel = getattr(sde, "kernel", None)
    if kernel is not None:
        return kernel.empirical_denoiser(data, u[None, :, 0], jnp.sqrt(sde.B(t)), chunk)[0]
    # --- end force-field dispatch ---
    xhat, s2 = _gls_one(sde, u, t)
    dtype = xhat.dtype
    n_data, d = data.shape
    if d != xhat.shape[0]:
        raise ValueError(f"data has {d} dimensions, u has {xhat.shape[0]}")
    chunk = int(max(1, min(int(chunk), n_data)))
    s2 = jnp.broadcast_to(s2, xhat.shape)
    s2_min = jnp.min(s2)
    # Distances in coordinates scaled by sqrt(rho_j) (where(): sigma_min^2 may underflow to 0; those modes
    # keep rho = 1 rather than 0 / 0). rho = 1 exactly for a pixel-shared family: the scaling is then exact.
    root_rel = jnp.sqrt(jnp.where(s2 > s2_min, s2_min / s2, 1.0))
    inv2s2 = 0.5 / s2_min

    # Online softmax over squared distances: carry (smallest distance so far, sum of weights, weighted sum
    # of y), weights exp(-(dist - dist_min) / (2 sigma_min^2)). The subtraction comes before the (huge,
    # ~1e16 at small t) scale, so the nearest point gets exactly weight 1 however XLA fuses the product.
    def update(carry, y):
        dmin, tot, acc = carry
        y = y.astype(dtype)
        diff = (_data_modes(sde, y) - xhat[None, :]) * root_rel
        dist = jnp.sum(diff * diff, axis=-1)                                     # (c,)
        new_min = jnp.minimum(dmin, jnp.min(dist))
        # where(): sigma_eff^2 may underflow to 0 (inv2s2 = inf) and 0 * inf is NaN; exp(-0 * inf) means 1.
        scale = jnp.where(new_min < dmin, jnp.exp((new_min - dmin) * inv2s2), 1.0)
        gap = dist - new_min
        p = jnp.where(gap > 0, jnp.exp(-gap * inv2s2), 1.0)
        return new_min, tot * scale + jnp.sum(p), acc * scale + matmul(p, y)

    carry = (jnp.asarray(jnp.inf, dtype), jnp.zeros((), dtype), jnp.zeros((d,), dtype))
    n_full = n_data // chunk
    if n_full > 0:
        def body(c, i):
            return update(c, lax.dynamic_slice_in_dim(data, i * chunk, chunk, axis=0)), None
        carry, _ = lax.scan(body, carry, jnp.arange(n_full))
    if n_full * chunk < n_data:
        carry = update(carry, data[n_full * chunk:])
    _, tot, acc = carry
    return acc / tot


def _empirical_score_one(sde, data: Array, u: Array, t: Array, chunk: int = 1024) -> Array:
    """One state u (d, k), scalar t: see :func:`empirical_score`."""
    den = _empirical_denoiser_one(sde, data, u, t, chunk)
    w, t, m, chol = _moments(sde, u, t)
    n_grp = m.shape[0]
    den_w = _group(_modes(sde, den[:, None]), n_grp)                              # (G, 1, c)
    r = solve_triangular(chol, _group(w, n_grp) - m[..., None] * den_w, lower=True)
    return _pixels(sde, -_ungroup(solve_triangular(chol, r, lower=True, trans=True)))

# ----------------------------------------------------------------------------------------- batched API
def _flat(sde, u: Array, t: Array, d: int | None = None) -> tuple[Array, Array, tuple[int, ...]]:
    """(u as (batch, d, k), t as (batch,) or a scalar, data shape) from the (batch, *data, k) convention."""
    u = jnp.asarray(u)
    k = sde.order
    if u.ndim < 2 or u.shape[-1] != k:
        raise ValueError(f"{sde.name}: u must have shape (batch, *data, k={k}), got {u.shape}")
    data = tuple(u.shape[1:-1])
    size = int(np.prod(data, dtype=np.int64))
    if sde.mode_ndim and data != tuple(sde.data_shape):
        raise ValueError(f"{sde.name}: u must have shape (batch, *{tuple(sde.data_shape)}, {k}) (the family's data "
                         f"shape), got {u.shape}")
    if d is not None and size != d:
        raise ValueError(f"u has {size} data dimensions (shape {u.shape} = (batch, *data, k)), the data have {d}")
    t = jnp.asarray(t, jnp.result_type(u.dtype, float))
    if t.ndim == 0:          # one time for the batch: the per-time tables are computed once (not vmapped)
        return u.reshape(u.shape[0], size, k), t, data
    if t.shape != u.shape[:1]:
        raise ValueError(f"t must be a scalar or have shape (batch,) = {u.shape[:1]}, got {t.shape}")
    return u.reshape(u.shape[0], size, k), t, data


def _per_example(fn: Callable, uf: Array, tb: Array) -> Any:
    """vmap ``fn(u, t)`` over the batch; a scalar t is shared (its per-time tables are computed once)."""
    return jax.vmap(fn, in_axes=(0, 0 if jnp.ndim(tb) else None))(uf, tb)


def _flat_data(data: Array) -> Array:
    data = jnp.asarray(data)
    if data.ndim < 2:
        raise ValueError(f"data must have shape (n, *data), got {data.shape}")
    return data.reshape(data.shape[0], -1)


def _square_root_fn(sde, K: Any) -> Callable[[Array], Array]:
    if callable(K):
        return K
    from diffusion_jax.param.roots import SQUARE_ROOTS, square_root   # param imports the core: keep exact light
    if K not in SQUARE_ROOTS:
        raise ValueError(f"K must be one of {SQUARE_ROOTS} or a callable t -> K_t, got {K!r}")
    return square_root(sde, K)


def mixture_log_density(sde, mix: GaussianMixture, u: Array, t: Array) -> Array:
    r"""log p_t(u) = logsumexp_i [log w_i + sum_j log N(w_j; m_j mu_ij, C_ij)], shape (batch,).

    (w = V^T u and mu_i in mode coordinates for a modal family; m_j, C_ij the same for every j otherwise.)
    """
    uf, tb, _ = _flat(sde, u, t, mix.dim)
    return _per_example(lambda a, b: _log_density_one(sde, mix, a, b), uf, tb)


def mixture_score(sde, mix: GaussianMixture, u: Array, t: Array) -> Array:
    r"""Exact score grad_u log p_t(u), shape (batch, *data, k) like u.

        score_j = sum_i r_i(u) (-C_i^{-1} (u_j - m_t mu_ij)),   C_i = v_i m_t m_t^T + Sigma_t = F_i F_i^T,

    with r_i = softmax(logit_i) and -C_i^{-1} r = -F_i^{-T} (F_i^{-1} r) by two triangular solves. For a modal
    family the same per mode in w = V^T u (C_ij, F_ij per mode j), and score = V score_w.
    For Dirac components (v_i = 0) and k >= 2 at small t the score is of size ~ Sigma_t^{-1/2} and only as
    accurate as the float32 state u resolves (see the module docstring).
    """
    uf, tb, _ = _flat(sde, u, t, mix.dim)
    return _per_example(lambda a, b: _score_one(sde, mix, a, b), uf, tb).reshape(jnp.shape(u))


def mixture_denoiser(sde, mix: GaussianMixture, u: Array, t: Array) -> Array:
    r"""Exact denoiser E[x_0 | u_t = u], shape (batch, *data).

    Component i's posterior mean is mu_ij + v_i m_t^T C_i^{-1} (u_j - m_t mu_ij)
    = mu_ij + v_i (F_i^{-1} m_t) . (F_i^{-1} (u_j - m_t mu_ij)); these are mixed with the responsibilities.
    For a modal family the same holds per mode in mode coordinates and the result is mapped back with V.
    """
    uf, tb, _ = _flat(sde, u, t, mix.dim)
    return _per_example(lambda a, b: _denoiser_one(sde, mix, a, b), uf, tb).reshape(jnp.shape(u)[:-1])


def mixture_eps(sde, mix: GaussianMixture, u: Array, t: Array, K: Any = "R") -> Array:
    r"""Exact noise prediction eps = -K^T score, shape (batch, *data, k), for a square root K of Sigma_t (K K^T = Sigma_t).

    ``K``: "R" (gDDIM, the library's default), "L" (the core's Cholesky factor, CLD-SGM) or a callable
    t -> K_t (scalar t; (k, k), or per mode anything broadcasting to (*data_shape, k, k) for a modal family,
    where eps = V (K_j^T (-score_w)_j)). Computed as
    eps_j = sum_i r_i (F_i^{-1} K)^T F_i^{-1} (u_j - m_t mu_ij), never forming the (huge, at small t) score:
    F_i^{-1} K is orthogonal for v_i = 0 (the identity when K = L_t) and well conditioned for v_i > 0.
    The score is recovered as -K^{-T} eps; at small t that solve amplifies eps's float32 rounding by
    cond(K) (~1e7 for TOLD / CD-HOLD n=4 at t = 1e-3), which is why eps, not the score, is the stable
    float32 target there.
    """
    uf, tb, _ = _flat(sde, u, t, mix.dim)
    if K == "L" or getattr(K, "kind", None) == "L":   # the factor _mixture_parts already has, bit for bit
        return _per_example(lambda a, b: _eps_one(sde, mix, a, b), uf, tb).reshape(jnp.shape(u))
    root = _square_root_fn(sde, K)
    return _per_example(lambda a, b: _eps_one(sde, mix, a, b, root(b)), uf, tb).reshape(jnp.shape(u))


def gls_estimate(sde, u: Array, t: Array) -> tuple[Array, Array]:
    r"""(xhat, sigma_eff^2): the generalised-least-squares estimate of x_0 from u and its variance.

    Per data dimension, with a = L_t^{-1} m_t and the whitened state L_t^{-1} u_j:
    xhat_j = a . L_t^{-1} u_j / |a|^2 = m^T Sigma^{-1} u_j / (m^T Sigma^{-1} m), sigma_eff^2 = 1 / |a|^2.
    log N(u_j; m_t y, Sigma_t) = -(xhat_j - y)^2 / (2 sigma_eff^2) + (terms free of y): for every linear family
    the likelihood of a data point is the VE Gaussian kernel of bandwidth sigma_eff around xhat.

    Shapes: xhat (batch, *data); sigma_eff^2 (batch,) for a pixel-shared family. For a modal family both are per mode:
    xhat estimates V^T x_0 (mode coordinates, flattened like u) and sigma_eff^2 has shape (batch, *data), so the kernel
    is anisotropic, -sum_j (xhat_j - (V^T y)_j)^2 / (2 sigma_eff,j^2).
    """
    uf, tb, data = _flat(sde, u, t)
    xhat, s2 = _per_example(lambda a, b: _gls_one(sde, a, b), uf, tb)
    batch = (uf.shape[0],)
    return xhat.reshape(batch + data), (s2.reshape(batch + data) if sde.mode_ndim else s2)


def empirical_denoiser(sde, data: Array, u: Array, t: Array, chunk: int = 1024) -> Array:
    r"""Optimal denoiser of a finite data set {y_n} (N, *data) (or (N, d) flat), shape (batch, *data).

        D(u, t) = sum_n softmax_n(log N(u; m_t y_n, I_d (x) Sigma_t)) y_n.

    The log-likelihood is sum_j |L_t^{-1}(u_j - m_t y_nj)|^2 / -2 + const; writing the whitened residual as
    L^{-1}u_j - a y_nj (a = L_t^{-1} m_t) and splitting off its component along a, this equals
    -|xhat - y_n|^2 / (2 sigma_eff^2) plus terms free of n (see :func:`gls_estimate`), which is what is
    evaluated: one mean-shift step of bandwidth sigma_eff, with no cancellation between the large whitened
    vectors and k times less work. For a modal family the distance is taken in mode coordinates with a
    bandwidth per mode, -sum_j (xhat_j - (V^T y_n)_j)^2 / (2 sigma_eff,j^2), written as
    -sum_j rho_j (xhat_j - (V^T y_n)_j)^2 / (2 sigma_min^2) with rho_j = sigma_min^2 / sigma_eff,j^2 <= 1
    (rho = 1 exactly for a pixel-shared family); the weighted mean of the y_n is formed in pixel space. The
    data are streamed in chunks of ``chunk`` rows (a ``lax.scan`` with an online logsumexp, then the ragged
    remainder), so memory is O(chunk * d) beyond ``data`` itself.

    A force-field family (:mod:`diffusion_jax.fields.family`, a VE core with a non-Gaussian kernel) gets the
    posterior mean under its kernel at sigma(t) = sqrt(B(t)) instead; the score built from it
    (:func:`empirical_score`) is then the VE-equivalent one whose probability-flow ODE is the field's ODE.
    """
    flat = _flat_data(data)
    uf, tb, _ = _flat(sde, u, t, flat.shape[1])
    out = _per_example(lambda a, b: _empirical_denoiser_one(sde, flat, a, b, chunk), uf, tb)
    return out.reshape(jnp.shape(u)[:-1])


def empirical_score(sde, data: Array, u: Array, t: Array, chunk: int = 1024) -> Array:
    r"""Exact score of the empirical data distribution, shape (batch, *data, k) like u.

    score_j = sum_n r_n (-Sigma_t^{-1} (u_j - m_t y_nj)) = -Sigma_t^{-1} (u_j - m_t D(u)_j) (Sigma_t, m_t shared),
    evaluated as -L_t^{-T} L_t^{-1} (u_j - m_t D_j); for a modal family per mode in mode coordinates
    (w_j - m_j (V^T D)_j), mapped back with V. For k >= 2 at small t it is as ill conditioned as the
    Dirac case is (module docstring).
    """
    flat = _flat_data(data)
    uf, tb, _ = _flat(sde, u, t, flat.shape[1])
    return _per_example(lambda a, b: _empirical_score_one(sde, flat, a, b, chunk), uf, tb).reshape(jnp.shape(u))


def exact_eps_fn(sde, mix: GaussianMixture, K: Any = "R") -> Callable[[Array, Array], Array]:
    """fn(u, t) -> eps w.r.t. K (default R_t) of the exact mixture score (u: (batch, *data, k), t: (batch,)).

    The network-free model of the exact-score benchmarks: every sampler run on it is an ODE/SDE solve
    with the true score, so its error against a reference solve is the sampler's own error.
    """
    root = K if isinstance(K, str) and K == "L" else _square_root_fn(sde, K)   # build R's table once, here
    return lambda u, t: mixture_eps(sde, mix, u, t, root)
