"""Blurring diffusion (bdm): the DCT basis, marginals and SDE against float64 pixel-space computations,
gDDIM single-point exactness, the stochastic samplers' law, the loss at a known optimum, and a tiny run.

Every reference here is independent of the library's modal code: scipy's DCT, the paper's formulas for
a_f(t) and sigma_t written out again, float64 ODE solves in pixel space, and numerical derivatives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft as sf
from scipy.integrate import solve_ivp

from diffusion_jax import param, sdes
from diffusion_jax.apps import bench_nfe
from diffusion_jax.training import configs, losses
from diffusion_jax.param.precond import Preconditioner
from diffusion_jax.samplers import prior_init, sample
from diffusion_jax.training import build_experiment, train

SHAPE = (4, 4, 2)
KW = dict(shape=SHAPE, sigma_blur_max=3.0, d_min=0.001, logsnr_min=-10.0)


def ref_law(t, shape=SHAPE, sigma_blur_max=3.0, d_min=0.001, logsnr_min=-10.0):
    """float64 (a_f(t) of shape (H, W, 1), sigma_t) from Hoogeboom & Salimans' definitions (T = 1)."""
    h, w = shape[:2]
    lam = np.pi ** 2 * (np.arange(h)[:, None] ** 2 / h ** 2 + np.arange(w)[None, :] ** 2 / w ** 2)
    phi = np.arctan(np.exp(-logsnr_min / 2))
    blur = sigma_blur_max * np.sin(np.pi * t / 2) ** 2
    d = (1 - d_min) * np.exp(-lam * blur ** 2 / 2) + d_min
    return np.cos(phi * t) * d[..., None], np.sin(phi * t)


def dct(x):
    return sf.dctn(x, axes=(-3, -2), norm="ortho")


def idct(x):
    return sf.idctn(x, axes=(-3, -2), norm="ortho")


def test_dct_matrix_orthonormal_and_equal_to_scipy():
    for n in (1, 2, 4, 7, 8):
        c = sdes.dct_matrix(n)
        assert np.abs(c @ c.T - np.eye(n)).max() < 1e-13
        assert np.abs(c - sf.dct(np.eye(n), axis=0, norm="ortho")).max() < 1e-13


@pytest.mark.parametrize("shape", [(4, 4, 2), (8, 8, 1), (6,)])
def test_basis_round_trip_and_parseval(shape):
    sde = sdes.make("bdm", shape=shape)
    u = jax.random.normal(jax.random.PRNGKey(0), (3,) + shape + (1,))
    w = sde.to_modes(u)
    axes = (-3, -2) if len(shape) == 3 else (-1,)
    ref = sf.dctn(np.asarray(u, np.float64)[..., 0], axes=axes, norm="ortho")
    assert np.abs(np.asarray(w[..., 0]) - ref).max() < 1e-5
    assert np.abs(np.asarray(sde.from_modes(w)) - np.asarray(u)).max() < 1e-5
    assert np.allclose(np.sum(np.asarray(w) ** 2), np.sum(np.asarray(u) ** 2), rtol=1e-5)


@pytest.mark.parametrize("t", [1e-3, 0.1, 0.5, 0.9, 1.0])
def test_marginals_match_float64_pixel_space(t):
    sde = sdes.make("bdm", **KW)
    a, s = ref_law(t)
    x0 = np.random.RandomState(1).randn(5, *SHAPE)
    mean, chol = sde.marginal(jnp.asarray(x0, jnp.float32), t)
    ref_mean = idct(a * dct(x0))
    assert np.abs(np.asarray(mean[..., 0]) - ref_mean).max() <= 1e-5 * np.abs(x0).max()
    # the covariance applied to every pixel basis vector: the pixel-space matrix, here sigma_t^2 I
    eye = np.eye(int(np.prod(SHAPE)), dtype=np.float32).reshape((-1,) + SHAPE + (1,))
    cov = np.asarray(sde.apply(sde.covariance(t), jnp.asarray(eye)), np.float64).reshape(len(eye), -1)
    assert np.abs(cov - s ** 2 * np.eye(len(eye))).max() <= 1e-6 * max(s ** 2, 1e-6)
    # transitions compose: Phi(t, s') maps E[u_s' | x0] to E[u_t | x0]
    t0 = 0.5 * t
    a0, _ = ref_law(t0)
    moved = sde.apply(sde.transition(t=t, s=t0), jnp.asarray(idct(a0 * dct(x0))[..., None], jnp.float32))
    assert np.abs(np.asarray(moved[..., 0]) - ref_mean).max() <= 2e-5 * np.abs(x0).max()
    # host float64 versions agree with the formulas to float64 accuracy
    assert np.allclose(sde.transition_np(t=t, s=0.0)[..., 0, 0], np.broadcast_to(a, a.shape), rtol=1e-12)
    assert np.allclose(sde.covariance_np(t)[..., 0, 0], s ** 2, rtol=1e-12)


