r"""Families that act through an orthogonal basis change with a scalar linear SDE per mode.

With V orthogonal (here the orthonormal DCT-II along the spatial axes, per channel) and the mode
coordinates w = V^T x, each mode f follows its own scalar SDE

    dw_f = f_f(t) w_f dt + g_f(t) dW_f,

fixed by its closed-form marginal w_f,t | w_f,0 ~ N(a_f(t) w_f,0, s_f(t)^2) with a_f(0) = 1, s_f(0) = 0:

    f_f = d log a_f / dt,    g_f^2 = d s_f^2 / dt - 2 f_f s_f^2,
    Phi_f(t, s) = a_f(t) / a_f(s),
    reverse-step noise  int_{t'}^{t} Phi_f(t', r)^2 g_f(r)^2 dr = Phi_f(t', t)^2 s_f(t)^2 - s_f(t')^2

(the last because d/dr (s_f^2 / a_f^2) = g_f^2 / a_f^2). Because V is orthogonal, V dW is again a
standard Brownian motion: in pixel space the process is du = V F V^T u dt + V G dW.

The state stays in pixel space, shape (batch, *data_shape, k) with k = 1, so networks, images and
distances are what they are for every other family. Per-mode quantities (transition, factor, drift,
noise) are "matrices" of shape (*t.shape, *mode_shape, k, k); :meth:`ModalSDE.apply` applies one to a
state as V (M (V^T u)). ``mode_shape`` broadcasts against ``data_shape`` (channels share a frequency).
Everything a sampler, loss or analysis needs goes through the interface the pixel-shared
:class:`~diffusion_jax.sdes.linear.LinearSDE` also has (apply, lift, project, to_modes, ...).
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import linalg
from diffusion_jax.sdes.base import FamilyBase

Array = Any


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C (n x n): C[k, j] = sqrt(2/n) c_k cos(pi (2j + 1) k / (2n)), c_0 = 1/sqrt 2."""
    j = np.arange(n)
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * j[None, :] + 1) * j[:, None] / (2 * n))
    c[0] /= math.sqrt(2.0)
    return c


class DCTBasis:
    """V^T = orthonormal DCT-II along the spatial axes of data of shape ``shape``.

    Images (H, W, C): a 2-D DCT over (H, W), the same for every channel; flat data (D,): over the axis.
    ``frequencies`` are Hoogeboom & Salimans' lambda = pi^2 sum_a (i_a / n_a)^2, the eigenvalues of the
    (Neumann) heat operator in pixel units, so exp(-lambda sigma^2 / 2) is a Gaussian blur of std sigma.
    """

    def __init__(self, shape: tuple[int, ...]):
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise ValueError(f"DCT basis: data must be images (H, W, C) or vectors (D,), got shape {shape}")
        self.shape = shape
        self.spatial = (0, 1) if len(shape) == 3 else (0,)
        self.mats = [dct_matrix(shape[a]) for a in self.spatial]
        self.mode_shape = tuple(shape[a] if a in self.spatial else 1 for a in range(len(shape)))
        lam = np.zeros(self.mode_shape)
        for a in self.spatial:
            idx = np.arange(shape[a]).reshape([-1 if b == a else 1 for b in range(len(shape))])
            lam = lam + (np.pi * idx / shape[a]) ** 2
        self.frequencies = lam

    def _along(self, x: Array, mats, axis_from_end: int, xp) -> Array:
        for a, c in zip(self.spatial, mats):
            ax = x.ndim - axis_from_end + a
            dot = np.tensordot if xp is np else linalg.tensordot
            x = xp.moveaxis(dot(c, xp.moveaxis(x, ax, 0), axes=1), 0, ax)
        return x

    def forward(self, u: Array, xp=jnp) -> Array:
        """V^T u on a state (..., *shape, k): pixel -> mode coordinates."""
        mats = self.mats if xp is np else [xp.asarray(c, u.dtype) for c in self.mats]
        return self._along(u, mats, len(self.shape) + 1, xp)

    def inverse(self, w: Array, xp=jnp) -> Array:
        """V w on a state (..., *shape, k): mode -> pixel coordinates."""
        mats = [c.T for c in self.mats] if xp is np else [xp.asarray(c.T, w.dtype) for c in self.mats]
        return self._along(w, mats, len(self.shape) + 1, xp)


