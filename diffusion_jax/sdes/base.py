r"""The family interface: what every sampler, loss, parameterisation and analysis may use of a family.

State layout contract
---------------------
A state is an array of shape ``(batch, *data_shape, k)``: the phase-space coordinate is the last axis and the
data coordinate is ``u[..., 0]`` (:meth:`Family.data`; :meth:`Family.embed` is its right inverse with zero
auxiliaries). Times are scalars or per-example vectors of shape ``(batch,)``.

Per-mode matrices. A family is diagonal in an orthogonal basis V of data space (the identity for the
pixel-shared families, the DCT for blurring diffusion): in mode coordinates w = V^T u every mode f follows a
linear SDE with k x k matrices. Every per-mode quantity (transition Phi, square roots K, drift F, noise G G^T)
has shape ``(*t.shape, *mode_shape, k, k)`` where ``mode_shape`` has ``mode_ndim`` axes that broadcast against
the *trailing* data axes (``mode_ndim = 0``: one matrix for every pixel). :meth:`Family.apply` applies such a
matrix to a state, :meth:`Family.lift` maps data through per-mode vectors (e.g. the mean m_t x_0), and
:meth:`Family.project` maps a state to data through per-mode vectors. Generic code never looks inside.

The process (per mode, F = F(t), G = G(t)):

    du = F u dt + G dW,      Phi(t, s) = transition from s to t,
    u_t | x_0 ~ N(m_t x_0, Sigma_t),   m_t = Phi(t, 0) e_0,   Sigma_t = K_t K_t^T,
    Sigma_0 = diag(0, s_1, ..., s_{k-1})  (:attr:`Family.initial_variance`).

Families are immutable values: equal (and equally hashed) when built from the same definition, so they can
be static arguments of ``jax.jit`` and keys of host-side caches (``functools.lru_cache``); two
``sdes.make`` calls with the same parameters return the same object and share its float64 tables.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Hashable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import linalg

Array = Any


@runtime_checkable
class Family(Protocol):
    """A linear diffusion family (see the module docstring for the state layout and shapes)."""

    name: str
    params: dict
    T: float
    t_min: float
    order: int                         # k
    data_shape: tuple[int, ...] | None  # None: any data shape
    mode_ndim: int
    noise_rows: tuple[int, ...]        # phase-space rows the noise drives
    initial_variance: np.ndarray       # diag(Sigma_0), shape (k,); entry 0 (the data) is 0
    prior_covariance: np.ndarray       # covariance of the prior at T (k x k, per mode: the largest)
    deterministic_only: bool           # only ODE samplers apply (non-Gaussian training noise)

    @property
    def key(self) -> Hashable: ...

    # ---- JAX (jit/vmap/grad; float dtype of the inputs)
    def transition(self, *, t: Array, s: Array) -> Array: ...
    def cholesky(self, t: Array) -> Array: ...
    def covariance(self, t: Array) -> Array: ...
    def mean_coefficient(self, t: Array) -> Array: ...
    def drift_matrix(self, t: Array) -> Array: ...
    def noise_matrix(self, t: Array) -> Array: ...
    def diffusion_matrix(self, t: Array) -> Array: ...
    def drift_trace(self, t: Array, data_shape: tuple[int, ...]) -> Array: ...
    def embed(self, x0: Array) -> Array: ...
    def data(self, u: Array) -> Array: ...
    def apply(self, m: Array, u: Array) -> Array: ...
    def lift(self, m: Array, x: Array) -> Array: ...
    def project(self, w: Array, u: Array) -> Array: ...
    def to_modes(self, u: Array) -> Array: ...
    def from_modes(self, w: Array) -> Array: ...
    def mode_mean(self, x: Array) -> Array: ...
    def marginal(self, x0: Array, t: Array) -> tuple[Array, Array]: ...
    def sample_marginal(self, key: Array, x0: Array, t: Array) -> tuple[Array, Array]: ...
    def prior_sample(self, key: Array, shape: tuple[int, ...]) -> Array: ...
    def prior_logp(self, u: Array, batch_ndim: int = 1) -> Array: ...
    def known_start(self) -> "Family": ...
    def sample_noise(self, key: Array, shape: tuple[int, ...], dtype: Any = None) -> Array: ...

    # ---- host float64 (tables computed once per time grid). Times are floats or arrays (broadcast together for
    # transition_np): the results carry t's shape in front, (*t.shape, *mode_shape, k, k), so a quadrature's
    # nodes cost one call.
    def transition_np(self, *, t: float | np.ndarray, s: float | np.ndarray) -> np.ndarray: ...
    def cholesky_np(self, t: float | np.ndarray) -> np.ndarray: ...
    def covariance_np(self, t: float | np.ndarray) -> np.ndarray: ...
    def drift_matrix_np(self, t: float | np.ndarray) -> np.ndarray: ...
    def noise_matrix_np(self, t: float | np.ndarray) -> np.ndarray: ...
    def reverse_covariance_np(self, t_next: float, t: float) -> np.ndarray: ...
    def noise_level_np(self, t: float | np.ndarray) -> float | np.ndarray: ...


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _freeze(v: Any) -> Hashable:
    """A hashable, value-comparable form of a parameter value (arrays by content, containers recursively)."""
    if isinstance(v, np.ndarray):
        return ("ndarray", v.shape, str(v.dtype), v.tobytes())
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def expand_per_mode(m: Array, target_ndim: int, mode_ndim: int, trailing: int) -> Array:
    """Insert singleton axes between the time axes and the mode axes of ``m``.

    ``m`` has shape (*t, *modes, *trail) with ``mode_ndim`` mode axes and ``trailing`` trailing axes ((k, k)
    for a matrix: 2, (k,) for a vector: 1); the result broadcasts against an array of ``target_ndim`` axes
    (batch, *data, then ``trailing`` more) with the modes aligned to the trailing data axes.
    """
    m = jnp.asarray(m)
    n_missing = target_ndim - m.ndim
    if n_missing <= 0:
        return m
    t_ndim = m.ndim - trailing - mode_ndim
    return m.reshape(m.shape[:t_ndim] + (1,) * n_missing + m.shape[t_ndim:])


@functools.partial(jax.jit, static_argnums=(0, 1))
def table_kernel(owner: Hashable, method: str, x: Array) -> Array:
    """``owner.method(x_i, jnp, dtype)`` (a (k, k) table lookup) at every element of ``x``: (*x.shape, k, k).

    Jitted with the owner (a family, hashable by value, or a square root) and the method name static, so every
    program that uses a kernel reuses its one traced jaxpr per (owner, shape, dtype) instead of retracing the
    lookup, Taylor series or QR (tens of primitives) per call; inside an outer jit XLA inlines it.
    """
    fn = getattr(owner, method)
    return jnp.vectorize(lambda y: fn(y, jnp, y.dtype), signature="()->(i,j)")(x)


def tri_factor(k_mat: Array, xp) -> Array:
    """Lower-triangular L with L L^T = K K^T, from the QR factorisation of K^T (k x m, m >= k)."""
    r = xp.linalg.qr(xp.swapaxes(k_mat, -1, -2), mode="reduced")[1]
    d = xp.diagonal(r, axis1=-2, axis2=-1)
    sign = xp.where(d < 0, -1.0, 1.0).astype(r.dtype)
    return xp.swapaxes(r, -1, -2) * sign[..., None, :]


def apply_matrix(m: Array, u: Array) -> Array:
    """Apply per-pixel k x k matrices m (shape (*batch, k, k)) to a state u of shape (*batch, *data, k).

    ``batch`` may be empty (one matrix for all pixels); the matrix is broadcast over the data axes.
    """
    m = jnp.asarray(m)
    n_extra = u.ndim - 1 - (m.ndim - 2)
    m = m.reshape(m.shape[:-2] + (1,) * n_extra + m.shape[-2:])
    return linalg.einsum("...ij,...j->...i", m, u)


class FamilyBase:
    """Shared implementations of :class:`Family`: time checks, value identity, immutability, derived maps.

    Subclasses set their attributes in ``__init__`` and call :meth:`_finish` last, which freezes the object.
    """

    name: str
    params: dict
    T: float
    t_min: float
    order: int
    mode_ndim: int = 0
    data_shape: tuple[int, ...] | None = None
    #: True when only the probability-flow ODE samples the family (a non-Gaussian training noise, e.g. a
    #: force-field model): stochastic samplers refuse it
    deterministic_only: bool = False

    # ------------------------------------------------------------------ value identity, immutability
    def _check_horizon(self, T: float, t_min: float) -> None:
        if not (T > 0 and math.isfinite(T)):
            raise ValueError(f"{self.name}: T must be a positive finite number, got {T}")
        if not (0 < t_min < T):
            raise ValueError(f"{self.name}: need 0 < t_min < T, got t_min={t_min}, T={T}")

    def _definition(self) -> Hashable:
        """What, besides (name, params, T, t_min), fixes the process (subclasses: matrices, schedule, law)."""
        return ()

    def _finish(self) -> None:
        key = (type(self).__name__, self.name, _freeze(self.params), self.T, self.t_min, self._definition())
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))
        object.__setattr__(self, "_frozen", True)

    @property
    def key(self) -> Hashable:
        """The value key: (class, name, parameters, T, t_min, definition)."""
        return self._key

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"{type(self).__name__} {self.name!r} is immutable (tried to set {name!r}); "
                                 f"build a new family with sdes.make(...)")
        object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FamilyBase) and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({self.name}, k={self.order}, {ps}, T={self.T}, t_min={self.t_min})"

    # ------------------------------------------------------------------ time checks
    def _check_t(self, t: Any, what: str = "t") -> None:
        if _is_concrete(t):
            arr = np.asarray(t, dtype=np.float64)
            if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > self.T * (1 + 1e-6)):
                raise ValueError(
                    f"{self.name}: {what} must lie in [0, T={self.T}], got values in "
                    f"[{arr.min():.4g}, {arr.max():.4g}]")

    @staticmethod
    def _float(t):
        return jnp.asarray(t, dtype=jnp.result_type(float))

    # ------------------------------------------------------------------ per-mode algebra
    def to_modes(self, u: Array) -> Array:
        """V^T u (identity unless the family has a basis)."""
        return u

    def from_modes(self, w: Array) -> Array:
        """V w (identity unless the family has a basis)."""
        return w

    def apply(self, m: Array, u: Array) -> Array:
        """V (M (V^T u)) for per-mode matrices m (*t, *modes, k, k), t scalar or u's leading batch axes."""
        m = expand_per_mode(m, u.ndim + 1, self.mode_ndim, 2)
        return self.from_modes(linalg.einsum("...ij,...j->...i", m, self.to_modes(u)))

    def lift(self, m: Array, x: Array) -> Array:
        """The state V (m (V^T x)) from data x (batch, *data) and per-mode vectors m (*t, *modes, k)."""
        m = expand_per_mode(m, x.ndim + 1, self.mode_ndim, 1)
        return self.from_modes(m * self.to_modes(x[..., None]))

    def project(self, w: Array, u: Array) -> Array:
        """Data V (w^T (V^T u)) from a state u and per-mode vectors w (*t, *modes, k)."""
        w = expand_per_mode(w, u.ndim, self.mode_ndim, 1)
        return self.from_modes(jnp.sum(w * self.to_modes(u), axis=-1, keepdims=True))[..., 0]

    def mode_mean(self, x: Array) -> Array:
        """Average of per-mode vectors (*t, *modes, k) over the mode axes -> (*t, k)."""
        return jnp.mean(x, axis=tuple(range(x.ndim - 1 - self.mode_ndim, x.ndim - 1)))

    # ------------------------------------------------------------------ derived quantities
    def embed(self, x0: Array) -> Array:
        """(x_0, 0, ..., 0): data (...) -> state (..., k)."""
        return jnp.concatenate([x0[..., None], jnp.zeros(x0.shape + (self.order - 1,), x0.dtype)], -1)

    def sample_noise(self, key: Array, shape: tuple[int, ...], dtype: Any = None) -> Array:
        """The standardised training noise z of u_t = m_t x_0 + K_t z: N(0, I) for a Gaussian family
        (a force-field family draws its kernel's noise instead)."""
        return jax.random.normal(key, tuple(shape), dtype or jnp.result_type(float))

    def data(self, u: Array) -> Array:
        """The data coordinate u[..., 0] of a state (..., k)."""
        return u[..., 0]

    def covariance(self, t: Array) -> Array:
        """Sigma_t = Cov(u_t | x_0) per mode, shape (*t.shape, *modes, k, k)."""
        chol = self.cholesky(t)
        return linalg.matmul(chol, jnp.swapaxes(chol, -1, -2))

    def mean_coefficient(self, t: Array) -> Array:
        """m_t = Phi(t, 0) e_0 per mode: E[u_t | x_0] = m_t x_0, shape (*t.shape, *modes, k)."""
        return self.transition(t=t, s=0.0)[..., :, 0]

    def marginal(self, x0: Array, t: Array) -> tuple[Array, Array]:
        """Mean m_t x_0 (state of x0's shape + (k,)) and the per-mode Cholesky factor of u_t | x_0.

        ``t`` is a scalar or has the leading (batch) shape of ``x0``; apply the factor with :meth:`apply`.
        """
        t = self._float(t)
        return self.lift(self.mean_coefficient(t), x0), self.cholesky(t)

    def sample_marginal(self, key: Array, x0: Array, t: Array) -> tuple[Array, Array]:
        """u_t = m_t x_0 + V L_t V^T z with z ~ N(0, I) in pixel space; returns (u_t, z)."""
        mean, chol = self.marginal(x0, t)
        z = jax.random.normal(key, mean.shape, mean.dtype)
        return mean + self.apply(chol, z), z

    def covariance_np(self, t: float | np.ndarray) -> np.ndarray:
        chol = self.cholesky_np(t)
        return chol @ np.swapaxes(chol, -1, -2)

    def noise_level_np(self, t: float | np.ndarray) -> float | np.ndarray:
        """sigma(t) = sqrt(Sigma_t[x, x]) / m_t[x] of the first (lowest-frequency) mode: EDM's sigma.

        A float for a float ``t``, else an array of ``t``'s shape."""
        t_arr = np.asarray(t, np.float64)
        k = self.order
        cov = np.asarray(self.covariance_np(t_arr)).reshape(t_arr.shape + (-1, k, k))[..., 0, 0, 0]
        phi = np.asarray(self.transition_np(t=t_arr, s=0.0)).reshape(t_arr.shape + (-1, k, k))[..., 0, 0, 0]
        sigma = np.sqrt(cov) / phi
        return float(sigma) if np.ndim(t) == 0 else sigma