def test_drift_and_noise_reproduce_the_marginals():
    """Solve dm/dt = F m, dS/dt = F S + S F^T + G G^T in float64 pixel space with the family's F(t), G G^T(t)."""
    shape = (4, 4, 1)
    kw = dict(KW, shape=shape)
    sde = sdes.make("bdm", **kw)
    n = int(np.prod(shape))
    # scipy's orthonormal DCT as a matrix: column j is the DCT of pixel basis vector j (V^T = basis)
    basis = dct(np.eye(n).reshape((n,) + shape)).reshape(n, n).T

    def op(diag):                     # pixel-space matrix of V diag V^T
        return basis.T @ (np.broadcast_to(diag, shape).reshape(n, 1) * basis)

    x0 = np.random.RandomState(2).randn(n)

    def rhs(t, y):
        m, cov = y[:n], y[n:].reshape(n, n)
        f = op(sde.drift_matrix_np(t)[..., 0, 0])
        q = op(sde.noise_matrix_np(t)[..., 0, 0])
        return np.concatenate([f @ m, (f @ cov + cov @ f.T + q).ravel()])

    ts = [0.05, 0.3, 0.7, 0.95, 1.0]
    # The system is only mildly stiff: an explicit 8th-order solver reaches ~1e-11 here (Radau, with a
    # finite-difference Jacobian of this 272-dim system, took minutes for the same accuracy).
    sol = solve_ivp(rhs, (0.0, 1.0), np.concatenate([x0, np.zeros(n * n)]), method="DOP853", t_eval=ts,
                    rtol=1e-10, atol=1e-13)
    assert sol.success
    for i, t in enumerate(ts):
        a, s = ref_law(t, shape=shape)
        m_ref = idct(a * dct(x0.reshape(shape))).ravel()
        assert np.abs(sol.y[:n, i] - m_ref).max() < 1e-6, t
        assert np.abs(sol.y[n:, i].reshape(n, n) - s ** 2 * np.eye(n)).max() < 1e-6, t


def test_conversions_round_trip_and_score():
    sde = sdes.make("bdm", **KW)
    t = 0.4
    x0 = jax.random.normal(jax.random.PRNGKey(3), (4,) + SHAPE)
    u, z = sde.sample_marginal(jax.random.PRNGKey(4), x0, t)
    k_t, m_t = param.square_root(sde, "R")(t), sde.mean_coefficient(t)
    assert np.allclose(param.eps_from_denoiser(sde, u, x0, m_t, k_t), z, atol=1e-4)
    assert np.allclose(param.denoiser_from_eps(sde, u, z, m_t, k_t), x0, atol=1e-4)
    a, s = ref_law(t)
    res = np.asarray(u[..., 0], np.float64) - idct(a * dct(np.asarray(x0, np.float64)))
    score = param.score_from_eps(sde, z, k_t)
    assert np.allclose(np.asarray(score[..., 0]), -res / s ** 2, rtol=1e-4, atol=1e-4)


X_STAR = np.random.RandomState(0).randn(*SHAPE)


def dirac_denoiser(u, t):
    return jnp.broadcast_to(jnp.asarray(X_STAR, u.dtype), u.shape[:-1])


def dirac_pf_ode(u_start, t_start, t_end):
    """Closed form: along the PF-ODE of one point, each mode keeps eps = (w - a x*) / sigma constant."""
    a0, s0 = ref_law(t_start)
    a1, s1 = ref_law(t_end)
    ws = dct(X_STAR)
    eps = (dct(np.asarray(u_start, np.float64)[..., 0]) - a0 * ws) / s0
    return idct(a1 * ws + s1 * eps)


