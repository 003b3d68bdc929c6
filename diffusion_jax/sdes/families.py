"""The families of the five papers as small definitions on the linear core (docs/maths.md sections 2-3)."""
from __future__ import annotations

import functools
import inspect
import math
from fractions import Fraction
from typing import Callable, Sequence

import numpy as np

from diffusion_jax.sdes.linear import LinearSDE
from diffusion_jax.sdes.modal import BlurLaw, DCTBasis, ModalSDE
from diffusion_jax.sdes.schedules import ConstantBeta, GeometricSigma, LinearBeta


def _positive(family: str, **values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float, np.floating)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{family}: {name} must be a positive finite number, got {v!r}")


def vp(beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, t_min: float = 1e-5) -> LinearSDE:
    """Variance preserving: A = -1/2, Q = 1, linear beta (score_sde's VP SDE)."""
    _positive("vp", beta_min=beta_min, beta_max=beta_max)
    return LinearSDE("vp", [[-0.5]], [[1.0]], LinearBeta(beta_min, beta_max), (), T, t_min,
                     dict(beta_min=beta_min, beta_max=beta_max))


def ve(sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0, t_min: float = 1e-5) -> LinearSDE:
    """Variance exploding: A = 0, Q = 1, beta = d sigma^2/dt with geometric sigma(t)."""
    _positive("ve", sigma_min=sigma_min, sigma_max=sigma_max)
    return LinearSDE("ve", [[0.0]], [[1.0]], GeometricSigma(sigma_min, sigma_max), (), T, t_min,
                     dict(sigma_min=sigma_min, sigma_max=sigma_max))


def cld(beta: float = 4.0, m_inv: float = 4.0, gamma: float | None = None, init_gamma: float = 0.04,
        T: float = 1.0, t_min: float = 1e-5) -> LinearSDE:
    """Critically-damped Langevin (Dockhorn et al.): A = [[0, M^-1], [-1, -Gamma M^-1]], Q = diag(0, 2 Gamma).

    ``gamma`` (friction Gamma) defaults to critical damping Gamma^2 = 4 M, i.e. Gamma = 2 / sqrt(M^-1).
    The velocity starts as N(0, init_gamma * M) (HSM). Stationary law N(0, diag(1, M)).
    """
    _positive("cld", beta=beta, m_inv=m_inv, init_gamma=init_gamma)
    if gamma is None:
        gamma = 2.0 / math.sqrt(m_inv)
    _positive("cld", gamma=gamma)
    m = 1.0 / m_inv
    a = [[0.0, m_inv], [-1.0, -gamma * m_inv]]
    q = [[0.0, 0.0], [0.0, 2.0 * gamma]]
    return LinearSDE("cld", a, q, ConstantBeta(beta), (init_gamma * m,), T, t_min,
                     dict(beta=beta, m_inv=m_inv, gamma=gamma, init_gamma=init_gamma))


def _hold_matrices(g: Sequence[float], xi: float) -> tuple[np.ndarray, np.ndarray]:
    n = len(g) + 1
    a = np.zeros((n, n))
    for i, gi in enumerate(g):
        a[i, i + 1] = gi
        a[i + 1, i] = -gi
    a[n - 1, n - 1] = -xi
    q = np.zeros((n, n))
    q[n - 1, n - 1] = 2.0 * xi
    return a, q


def hold(g: Sequence[float], xi: float, beta: float = 4.0, init_var: float | Sequence[float] = 0.04,
         T: float = 1.0, t_min: float = 1e-5, name: str = "hold", extra: dict | None = None) -> LinearSDE:
    """Higher-order Langevin dynamics of order n = len(g) + 1.

    A is tridiagonal with A[i, i+1] = g_i, A[i+1, i] = -g_i and A[n-1, n-1] = -xi; Q = diag(0, ..., 0, 2 xi).
    A + A^T = -Q, so the stationary law is N(0, I_n) whenever A is stable (all g_i != 0, xi > 0).
    """
    g = [float(v) for v in np.atleast_1d(np.asarray(g, dtype=np.float64))] if len(np.atleast_1d(g)) else []
    n = len(g) + 1
    _positive(name, beta=beta, xi=xi)
    if any(not math.isfinite(v) for v in g):
        raise ValueError(f"{name}: couplings g must be finite, got {g}")
    if any(v == 0 for v in g):
        raise ValueError(f"{name}: every coupling g_i must be non-zero (a zero decouples coordinates and "
                         f"leaves A unstable), got g={g}")
    a, q = _hold_matrices(g, xi)
    spectral_abscissa = np.linalg.eigvals(a).real.max()
    if not spectral_abscissa < 0:
        raise ValueError(f"{name}: A is not stable (max Re eig = {spectral_abscissa:.3g}) for g={g}, xi={xi}")
    init = np.broadcast_to(np.asarray(init_var, dtype=np.float64), (n - 1,))
    params = dict(g=tuple(g), xi=xi, beta=beta, init_var=tuple(float(v) for v in init))
    params.update(extra or {})
    return LinearSDE(name, a, q, ConstantBeta(beta), tuple(init), T, t_min, params)


