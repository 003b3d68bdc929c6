"""Force-field families (diffusion_jax.fields.family) through the library's samplers, loss and training loop.

* the exact empirical field of a small data set, integrated by ``samplers.sample`` (edm_heun, gddim), lands
  on the training points for every kernel (and for the Gaussian kernel on VE, the same code path);
* stochastic samplers and bad family parameters are refused with clear errors;
* the training loss draws the kernel's noise (KS of the perturbation radius) and the prior is the kernel at sigma(T);
* toy2d_pfgmpp trains through ``training.train`` and samples far closer to the data than a Gaussian fit.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax.fields import kernels as K

# ------------------------------------------------------------------ field families: samplers, loss, training
FIELD_FAMILIES = {"pfgm": {}, "pfgmpp": {"D": 4.0}, "radial_tanh": {}, "radial_exp": {}}


@pytest.mark.parametrize("name", sorted(FIELD_FAMILIES) + ["ve"])
def test_empirical_field_integrated_by_the_library_samplers_lands_on_training_points(name):
    from diffusion_jax import samplers, sdes
    from diffusion_jax.fields.family import empirical_denoiser_fn
    data = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2)), jnp.float32)
    if name == "ve":                     # the Gaussian kernel on the VE family: the same code path
        sde = sdes.ve(sigma_min=0.002, sigma_max=80.0, t_min=sdes.make("pfgm").t_min)
        fn = empirical_denoiser_fn(sde, data, K.Gaussian(), chunk=16)
    else:
        sde = sdes.make(name, **FIELD_FAMILIES[name])
        fn = empirical_denoiser_fn(sde, data, chunk=16)
    u0 = samplers.prior_init(sde, jax.random.PRNGKey(1), 128, (2,))
    spacing = np.median(np.linalg.norm(np.asarray(data)[:, None] - np.asarray(data)[None], axis=-1)
                        + 1e9 * np.eye(16), axis=1).min()
    for method, nfe in (("edm_heun", 35),) + ((("gddim", 20),) if name in ("pfgm", "pfgmpp") else ()):
        u, info = samplers.sample(sde, fn, u0, method=method, nfe=nfe, output="denoiser", denoise_final=True)
        assert info.nfe == nfe + 1
        nn = np.linalg.norm(np.asarray(u[..., 0])[:, None] - np.asarray(data)[None], axis=-1).min(1)
        # heavy tails (Cauchy: P(R > s sigma) ~ 1/s) leave a few samples far out in the kernel's tail
        assert np.median(nn) < 1e-4 * spacing + 1e-4, (method, np.median(nn))
        assert np.mean(nn < 1e-2) > (0.9 if name == "pfgm" else 0.99), (method, np.mean(nn < 1e-2))
    # the prior samples are nowhere near the data
    nn0 = np.linalg.norm(np.asarray(u0[..., 0])[:, None] - np.asarray(data)[None], axis=-1).min(1)
    assert np.median(nn0) > 5.0


def test_field_families_refuse_stochastic_samplers_and_bad_parameters():
    from diffusion_jax import samplers, sdes
    from diffusion_jax.training import configs
    sde = sdes.make("pfgmpp", D=16.0)
    u0 = samplers.prior_init(sde, jax.random.PRNGKey(0), 4, (2,))
    fn = lambda u, t: jnp.zeros(u.shape[:-1])
    for method, kw in (("euler_maruyama", {}), ("sscs", {}), ("gddim", {"lam": 1.0})):
        with pytest.raises(ValueError, match="force-field ODE model.*use an ODE method"):
            samplers.sample(sde, fn, u0, method=method, nfe=4, output="denoiser", key=jax.random.PRNGKey(0), **kw)
    u, _ = samplers.sample(sde, fn, u0, method="sscs", nfe=4, output="denoiser", lam=0.0)      # ODE splitting
    assert np.all(np.isfinite(np.asarray(u)))
    with pytest.raises(ValueError, match="augmentation dimension D"):
        sdes.make("pfgmpp", D=-1.0)
    with pytest.raises(ValueError, match="pfgm: bad parameters"):
        sdes.make("pfgm", D=4.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        sdes.make("radial_tanh", sigma_min=5.0, sigma_max=1.0)
    c = configs.toy2d("pfgmpp", D=4.0)
    c.sampling.method = "euler_maruyama"
    with pytest.raises(ValueError, match="force-field ODE model"):
        configs.validate(c)


def test_training_loss_draws_the_kernel_noise():
    from diffusion_jax import sdes
    from diffusion_jax.training.losses import perturb
    from diffusion_jax.param import square_root
    for name, kern in (("pfgmpp", K.StudentT(4.0)), ("radial_tanh", K.radial_tanh())):
        sde = sdes.make(name, **({"D": 4.0} if name == "pfgmpp" else {}))
        x0 = jnp.full((3000, 2), 0.3)
        t = jnp.linspace(0.1, 0.9, 3000)
        sq = square_root(sde, "R")
        u, z = jax.jit(lambda k, x, tt: perturb(sde, sq, k, x, tt))(jax.random.PRNGKey(5), x0, t)
        sigma = np.sqrt(np.asarray(sde.B(t)))
        n = (np.asarray(u[..., 0]) - 0.3) / sigma[:, None]
        np.testing.assert_allclose(n, np.asarray(z[..., 0]), rtol=2e-4, atol=2e-4)        # target = the noise
        radius = np.linalg.norm(n, axis=1)
        assert stats.kstest(radius, lambda s: kern.radius_cdf_np(s, 2)).pvalue > 1e-3
        assert stats.kstest(radius, stats.chi(2).cdf).pvalue < 1e-6                    # not Gaussian noise
    # the prior is the kernel at sigma(T)
    sde = sdes.make("radial_exp")
    x = np.asarray(sde.prior_sample(jax.random.PRNGKey(6), (4000, 2)))[..., 0]
    r = np.linalg.norm(x, axis=1) / sde.prior_sigma()
    assert stats.kstest(r, lambda s: sde.kernel.radius_cdf_np(s, 2)).pvalue > 1e-3
    assert sde.prior_sigma() == pytest.approx(80.0, rel=1e-6)


def test_field_model_trains_through_the_training_loop(tmp_path):
    """toy2d_pfgmpp through training.train and samplers.sample: far closer to the data than a Gaussian fit."""
    import importlib.util
    import os

    from diffusion_jax.evaluation.distances import sliced_wasserstein
    from diffusion_jax.evaluation.distances import gaussian_fit_samples
    from diffusion_jax.data import load_split
    from diffusion_jax.training import sample_data, train
    root = os.path.join(os.path.dirname(__file__), "..")
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(root, "configs", "toy2d_pfgmpp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data.toy_name = "ring8"
    c.model.kwargs.hidden = 64
    c.training.num_steps, c.training.ckpt_every, c.training.batch_size = 500, 500, 256
    out = train(c, str(tmp_path))
    assert (tmp_path / "checkpoints").exists()
    data = load_split(c, "test", limit=1000)
    x = sample_data(out["experiment"], out["state"].ema["0.999"], jax.random.PRNGKey(3), 1000, "edm_heun", 35)
    other = load_split(c, "test", limit=2000)[1000:]
    sw, sw_gauss = sliced_wasserstein(x, data), sliced_wasserstein(gaussian_fit_samples(other, 1000), data)
    assert sw < 0.5 * sw_gauss, (sw, sw_gauss)


def test_exact_empirical_denoiser_dispatches_to_the_kernel():
    """exact.empirical_denoiser (used by the analyses) on a field family is the kernel's posterior mean."""
    from diffusion_jax import exact, sdes
    rng = np.random.default_rng(4)
    data = jnp.asarray(rng.normal(size=(20, 3)), jnp.float32)
    sde = sdes.make("radial_exp")
    u = jnp.asarray(rng.normal(size=(1, 3, 1)) * 0.8, jnp.float32)
    t = 0.2
    sigma = float(np.sqrt(np.asarray(sde.B(t))))
    got = exact.empirical_denoiser(sde, data, u, t)[0]
    # float64 reference: weights propto Psi'(R/a) / R^{N-1}, a = c_3 sigma, Psi' = e^-y
    d = np.linalg.norm(np.asarray(data, np.float64) - np.asarray(u[0, :, 0], np.float64), axis=1)
    a = sde.kernel.scale(3) * sigma
    lw = -d / a - 2 * np.log(d)
    w = np.exp(lw - lw.max())
    np.testing.assert_allclose(np.asarray(got), (w[:, None] * np.asarray(data, np.float64)).sum(0) / w.sum(),
                               atol=2e-6)
