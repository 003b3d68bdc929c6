"""Trajectory analyses (diffusion_jax.analysis) against independent computations.

* the empirical optimal denoiser against a brute-force float64 numpy posterior mean on the full state;
* PF-ODE sampling with the optimal denoiser collapses onto training points (vp, ve, cld);
* Gaussian mean shift never lowers the KDE log-likelihood at its bandwidth; the VE Euler step with the
  optimal denoiser equals the convex combination with a mean-shift step;
* geometry metrics on lines, circle arcs and quadratics with closed-form answers;
* score deviation bookkeeping with a denoiser that is off by a known constant; nearest neighbours; plots.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from diffusion_jax import analysis, exact, samplers, sdes

FAMILIES = [("vp", {}), ("ve", {}), ("cld", {}), ("psld", {}), ("told", {}), ("cdhold", {"n": 4})]
FAMILY_IDS = ["vp", "ve", "cld", "psld", "told", "cdhold4"]


@functools.lru_cache(maxsize=None)
def _family(name, items):
    return sdes.make(name, **dict(items))


def family(name, params=None):
    return _family(name, tuple(sorted((params or {}).items())))


# ------------------------------------------------------------------ optimal denoiser vs float64 posterior mean
def posterior_mean_f64(sde, data, u, t):
    """E[x_0 | u_t = u] for the empirical distribution of ``data`` (n, d), u (B, d, k), numpy float64.

    Brute force on the full state: log N(u; m_t y, I_d (x) Sigma_t) = -1/2 sum_j r_j^T Sigma^{-1} r_j + const,
    r_j = u_j - m_t y_j, with m_t and Sigma_t from the host float64 core.
    """
    m = sde.transition_np(t=t, s=0.0)[:, 0]
    sigma = sde.covariance_np(t)
    sinv = np.linalg.inv(sigma)
    r = u[:, None, :, :] - data[None, :, :, None] * m                      # (B, n, d, k)
    ll = -0.5 * np.einsum("bndi,ij,bndj->bn", r, sinv, r)
    w = np.exp(ll - logsumexp(ll, axis=1, keepdims=True))
    return w @ data, w


@pytest.mark.parametrize("name,params", FAMILIES, ids=FAMILY_IDS)
def test_empirical_denoiser_matches_float64_posterior_mean(name, params):
    sde = family(name, params)
    rng = np.random.default_rng(7)
    n, d, batch = 24, 3, 16
    data = rng.normal(size=(n, d)).astype(np.float32)
    fn = jax.jit(lambda u, t: exact.empirical_denoiser(sde, jnp.asarray(data), u, t, 7))
    entropies = []
    # moderate t: Sigma_t is well conditioned there in float32 (exact.py's docstring on the Dirac case)
    for t in (0.05, 0.2, 0.6):
        m = sde.transition_np(t=t, s=0.0)[:, 0]
        chol = np.linalg.cholesky(sde.covariance_np(t))
        y0 = data[rng.integers(0, n, batch)] + 0.3 * rng.normal(size=(batch, d))
        u = (y0[..., None] * m + rng.normal(size=(batch, d, sde.order)) @ chol.T).astype(np.float32)
        ref, w = posterior_mean_f64(sde, data.astype(np.float64), u.astype(np.float64), t)
        got = np.asarray(fn(jnp.asarray(u), t), np.float64)
        np.testing.assert_allclose(got, ref, atol=5e-6, rtol=0, err_msg=f"{name} t={t}")
        entropies.append(-(w * np.log(np.where(w > 0, w, 1.0))).sum(1).mean())
    # the comparison is not a trivial nearest-point one: some posteriors spread over several points
    assert max(entropies) > 1.0, entropies


# ------------------------------------------------------------------ PF-ODE with D* collapses onto the data
@pytest.mark.parametrize("name,t_end", [("vp", None), ("ve", None), ("cld", 1e-3)])
def test_pf_ode_with_optimal_denoiser_converges_to_training_points(name, t_end):
    sde = family(name)
    rng = np.random.default_rng(1)
    data = rng.normal(size=(16, 2)).astype(np.float32)
    fn = analysis.empirical_denoiser_fn(sde, data, chunk=8)
    u0 = samplers.prior_init(sde, jax.random.PRNGKey(0), 32, (2,))
    # EDM grid: the Dirac data make the ODE stiff at small noise; a uniform t grid is unstable there
    _, info = samplers.sample(sde, fn, u0, method="heun", nfe=60, output="denoiser", grid="edm",
                              t_end=t_end, return_trajectory=True)
    ts, x = analysis.sampling_trajectory(info)
    ts_d, den = analysis.denoising_trajectory(info)

    def nn(traj):                      # nearest-training-point distance of every point, (len, batch)
        flat = traj.reshape(-1, 2)
        return analysis.nearest_neighbors(flat, data, k=1)["distance"][:, 0].reshape(traj.shape[:2])

    nn_x, nn_d = nn(x), nn(den)
    q_x, q_d = np.median(nn_x, axis=1), np.median(nn_d, axis=1)
    spread = np.median(analysis.nearest_neighbors(data, data, k=2)["distance"][:, 1])   # typical data gap
    # final samples sit on training points; the denoiser output there is a training point
    assert np.max(nn_x[-1]) < 5e-3, q_x[-1]
    assert np.max(nn_d[-1]) < 1e-5
    assert q_x[-1] < 1e-2 * max(q_x.max(), spread)
    # monotone-ish decrease once the noise level is below the data spacing (sigma < 0.2)
    sig = samplers.grids.noise_level(sde, ts)
    tail = q_x[sig < 0.2]
    assert len(tail) >= 5 and np.all(tail[1:] <= 1.05 * tail[:-1] + 1e-4), tail
    tail_d = q_d[samplers.grids.noise_level(sde, ts_d) < 0.2]
    assert np.all(tail_d[1:] <= 1.05 * tail_d[:-1] + 1e-4), tail_d
    # the denoising trajectory reaches the data first (Chen et al.: it "converges faster")
    i = int(np.argmax(sig < 0.1))
    assert q_d[i] <= q_x[i] + 1e-6, (q_d[i], q_x[i])


# ------------------------------------------------------------------ mean shift
def test_mean_shift_and_kde_match_numpy():
    rng = np.random.default_rng(3)
    data = rng.normal(size=(37, 3))
    x = rng.normal(size=(11, 3)) * 1.5
    for h in (0.2, 1.0):
        d2 = ((x[:, None, :] - data[None]) ** 2).sum(-1)
        lw = -d2 / (2 * h * h)
        w = np.exp(lw - logsumexp(lw, axis=1, keepdims=True))
        ref_ms = w @ data
        ref_kde = logsumexp(lw, axis=1) - math.log(37) - 1.5 * math.log(2 * math.pi * h * h)
        got_ms = np.asarray(analysis.mean_shift_step(data.astype(np.float32), x.astype(np.float32), h, chunk=8))
        got_kde = np.asarray(analysis.gaussian_kde_logpdf(data.astype(np.float32), x.astype(np.float32), h, chunk=8))
        np.testing.assert_allclose(got_ms, ref_ms, atol=2e-5)
        np.testing.assert_allclose(got_kde, ref_kde, atol=5e-5, rtol=1e-5)


def test_annealed_mean_shift_never_decreases_kde_likelihood():
    rng = np.random.default_rng(4)
    data = jnp.asarray(rng.normal(size=(40, 3)), jnp.float32)
    x0 = jnp.asarray(rng.normal(size=(300, 3)) * 3.0, jnp.float32)
    sigmas = jnp.asarray(np.geomspace(3.0, 0.05, 25), jnp.float32)
    _, path = analysis.annealed_mean_shift(data, x0, sigmas, chunk=16)
    kde = jax.jit(jax.vmap(lambda x, h: analysis.gaussian_kde_logpdf(data, x, h, chunk=16)))
    before = np.asarray(kde(path[:-1], sigmas), np.float64)          # log p_{h_i}(x_i)
    after = np.asarray(kde(path[1:], sigmas), np.float64)            # log p_{h_i}(x_{i+1})
    tol = 2e-5 * (1 + np.abs(before))
    assert np.all(after >= before - tol), (after - before).min()
    assert np.mean(after - before > 1e-3) > 0.5                       # it does climb, not only stay
    # an over-relaxed step (x + 2.5 (m - x)) breaks the property: the test can fail
    ms = jax.vmap(lambda x, h: analysis.mean_shift_step(data, x, h, 16))(path[:-1], sigmas)
    over = path[:-1] + 2.5 * (ms - path[:-1])
    assert np.any(np.asarray(kde(over, sigmas)) < before - 1e-2)
    # the end points are near modes of the narrowest KDE: near data points
    nn = analysis.nearest_neighbors(path[-1], data, k=1)["distance"][:, 0]
    assert np.median(nn) < 0.05


@pytest.mark.parametrize("name", ["ve", "vp"])
def test_euler_step_with_optimal_denoiser_is_mean_shift_convex_combination(name):
    sde = family(name)
    rng = np.random.default_rng(5)
    data = rng.normal(size=(16, 4)).astype(np.float32)
    for t, t_next in ((0.5, 0.45), (0.3, 0.1), (0.15, 0.149)):
        sig = float(samplers.grids.noise_level(sde, t)[0])
        x = (data[rng.integers(0, 16, 64)] + sig * rng.normal(size=(64, 4))).astype(np.float32)
        out = analysis.euler_mean_shift_identity(sde, data, x, t, t_next, chunk=8)
        scale = float(np.abs(x).max())
        # D* is the mean-shift image (VE posterior = Gaussian kernel of bandwidth sigma)
        np.testing.assert_allclose(out["denoiser"], out["mean_shift"], atol=2e-6 * scale)
        np.testing.assert_allclose(out["euler"], out["convex"], atol=2e-6 * scale)
        assert 0 < out["sigma_next"] < out["sigma"]
    if name == "ve":
        # VE's noise level is sqrt(B(t)) = sqrt(s(t)^2 - s(0)^2) for the geometric schedule s(t)
        s = lambda tt: 0.01 * (50.0 / 0.01) ** tt
        assert out["sigma"] == pytest.approx(math.sqrt(s(0.15) ** 2 - s(0.0) ** 2), rel=1e-10)
        assert out["m_next"] == 1.0


def test_mean_shift_identity_rejects_phase_space_families():
    with pytest.raises(ValueError, match="k = 1"):
        analysis.euler_mean_shift_identity(family("cld"), np.zeros((3, 2)), np.zeros((2, 2)), 0.5, 0.4)


# ------------------------------------------------------------------ geometry on known curves
def test_geometry_of_a_straight_line():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    s = np.sort(np.concatenate([[0.0, 1.0], rng.uniform(size=9)]))[:, None, None]   # uneven steps
    traj = a + s * (b - a)                                                          # (11, 3, 5)
    g = analysis.trajectory_geometry(traj, s[:, 0, 0])
    np.testing.assert_allclose(g["chord_deviation"], 0.0, atol=1e-12)
    np.testing.assert_allclose(g["step_cosine"], 1.0, atol=1e-12)
    np.testing.assert_allclose(g["turning_angle"], 0.0, atol=2e-6)
    np.testing.assert_allclose(g["curvature"], 0.0, atol=1e-6)
    np.testing.assert_allclose(g["second_derivative"], 0.0, atol=1e-9)
    np.testing.assert_allclose(g["distance_to_end"], (1 - s[:, :, 0]) * np.linalg.norm(b - a, axis=-1), atol=1e-12)
    np.testing.assert_allclose(g["length"], g["chord"], rtol=1e-12)


def test_geometry_of_a_circle_arc():
    rng = np.random.default_rng(1)
    radius, theta, n = 2.5, 2.0, 21
    q, _ = np.linalg.qr(rng.normal(size=(6, 2)))                                    # a plane in R^6
    centre = rng.normal(size=6)
    phi = np.linspace(0.0, theta, n)
    pts = centre + radius * (np.cos(phi)[:, None] * q[:, 0] + np.sin(phi)[:, None] * q[:, 1])
    traj = pts[:, None, :].reshape(n, 1, 2, 3)                                       # data shape (2, 3)
    g = analysis.trajectory_geometry(traj)
    # distance from the chord: R cos(phi - theta/2) - R cos(theta/2)
    np.testing.assert_allclose(g["chord_deviation"][:, 0],
                               radius * (np.cos(phi - theta / 2) - np.cos(theta / 2)), atol=1e-12)
    np.testing.assert_allclose(g["distance_to_end"][:, 0], 2 * radius * np.sin((theta - phi) / 2), atol=1e-12)
    dphi = theta / (n - 1)
    np.testing.assert_allclose(g["step_cosine"], math.cos(dphi), atol=1e-12)
    np.testing.assert_allclose(g["turning_angle"], dphi, atol=1e-7)
    np.testing.assert_allclose(g["curvature"], 1.0 / radius, rtol=1e-9)
    np.testing.assert_allclose(g["length"], 2 * radius * (n - 1) * math.sin(dphi / 2), rtol=1e-12)


def test_second_derivative_is_exact_for_quadratics():
    rng = np.random.default_rng(2)
    s = np.sort(rng.uniform(0, 3, size=12))
    a, b, c = rng.normal(size=(3, 2, 4))
    traj = a + b * s[:, None, None] + c * s[:, None, None] ** 2                      # (12, 2, 4)
    np.testing.assert_allclose(analysis.second_derivative_norm(traj, s),
                               np.broadcast_to(np.linalg.norm(2 * c, axis=-1), (10, 2)), rtol=1e-8)


def _info(ts, trajectory=None, denoised=None, denoised_ts=None):
    from diffusion_jax.samplers import SampleInfo
    return SampleInfo(nfe=len(ts) - 1, ts=ts, trajectory=trajectory, denoised=denoised, denoised_ts=denoised_ts,
                      nfe_analysis=0, steps=None, rejected=None)


def test_trajectory_helpers_align_times_with_outputs():
    ts = np.linspace(1.0, 0.01, 6)
    traj = np.arange(6 * 2 * 3 * 2, dtype=np.float32).reshape(6, 2, 3, 2)
    den = np.ones((5, 2, 3))
    t_x, x = analysis.sampling_trajectory(_info(ts, traj, den))
    np.testing.assert_array_equal(x, traj[..., 0])
    t_d, d = analysis.denoising_trajectory(_info(ts, traj, den))
    np.testing.assert_array_equal(t_d, ts[:5])
    mids = 0.5 * (ts[1:] + ts[:-1])
    t_d, _ = analysis.denoising_trajectory(_info(ts, traj, den, mids))
    np.testing.assert_array_equal(t_d, mids)
    sig, xhat = analysis.edm_view(family("vp"), ts, traj[..., 0])
    m = np.array([family("vp").transition_np(t=t, s=0.0)[0, 0] for t in ts])
    np.testing.assert_allclose(xhat, traj[..., 0] / m[:, None, None], rtol=1e-12)
    assert np.all(np.diff(sig) < 0)
    with pytest.raises(ValueError, match="return_trajectory"):
        analysis.sampling_trajectory(_info(ts))


# ------------------------------------------------------------------ score deviation and memorisation
def test_score_deviation_with_a_known_denoiser_offset(tmp_path):
    sde = family("ve")
    rng = np.random.default_rng(6)
    data = rng.normal(size=(12, 2)).astype(np.float32)
    offset = jnp.asarray([0.03, -0.04], jnp.float32)                 # ||offset|| = 0.05
    opt = analysis.empirical_denoiser_fn(sde, data, chunk=5)
    learned = lambda u, t: opt(u, t) + offset                        # D_theta = D* + c everywhere
    u0 = samplers.prior_init(sde, jax.random.PRNGKey(3), 8, (2,))
    res = analysis.score_deviation(sde, learned, data, u0, method="edm_heun", nfe=15, output="denoiser",
                                   chunk=5)
    n_t = len(res["ts"])
    assert res["learned_deviation"].shape == (n_t, 8)
    # the score deviation is exactly ||c|| along both paths
    np.testing.assert_allclose(res["learned_deviation"], 0.05, rtol=1e-4)
    np.testing.assert_allclose(res["optimal_deviation"], 0.05, rtol=1e-4)
    # same start: zero sampling distance at T; the denoisers differ there by exactly c
    np.testing.assert_allclose(res["sampling"][0], 0.0, atol=1e-7)
    np.testing.assert_allclose(res["denoising"][0], 0.05, rtol=1e-4)
    # the learned sampler ends on training points shifted by c (its D is D* + c): it does not memorise,
    # the optimal one does
    nn_l = analysis.nearest_neighbors(res["x_learned"], data, k=2)
    nn_o = analysis.nearest_neighbors(res["x_optimal"], data, k=2)
    assert np.max(nn_o["distance"][:, 0]) < 5e-3
    assert np.min(nn_l["distance"][:, 0]) > 0.02
    assert np.all(res["sampling"][-1] > 0.02)
    path = analysis.plot_score_deviation(tmp_path / "dev.png", res)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_nearest_neighbors_match_brute_force():
    rng = np.random.default_rng(8)
    data = rng.normal(size=(37, 2, 3)).astype(np.float32)
    samples = rng.normal(size=(9, 2, 3)).astype(np.float32)
    samples[4] = data[21]                                             # a memorised sample
    out = analysis.nearest_neighbors(samples, data, k=3, chunk=8)     # 37 = 4 * 8 + 5: ragged tail
    d = np.linalg.norm((samples[:, None] - data[None]).reshape(9, 37, -1).astype(np.float64), axis=-1)
    order = np.argsort(d, axis=1)[:, :3]
    np.testing.assert_array_equal(out["index"], order)
    np.testing.assert_allclose(out["distance"], np.take_along_axis(d, order, 1), rtol=1e-5, atol=1e-6)
    assert out["distance"][4, 0] == 0.0 and out["ratio"][4] == 0.0 and out["index"][4, 0] == 21


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(9)
    ts = np.geomspace(1.0, 1e-3, 12)
    traj = np.cumsum(rng.normal(size=(12, 5, 2)), axis=0)
    den = traj + 0.1
    data = rng.normal(size=(7, 2))
    g = analysis.trajectory_geometry(traj)
    paths = [
        analysis.plot_trajectories_2d(tmp_path / "a" / "traj2d.png", traj, den, data, title="x"),
        analysis.plot_trajectories_1d(tmp_path / "traj1d.png", ts, traj, den),
        analysis.plot_curves(tmp_path / "curves.png", ts, {"chord deviation": g["chord_deviation"],
                                                           "distance to end": g["distance_to_end"]}),
    ]
    for p in paths:
        with open(p, "rb") as f:
            head = f.read()
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) > 2000
    with pytest.raises(ValueError):
        analysis.plot_trajectories_2d(tmp_path / "bad.png", np.zeros((3, 2, 3)))


# ------------------------------------------------------------------ a modal family: blurring diffusion (bdm)
BDM_SHAPE = (4, 4, 1)
PHI_T = math.atan(math.exp(5.0))                 # bdm's default logsnr_min = -10


@functools.lru_cache(maxsize=None)
def bdm():
    return sdes.make("bdm", shape=BDM_SHAPE, sigma_blur_max=3.0)


def bdm_mean_operator(t):
    """M_t = V diag(a_f(t)) V^T (16 x 16) and sigma_t^2 from the closed forms, with scipy's orthonormal DCT."""
    from scipy.fft import dctn, idctn
    lam = np.pi ** 2 * (np.arange(4)[:, None] ** 2 + np.arange(4)[None, :] ** 2) / 16.0
    s_blur = 3.0 * math.sin(math.pi * t / 2) ** 2
    a = math.cos(PHI_T * t) * (0.999 * np.exp(-lam * s_blur ** 2 / 2) + 0.001)
    eye = np.eye(16).reshape(16, 4, 4, 1)
    cols = idctn(a[None, :, :, None] * dctn(eye, axes=(1, 2), norm="ortho"), axes=(1, 2), norm="ortho")
    return cols.reshape(16, 16).T, math.sin(PHI_T * t) ** 2