def test_gddim_is_exact_on_a_single_point():
    sde = sdes.make("bdm", **KW)
    u0 = prior_init(sde, jax.random.PRNGKey(0), 3, SHAPE)
    t_end = 1e-3
    ref = dirac_pf_ode(u0, 1.0, t_end)
    scale = np.abs(ref).max()
    for nfe, order in [(1, 0), (7, 0), (50, 0), (20, 1), (20, 2)]:
        u, info = sample(sde, dirac_denoiser, u0, method="gddim", nfe=nfe, order=order, output="denoiser",
                         t_end=t_end)
        assert info.nfe == nfe
        err = np.abs(np.asarray(u[..., 0], np.float64) - ref).max() / scale
        assert err <= 1e-4, (nfe, order, err)
    # a first-order solver on the same ODE is not exact (blurring makes the drift stiff)
    u, _ = sample(sde, dirac_denoiser, u0, method="euler", nfe=10, output="denoiser", t_end=t_end)
    assert np.abs(np.asarray(u[..., 0], np.float64) - ref).max() / scale > 1e-2


# SSCS takes an Euler step on the score part, which blurring makes stiff in the high frequencies: at 200
# uniform steps its variance is 21 % off in the highest mode, at 400 quadratic steps within sampling noise.
@pytest.mark.parametrize("method,opts", [("gddim", dict(lam=1.0, nfe=200)), ("euler_maruyama", dict(nfe=200)),
                                         ("sscs", dict(nfe=400, grid="quadratic"))])
def test_stochastic_samplers_reach_the_single_point_law(method, opts):
    """Started from the exact law at T, the reverse SDE of one point has law N(a_t x*, sigma_t^2) per mode."""
    shape = (4, 4, 1)
    sde = sdes.make("bdm", **dict(KW, shape=shape))
    xs = X_STAR[..., :1]
    n, t_end = 2000, 0.3
    a_T, s_T = ref_law(1.0, shape=shape)
    z = np.random.RandomState(5).randn(n, *shape)
    u0 = jnp.asarray(idct(a_T * dct(xs)) + s_T * z, jnp.float32)[..., None]
    u, _ = sample(sde, lambda u, t: jnp.broadcast_to(jnp.asarray(xs, u.dtype), u.shape[:-1]), u0,
                  method=method, output="denoiser", t_end=t_end, key=jax.random.PRNGKey(6), **opts)
    a, s = ref_law(t_end, shape=shape)
    white = (dct(np.asarray(u[..., 0], np.float64)) - a * dct(xs)) / s            # ~ N(0, 1) per mode
    # n = 2000: the standard error of a mean is 0.022 and of a variance 0.032 per mode
    assert np.abs(white.mean(axis=0)).max() < 0.12, white.mean(axis=0)
    assert np.abs(white.var(axis=0) - 1).max() < 0.15, white.var(axis=0)


@pytest.mark.parametrize("weighting", ["eps", "likelihood"])
def test_loss_at_the_gaussian_optimum(weighting):
    """x0 ~ N(0, v I): the mixed-score reference eps is optimal, with a closed-form expected loss."""
    shape = (4, 4, 1)
    sde = sdes.make("bdm", **dict(KW, shape=shape))
    v, t, n = 0.3, 0.35, 4096
    sqrt = param.square_root(sde, "R")
    pre = Preconditioner(sde, sqrt, sigma_data=float(np.sqrt(v)), mixed=True)
    x0 = jnp.sqrt(v) * jax.random.normal(jax.random.PRNGKey(7), (n,) + shape)
    loss, aux = losses.score_matching_loss(pre.eps_ref, sde, sqrt, jax.random.PRNGKey(8), x0,
                                           weighting=weighting, t=jnp.full((n,), t))
    a, s = ref_law(t, shape=shape)
    per_mode = 1.0 - s ** 2 / (v * a ** 2 + s ** 2)
    if weighting == "likelihood":
        h = 1e-5                       # g^2 = d s^2/dt - 2 (d log a/dt) s^2 by central differences
        (ap, sp), (am, sm) = ref_law(t + h, shape=shape), ref_law(t - h, shape=shape)
        g2 = (sp ** 2 - sm ** 2) / (2 * h) - 2 * (np.log(ap) - np.log(am)) / (2 * h) * s ** 2
        per_mode = per_mode * g2 / s ** 2
    expected = float(np.mean(np.broadcast_to(per_mode, shape)))
    se = float(np.std(aux["per_example"]) / np.sqrt(n))
    assert abs(float(loss) - expected) < 4 * se + 1e-4 * expected, (float(loss), expected, se)


