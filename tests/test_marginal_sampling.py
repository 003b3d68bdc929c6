"""Monte-Carlo: samples of u_t | x_0 and of the prior have the mean and covariance of independent float64
computations (moment ODEs, the stationary Lyapunov equation)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from diffusion_jax import sdes
from reference import moments_by_ode

N = 200_000


def _check_moments(res, sigma_ref, n):
    """Mean within 5 standard errors; covariance entries within 5 standard errors of a Gaussian."""
    k = res.shape[-1]
    mean = res.mean(0)
    cov = np.cov(res.T, bias=False).reshape(k, k)
    sd = np.sqrt(np.diag(sigma_ref))
    assert np.all(np.abs(mean) <= 5 * sd / np.sqrt(n)), (mean, sd)
    se = np.sqrt((np.outer(np.diag(sigma_ref), np.diag(sigma_ref)) + sigma_ref ** 2) / n)
    assert np.all(np.abs(cov - sigma_ref) <= 5 * se), ((cov - sigma_ref) / se)


@pytest.mark.parametrize("name,params,t", [("cld", {}, 0.01), ("told", {}, 0.2), ("psld", {}, 1e-4),
                                            ("cdhold", dict(n=5), 0.05), ("vp", {}, 0.3)])
def test_marginal_samples_have_closed_form_moments(name, params, t):
    sde = sdes.make(name, **params)
    key_x, key_u = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.uniform(key_x, (N // 4, 2, 2), minval=-1, maxval=1)   # data of shape (2, 2)
    u, z = jax.jit(sde.sample_marginal)(key_u, x0, t)
    assert u.shape == x0.shape + (sde.order,) and z.shape == u.shape
    b = float(sde.schedule.integral(np.float64(t), np))
    phi_ref, sigma_ref = moments_by_ode(sde.A, sde.Q, sde.sigma0, b)
    res = np.asarray(u, np.float64) - np.asarray(x0, np.float64)[..., None] * phi_ref[:, 0]
    _check_moments(res.reshape(-1, sde.order), sigma_ref, N)


def test_per_example_times_broadcast_over_data_axes():
    sde = sdes.make("cdhold", n=4)
    t_values = np.array([1e-3, 0.4])
    n_ex = 40_000
    t = jnp.asarray(np.repeat(t_values, n_ex // 2), jnp.float32)
    x0 = jnp.full((n_ex, 3), 0.5)
    u, _ = sde.sample_marginal(jax.random.PRNGKey(1), x0, t)
    for j, tv in enumerate(t_values):
        b = float(sde.schedule.integral(np.float64(tv), np))
        phi_ref, sigma_ref = moments_by_ode(sde.A, sde.Q, sde.sigma0, b)
        part = np.asarray(u[j * n_ex // 2:(j + 1) * n_ex // 2], np.float64)
        res = part - 0.5 * phi_ref[:, 0]
        _check_moments(res.reshape(-1, 4), sigma_ref, res.size // 4)


def independent_prior_covariance(sde) -> np.ndarray:
    """The prior's k x k covariance from the family's float64 drift F and noise G G^T only.

    Stable drift (every eigenvalue of F in the left half-plane): the stationary law, F S + S F^T + G G^T = 0
    solved as one linear system in vec(S) (Kronecker form; time-homogeneous families, so any t gives the same
    S). Otherwise (VE): the law at T of a known x_0 = 0, dS/dt = F S + S F^T + G G^T from diag(Sigma_0) at 0
    by a float64 Radau solve.
    """
    k = sde.order
    f, q = sde.drift_matrix_np(sde.T), sde.noise_matrix_np(sde.T)
    if np.linalg.eigvals(f).real.max() < 0:
        eye = np.eye(k)
        s = np.linalg.solve(np.kron(f, eye) + np.kron(eye, f), -q.ravel()).reshape(k, k)
    else:
        def rhs(t, y):
            s, f, q = y.reshape(k, k), sde.drift_matrix_np(t), sde.noise_matrix_np(t)
            return (f @ s + s @ f.T + q).ravel()
        sol = solve_ivp(rhs, (0.0, sde.T), np.diag(sde.initial_variance).ravel(), method="Radau",
                        rtol=1e-11, atol=1e-12)
        assert sol.success, sol.message
        s = sol.y[:, -1].reshape(k, k)
    return 0.5 * (s + s.T)


@pytest.mark.parametrize("name", ["ve", "cld", "cdhold", "psld"])
def test_prior_sample_and_logp(name):
    """Prior draws have zero mean and the independently computed covariance (within 5 standard errors), and
    prior_logp is scipy's Gaussian log-density with that covariance."""
    sde = sdes.make(name)
    sigma_ref = independent_prior_covariance(sde)
    n = N // 2
    u = sde.prior_sample(jax.random.PRNGKey(2), (n, 2))
    assert u.shape == (n, 2, sde.order)
    _check_moments(np.asarray(u, np.float64).reshape(-1, sde.order), sigma_ref, 2 * n)
    # log-density against scipy's multivariate normal, summed over the data axis.
    from scipy.stats import multivariate_normal
    few = np.asarray(u[:5], np.float64)
    ref = multivariate_normal(np.zeros(sde.order), sigma_ref).logpdf(few.reshape(-1, sde.order))
    got = np.asarray(sde.prior_logp(u[:5]))
    assert np.allclose(got, ref.reshape(5, 2).sum(1), rtol=1e-5, atol=1e-3)