def test_bdm_edm_view_uses_the_unblurred_mode():
    """For a modal family m_t is that of the zero-frequency mode, a_0(t) = cos(phi_T t) (d_0 = 1, no blur), and
    sigma(t) = tan(phi_T t) its noise-to-signal ratio."""
    sde = bdm()
    ts = np.array([1.0, 0.5, 0.1, 1e-3])
    for t in ts:
        assert analysis.reference_mean_coefficient(sde, t) == pytest.approx(math.cos(PHI_T * t), rel=1e-12)
    traj = np.random.default_rng(0).normal(size=(4, 2) + BDM_SHAPE)
    sig, xhat = analysis.edm_view(sde, ts, traj)
    np.testing.assert_allclose(sig, np.tan(PHI_T * ts), rtol=1e-10)
    np.testing.assert_allclose(xhat, traj / np.cos(PHI_T * ts)[:, None, None, None, None], rtol=1e-12)


def test_mean_shift_identity_rejects_modal_families_before_compiling(monkeypatch):
    import diffusion_jax.analysis.meanshift as meanshift

    def never(*args, **kwargs):
        raise AssertionError("the optimal denoiser / mean shift ran before the family was checked")

    monkeypatch.setattr(meanshift, "_empirical_batch", never)
    monkeypatch.setattr(meanshift, "mean_shift_step", never)
    data, x = np.zeros((3, 16), np.float32), np.zeros((2, 16), np.float32)
    with pytest.raises(ValueError, match="mean coefficient differs across its 16 modes") as err:
        analysis.euler_mean_shift_identity(bdm(), data, x, 0.5, 0.4)
    assert "one scalar law for every data dimension" in str(err.value)
    assert "score_deviation" in str(err.value)                       # what to use instead
    # near t = 0 every a_f(t) is 1 to ~1e-18: the check also looks at T, where the blur is strongest
    with pytest.raises(ValueError, match="mean coefficient differs"):
        analysis.euler_mean_shift_identity(bdm(), data, x, 2e-5, 1e-5)
    analysis.check_scalar_law(family("vp"), (0.5, 0.4))              # one law for every pixel: accepted