def test_bad_parameters_name_the_fix():
    with pytest.raises(ValueError, match="images"):
        sdes.make("bdm", shape=(4, 4))
    with pytest.raises(ValueError, match="sigma_blur_max"):
        sdes.make("bdm", sigma_blur_max=-1.0)
    with pytest.raises(ValueError, match="d_min"):
        sdes.make("bdm", d_min=1.5)
    with pytest.raises(ValueError, match="logsnr_min"):
        sdes.make("bdm", logsnr_min=2.0)
    c = configs.digits("bdm", shape=(16, 16, 1))
    with pytest.raises(ValueError, match=r"config.family.params.shape='\(8, 8, 1\)'"):
        build_experiment(c, (8, 8, 1))


def reference_bench_samples(eps, u0, method, nfe, t_min=1e-5, **law):
    """float64 pixel-space re-computation of a bench-nfe cell from the network ``eps(u, t)`` (a black box).

    Per DCT mode (a_f(t), sigma_t from :func:`ref_law`) on the uniform grid from 1 to t_min: ``ddim`` is
    w' = a'/a (w - s eps) + s' eps (DDIM, which gDDIM of order 0 is for a diagonal family); ``euler`` steps
    the probability-flow ODE dw/dt = f w + g^2 eps / (2 s) (f = d log a/dt, g^2 = d s^2/dt - 2 f s^2, central
    differences). Then the denoising step x_0 = (w - s eps) / a at t_min, as the benchmark adds it."""
    shape = u0.shape[1:-1]
    ts = np.linspace(1.0, t_min, nfe + 1)
    x = np.asarray(u0, np.float64)[..., 0]

    def eps_modes(x, t):
        e = eps(jnp.asarray(x[..., None], jnp.float32), jnp.full((len(x),), t, jnp.float32))
        return dct(np.asarray(e, np.float64)[..., 0])

    for t, t_next in zip(ts[:-1], ts[1:]):
        (a, s), (a_n, s_n) = ref_law(t, shape, **law), ref_law(t_next, shape, **law)
        w, e = dct(x), eps_modes(x, t)
        if method == "ddim":
            w = a_n / a * (w - s * e) + s_n * e
        else:
            h = 1e-6
            (ap, sp), (am, sm) = ref_law(t + h, shape, **law), ref_law(t - h, shape, **law)
            f = (np.log(ap) - np.log(am)) / (2 * h)
            g2 = (sp ** 2 - sm ** 2) / (2 * h) - 2 * f * s ** 2
            w = w + (t_next - t) * (f * w + 0.5 * g2 / s * e)
        x = idct(w)
    a, s = ref_law(t_min, shape, **law)
    return idct((dct(x) - s * eps_modes(x, t_min)) / a)


