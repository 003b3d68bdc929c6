"""PFGM++ (diffusion_jax.fields.pfgmpp) against closed forms and the library's VE sampler.

* kernel samples: R/r against the beta-prime law (KS), the D = inf limit against chi(N), direction isotropy;
* kernel_logpdf: integrates to 1 (N = 1, 2), equals scipy's multivariate t, tends to the Gaussian;
* the empirical optimal denoiser against a float64 numpy posterior mean; D = inf equals exact.empirical_denoiser;
* large D: the PFGM++ family's ODE with the optimal denoiser, through samplers.sample, follows the VE one;
* the EDM grid and the loss on a known case (training through training.train: tests/test_force_fields.py).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats
from scipy.special import logsumexp

from diffusion_jax import exact, samplers, sdes
from diffusion_jax.analysis import empirical_denoiser_fn as empirical_denoiser_fn_analysis
from diffusion_jax.fields import kernels as K
from diffusion_jax.fields import pfgmpp as P
from diffusion_jax.fields.family import empirical_denoiser_fn
from diffusion_jax.samplers.grids import noise_level

SIGMA = 0.7


# ------------------------------------------------------------------ the kernel
@pytest.mark.parametrize("n_dim,aug", [(1, 1.0), (1, 128.0), (2, 1.0), (2, 3.0), (5, 3.0), (64, 1.0),
                                       (64, 128.0), (5, 1e7)])
def test_kernel_radius_follows_beta_prime(n_dim, aug):
    y = jnp.full((20000, n_dim), 0.3)
    x = P.sample_kernel(jax.random.PRNGKey(n_dim * 31 + int(aug) % 1000), y, SIGMA, aug)
    radius = np.linalg.norm(np.asarray(x - y, np.float64), axis=1)
    r = SIGMA * math.sqrt(aug)
    # P(R/r <= s) = P(R^2/r^2 <= s^2), R^2/r^2 ~ BetaPrime(N/2, D/2)
    p = stats.kstest(radius / r, lambda s: stats.betaprime(n_dim / 2, aug / 2).cdf(s * s)).pvalue
    assert p > 1e-3, p


def test_kernel_ks_test_has_power_and_gaussian_limit():
    y = jnp.zeros((4000, 2))
    radius = np.linalg.norm(np.asarray(P.sample_kernel(jax.random.PRNGKey(1), y, SIGMA, 1.0)), axis=1)
    wrong = stats.kstest(radius / (SIGMA * math.sqrt(3.0)), lambda s: stats.betaprime(1.0, 1.5).cdf(s * s))
    assert wrong.pvalue < 1e-6                                         # D = 1 samples are not D = 3
    for n_dim in (1, 3, 50):
        x = np.asarray(P.sample_kernel(jax.random.PRNGKey(n_dim), jnp.zeros((4000, n_dim)), SIGMA, math.inf))
        assert stats.kstest(np.linalg.norm(x, axis=1) / SIGMA, stats.chi(n_dim).cdf).pvalue > 1e-3
    # uniform direction: the mean unit vector of 4000 draws in R^3 is O(1/sqrt(4000))
    x = np.asarray(P.sample_kernel(jax.random.PRNGKey(9), jnp.zeros((4000, 3)), SIGMA, 2.0), np.float64)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.linalg.norm(unit.mean(0)) < 4.0 / math.sqrt(4000)
    # per-example sigma scales the perturbation of that example
    sig = jnp.asarray([0.1, 10.0] * 2000)
    x = np.asarray(P.sample_kernel(jax.random.PRNGKey(3), jnp.zeros((4000, 2)), sig, 5.0))
    ratio = np.median(np.linalg.norm(x[1::2], axis=1)) / np.median(np.linalg.norm(x[::2], axis=1))
    assert 80 < ratio < 125


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")   # float32 integrand roundoff
@pytest.mark.parametrize("aug", [1.0, 2.5, 50.0, 1e7, math.inf])
def test_kernel_logpdf_normalises(aug):
    y0 = 0.4
    f = jax.jit(lambda pts: P.kernel_logpdf(pts, jnp.full_like(pts, y0), SIGMA, aug))
    dens1 = lambda s: float(np.exp(f(jnp.asarray([[y0 + s]], jnp.float32))[0]))
    total1 = integrate.quad(dens1, -np.inf, np.inf, limit=200)[0]
    dens2 = lambda s: float(np.exp(f(jnp.asarray([[y0 + s, y0]], jnp.float32))[0]))
    total2 = integrate.quad(lambda s: 2 * math.pi * s * dens2(s), 0, np.inf, limit=200)[0]
    assert total1 == pytest.approx(1.0, abs=1e-5)
    assert total2 == pytest.approx(1.0, abs=1e-5)


def test_kernel_logpdf_is_multivariate_t_and_tends_to_gaussian():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(6, 3))
    x = y + rng.normal(size=(6, 3)) * 2.0
    sig = np.array([0.3, 0.7, 1.0, 2.0, 5.0, 0.9])
    for aug in (1.0, 4.0, 33.0):
        got = np.asarray(P.kernel_logpdf(jnp.asarray(x), jnp.asarray(y), jnp.asarray(sig), aug))
        ref = [stats.multivariate_t(loc=y[i], shape=sig[i] ** 2 * np.eye(3), df=aug).logpdf(x[i]) for i in range(6)]
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6)
    gauss = [stats.multivariate_normal(y[i], sig[i] ** 2 * np.eye(3)).logpdf(x[i]) for i in range(6)]
    got = np.asarray(P.kernel_logpdf(jnp.asarray(x), jnp.asarray(y), jnp.asarray(sig), 1e9))
    np.testing.assert_allclose(got, gauss, rtol=1e-5, atol=1e-5)
    # the constant's large-D branch (asymptotic series) meets the Gaussian one
    assert P.kernel_log_normaliser(3, 3e7) == pytest.approx(P.kernel_log_normaliser(3, math.inf), abs=1e-6)


# ------------------------------------------------------------------ optimal denoiser
@pytest.mark.parametrize("aug", [1.0, 8.0, 1000.0, math.inf])
def test_empirical_denoiser_matches_float64_posterior_mean(aug):
    rng = np.random.default_rng(2)
    data = rng.normal(size=(29, 2, 2))                               # N = 4, data shape (2, 2)
    x = rng.normal(size=(10, 2, 2)) * 1.5
    sig = 0.8
    d2 = ((x[:, None] - data[None]) ** 2).reshape(10, 29, -1).sum(-1)
    lw = -d2 / (2 * sig ** 2) if math.isinf(aug) else -0.5 * (4 + aug) * np.log(d2 + aug * sig ** 2)
    w = np.exp(lw - logsumexp(lw, axis=1, keepdims=True))
    ref = np.einsum("mn,nij->mij", w, data)
    got = P.empirical_denoiser(jnp.asarray(data, jnp.float32), jnp.asarray(x, jnp.float32), sig, aug, chunk=6)
    np.testing.assert_allclose(np.asarray(got), ref, atol=3e-6)


def test_gaussian_limit_denoiser_is_the_library_ve_denoiser():
    sde = sdes.make("ve")
    rng = np.random.default_rng(3)
    data = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    for t in (0.3, 0.6):
        s = float(noise_level(sde, t)[0])                            # VE: sigma(t) = sqrt(B(t))
        x = jnp.asarray(rng.normal(size=(32, 2)) * s, jnp.float32)
        ours = P.empirical_denoiser(data, x, s, math.inf)
        lib = exact.empirical_denoiser(sde, data, x[..., None], t)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(lib), atol=1e-6)


def test_large_d_sampler_matches_ve_edm():
    """PFGM++ families through samplers.sample (edm_heun) from the same start: D = 1e7 follows VE, D = 64 not."""
    rng = np.random.default_rng(0)
    data = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    x0 = P.prior_sample(jax.random.PRNGKey(0), (64, 2), 20.0, math.inf)[..., None]
    traj = {}
    fams = {aug: sdes.make("pfgmpp", D=aug, sigma_max=20.0) for aug in (1e7, 64.0)}
    ve = sdes.ve(sigma_min=0.002, sigma_max=20.0, t_min=fams[64.0].t_min)     # the same time grid
    fams[math.inf] = ve
    for aug, sde in fams.items():
        fn = empirical_denoiser_fn(sde, data, K.StudentT(aug), chunk=8)
        _, info = samplers.sample(sde, fn, x0, method="edm_heun", nfe=39, output="denoiser",
                                  return_trajectory=True)
        assert info.nfe == 39
        traj[aug] = np.asarray(info.trajectory)
    # D = 1e7 follows the Gaussian (VE/EDM) ODE to float32 noise; D = 64 does not (measured 0.077, i.e. 40x the
    # D = 1e7 bound)
    assert np.abs(traj[1e7] - traj[math.inf]).max() < 1e-4 * 20.0
    assert np.abs(traj[64.0] - traj[math.inf]).max() > 0.03
    # the D = inf run is the library's VE run with its own optimal denoiser (exact.empirical_denoiser)
    _, info_lib = samplers.sample(ve, empirical_denoiser_fn_analysis(ve, data, 8), x0, method="edm_heun", nfe=39,
                                  output="denoiser", return_trajectory=True)
    # relative to the initial scale sigma_max = 20
    np.testing.assert_allclose(traj[math.inf], np.asarray(info_lib.trajectory), atol=3e-4)


# ------------------------------------------------------------------ grid, loss
def test_edm_sigmas():
    s = P.edm_sigmas(18, 0.002, 80.0)
    assert s.shape == (19,) and s[0] == 80.0 and s[-2] == 0.002 and s[-1] == 0.0
    assert np.all(np.diff(s) < 0)
    # rho-th roots are evenly spaced
    np.testing.assert_allclose(np.diff(s[:-1] ** (1 / 7)), (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17, rtol=1e-10)
    with pytest.raises(ValueError):
        P.edm_sigmas(1)


def test_denoiser_loss_on_a_known_case():
    y = jnp.asarray(np.random.default_rng(4).normal(size=(64, 3)), jnp.float32)
    const = lambda key, n: jnp.full((n,), 0.8)
    exact_fn = lambda x, s: y                                        # knows the clean data: zero loss
    assert float(P.denoiser_loss(exact_fn, jax.random.PRNGKey(0), y, 16.0, const)) == 0.0
    c = jnp.asarray([0.1, -0.2, 0.3])
    off = lambda x, s: y + c
    loss = float(P.denoiser_loss(off, jax.random.PRNGKey(0), y, 16.0, const, sigma_data=0.5))
    lam = (0.8 ** 2 + 0.25) / (0.8 * 0.5) ** 2
    assert loss == pytest.approx(lam * float(jnp.sum(c * c)) / 3, rel=1e-5)
    # EDM preconditioning at sigma = 0.8, sigma_d = 0.5; the loss weight is 1 / c_out^2
    c_skip, c_out, c_in, c_noise = P.edm_preconditioning(jnp.asarray(0.8), 0.5)
    assert float(c_skip) == pytest.approx(0.25 / 0.89) and float(c_in) == pytest.approx(1 / math.sqrt(0.89))
    assert float(c_out) ** 2 * float(P.loss_weight(0.8, 0.5)) == pytest.approx(1.0)
