"""score_sde's sub-VP family, added as one definition (a scalar law): moments, gDDIM exactness, a toy run.

The references here are written from the SDE itself, dx = -1/2 beta x dt + sqrt(beta (1 - e^{-2B})) dW with
score_sde's linear beta, not from the family's closed form.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from diffusion_jax import sdes
from diffusion_jax.data import load_split
from diffusion_jax.evaluation.distances import gaussian_fit_samples, sliced_wasserstein
from diffusion_jax.samplers import prior_init, sample
from diffusion_jax.training import configs, sample_data, train

BMIN, BMAX = 0.1, 20.0


def _beta(t):
    return BMIN + t * (BMAX - BMIN)


def _B(t):
    return BMIN * t + 0.5 * (BMAX - BMIN) * t * t


def _moments_ode(ts):
    """float64 solve of dm/dt = -beta m / 2, dv/dt = -beta v + beta (1 - e^{-2B}) from m = 1, v = 0."""
    rhs = lambda t, y: [-0.5 * _beta(t) * y[0], -_beta(t) * y[1] + _beta(t) * -np.expm1(-2 * _B(t))]
    sol = solve_ivp(rhs, (0.0, ts[-1]), [1.0, 0.0], t_eval=ts, method="DOP853", rtol=1e-12, atol=1e-16)
    return sol.y


def test_subvp_moments_match_the_sde():
    sde = sdes.make("subvp")
    ts = np.array([1e-5, 1e-3, 0.05, 0.3, 0.7, 1.0])
    m_ref, v_ref = _moments_ode(ts)
    m = np.asarray(sde.mean_coefficient(jnp.asarray(ts)))[:, 0]
    v = np.asarray(sde.covariance(jnp.asarray(ts)))[:, 0, 0]
    np.testing.assert_allclose(m, m_ref, rtol=2e-6)
    np.testing.assert_allclose(v, v_ref, rtol=2e-5)
    np.testing.assert_allclose([sde.covariance_np(t)[0, 0] for t in ts], v_ref, rtol=1e-9)
    # the SDE coefficients the samplers integrate: F = -beta/2, G G^T = beta (1 - e^{-2B})
    for t in (1e-3, 0.4, 1.0):
        assert abs(float(sde.drift_matrix_np(t)[0, 0]) + 0.5 * _beta(t)) < 1e-12
        assert abs(float(sde.noise_matrix_np(t)[0, 0]) + _beta(t) * np.expm1(-2 * _B(t))) < 1e-9 * _beta(t)
    # works on data of any shape, like vp: state (batch, 4, 3, 1)
    x0 = jnp.ones((2, 4, 3))
    u, z = sde.sample_marginal(jax.random.PRNGKey(0), x0, jnp.array([0.2, 0.9]))
    assert u.shape == (2, 4, 3, 1) and z.shape == u.shape


@pytest.mark.parametrize("nfe", [1, 5, 20])
def test_gddim_is_exact_on_a_single_point(nfe):
    """Dirac data x*: the PF-ODE keeps eps = (u - m_t x*)/s_t constant, so u(t') = m_t' x* + s_t' eps_T."""
    sde = sdes.make("subvp")
    x_star, t_end = 0.7, 1e-3
    u0 = prior_init(sde, jax.random.PRNGKey(1), 4, (3,))
    m_T, s_T = np.exp(-0.5 * _B(1.0)), -np.expm1(-_B(1.0))
    eps = (np.asarray(u0, np.float64) - m_T * x_star) / s_T
    exact_end = np.exp(-0.5 * _B(t_end)) * x_star - np.expm1(-_B(t_end)) * eps
    fn = lambda u, t: jnp.full(u.shape[:-1], x_star, u.dtype)
    u, info = sample(sde, fn, u0, method="gddim", nfe=nfe, order=0, output="denoiser", t_end=t_end)
    assert info.nfe == nfe
    err = np.abs(np.asarray(u, np.float64) - exact_end).max() / np.abs(exact_end).max()
    assert err <= 1e-4, err
    u_e, _ = sample(sde, fn, u0, method="euler", nfe=nfe, output="denoiser", t_end=t_end)
    assert np.abs(np.asarray(u_e, np.float64) - exact_end).max() / np.abs(exact_end).max() > 1e-3


def test_subvp_learns_the_ring(tmp_path):
    c = configs.toy2d("subvp", toy_name="ring8")
    c.training.num_steps, c.training.ckpt_every, c.training.batch_size = 600, 600, 256
    c.model.kwargs.hidden = 128
    out = train(c, str(tmp_path))
    data = load_split(c, "test", limit=1000)
    other = load_split(c, "test", limit=2000)[1000:]
    x = sample_data(out["experiment"], out["state"].ema["0.999"], jax.random.PRNGKey(3), 1000, "gddim", 50)
    sw, sw_gauss = sliced_wasserstein(x, data), sliced_wasserstein(gaussian_fit_samples(other, 1000), data)
    assert sw < 0.5 * sw_gauss, (sw, sw_gauss, sliced_wasserstein(other, data))
