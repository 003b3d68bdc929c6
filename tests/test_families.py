"""Family definitions: critical damping, the closed-form table of docs/maths.md, stationary laws, PSLD -> CLD."""
import math

import numpy as np
import pytest

from diffusion_jax import sdes


def charpoly_faddeev_leverrier(a: np.ndarray) -> np.ndarray:
    """Coefficients c_0..c_n of det(sI - A) = sum_j c_j s^j, by Faddeev-LeVerrier (no eigenvalues)."""
    n = a.shape[0]
    c = np.zeros(n + 1)
    c[n] = 1.0
    m = np.zeros_like(a)
    for k in range(1, n + 1):
        m = a @ m + c[n - k + 1] * np.eye(n)
        c[n - k] = -np.trace(a @ m) / k
    return c


@pytest.mark.parametrize("n", range(1, 9))
def test_cdhold_characteristic_polynomial_is_critical(n):
    sde = sdes.make("cdhold", n=n)
    lam = sde.params["lam"]
    coeffs = charpoly_faddeev_leverrier(sde.A)
    expected = np.array([math.comb(n, j) * lam ** (n - j) for j in range(n + 1)])
    assert np.allclose(coeffs, expected, rtol=1e-10), (coeffs, expected)
    assert math.isclose(lam ** 2, max(2 * n - 3, 1), rel_tol=1e-12)
    assert math.isclose(sde.params["xi"], n * lam, rel_tol=1e-12)
    if n > 1:
        assert sde.params["g"][0] == 1.0


CLOSED_FORM_TABLE = {
    2: ((1.0,), 2.0),
    3: ((1.0, 8.0), 3 * math.sqrt(3)),
    4: ((1.0, 4.0, 25.0), 4 * math.sqrt(5)),
    5: ((1.0, 16 / 5, 49 / 5, 56.0), 5 * math.sqrt(7)),
    6: ((1.0, 20 / 7, 243 / 35, 96 / 5, 105.0), 18.0),
}


@pytest.mark.parametrize("n", sorted(CLOSED_FORM_TABLE))
def test_cdhold_reproduces_design_table(n):
    g2, xi = CLOSED_FORM_TABLE[n]
    lam, g, xi_code = sdes.critical_damping(n)
    assert np.allclose(np.square(g), g2, rtol=1e-12)
    assert math.isclose(xi_code, xi, rel_tol=1e-12)


@pytest.mark.parametrize("n", range(1, 9))
def test_hold_stationary_covariance_is_identity(n):
    sde = sdes.make("cdhold", n=n)
    a, q = sde.A, sde.Q
    assert np.allclose(a + a.T, -q, atol=1e-12)
    assert np.allclose(sde.prior_covariance, np.eye(n), atol=1e-9)
    assert np.allclose(a @ np.eye(n) + np.eye(n) @ a.T + q, 0, atol=1e-12)   # Lyapunov residual of I


def test_told_is_toldpp():
    sde = sdes.make("told")
    assert sde.order == 3
    assert np.allclose(sde.params["g"], (1.0, 2 * math.sqrt(2)), rtol=1e-14)
    assert math.isclose(sde.params["xi"], 3 * math.sqrt(3), rel_tol=1e-14)
    a = sde.A
    assert a[0, 1] == 1.0 and a[1, 0] == -1.0 and math.isclose(a[1, 2], 2 * math.sqrt(2))
    assert math.isclose(a[2, 2], -3 * math.sqrt(3))


def test_cld_critically_damped_with_stationary_diag_1_M():
    sde = sdes.make("cld")
    m_inv, gamma = sde.params["m_inv"], sde.params["gamma"]
    m = 1 / m_inv
    assert math.isclose(gamma ** 2, 4 * m)
    # Repeated eigenvalue <=> zero discriminant of s^2 - tr(A) s + det(A).
    a = sde.A
    assert math.isclose(np.trace(a) ** 2, 4 * np.linalg.det(a), rel_tol=1e-12)
    assert np.allclose(sde.prior_covariance, np.diag([1.0, m]), atol=1e-12)
    assert np.allclose(sde.sigma0, np.diag([0.0, 0.04 * m]))


def test_psld_default_is_critical_and_stationary():
    sde = sdes.make("psld")
    p = sde.params
    assert math.isclose((p["gamma"] - p["nu"]) ** 2, 4 * p["m_inv"])
    a = sde.A
    assert math.isclose(np.trace(a) ** 2, 4 * np.linalg.det(a), rel_tol=1e-10)
    assert np.allclose(sde.prior_covariance, np.diag([1.0, 1 / p["m_inv"]]), atol=1e-12)


def test_psld_with_zero_gamma_is_cld():
    beta, nu, m_inv = 8.0, 4.01, 3.0
    p = sdes.make("psld", beta=beta, gamma=0.0, nu=nu, m_inv=m_inv, init_kappa=0.04)
    c = sdes.make("cld", beta=beta / 2, m_inv=m_inv, gamma=nu / m_inv, init_gamma=0.04)
    assert np.allclose(p.beta(0.3) * p.A, c.beta(0.3) * c.A)
    assert np.allclose(p.beta(0.3) * p.Q, c.beta(0.3) * c.Q)
    for t in [1e-4, 0.1, 0.5, 1.0]:
        assert np.allclose(p.transition(t=t, s=0.0), c.transition(t=t, s=0.0), rtol=1e-5, atol=1e-7)
        sp, sc = np.asarray(p.covariance(t)), np.asarray(c.covariance(t))
        d = np.sqrt(np.diag(sc))
        assert np.all(np.abs(sp - sc) <= 1e-5 * np.outer(d, d))