class ModeLaw(Protocol):
    """Closed-form per-mode marginal: log a_f(t), d log a_f/dt, s_f(t)^2 and d s_f^2/dt (xp = np or jnp).

    Each returns an array of shape (*t.shape, *mode_shape) or broadcastable to it.
    """

    def log_mean(self, t: Array, xp) -> Array: ...
    def dlog_mean(self, t: Array, xp) -> Array: ...
    def variance(self, t: Array, xp) -> Array: ...
    def dvariance(self, t: Array, xp) -> Array: ...


class ModalSDE(FamilyBase):
    """A linear diffusion diagonal in an orthogonal basis: per-mode scalar SDEs (k = 1), state in pixel space.

    Same public interface as :class:`~diffusion_jax.sdes.linear.LinearSDE`; per-mode matrices carry the
    ``mode_shape`` axes between the time axes and the trailing (k, k). ``basis=None`` is the identity: one
    scalar law shared by every pixel, for data of any shape (e.g. score_sde's sub-VP).
    """

    order = 1

    def __init__(self, name: str, basis: DCTBasis | None, law: ModeLaw, T: float = 1.0, t_min: float = 1e-5,
                 params: dict | None = None):
        self.name = name
        self._check_horizon(T, t_min)
        self.params = dict(params or {})
        self.basis = basis
        self.law = law
        self.T = float(T)
        self.t_min = float(t_min)
        self.data_shape = None if basis is None else basis.shape
        self.mode_shape = () if basis is None else basis.mode_shape
        self.mode_ndim = len(self.mode_shape)
        self.initial_variance = np.zeros(1)
        self.noise_rows = (0,)
        self._check_law()
        var_t = float(np.max(self.law.variance(np.float64(self.T), np)))
        self.prior_covariance = np.array([[var_t]])
        self.prior_cholesky = np.sqrt(self.prior_covariance)
        self._finish()

    def _definition(self):
        return (self.data_shape, getattr(self.law, "key", self.law))

    def _check_law(self) -> None:
        ts = np.concatenate([[0.0], np.geomspace(self.t_min, self.T, 257)])
        loga0 = np.asarray(self.law.log_mean(np.float64(0.0), np))
        var0 = np.asarray(self.law.variance(np.float64(0.0), np))
        if np.max(np.abs(loga0)) > 1e-12 or np.max(np.abs(var0)) > 1e-12:
            raise ValueError(f"{self.name}: the marginal must start at the data (a_f(0) = 1, s_f(0) = 0)")
        g2 = self.noise_np(ts)
        if not np.all(np.isfinite(g2)) or g2.min() < -1e-9 * max(1.0, g2.max()):
            raise ValueError(f"{self.name}: these parameters give a negative noise rate g_f(t)^2 = "
                             f"d s^2/dt - 2 f s^2 (min {g2.min():.3g}); the marginal is not an SDE's")

    # ------------------------------------------------------------------ shapes and the basis
    def _mat(self, x: Array, t_ndim: int) -> Array:
        """(*t, *modes-or-ones) per-mode scalars -> (*t, *modes-or-ones, 1, 1) matrices."""
        x = x.reshape(x.shape + (1,) * (t_ndim + self.mode_ndim - x.ndim))
        return x[..., None, None]

    def to_modes(self, u: Array) -> Array:
        """V^T u for a state of shape (..., *data_shape, k)."""
        return u if self.basis is None else self.basis.forward(u)

    def from_modes(self, w: Array) -> Array:
        """V w for mode coordinates of shape (..., *data_shape, k)."""
        return w if self.basis is None else self.basis.inverse(w)

    # ------------------------------------------------------------------ per-mode scalars (xp = np or jnp)
    def _noise(self, t, xp):
        return self.law.dvariance(t, xp) - 2.0 * self.law.dlog_mean(t, xp) * self.law.variance(t, xp)

    def noise_np(self, t) -> np.ndarray:
        """g_f(t)^2 on the host, shape (*t.shape, *modes)."""
        t = np.asarray(t, np.float64)
        return np.broadcast_to(self._noise(t.reshape(t.shape + (1,) * self.mode_ndim), np),
                               t.shape + self.mode_shape)

    def _tb(self, t, xp):
        """t with singleton mode axes appended, so per-mode laws broadcast."""
        return t.reshape(t.shape + (1,) * self.mode_ndim)

    # ------------------------------------------------------------------ public API (JAX)
    def drift_matrix(self, t: Array) -> Array:
        """F(t): f_f(t) per mode, shape (*t.shape, *modes, 1, 1)."""
        t = self._float(t)
        return self._mat(self.law.dlog_mean(self._tb(t, jnp), jnp), t.ndim)

    def noise_matrix(self, t: Array) -> Array:
        """G G^T (t): g_f(t)^2 per mode."""
        t = self._float(t)
        return self._mat(self._noise(self._tb(t, jnp), jnp), t.ndim)

    def diffusion_matrix(self, t: Array) -> Array:
        """G(t) = g_f(t) per mode."""
        return jnp.sqrt(jnp.maximum(self.noise_matrix(t), 0.0))

    def drift_trace(self, t: Array, data_shape: tuple[int, ...]) -> Array:
        """tr F over a whole state of data shape ``data_shape`` (basis-invariant): sum of f_f over pixels."""
        f = self.law.dlog_mean(self._tb(self._float(t), jnp), jnp)
        f = f.reshape(f.shape + (1,) * (jnp.ndim(t) + len(data_shape) - f.ndim))   # shared law: no mode axes
        f = jnp.broadcast_to(f, jnp.shape(t) + tuple(data_shape))
        return jnp.sum(f, axis=tuple(range(f.ndim - len(data_shape), f.ndim)))

    def transition(self, *, t: Array, s: Array) -> Array:
        """Phi(t, s) = a_f(t) / a_f(s) per mode (t < s allowed)."""
        self._check_t(s, "s")
        self._check_t(t)
        s, t = jnp.broadcast_arrays(self._float(s), self._float(t))
        la = self.law.log_mean(self._tb(t, jnp), jnp) - self.law.log_mean(self._tb(s, jnp), jnp)
        return self._mat(jnp.exp(la), t.ndim)

    def cholesky(self, t: Array) -> Array:
        """s_f(t) per mode (the 1 x 1 Cholesky factor of Sigma_t)."""
        self._check_t(t)
        t = self._float(t)
        return self._mat(jnp.sqrt(self.law.variance(self._tb(t, jnp), jnp)), t.ndim)

    def known_start(self) -> "ModalSDE":
        """Sigma_0 = 0 already (k = 1): the process from a known state is the family itself."""
        return self

    def _prior_sd(self, dtype) -> Array:
        var = self.law.variance(np.float64(self.T), np)
        return jnp.asarray(np.broadcast_to(np.sqrt(var), self.mode_shape)[..., None], dtype)

    def prior_sample(self, key: Array, shape: tuple[int, ...]) -> Array:
        """N(0, V diag(s_f(T)^2) V^T): the marginal at T of x_0 = 0 (a_f(T) is small, not zero)."""
        z = jax.random.normal(key, tuple(shape) + (1,), jnp.result_type(float))
        return self.from_modes(self._prior_sd(z.dtype) * z)

    def prior_logp(self, u: Array, batch_ndim: int = 1) -> Array:
        sd = self._prior_sd(u.dtype)
        w = self.to_modes(u) / sd
        per = -0.5 * w * w - jnp.log(sd) - 0.5 * math.log(2 * math.pi)
        return jnp.sum(per, axis=tuple(range(batch_ndim, per.ndim)))

    # ------------------------------------------------------------------ public API (host float64)
    # The host twins take a float or an array of times and return (*t.shape, *modes, 1, 1).
    def _np_mat(self, x, t_shape=()) -> np.ndarray:
        x = np.broadcast_to(x, tuple(t_shape) + self.mode_shape)
        return np.array(x)[..., None, None]

    def _law_np(self, fn, t) -> np.ndarray:
        t = np.asarray(t, np.float64)
        return self._np_mat(fn(self._tb(t, np), np), t.shape)

    def transition_np(self, *, t: float | np.ndarray, s: float | np.ndarray) -> np.ndarray:
        t, s = np.broadcast_arrays(np.asarray(t, np.float64), np.asarray(s, np.float64))
        la = self.law.log_mean(self._tb(t, np), np) - self.law.log_mean(self._tb(s, np), np)
        return self._np_mat(np.exp(la), t.shape)

    def cholesky_np(self, t: float | np.ndarray) -> np.ndarray:
        return np.sqrt(self.covariance_np(t))

    def covariance_np(self, t: float | np.ndarray) -> np.ndarray:
        return self._law_np(self.law.variance, t)

    def drift_matrix_np(self, t: float | np.ndarray) -> np.ndarray:
        return self._law_np(self.law.dlog_mean, t)

    def noise_matrix_np(self, t: float | np.ndarray) -> np.ndarray:
        return self._law_np(self._noise, t)

    def reverse_covariance_np(self, t_next: float, t: float) -> np.ndarray:
        """Noise of the exact reverse linear step t -> t' < t: Phi(t', t)^2 s(t)^2 - s(t')^2 per mode."""
        phi = self.transition_np(t=t_next, s=t)
        return np.maximum(phi * phi * self.covariance_np(t) - self.covariance_np(t_next), 0.0)