def test_bdm_score_deviation_of_the_exact_optimal_denoiser_is_zero():
    """Blurring diffusion, learned model = the optimal denoiser computed another way (the Dirac mixture of the
    training points through exact.mixture_denoiser): both deviations vanish to float32 accuracy, the final
    denoised samples are training points, and D* along the optimal path matches a float64 pixel-space softmax
    softmax_n(-|u - M_t y_n|^2 / (2 sigma_t^2)) y_n built with scipy's DCT."""
    sde = bdm()
    rng = np.random.default_rng(12)
    n = 24
    data = rng.uniform(-1, 1, size=(n,) + BDM_SHAPE).astype(np.float32)
    flat = data.reshape(n, -1)
    dirac = exact.GaussianMixture.create(flat, 0.0)

    def learned(u, t):
        return exact.mixture_denoiser(sde, dirac, u, t)

    u0 = samplers.prior_init(sde, jax.random.PRNGKey(4), 6, BDM_SHAPE)
    res = analysis.score_deviation(sde, learned, data, u0, method="gddim", nfe=12, output="denoiser", chunk=10)
    n_t = len(res["ts"])
    assert res["learned_deviation"].shape == (n_t, 6) and res["traj_optimal"].shape == (n_t, 6) + BDM_SHAPE + (1,)
    # measured: learned 1.0e-6, optimal 8.3e-7, sampling 5.9e-6
    assert np.max(res["learned_deviation"]) < 1e-4 and np.max(res["optimal_deviation"]) < 1e-4
    assert np.max(res["sampling"]) < 1e-3 and np.max(res["denoising"]) < 1e-3
    # the optimal sampler memorises: its final denoised samples (D* at t_min) are training points
    nn = analysis.nearest_neighbors(res["D_optimal"][-1], data, k=2)
    assert np.max(nn["distance"][:, 0]) < 1e-5 and np.max(nn["ratio"]) < 1e-4
    # D*(u*_t, t) along the optimal path against the float64 pixel-space posterior mean
    data64 = flat.astype(np.float64)
    spread = []
    for i, t in enumerate(res["ts"]):
        mt, s2 = bdm_mean_operator(float(t))
        u = res["traj_optimal"][i].reshape(6, 16)
        r = u[:, None, :] - (data64 @ mt.T)[None]
        logit = -0.5 * np.sum(r * r, axis=-1) / s2
        w = np.exp(logit - logsumexp(logit, axis=1, keepdims=True))
        spread.append(np.max(1.0 / np.sum(w * w, axis=1)))
        np.testing.assert_allclose(res["D_optimal"][i].reshape(6, 16), w @ data64, atol=1e-5, rtol=0,
                                   err_msg=f"t={t}")
    assert max(spread) > 3                       # some posteriors spread over several training points
