"""Force-field kernels (diffusion_jax.fields.kernels / checks) against closed forms and their defining conditions.

* continuity dp/dsigma + div(p f) = 0 by float64 finite differences in d = 1, 2 for every kernel (relative
  residual < 1e-6; measured 1e-8 .. 2e-7), and broken kernels (wrong velocity, wrong normaliser) fail it;
* normalisation by float64 quadrature, and the log-density's radial law equal to the closed-form radius CDF;
* KS test of the samples' radius against the closed form; a mis-scaled sampler fails it;
* log-densities against scipy (Gaussian, Student-t) and closed forms (tanh, exponential);
* delta limit, prior independent of the data at sigma_max (Gaussian TV against its closed form);
* the empirical denoiser against a float64 numpy posterior mean (integrated by the library's samplers:
  tests/test_field_family.py);
* bad input: unknown kernel, invalid D, bad CDFs.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats
from scipy.special import logsumexp

from diffusion_jax.fields import checks as C
from diffusion_jax.fields import kernels as K

GAMMA2 = lambda r: 1.0 - (1.0 + r) * jnp.exp(-r)      # a user CDF: rho ~ Gamma(2), Psi' = r e^-r, E rho^2 = 6
POLY3 = lambda r: 1.0 - 1.0 / (1.0 + r) ** 3           # a heavier user tail: E rho^2 = int 2r (1+r)^-3 dr = 1

KERNELS = {
    "gaussian": K.Gaussian,
    "pfgm": K.pfgm,
    "pfgmpp_D4": lambda: K.StudentT(4.0),
    "pfgmpp_D128": lambda: K.StudentT(128.0),
    "radial_tanh": K.radial_tanh,
    "radial_exp": K.radial_exp,
    "radial_user": lambda: K.RadialCDF(GAMMA2, "gamma2"),
}


@pytest.fixture(scope="module", params=sorted(KERNELS))
def kernel(request):
    return KERNELS[request.param]()


# ------------------------------------------------------------------ continuity, normalisation
@pytest.mark.parametrize("n", [1, 2])
def test_continuity_equation_and_normalisation(kernel, n):
    cont = C.continuity_residual(kernel, n, sigma=0.7)
    assert cont["relative"] < 1e-6, cont
    assert C.radial_mass(kernel, n, 0.7) == pytest.approx(1.0, abs=1e-8)
    # the density's radial law is the closed-form CDF that the KS tests use
    for s in (0.5, 2.0):
        assert C.radial_mass(kernel, n, 0.7, s) == pytest.approx(float(kernel.radius_cdf_np(np.array([s]), n)[0]),
                                                                 abs=1e-7)


class _WrongVelocity(K.Gaussian):
    def velocity(self, x, x0, sigma):
        return 0.5 * super().velocity(x, x0, sigma)


class _WrongNormaliser(K.StudentT):
    def log_density_d2(self, d2, sigma, n):
        return super().log_density_d2(d2, sigma, n) + jnp.log(sigma)        # sigma^{-(N-1)}: not a scale family


def test_continuity_check_catches_broken_kernels():
    for bad in (_WrongVelocity(), _WrongNormaliser(3.0)):
        for n in (1, 2):
            assert C.continuity_residual(bad, n)["relative"] > 0.1
        with pytest.raises(ValueError, match="continuity residual"):
            C.check_kernel(bad, dims=(1,))


def test_sphere_area():
    assert math.exp(K.sphere_log_area(1)) == pytest.approx(2.0)
    assert math.exp(K.sphere_log_area(2)) == pytest.approx(2 * math.pi)
    assert math.exp(K.sphere_log_area(3)) == pytest.approx(4 * math.pi)


# ------------------------------------------------------------------ sampling: KS on the radius
@pytest.mark.parametrize("n", [1, 2, 64])
def test_kernel_samples_follow_the_radius_law(kernel, n):
    assert C.ks_radius(kernel, n, sigma=0.7, key=jax.random.PRNGKey(n)) > 1e-3


class _MisScaled(K.Kernel):
    """Samples of ``base`` stretched by ``factor``: a sampler that disagrees with the density."""

    def __init__(self, base, factor):
        self.base, self.factor, self.name = base, factor, "mis-scaled"

    def noise(self, key, shape, dtype=None):
        return self.factor * self.base.noise(key, shape, dtype)


def test_mis_scaled_kernel_fails_the_ks_test(kernel):
    for n in (1, 2):
        assert C.ks_radius(kernel, n, count=20000, sampler=_MisScaled(kernel, 1.1)) < 1e-6


def test_alignment_matches_the_gaussian_second_moment():
    for kern in (K.radial_tanh(), K.radial_exp(), K.RadialCDF(GAMMA2, "gamma2")):
        for n in (2, 64):
            x = np.asarray(kern.noise(jax.random.PRNGKey(n), (40000, n)), np.float64)
            # E|n|^2 = N (sampling error of the mean of |n|^2 / N: a few percent at most)
            assert np.mean(np.sum(x * x, axis=1)) / n == pytest.approx(1.0, rel=0.05)
    # closed-form second moments agree with the quadrature of a user CDF
    assert K.RadialCDF(jnp.tanh, "t").second_moment == pytest.approx(math.pi ** 2 / 12, rel=1e-6)
    assert K.RadialCDF(lambda r: -jnp.expm1(-r), "e").second_moment == pytest.approx(2.0, rel=1e-6)
    # (1 - Psi rounds to 0 in float64 beyond r ~ 2e5 for this CDF: the missing tail int 2 r^-2 dr is 1e-5)
    assert K.RadialCDF(POLY3, "p").second_moment == pytest.approx(1.0, rel=2e-5)
    assert K.RadialCDF(GAMMA2, "g").second_moment == pytest.approx(6.0, rel=1e-6)
    # native times: PFGM's z = sigma, PFGM++'s r = sigma sqrt(D), a radial CDF's t = c_N sigma
    assert K.pfgm().native_scale(0.3, 2) == 0.3
    assert K.StudentT(16.0).native_scale(0.5, 2) == pytest.approx(2.0)
    assert K.radial_exp().native_scale(1.0, 8) == pytest.approx(2.0)


# ------------------------------------------------------------------ densities against closed forms
def test_logpdf_against_scipy_and_closed_forms():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(6, 3))
    x = y + rng.normal(size=(6, 3)) * 2.0
    sig = np.array([0.3, 0.7, 1.0, 2.0, 5.0, 0.9])
    got = np.asarray(K.Gaussian().logpdf(jnp.asarray(x), jnp.asarray(y), jnp.asarray(sig)))
    ref = [stats.multivariate_normal(y[i], sig[i] ** 2 * np.eye(3)).logpdf(x[i]) for i in range(6)]
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6)
    for aug in (1.0, 4.0, 33.0):
        got = np.asarray(K.StudentT(aug).logpdf(jnp.asarray(x), jnp.asarray(y), jnp.asarray(sig)))
        ref = [stats.multivariate_t(loc=y[i], shape=sig[i] ** 2 * np.eye(3), df=aug).logpdf(x[i]) for i in range(6)]
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6)
    # radial CDFs in 1-D: p(x) = Psi'(|x|/a) / (2a), a = c_1 sigma
    xs = np.linspace(-3, 3, 13)[:, None]
    zero = np.zeros_like(xs)
    a = 0.7 * math.sqrt(12 / math.pi ** 2)
    got = np.asarray(K.radial_tanh().logpdf(jnp.asarray(xs), jnp.asarray(zero), 0.7))
    np.testing.assert_allclose(got, np.log(1 / np.cosh(np.abs(xs[:, 0]) / a) ** 2 / (2 * a)), rtol=1e-5)
    a = 0.7 * math.sqrt(1 / 2)
    got = np.asarray(K.radial_exp().logpdf(jnp.asarray(xs), jnp.asarray(zero), 0.7))
    np.testing.assert_allclose(got, -np.abs(xs[:, 0]) / a - np.log(2 * a), rtol=1e-5)
    # the autodiff density of a user CDF equals the closed form of the same CDF
    user = K.RadialCDF(lambda r: -jnp.expm1(-r), "exp_by_autodiff")
    np.testing.assert_allclose(np.asarray(user.logpdf(jnp.asarray(xs), jnp.asarray(zero), 0.7)), got, rtol=1e-5)


def test_delta_limit_and_prior_independence(kernel):
    for n in (1, 2):
        d = C.delta_limit(kernel, n, count=4000)
        closed = d["closed_form"]
        assert np.all(np.diff(closed) <= 1e-12) and closed[-1] < 0.01 * closed[0]
        np.testing.assert_allclose(d["sampled"], closed, atol=4.0 * math.sqrt(0.25 / 4000))
        tv80 = C.prior_dependence(kernel, n, 80.0, count=4000)
        tv8 = C.prior_dependence(kernel, n, 8.0, count=4000)
        assert tv80 < 0.05 and tv80 < tv8


def test_gaussian_prior_dependence_matches_closed_form():
    # TV(N(0, s^2 I), N(a e_1, s^2 I)) = erf(a / (2 sqrt(2) s))
    tv = C.prior_dependence(K.Gaussian(), 2, 4.0, data_radius=1.0, count=40000)
    assert tv == pytest.approx(special.erf(1.0 / (2 * math.sqrt(2) * 4.0)), abs=0.01)


def test_check_kernel_reports_every_condition():
    rep = C.check_kernel(K.radial_exp(), dims=(1,))
    assert set(rep[1]) == {"continuity", "mass", "mass_within_sigma", "delta", "prior_tv", "ks_pvalue"}


# ------------------------------------------------------------------ the empirical field
def _np_log_density(kernel, d2, sigma, n):
    r = np.sqrt(np.maximum(d2, 1e-300))
    if isinstance(kernel, K.StudentT) and math.isinf(kernel.D) or isinstance(kernel, K.Gaussian):
        return -d2 / (2 * sigma ** 2)
    if isinstance(kernel, K.StudentT):
        return -0.5 * (n + kernel.D) * np.log1p(d2 / (kernel.D * sigma ** 2))
    a = kernel.scale(n) * sigma
    y = r / a
    if kernel.name == "radial_tanh":
        lp = np.log(1 / np.cosh(y) ** 2)
    elif kernel.name == "radial_exp":
        lp = -y
    else:
        lp = np.log(y) - y                                 # GAMMA2' = r e^-r
    return lp - (n - 1) * np.log(r)


def test_empirical_denoiser_matches_float64_posterior_mean(kernel):
    rng = np.random.default_rng(2)
    data = rng.normal(size=(29, 2, 2))                      # N = 4, data shape (2, 2)
    x = rng.normal(size=(10, 2, 2)) * 1.5
    sig = 0.8
    d2 = ((x[:, None] - data[None]) ** 2).reshape(10, 29, -1).sum(-1)
    lw = _np_log_density(kernel, d2, sig, 4)
    w = np.exp(lw - logsumexp(lw, axis=1, keepdims=True))
    ref = np.einsum("mn,nij->mij", w, data)
    got = kernel.empirical_denoiser(jnp.asarray(data, jnp.float32), jnp.asarray(x, jnp.float32), sig, chunk=6)
    np.testing.assert_allclose(np.asarray(got), ref, atol=5e-6)
    vel = kernel.empirical_velocity(jnp.asarray(data, jnp.float32), jnp.asarray(x, jnp.float32), sig)
    np.testing.assert_allclose(np.asarray(vel), (x - ref) / sig, atol=2e-5)


# ------------------------------------------------------------------ bad input
def test_bad_input_is_refused_with_clear_errors():
    with pytest.raises(ValueError, match="unknown force-field kernel 'yukawa'.*known kernels"):
        K.make_kernel("yukawa")
    for bad in (0.0, -2.0, float("nan"), "abc", None):
        with pytest.raises(ValueError, match="augmentation dimension D"):
            K.make_kernel("pfgmpp", D=bad)
    with pytest.raises(ValueError, match="pfgmpp: bad parameters"):
        K.make_kernel("pfgmpp", d=3)
    with pytest.raises(ValueError, match="not increasing"):
        K.RadialCDF(lambda r: jnp.tanh(r) * (1.0 - 0.5 * jnp.exp(-(r - 2.0) ** 2)), "dipping")
    with pytest.raises(ValueError, match="tend to 1"):
        K.RadialCDF(lambda r: 0.5 * jnp.tanh(r), "half")
    with pytest.raises(ValueError, match="Psi\\(0\\) = 0"):
        K.RadialCDF(lambda r: 0.5 + 0.5 * jnp.tanh(r), "shifted")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        K.RadialCDF(lambda r: 1.5 * jnp.tanh(r), "overshoot")
    with pytest.raises(ValueError, match="second moment"):
        K.RadialCDF(lambda r: 1.0 - (1.0 + r) ** -1.5, "heavy")
    with pytest.raises(ValueError, match="jax.numpy"):
        K.RadialCDF(np.vectorize(lambda r: math.tanh(r)), "python_only")
    with pytest.raises(ValueError, match="callable"):
        K.RadialCDF(0.5, "const")