class BlurLaw:
    r"""Blurring diffusion (Hoogeboom & Salimans 2023) as gDDIM uses it.

    a_f(t) = alpha_t d_f(t),  s_f(t) = sigma_t, with alpha_t = cos(phi_T t / T), sigma_t = sin(phi_T t / T)
    (phi_T = arctan exp(-logsnr_min / 2): log-SNR of the unblurred mode at T is logsnr_min), and

        d_f(t) = (1 - d_min) exp(-lambda_f tau_t) + d_min,   tau_t = sigma_blur(t)^2 / 2,
        sigma_blur(t) = sigma_blur_max sin^2(pi t / (2 T)).
    """

    def __init__(self, frequencies: np.ndarray, sigma_blur_max: float, d_min: float, logsnr_min: float,
                 T: float):
        self.lam = np.asarray(frequencies, np.float64)
        self.sigma_blur_max = float(sigma_blur_max)
        self.d_min = float(d_min)
        self.phi_T = math.atan(math.exp(-0.5 * logsnr_min))
        self.T = float(T)

    @property
    def key(self) -> tuple:
        """Value key (the law is fixed by its parameters and frequencies)."""
        return ("blur", self.sigma_blur_max, self.d_min, self.phi_T, self.T, self.lam.shape, self.lam.tobytes())

    def _lam(self, xp, t):
        return self.lam if xp is np else xp.asarray(self.lam, t.dtype)

    def _blur(self, t, xp):
        """(tau_t, d tau / dt)."""
        w = 0.5 * math.pi / self.T
        s, c = xp.sin(w * t), xp.cos(w * t)
        sb = self.sigma_blur_max * s * s
        dsb = self.sigma_blur_max * 2.0 * s * c * w
        return 0.5 * sb * sb, sb * dsb

    def _decay(self, t, xp):
        tau, dtau = self._blur(t, xp)
        e = (1.0 - self.d_min) * xp.exp(-self._lam(xp, t) * tau)
        d = e + self.d_min
        return d, -self._lam(xp, t) * dtau * e / d

    def log_mean(self, t, xp):
        d, _ = self._decay(t, xp)
        return xp.log(xp.cos(self.phi_T * t / self.T)) + xp.log(d)

    def dlog_mean(self, t, xp):
        _, dlogd = self._decay(t, xp)
        return -(self.phi_T / self.T) * xp.tan(self.phi_T * t / self.T) + dlogd

    def variance(self, t, xp):
        return xp.sin(self.phi_T * t / self.T) ** 2

    def dvariance(self, t, xp):
        w = self.phi_T / self.T
        return w * xp.sin(2.0 * w * t)