def critical_damping(n: int) -> tuple[float, tuple[float, ...], float]:
    """Critically-damped HOLD parameters of order n: (lambda, g, xi) with g_1 = 1.

    det(sI - A) = (s + lambda)^n. The characteristic polynomial of the tridiagonal A is the continuant
    D_n = (s + xi) D_{n-1} + g_{n-1}^2 D_{n-2}, D_{j+1} = s D_j + g_j^2 D_{j-1}, D_0 = 1, D_1 = s, where D_j
    (j < n) has the parity of j. Splitting (s + 1)^n into its parts of parity n-1 and n gives
    xi D_{n-1} and s D_{n-1} + g_{n-1}^2 D_{n-2}; the continuant recursion then peels off every g_j^2
    (a Euclidean algorithm), exactly in rational arithmetic for lambda = 1. Rescaling time so that
    g_1 = 1 fixes lambda. n = 1 has no coupling: lambda = xi = 1.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"cdhold: order n must be an integer >= 1, got {n!r}")
    n = int(n)
    if n == 1:
        return 1.0, (), 1.0
    binom = [Fraction(math.comb(n, j)) for j in range(n + 1)]          # (s+1)^n, coefficient of s^j
    odd_part = [c if (j % 2) == ((n - 1) % 2) else Fraction(0) for j, c in enumerate(binom)]
    even_part = [c if (j % 2) == (n % 2) else Fraction(0) for j, c in enumerate(binom)]
    xi = odd_part[n - 1]                                               # = n (lambda = 1)
    d_hi = [c / xi for c in odd_part[:n]]                              # D_{n-1}, monic
    rem = [even_part[j] - (d_hi[j - 1] if j >= 1 else 0) for j in range(n + 1)]
    g2 = [Fraction(0)] * (n - 1)
    for j in range(n - 1, 0, -1):                                      # rem = g_j^2 D_{j-1}
        deg = j - 1
        if any(c != 0 for c in rem[deg + 1:]):
            raise ArithmeticError("continuant recursion failed (degree mismatch)")
        g2[j - 1] = rem[deg]
        if g2[j - 1] <= 0:
            raise ArithmeticError(f"critical damping has no real coupling at n={n}")
        d_lo = [c / g2[j - 1] for c in rem[:deg + 1]]                  # D_{j-1}
        rem = [(d_hi[i] if i < len(d_hi) else 0) - (d_lo[i - 1] if 1 <= i <= len(d_lo) else 0)
               for i in range(max(len(d_hi), len(d_lo) + 1))]
        d_hi = d_lo
    if d_hi != [Fraction(1)]:
        raise ArithmeticError("continuant recursion did not end at D_0 = 1")
    scale2 = 1 / g2[0]                                                 # lambda^2 after g_1 -> 1
    lam = math.sqrt(scale2)
    g = tuple(math.sqrt(v * scale2) for v in g2)
    return lam, g, float(n) * lam


def cdhold(n: int = 3, beta: float = 4.0, init_var: float | Sequence[float] = 0.04, T: float = 1.0,
           t_min: float = 1e-5) -> LinearSDE:
    """Critically-damped HOLD of any order n >= 1: every eigenvalue of A equals -lambda, lambda^2 = 2n - 3."""
    lam, g, xi = critical_damping(n)
    return hold(g, xi, beta, init_var, T, t_min, name="cdhold", extra=dict(n=int(n), lam=lam))


def told(beta: float = 4.0, init_var: float | Sequence[float] = 0.04, T: float = 1.0,
         t_min: float = 1e-5) -> LinearSDE:
    """TOLD++: cdhold with n = 3 (g = (1, 2 sqrt 2), xi = 3 sqrt 3)."""
    lam, g, xi = critical_damping(3)
    return hold(g, xi, beta, init_var, T, t_min, name="told", extra=dict(n=3, lam=lam))


def psld(beta: float = 8.0, gamma: float = 0.01, nu: float = 4.01, m_inv: float | None = None,
         init_kappa: float = 0.04, T: float = 1.0, t_min: float = 1e-5) -> LinearSDE:
    """Phase-space Langevin diffusion (Pandey & Mandt): A = 1/2 [[-Gamma, M^-1], [-1, -nu]], Q = diag(Gamma, M nu).

    ``m_inv`` defaults to critical damping (Gamma - nu)^2 = 4 M^-1. Stationary law N(0, diag(1, M)).
    Gamma = 0 is CLD with beta_CLD = beta / 2 and friction Gamma_CLD = M nu.
    """
    _positive("psld", beta=beta, nu=nu, init_kappa=init_kappa)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"psld: gamma must be finite and >= 0, got {gamma!r}")
    if m_inv is None:
        m_inv = (gamma - nu) ** 2 / 4.0
    _positive("psld", m_inv=m_inv)
    m = 1.0 / m_inv
    a = 0.5 * np.array([[-gamma, m_inv], [-1.0, -nu]])
    q = np.diag([gamma, m * nu])
    return LinearSDE("psld", a, q, ConstantBeta(beta), (init_kappa * m,), T, t_min,
                     dict(beta=beta, gamma=gamma, nu=nu, m_inv=m_inv, init_kappa=init_kappa))


def bdm(shape: Sequence[int] = (8, 8, 1), sigma_blur_max: float = 5.0, d_min: float = 0.001,
        logsnr_min: float = -10.0, T: float = 1.0, t_min: float = 1e-5) -> ModalSDE:
    """Blurring diffusion (Hoogeboom & Salimans), diagonal in the orthonormal DCT-II basis of ``shape``.

    Per frequency lambda_f = pi^2 (i^2/H^2 + j^2/W^2): u_t | x_0 ~ N(V diag(alpha_t d_f(t)) V^T x_0,
    sigma_t^2 I), d_f(t) = (1 - d_min) exp(-lambda_f sigma_blur(t)^2 / 2) + d_min, sigma_blur(t) =
    sigma_blur_max sin^2(pi t / 2T), alpha_t = cos(phi_T t/T), sigma_t = sin(phi_T t/T) with the unblurred
    log-SNR at T equal to ``logsnr_min``. ``shape`` is the data shape, (H, W, C) or (D,); sigma_blur_max is
    in pixels (Hoogeboom & Salimans use 20 at 32-64 px; 5 suits 8 x 8 digits).
    """
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as e:
        raise ValueError(f"bdm: shape must be the data shape (H, W, C) or (D,), got {shape!r}") from e
    _positive("bdm", sigma_blur_max=sigma_blur_max)
    if not (0 < d_min < 1):
        raise ValueError(f"bdm: d_min must lie in (0, 1), got {d_min!r}")
    if not (math.isfinite(logsnr_min) and logsnr_min < 0):
        raise ValueError(f"bdm: logsnr_min must be a finite negative log-SNR at T (e.g. -10), got {logsnr_min!r}")
    basis = DCTBasis(shape)
    law = BlurLaw(basis.frequencies, sigma_blur_max, d_min, logsnr_min, T)
    return ModalSDE("bdm", basis, law, T, t_min, dict(shape=shape, sigma_blur_max=sigma_blur_max,
                                                        d_min=d_min, logsnr_min=logsnr_min))



class SubVPLaw:
    r"""score_sde's sub-VP SDE  dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - e^{-2 B(t)})) dW  as a scalar law:

        m_t = e^{-B/2},   s_t^2 = (1 - e^{-B})^2,   B(t) = int_0^t beta,

    so f = d log m/dt = -beta/2 and d s^2/dt - 2 f s^2 = beta (1 - e^{-2B}), the SDE's noise rate. The noise
    rate is not a constant multiple of beta, which is why it is a law and not a (beta, A, Q) family.
    """

    def __init__(self, schedule: LinearBeta):
        self.schedule = schedule

    @property
    def key(self) -> tuple:
        return ("subvp", self.schedule)

    def log_mean(self, t, xp):
        return -0.5 * self.schedule.integral(t, xp)

    def dlog_mean(self, t, xp):
        return -0.5 * self.schedule.beta(t, xp)

    def variance(self, t, xp):
        return xp.expm1(-self.schedule.integral(t, xp)) ** 2            # expm1: exact at small B

    def dvariance(self, t, xp):
        b = self.schedule.integral(t, xp)
        return -2.0 * xp.expm1(-b) * xp.exp(-b) * self.schedule.beta(t, xp)


def subvp(beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, t_min: float = 1e-5) -> ModalSDE:
    """Sub-VP (Song et al. 2021): VP's mean, variance (1 - e^{-B})^2 <= VP's; one scalar law for every pixel."""
    _positive("subvp", beta_min=beta_min, beta_max=beta_max)
    return ModalSDE("subvp", None, SubVPLaw(LinearBeta(beta_min, beta_max)), T, t_min,
                    dict(beta_min=beta_min, beta_max=beta_max))


# ------------------------------------------------------------------ force-field ODE models (fields.family)
# The VE core with a non-Gaussian kernel's training noise and prior; imported on use (fields imports sdes).
def pfgm(sigma_min: float = 0.002, sigma_max: float = 80.0, T: float = 1.0, t_min: float | None = None) -> LinearSDE:
    """PFGM: the Cauchy kernel of gravitation in N + 1 dimensions (Student-t, D = 1), VE geometry."""
    from diffusion_jax.fields.family import field_family
    return field_family("pfgm", sigma_min, sigma_max, T, t_min)


def pfgmpp(D: float = 128.0, sigma_min: float = 0.002, sigma_max: float = 80.0, T: float = 1.0,
           t_min: float | None = None) -> LinearSDE:
    """PFGM++: Student-t kernel with D augmented dimensions (r = sigma sqrt(D)), VE geometry."""
    from diffusion_jax.fields.family import field_family
    return field_family("pfgmpp", sigma_min, sigma_max, T, t_min, D=D)


def radial_tanh(sigma_min: float = 0.002, sigma_max: float = 80.0, T: float = 1.0,
                t_min: float | None = None) -> LinearSDE:
    """Radial-CDF field with Psi = tanh, second moment aligned with VE, VE geometry."""
    from diffusion_jax.fields.family import field_family
    return field_family("radial_tanh", sigma_min, sigma_max, T, t_min)


def radial_exp(sigma_min: float = 0.002, sigma_max: float = 80.0, T: float = 1.0,
               t_min: float | None = None) -> LinearSDE:
    """Radial-CDF field with Psi = 1 - e^{-r}, second moment aligned with VE, VE geometry."""
    from diffusion_jax.fields.family import field_family
    return field_family("radial_exp", sigma_min, sigma_max, T, t_min)


FAMILIES: dict[str, Callable[..., LinearSDE | ModalSDE]] = {
    "vp": vp, "ve": ve, "cld": cld, "hold": hold, "cdhold": cdhold, "told": told, "psld": psld, "bdm": bdm,
    "subvp": subvp, "pfgm": pfgm, "pfgmpp": pfgmpp, "radial_tanh": radial_tanh, "radial_exp": radial_exp,
}


def make(name: str, **params) -> LinearSDE | ModalSDE:
    """Build a family by name, e.g. ``make("cdhold", n=4)``; ``params`` are the builder's keywords."""
    if name not in FAMILIES:
        raise ValueError(f"unknown SDE family {name!r}; known families: {', '.join(sorted(FAMILIES))}")
    builder = FAMILIES[name]
    try:
        inspect.signature(builder).bind(**params)
    except TypeError as e:
        raise ValueError(f"{name}: bad parameters {sorted(params)} ({e}); "
                         f"{name} accepts {list(inspect.signature(builder).parameters)}") from e
    return _make_cached(name, tuple(sorted((k, _hashable(v)) for k, v in params.items())))


def _hashable(v):
    """Parameter values as cache keys: lists (e.g. from JSON configs) become tuples."""
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, np.ndarray):
        return tuple(_hashable(x) for x in v.tolist())
    return v


@functools.lru_cache(maxsize=128)
def _make_cached(name: str, params: tuple) -> LinearSDE | ModalSDE:
    # Families are immutable values: one object (and one set of float64 tables) per definition.
    return FAMILIES[name](**dict(params))