def frechet_distance_by_eigenvalues(a, b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b) - 2 sum sqrt(eig(S_a S_b)) on flattened [0, 1] pixels (float64)."""
    fa, fb = (np.clip((np.asarray(v, np.float64) + 1) / 2, 0, 1).reshape(len(v), -1) for v in (a, b))
    sa, sb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    ev = np.linalg.eigvals(sa @ sb).real
    return float(np.sum((fa.mean(0) - fb.mean(0)) ** 2) + np.trace(sa + sb) - 2 * np.sum(np.sqrt(np.clip(ev, 0, None))))


def test_tiny_digits_bdm_run_trains_samples_and_benchmarks(tmp_path):
    """The whole path on bdm with no family-specific code: train 6 steps, then bench-nfe with gddim (eps form,
    order 0) and euler. Every cell's samples equal a float64 pixel-space re-computation from the paper's a_f(t), sigma_t
    with the trained network as a black box, and the recorded fd-pixels values equal a Frechet distance
    computed here from those samples and the training split."""
    from diffusion_jax.data import load_split
    from diffusion_jax.training.state import pick_ema
    c = configs.digits("bdm", shape=(8, 8, 1), sigma_blur_max=5.0)
    for k, v in dict(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=()).items():
        c.model.kwargs[k] = v
    c.training.update(batch_size=32, num_steps=6, log_every=6, ckpt_every=6, async_checkpoints=False)
    c.ema_rates = (0.9,)
    c.data.data_dir = str(tmp_path / "tfds")
    # The mixed score (Gaussian reference eps plus the scaled network residual): after 6 steps the network's
    # own output is still ~1e-3 of eps, so without it eps would be ~0 and the samplers' score terms untested.
    c.model.mixed_score, c.model.c_out = True, True
    out = train(c, str(tmp_path / "run"))
    assert out["step"] == 6
    n = 16
    res = bench_nfe.run(str(tmp_path / "run"), loaded=(out["experiment"], out["state"]), verbose=False,
                        samplers="gddim:order=0:predict=eps,euler", nfes="3,6", metric="fd-pixels", n_samples=n,
                        seed=0, out=str(tmp_path / "bench"))
    rows = {(r["sampler"], int(r["nfe_budget"])): r for r in bench_nfe.read_results(res["csv"])}
    exp = out["experiment"]
    _, params = pick_ema(out["state"])
    eps_jit = jax.jit(lambda p, u, t: exp.eps_fn(p)(u, t))
    eps = lambda u, t: eps_jit(params, u, t)
    (u0,) = bench_nfe.initial_noise(exp, 0, n)
    data = load_split(c, c.data.split)
    floor = rows[("data:test", 0)]
    held = load_split(c, "test")[:int(floor["n_used"])]
    assert abs(float(floor["value"]) - frechet_distance_by_eigenvalues(held, data)) < 1e-6 * float(floor["value"])
    for label, method in (("gddim:order=0:predict=eps", "ddim"), ("euler", "euler")):
        for nfe in (3, 6):
            row = rows[(label, nfe)]
            assert int(row["nfe"]) == nfe + 1                        # the solve plus the denoising step
            with np.load(tmp_path / "bench" / "samples" /
                         f"{label.replace(':', '_').replace('=', '-')}_nfe{nfe}_seed0_n{n}.npz") as z:
                got = z["samples"]
            ref = reference_bench_samples(eps, u0, method, nfe, sigma_blur_max=5.0)
            # float32 sampling vs float64: 4e-4 at most (gDDIM, NFE 3: the first step multiplies eps's rounding
            # by a_f(t') / a_f(T) ~ 1e5 in the blurred-out modes), 1e-4 in the other cells
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            print(f"{label} NFE {nfe}: max deviation from float64 {err:.1e}, fd-pixels {row['value']}")
            assert err < 3e-3, (label, nfe, err)
            fd = frechet_distance_by_eigenvalues(got, data)
            assert abs(float(row["value"]) - fd) < 1e-6 * fd, (label, nfe, row["value"], fd)


def test_scaled_residual_is_the_reference_posterior_std():
    """c_out^2 = diag(I - K^T C^{-1} K): closed form per mode for bdm, float64 matrices for CLD."""
    sde = sdes.make("bdm", **KW)
    pre = Preconditioner(sde, "R", sigma_data=0.5, mixed=True, c_out=True)
    for t in (1e-3, 0.3, 1.0):
        a, s = ref_law(t)
        ref = 0.5 * a / np.sqrt(0.25 * a * a + s * s)
        got = np.asarray(pre.c_out(jnp.asarray(t)))[..., 0]
        assert np.abs(got / ref - 1).max() < 1e-4, t
    cld = sdes.make("cld")
    pre = Preconditioner(cld, "R", sigma_data=0.5, mixed=True, c_out=True)
    sqrt = param.square_root(cld, "R")
    for t in (1e-2, 0.3, 1.0):
        k = sqrt.np(t)
        m = cld.transition_np(t=t, s=0.0)[:, 0]
        c = 0.25 * np.outer(m, m) + cld.covariance_np(t)
        ref = np.sqrt(np.diag(np.eye(2) - k.T @ np.linalg.solve(c, k)))
        assert np.allclose(np.asarray(pre.c_out(jnp.asarray(t))), ref, rtol=2e-3, atol=1e-6), t
    with pytest.raises(ValueError, match="mixed=True"):
        Preconditioner(cld, "R", mixed=False, c_out=True)
    c = configs.digits("bdm", shape=(8, 8, 1))
    c.model.c_out = True
    with pytest.raises(ValueError, match="mixed_score=True"):
        configs.validate(c)
